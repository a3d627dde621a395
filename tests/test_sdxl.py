"""SDXL end to end: the folder loads, prompts encode, sampling equals diffusers' StableDiffusionXLPipeline."""
import json

import pytest
import torch

from models import conditioning
from models.load import load_model, save_diffusers_folder
from models.pipeline import generate

PROMPT, NEG = "J3NN13, close-up selfie in a room background", "asymmetric eyes, distorted face"


def _pipe(folder):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(str(folder))


def test_folder_loads_both_text_encoders(tiny_sdxl_folder):
    sd = load_model(tiny_sdxl_folder)
    assert set(sd.parts) == {"unet", "text_encoder", "text_encoder_2"}
    assert sd.force_zeros_for_empty_prompt and sd.tokenizer_2.pad_token == "!"
    assert type(sd.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    ref = _pipe(tiny_sdxl_folder)
    for ours, theirs in ((sd.text_encoder_2, ref.text_encoder_2), (sd.unet, ref.unet)):
        mine = ours.state_dict()
        for k, v in theirs.state_dict().items():
            assert torch.equal(mine[k], v), k


def test_prompt_encoding_equals_diffusers(tiny_sdxl_folder):
    sd, ref = load_model(tiny_sdxl_folder), _pipe(tiny_sdxl_folder)
    with torch.no_grad():
        got = conditioning.encode(sd, [PROMPT, "a"])
        want, _, pooled, _ = ref.encode_prompt([PROMPT, "a"], do_classifier_free_guidance=False)
        skip2 = conditioning.encode(sd, [PROMPT], clip_skip=2)
        want2, _, _, _ = ref.encode_prompt([PROMPT], do_classifier_free_guidance=False, clip_skip=1)
    assert got["ctx"].shape == (2, 77, 32) and got["pooled"].shape == (2, 32)
    assert (got["ctx"] - want).abs().max() <= 1e-6 and (got["pooled"] - pooled).abs().max() <= 1e-6
    assert (skip2["ctx"] - want2).abs().max() <= 1e-6
    assert (skip2["ctx"] - got["ctx"][:1]).abs().max() > 1e-3  # another layer
    # the second tokenizer pads with "!" (id 0): a different pad token changes the padded positions
    assert (conditioning.tokenize_prompts(sd, ["a"])[1][0, 3:] == 0).all()


@pytest.mark.parametrize("negative,sampler", [(None, "ddim"), (NEG, "ddim"), (None, "euler")])
def test_generate_equals_diffusers_pipeline(tiny_sdxl_folder, negative, sampler):
    import diffusers
    ref = _pipe(tiny_sdxl_folder)
    if sampler == "euler":  # SDXL base's own scheduler
        ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    kw = dict(negative_prompt=negative, num_inference_steps=6, guidance_scale=6.0, height=64, width=48,
              num_images_per_prompt=2)
    want = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    want_z = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    sd = load_model(tiny_sdxl_folder)
    last = []
    got = generate(sd, PROMPT, negative or "", steps=6, guidance_scale=6.0, seed=3, num_images=2, sampler=sampler,
                   height=64, width=48, callback=lambda i, t, x, x0: last.append(x))
    assert got.shape == want.shape == (2, 3, 64, 48)
    assert want.std() > 0.05
    # the random tiny UNet drives the latents to |z| ~ 50-70: float32 rounding, relative
    assert (last[-1] - want_z).abs().max() <= 1e-4 * want_z.abs().max()
    assert (got - want).abs().max() <= 2e-4


def test_time_ids_change_the_output(tiny_sdxl_folder):
    """The size conditioning reaches the UNet (so a wrong time id cannot pass unnoticed)."""
    sd = load_model(tiny_sdxl_folder)
    text = conditioning.encode(sd, [PROMPT])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad():
        for ids in ((64, 64, 0, 0, 64, 64), (128, 64, 32, 0, 64, 64)):
            added = conditioning.added_cond(text, torch.tensor([ids], dtype=torch.float32))
            outs.append(sd.unet(x, 500, text["ctx"], added))
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_folder_round_trips_through_diffusers(tiny_sdxl_folder, tmp_path):
    sd = load_model(tiny_sdxl_folder)
    out = save_diffusers_folder(sd, tmp_path / "copy")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    ref, again = _pipe(tiny_sdxl_folder), _pipe(out)
    with torch.no_grad():
        a = ref.encode_prompt([PROMPT], do_classifier_free_guidance=False)
        b = again.encode_prompt([PROMPT], do_classifier_free_guidance=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert again.tokenizer_2.pad_token == "!"


# ---------------------------------------------------------------- LoRA files

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]


def _sdxl_with_lora(folder, seed=0):
    from lora.inject import inject_lora, lora_layers
    sd = load_model(folder)
    inject_lora(sd.unet, UNET_TARGETS, rank=4, alpha=2.0)
    for te in sd.text_encoders.values():
        inject_lora(te, "text", rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in sd.parts.values():
            for _, layer in lora_layers(m):
                up = layer.lora["default"].up.weight
                up.copy_(torch.randn(up.shape, generator=g) * 0.1)
    return sd


def _outputs(sd_or_pipe, x, ours=True):
    with torch.no_grad():
        if ours:
            text = conditioning.encode(sd_or_pipe, [PROMPT])
        else:
            c, _, p, _ = sd_or_pipe.encode_prompt([PROMPT], do_classifier_free_guidance=False)
            text = {"ctx": c, "pooled": p}
        ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        out = sd_or_pipe.unet(x, 500, text["ctx"], conditioning.added_cond(text, ids)) if ours else \
            sd_or_pipe.unet(x, 500, encoder_hidden_states=text["ctx"],
                            added_cond_kwargs={"text_embeds": text["pooled"], "time_ids": ids}).sample
    return text["ctx"], text["pooled"], out


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_our_sdxl_lora_file_loads_in_diffusers(tiny_sdxl_folder, tmp_path, fmt):
    from safetensors.torch import load_file

    from lora.io import save_lora
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sd = _sdxl_with_lora(tiny_sdxl_folder)
    f = save_lora(sd.parts, tmp_path / "xl.safetensors", fmt=fmt)
    keys = set(load_file(str(f)))
    if fmt == "kohya":  # kohya's SDXL names: LDM paths in the UNet (down_blocks.1.attentions.0 = input_blocks.4.1)
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
        assert "lora_unet_input_blocks_1_0_in_layers_2.alpha" in keys
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
        assert "lora_te2_text_model_encoder_layers_3_mlp_fc2.lora_up.weight" in keys
        assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
    else:
        assert any(k.startswith("text_encoder_2.") for k in keys)
    pipe = _pipe(tiny_sdxl_folder)
    base = _outputs(pipe, x, ours=False)
    pipe.load_lora_weights(str(f))
    want = _outputs(pipe, x, ours=False)
    got = _outputs(sd, x)
    for b, w, g in zip(base, want, got):
        assert (w - b).abs().max() > 1e-3          # the LoRA acts on each: ctx, pooled, UNet output
        assert (g - w).abs().max() <= 1e-5 * max(2.0, w.abs().max())  # float32 rounding of |out| up to ~2.5
    fresh = load_model(tiny_sdxl_folder)        # and ours reads it back
    from lora.io import load_lora
    assert load_lora(fresh.parts, f).fmt == fmt
    for g, r in zip(got, _outputs(fresh, x)):
        assert (g - r).abs().max() <= 1e-6


def test_diffusers_sdxl_peft_file_loads_in_ours(tiny_sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from lora.io import load_lora
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    pipe = _pipe(tiny_sdxl_folder)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False))
    te_cfg = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    inject_adapter_in_model(LoraConfig(**te_cfg), pipe.text_encoder)
    inject_adapter_in_model(LoraConfig(**te_cfg), pipe.text_encoder_2)
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2))
    want = _outputs(pipe, x, ours=False)
    sd = load_model(tiny_sdxl_folder)
    loaded = load_lora(sd.parts, tmp_path / "pytorch_lora_weights.safetensors")
    assert loaded.fmt == "peft" and len(loaded.modules["text_encoder_2"]) == 4 * 3
    for g, w in zip(_outputs(sd, x), want):
        assert (g - w).abs().max() <= 1e-5 * max(2.0, w.abs().max())


def test_sd15_lora_refused_by_sdxl(tiny_diffusers_folder, tiny_sdxl_folder, tmp_path):
    from lora.inject import inject_lora
    from lora.io import LoRAFileError, load_lora, save_lora
    sd15 = load_model(tiny_diffusers_folder)
    inject_lora(sd15.unet, ["to_q"], rank=2)
    f = save_lora({"unet": sd15.unet}, tmp_path / "sd15.safetensors")
    with pytest.raises(LoRAFileError, match="sd15.safetensors"):
        load_lora(load_model(tiny_sdxl_folder).parts, f)


# ---------------------------------------------------------------- training

from test_train import make_cfg  # noqa: E402  (the config test_train.py's runs use; tiny_data: conftest.py)


def _fixed_loss_sdxl(tr):
    """Mean loss over the training set at fixed noise and timesteps, with each sample's time ids."""
    from data.dataset import collate
    g = torch.Generator().manual_seed(123)
    tr.sd.unet.eval()
    total = 0.0
    with torch.no_grad():
        b = collate([tr.ds[j] for j in range(len(tr.ds))])
        z0 = b["latent_mean"] * tr.sd.vae.config.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(100, 900, (z0.shape[0],), generator=g)
        text = tr.text_cache(b["caption"])
        pred = tr.sd.unet(tr.schedule.add_noise(z0, noise, t), t, text["ctx"],
                          conditioning.added_cond(text, b["time_ids"]))
        total += torch.nn.functional.mse_loss(pred, noise).item()
    return total


def test_sdxl_training_learns(tiny_sdxl_folder, tiny_data, tmp_path):
    from training.loop import Trainer
    cfg = make_cfg(tiny_sdxl_folder, tiny_data, tmp_path / "run", "train.max_steps=40", "lora.dropout=0.0",
                   "optim.lr=3e-3", "lora.rank=8", "train.save_every_steps=0", "preview.every_steps=0",
                   "lora=attention_proj_conv", "lora.alpha=8")
    tr = Trainer(cfg)
    first = tr.ds[0]
    assert first["time_ids"].tolist() == [16, 16, 0, 0, 16, 16]  # 16x16 images, uncropped, at 16x16
    assert set(tr.text_cache([first["caption"]])) == {"ctx", "pooled"}
    before = _fixed_loss_sdxl(tr)
    result = tr.run()
    after = _fixed_loss_sdxl(tr)
    assert after < 0.8 * before, (before, after)
    from safetensors import safe_open
    with safe_open(result["lora"], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in f.keys())


def test_sdxl_text_encoder_lora_resumes_exactly_and_loads_in_diffusers(tiny_sdxl_folder, tiny_data, tmp_path):
    """Both text encoders trained (uncached text, tokens through both), killed and resumed: the same LoRA as one
    uninterrupted run; the file carries lora_te1_/lora_te2_ and diffusers applies it as we do."""
    from safetensors.torch import load_file

    from lora.io import load_lora
    from training.loop import Trainer
    common = ["+lora.text_encoder={targets: text, rank: 4, alpha: 4, lr: 1e-3}", "train.max_steps=4",
              "lora.dropout=0.1", "preview.every_steps=0", "train.save_every_steps=0"]
    full = Trainer(make_cfg(tiny_sdxl_folder, tiny_data, tmp_path / "full", *common)).run()
    part = Trainer(make_cfg(tiny_sdxl_folder, tiny_data, tmp_path / "part", *common, "train.stop_after_steps=2")).run()
    assert part["status"] == "stopped"
    Trainer(make_cfg(tiny_sdxl_folder, tiny_data, tmp_path / "part", *common, f"resume={tmp_path / 'part'}")).run()
    a, b = load_file(full["lora"]), load_file(str(tmp_path / "part" / "lora.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("lora_te1_") for k in a) and any(k.startswith("lora_te2_") for k in a)
    te2_up = [k for k in a if k.startswith("lora_te2_") and k.endswith("lora_up.weight")]
    assert te2_up and all(a[k].abs().max() > 0 for k in te2_up)  # the second encoder's LoRA trained
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sd = load_model(tiny_sdxl_folder)
    load_lora(sd.parts, full["lora"])
    pipe = _pipe(tiny_sdxl_folder)
    pipe.load_lora_weights(full["lora"])
    for g, w in zip(_outputs(sd, x), _outputs(pipe, x, ours=False)):
        assert (g - w).abs().max() <= 1e-5 * max(2.0, w.abs().max())


def test_time_ids_follow_the_crop_and_flip(tmp_path):
    """(orig h, orig w, top, left, target h, target w) for a 40x20 image at 16x16: scaled to 32x16, centre crop
    left 8; a random crop's ids name the pixels pixels() returns."""
    import numpy as np
    from PIL import Image

    from data.dataset import ImageCaptionDataset
    from data.folder import Item
    a = np.arange(20 * 40 * 3, dtype=np.uint8).reshape(20, 40, 3)
    Image.fromarray(a).save(tmp_path / "wide.png")
    items = [Item(tmp_path / "wide.png", "x")]
    centre = ImageCaptionDataset(items, resolution=16, size_conditioning=True)
    assert centre[0]["time_ids"].tolist() == [20, 40, 0, 8, 16, 16]
    flipped = ImageCaptionDataset(items, resolution=16, size_conditioning=True, flip_p=1.0)
    assert flipped[0]["time_ids"].tolist() == [20, 40, 0, 8, 16, 16]  # symmetric crop: the same left edge
    from data.images import load_rgb
    scaled = np.asarray(load_rgb(tmp_path / "wide.png").resize((32, 16), Image.LANCZOS))
    lefts = set()
    for seed in range(6):
        ds = ImageCaptionDataset(items, resolution=16, size_conditioning=True, crop="random", seed=seed)
        s = ds[0]
        top, left = int(s["time_ids"][2]), int(s["time_ids"][3])
        want = torch.from_numpy(scaled[top:top + 16, left:left + 16].copy()).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(s["pixels"], want)
        lefts.add(left)
        # the same draw flipped: the crop's left edge measured from the other side of the 32-wide scaled image
        f = ImageCaptionDataset(items, resolution=16, size_conditioning=True, crop="random", seed=seed, flip_p=1.0)[0]
        assert int(f["time_ids"][2]) == top and int(f["time_ids"][3]) == 32 - left - 16
    assert len(lefts) > 1


def test_header_size_follows_exif_rotation(tmp_path):
    """A phone photo stored 40x20 with orientation 6 loads as 20x40: buckets and time ids must agree."""
    from PIL import Image

    from data.images import image_size, load_rgb
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "phone.jpg").size == (20, 40) == image_size(tmp_path / "phone.jpg")


# ---------------------------------------------------------------- single files

def test_single_file_round_trips_and_loads_in_diffusers(tiny_sdxl_folder, tmp_path):
    """Our SDXL single file (sgm names: conditioner.embedders.{0,1}, OpenCLIP's fused in_proj and transposed
    text_projection) reads back identically and through diffusers' from_single_file."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from models.load import save_single_file
    sd = load_model(tiny_sdxl_folder)
    f = save_single_file(sd, tmp_path / "xl.safetensors")
    keys = load_file(str(f))
    assert keys["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (60, 20)
    assert keys["conditioner.embedders.1.model.text_projection"].shape == (20, 32)  # (D, P)
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    again = load_model(f, config=tiny_sdxl_folder)
    for part, mod in sd.parts.items():
        other = again.parts[part].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in mod.state_dict().items()), part
    assert again.tokenizer_2.pad_token == "!" and again.force_zeros_for_empty_prompt
    ref = StableDiffusionXLPipeline.from_single_file(str(f), config=str(tiny_sdxl_folder))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for g, w in zip(_outputs(again, x), _outputs(ref, x, ours=False)):
        assert (g - w).abs().max() <= 1e-5 * max(2.0, w.abs().max())


def test_openclip_names_invert(tiny_sdxl_folder):
    from models import openclip_keys
    from models.text import to_published
    te2 = load_model(tiny_sdxl_folder).text_encoder_2
    pub = to_published(te2.state_dict(), te2)
    oc = openclip_keys.from_hf(pub)
    assert all(torch.equal(v, openclip_keys.to_hf(oc)[k]) for k, v in pub.items())
    with pytest.raises(KeyError, match="resblocks.0.attn.bogus"):
        openclip_keys.to_hf({"transformer.resblocks.0.attn.bogus.weight": torch.zeros(1)})


def test_sdxl_single_file_errors_name_the_file(tiny_sdxl_folder, tiny_diffusers_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    from models.checkpoint import CheckpointError
    from models.load import save_single_file
    f = save_single_file(load_model(tiny_sdxl_folder), tmp_path / "xl.safetensors")
    state = load_file(str(f))
    state.pop("conditioner.embedders.1.model.ln_final.weight")
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)cut.safetensors \(text_encoder_2\).*final_layer_norm.weight"):
        load_model(tmp_path / "cut.safetensors", config=tiny_sdxl_folder)
    with pytest.raises(CheckpointError, match="xl.safetensors"):  # SDXL base's shapes, not this tiny model's
        load_model(f)
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):  # an SD1.5 folder as the SDXL file's config
        load_model(f, config=tiny_diffusers_folder)


def test_fp16_vae_that_asks_for_upcast_decodes_in_fp32(tiny_sdxl_folder, monkeypatch):
    sd = load_model(tiny_sdxl_folder)
    assert sd.vae.config.force_upcast is True and sd.vae.config.scaling_factor == 0.13025
    sd.vae.half()
    seen = []
    real = type(sd.vae).decode_latents
    monkeypatch.setattr(type(sd.vae), "decode_latents",
                        lambda self, z, **kw: (seen.append((self.dtype, z.dtype)), real(self, z, **kw))[1])
    img = generate(sd, PROMPT, steps=2, height=32, width=32)
    assert seen == [(torch.float32, torch.float32)] and sd.vae.dtype == torch.float16
    assert torch.isfinite(img).all()


def test_seed004_recipe_runs_on_a_tiny_sdxl(tiny_sdxl_folder, tiny_data, tmp_path):
    """+experiment=sdxl_dreambooth (seed 004) with its paths and sizes pointed at tiny things: class images made by
    the SDXL base, prior preservation, the run's LoRA in kohya's SDXL names."""
    from hydra import compose, initialize_config_dir

    from training.config import CONF_DIR
    from training.loop import Trainer
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=[
            "+experiment=sdxl_dreambooth", f"model.path={tiny_sdxl_folder}", f"data.path={tiny_data}",
            "data.resolution=16", f"data.class_dir={tmp_path / 'class'}", "data.num_class_images=2",
            "train.max_steps=2", "train.precision=fp32", "preview.every_steps=0", f"run_dir={tmp_path / 'run'}",
            "device=cpu"])
    assert (cfg.lora.rank, cfg.optim.lr, cfg.train.grad_accum, cfg.data.resolution) == (4, 1e-4, 4, 16)
    result = Trainer(cfg).run()
    assert result["status"] == "finished" and len(list((tmp_path / "class").glob("gen_*.png"))) == 2
    from safetensors import safe_open
    with safe_open(result["lora"], "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in f.keys())


def test_sample_py_with_an_sdxl_lora(tiny_sdxl_folder, tmp_path):
    """sample.py on an SDXL base with a LoRA file that adapts all three parts: the PNG is what generate() gives."""
    import numpy as np
    from PIL import Image

    import sample
    from lora.io import load_lora, save_lora
    from test_sample import _cfg
    f = save_lora(_sdxl_with_lora(tiny_sdxl_folder).parts, tmp_path / "xl.safetensors")
    cfg = _cfg([f"model.path={tiny_sdxl_folder}", f"out_dir={tmp_path / 'out'}", "steps=3", "height=32", "width=32",
                f'prompts=["{PROMPT}"]', "guidance_scale=5.0", f"loras=[{{path: {f}, weight: 1.0}}]",
                "original_size=[64,48]", "crop_top_left=[4,2]"])
    sample.run(cfg)
    ref = load_model(tiny_sdxl_folder)
    load_lora(ref.parts, f)
    img = generate(ref, PROMPT, cfg.negative_prompt, steps=3, guidance_scale=5.0, seed=cfg.seed, height=32, width=32,
                   original_size=(64, 48), crop_top_left=(4, 2))
    png = torch.tensor(np.array(Image.open(tmp_path / "out" / "000_00.png"))).permute(2, 0, 1) / 255
    assert (png - img[0]).abs().max() <= 1 / 255 + 1e-6
    plain = generate(load_model(tiny_sdxl_folder), PROMPT, cfg.negative_prompt, steps=3, guidance_scale=5.0,
                     seed=cfg.seed, height=32, width=32)
    assert (plain - img).abs().max() > 0.02  # the LoRA changed the picture
    uncond = generate(ref, PROMPT, cfg.negative_prompt, steps=3, guidance_scale=5.0, seed=cfg.seed, height=32, width=32)
    assert (uncond - img).abs().max() > 3 / 255  # and sample.py passed the size conditioning on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
def test_cuda_graphed_sdxl_sampling_equals_eager(tiny_sdxl_folder):
    """The sampling graph records SDXL's pooled text and time ids as static inputs too (models/cuda_graph.py)."""
    sd = load_model(tiny_sdxl_folder, device="cuda")
    kw = dict(steps=6, guidance_scale=5.0, seed=3, num_images=2, height=32, width=32)
    a = generate(sd, PROMPT, NEG, cuda_graph=False, **kw)
    b = generate(sd, PROMPT, NEG, cuda_graph=True, **kw)
    c = generate(sd, "another prompt", NEG, cuda_graph=True, **kw)  # the same graph, other pooled embeddings
    d = generate(sd, "another prompt", NEG, cuda_graph=False, **kw)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(c, d, atol=1e-5)
    assert (a - c).abs().max() > 1e-2
    # offloaded (the model in host memory): each prompt's UNet stage records its own graph and drops it after
    from models.cuda_graph import graphed_unet
    host = load_model(tiny_sdxl_folder)
    e = generate(host, PROMPT, NEG, cuda_graph=True, offload="cuda", **kw)
    f = generate(host, "another prompt", NEG, cuda_graph=True, offload="cuda", **kw)
    assert torch.allclose(a, e, atol=1e-5) and torch.allclose(d, f, atol=1e-5)
    assert not graphed_unet(host.unet).graphs and host.unet.conv_in.weight.device.type == "cpu"


def test_sdxl_bad_inputs_are_named(tiny_sdxl_folder, tiny_diffusers_folder, tmp_path):
    """An SDXL folder without its second text encoder, and an SDXL LoRA given to SD1.5, each name what is wrong."""
    import shutil

    from lora.io import LoRAFileError, load_lora, save_lora
    cut = tmp_path / "no_te2"
    shutil.copytree(tiny_sdxl_folder, cut)
    shutil.rmtree(cut / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="no_te2 has an SDXL UNet but no text_encoder_2/"):
        load_model(cut)
    f = save_lora(_sdxl_with_lora(tiny_sdxl_folder).parts, tmp_path / "xl.safetensors")
    with pytest.raises(LoRAFileError, match="xl.safetensors.*SDXL LoRA"):
        load_lora(load_model(tiny_diffusers_folder).parts, f)


def test_size_and_crop_conditioning_at_inference_equal_diffusers(tiny_sdxl_folder):
    """original_size / crops_coords_top_left / target_size as diffusers takes them (SDXL's micro-conditioning)."""
    ref = _pipe(tiny_sdxl_folder)
    cond = dict(original_size=(128, 96), target_size=(64, 48))
    want = ref(PROMPT, negative_prompt=NEG, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
               crops_coords_top_left=(8, 4), generator=torch.Generator().manual_seed(1), output_type="pt",
               **cond).images
    sd = load_model(tiny_sdxl_folder)
    got = generate(sd, PROMPT, NEG, steps=4, guidance_scale=5.0, seed=1, height=32, width=32, crop_top_left=(8, 4),
                   **cond)
    plain = generate(sd, PROMPT, NEG, steps=4, guidance_scale=5.0, seed=1, height=32, width=32)
    assert (got - want).abs().max() <= 2e-4
    assert (got - plain).abs().max() > 1e-3
