"""Loading real checkpoint layouts: diffusers folders, single-file LDM files, separate VAEs; and bad files."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import ldm_keys
from models.checkpoint import CheckpointError, read_state_dict
from models.load import load_model, load_vae, save_diffusers_folder, save_single_file, to_ldm_state_dict
from models.text import tokenize


def _same_state(a: torch.nn.Module, b: dict):
    sa = a.state_dict()
    assert set(sa) == set(b)
    for k in sa:
        assert torch.equal(sa[k], b[k]), k


def _outputs(sd, prompt="J3NN13, wink, close-up"):
    g = torch.Generator().manual_seed(0)
    ids = tokenize(sd.tokenizer, [prompt])
    with torch.no_grad():
        ctx = sd.text_encoder(ids).last_hidden_state
        x = torch.randn(1, 4, 8, 8, generator=g)
        eps = sd.unet(x, 500, ctx)
        img = sd.vae.decode(x)
    return ctx, eps, img


def test_diffusers_folder_loads_identical(tiny_diffusers_folder):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_diffusers_folder))
    sd = load_model(tiny_diffusers_folder)
    _same_state(sd.unet, pipe.unet.state_dict())
    _same_state(sd.vae, pipe.vae.state_dict())
    _same_state(sd.text_encoder, pipe.text_encoder.state_dict())
    assert sd.scheduler_config["beta_schedule"] == "scaled_linear"
    ctx, eps, img = _outputs(sd)
    with torch.no_grad():
        ids = tokenize(sd.tokenizer, ["J3NN13, wink, close-up"])
        assert torch.equal(ids, pipe.tokenizer(["J3NN13, wink, close-up"], padding="max_length", max_length=77,
                                               truncation=True, return_tensors="pt").input_ids)
        assert torch.allclose(eps, pipe.unet(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
                                             500, encoder_hidden_states=ctx).sample, atol=1e-5)


def test_dtype_and_fp16_variant(tiny_diffusers_folder, tmp_path):
    sd = load_model(tiny_diffusers_folder, dtype="fp16")
    assert sd.unet.dtype == torch.float16 and sd.vae.dtype == torch.float16
    # A folder that only has the fp16 variant files (as many hub repos do) loads too.
    folder = tmp_path / "fp16only"
    shutil.copytree(tiny_diffusers_folder, folder)
    for sub, stem in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        f = folder / sub / f"{stem}.safetensors"
        save_file({k: v.half() for k, v in load_file(str(f)).items()}, str(folder / sub / f"{stem}.fp16.safetensors"))
        f.unlink()
    half = load_model(folder, variant="fp16")
    assert torch.equal(half.unet.conv_in.weight, sd.unet.conv_in.weight.float())
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tiny_diffusers_folder, dtype="fp8")


def test_single_file_round_trip_and_diffusers_reads_it(tiny_diffusers_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    sd = load_model(tiny_diffusers_folder)
    f = save_single_file(sd, tmp_path / "tiny.safetensors")
    keys = set(load_file(str(f)))
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in keys       # upsampler of UpBlock2D
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in keys  # reversed decoder levels
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    back = load_model(f, config=tiny_diffusers_folder)
    for a, b in [(back.unet, sd.unet), (back.vae, sd.vae), (back.text_encoder, sd.text_encoder)]:
        _same_state(a, b.state_dict())
    # An independent key map: diffusers' from_single_file reads our file to the same weights and outputs.
    pipe = StableDiffusionPipeline.from_single_file(str(f), config=str(tiny_diffusers_folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    _same_state(sd.unet, pipe.unet.state_dict())
    _same_state(sd.vae, pipe.vae.state_dict())
    ctx, eps, img = _outputs(sd)
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(pipe.vae.decode(x).sample, img, atol=1e-5)
        assert torch.allclose(pipe.unet(x, 500, encoder_hidden_states=ctx).sample, eps, atol=1e-5)


def test_old_text_names_and_ema_and_schedule_buffers(tiny_diffusers_folder, tmp_path):
    sd = load_model(tiny_diffusers_folder)
    state = to_ldm_state_dict(sd)
    # Old SD1.x files: no `text_model.` level; plus the schedule buffers and an EMA copy of the UNet.
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in state.items()}
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    ema = {ldm_keys.ema_key(k): v + 1.0 for k, v in state.items() if k.startswith(ldm_keys.UNET_PREFIX)}
    save_file({**state, **ema, "model_ema.decay": torch.tensor(0.999)}, str(tmp_path / "old.safetensors"))
    plain = load_model(tmp_path / "old.safetensors", config=tiny_diffusers_folder)
    _same_state(plain.text_encoder, sd.text_encoder.state_dict())
    _same_state(plain.unet, sd.unet.state_dict())
    with_ema = load_model(tmp_path / "old.safetensors", config=tiny_diffusers_folder, use_ema=True)
    assert torch.equal(with_ema.unet.conv_in.weight, sd.unet.conv_in.weight + 1.0)


def test_separate_vae_single_file_and_folder(tiny_diffusers_folder, tmp_path):
    sd = load_model(tiny_diffusers_folder)
    state = to_ldm_state_dict(sd)
    # A single file without VAE weights needs vae=...
    nov = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    save_file(nov, str(tmp_path / "novae.safetensors"))
    with pytest.raises(CheckpointError, match="no VAE weights"):
        load_model(tmp_path / "novae.safetensors", config=tiny_diffusers_folder)
    # An LDM-named VAE file (like vae-ft-mse-840000-ema-pruned.safetensors), scaled to tell it apart.
    vae_ldm = {k.removeprefix("first_stage_model."): v * 2 for k, v in state.items()
               if k.startswith("first_stage_model.")}
    save_file(vae_ldm, str(tmp_path / "vae.safetensors"))
    vcfg = tiny_diffusers_folder / "vae" / "config.json"
    vae = load_vae(tmp_path / "vae.safetensors", config=vcfg)
    assert torch.equal(vae.decoder.conv_in.weight, sd.vae.decoder.conv_in.weight * 2)
    # load_model(vae=folder) replaces the model's own VAE.
    sd2 = load_model(tmp_path / "novae.safetensors", config=tiny_diffusers_folder, vae=tiny_diffusers_folder / "vae")
    _same_state(sd2.vae, sd.vae.state_dict())


def test_save_diffusers_folder_round_trip(tiny_diffusers_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    sd = load_model(tiny_diffusers_folder)
    out = save_diffusers_folder(sd, tmp_path / "copy")
    back = load_model(out)
    _same_state(back.unet, sd.unet.state_dict())
    _same_state(back.text_encoder, sd.text_encoder.state_dict())
    pipe = StableDiffusionPipeline.from_pretrained(str(out))  # diffusers reads what we write
    _same_state(sd.unet, pipe.unet.state_dict())
    _same_state(sd.text_encoder, pipe.text_encoder.state_dict())


# ---------------------------------------------------------------- bad input

@pytest.fixture
def ldm_file(tiny_diffusers_folder, tmp_path):
    state = to_ldm_state_dict(load_model(tiny_diffusers_folder))
    return state, tmp_path


def _write(state, path):
    save_file(state, str(path))
    return path


def test_renamed_missing_and_misshaped_keys_are_named(ldm_file, tiny_diffusers_folder):
    state, tmp = ldm_file
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    renamed = dict(state)
    renamed[k.replace("proj_in", "proj_inn")] = renamed.pop(k)
    with pytest.raises(CheckpointError, match=r"missing keys: model\.diffusion_model\.input_blocks\.1\.1\.proj_in"):
        load_model(_write(renamed, tmp / "renamed.safetensors"), config=tiny_diffusers_folder)
    extra = dict(state)
    extra["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys.*bogus"):
        load_model(_write(extra, tmp / "extra.safetensors"), config=tiny_diffusers_folder)
    shape = dict(state)
    shape[k] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(CheckpointError, match=r"proj_in\.weight \(3, 3, 1, 1\) vs model"):
        load_model(_write(shape, tmp / "shape.safetensors"), config=tiny_diffusers_folder)
    # The default (full-size SD1.5) architecture against a tiny file: the keys it lacks, named, and a hint.
    with pytest.raises(CheckpointError, match="missing keys: model.diffusion_model.input_blocks.4.1.*architecture"):
        load_model(tmp / "renamed.safetensors".replace("renamed", "shape"))


def test_truncated_file_and_wrong_kinds_of_file(ldm_file, tiny_diffusers_folder):
    state, tmp = ldm_file
    f = _write(state, tmp / "full.safetensors")
    data = f.read_bytes()
    (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*truncated or corrupt"):
        load_model(tmp / "cut.safetensors", config=tiny_diffusers_folder)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1)}
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        load_model(_write(lora, tmp / "lora.safetensors"))
    with pytest.raises(CheckpointError, match="xl.safetensors has no model.diffusion_model"):  # SDXL's text alone
        load_model(_write({"conditioner.embedders.0.x": torch.zeros(1)}, tmp / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="v2.safetensors has no model.diffusion_model"):  # SD2's text alone
        load_model(_write({"cond_stage_model.model.x": torch.zeros(1)}, tmp / "v2.safetensors"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp / "nope.safetensors")


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_code_running_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert not (tmp_path / "PWNED").exists()
    # A plain tensor pickle is fine and is unwrapped from LDM's {"state_dict": ...}.
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.ckpt")
    assert torch.equal(read_state_dict(tmp_path / "ok.ckpt")["w"], torch.ones(2))


def test_missing_folder_parts_and_hub_offline(tiny_diffusers_folder, tmp_path, monkeypatch):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_diffusers_folder, folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="missing text_encoder/"):
        load_model(folder)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["class_embed_type"] = "timestep"
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    shutil.copytree(tiny_diffusers_folder / "text_encoder", folder / "text_encoder")
    with pytest.raises(ValueError, match="class_embed_type"):
        load_model(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="diffusers folder: model_index.json"):
        load_model("someone/not-a-local-model")
