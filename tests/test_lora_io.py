"""LoRA files: ours load in diffusers, diffusers/peft files load in ours, formats round-trip, bad files refused."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora.inject import inject_lora, lora_layers, remove_lora
from lora.io import LoRAFileError, load_lora, save_lora
from models import ldm_keys
from models.load import load_model
from models.text import tokenize

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"]  # Linear, 1x1, 3x3


def _with_lora(folder, seed=0, alpha=2.0):
    sd = load_model(folder)
    inject_lora(sd.unet, UNET_TARGETS, rank=4, alpha=alpha)
    inject_lora(sd.text_encoder, "text", rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (sd.unet, sd.text_encoder):
            for _, layer in lora_layers(m):
                up = layer.lora["default"].up.weight
                up.copy_(torch.randn(up.shape, generator=g) * 0.1)
    return sd


def _parts(sd):
    return {"unet": sd.unet, "text_encoder": sd.text_encoder}


def _run(sd_or_pipe, ids, x, diffusers=False):
    with torch.no_grad():
        ctx = sd_or_pipe.text_encoder(ids).last_hidden_state
        out = sd_or_pipe.unet(x, 500, encoder_hidden_states=ctx).sample if diffusers else sd_or_pipe.unet(x, 500, ctx)
    return ctx, out


@pytest.fixture
def probe(tiny_diffusers_folder):
    sd = load_model(tiny_diffusers_folder)
    return tokenize(sd.tokenizer, ["J3NN13, wink, close-up"]), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def _pipe(folder):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)


def test_our_kohya_file_loads_in_diffusers(tiny_diffusers_folder, tmp_path, probe):
    ids, x = probe
    sd = _with_lora(tiny_diffusers_folder)
    f = save_lora(_parts(sd), tmp_path / "ours.safetensors", metadata={"ss_output_name": "ours"})
    keys = set(load_file(str(f)))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_resnets_0_conv1.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert load_file(str(f))["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    pipe = _pipe(tiny_diffusers_folder)
    base_ctx, base_out = _run(pipe, ids, x, diffusers=True)
    pipe.load_lora_weights(str(f))
    ctx_ref, out_ref = _run(pipe, ids, x, diffusers=True)
    ctx, out = _run(sd, ids, x)
    assert (out - base_out).abs().max() > 1e-2 and (ctx - base_ctx).abs().max() > 1e-3  # the LoRA acts
    assert (ctx - ctx_ref).abs().max() <= 1e-5
    assert (out - out_ref).abs().max() <= 1e-5


def test_diffusers_peft_file_loads_in_ours(tiny_diffusers_folder, tmp_path, probe):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    ids, x = probe
    pipe = _pipe(tiny_diffusers_folder)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, init_lora_weights=False))
    # peft directly, not transformers' add_adapter: that one refuses peft releases older than the
    # transformers release wants (5.24 asks for peft >= 0.22, which the index did not have on 2026-11-24).
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"],
                                       init_lora_weights=False), pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    f = tmp_path / "pytorch_lora_weights.safetensors"
    ctx_ref, out_ref = _run(pipe, ids, x, diffusers=True)
    sd = load_model(tiny_diffusers_folder)
    loaded = load_lora(_parts(sd), f)
    assert loaded.fmt == "peft" and len(loaded.modules["text_encoder"]) == 3 * 3
    ctx, out = _run(sd, ids, x)
    assert (ctx - ctx_ref).abs().max() <= 1e-5
    assert (out - out_ref).abs().max() <= 1e-5


def test_diffusers_kohya_conversion_reads_back(tiny_diffusers_folder, tmp_path, probe):
    """diffusers' own kohya writer (convert_state_dict_to_kohya) is an independent name map."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    ids, x = probe
    sd = _with_lora(tiny_diffusers_folder, alpha=4.0)  # alpha = rank: diffusers' writer assumes it
    peft_sd = {}
    for name, layer in lora_layers(sd.unet):
        a = layer.lora["default"]
        peft_sd[f"unet.{name}.lora_A.weight"], peft_sd[f"unet.{name}.lora_B.weight"] = a.down.weight, a.up.weight
    kohya = convert_state_dict_to_kohya(peft_sd)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "dk.safetensors"))
    ctx, want = _run(sd, ids, x)
    fresh = load_model(tiny_diffusers_folder)
    load_lora({"unet": fresh.unet}, tmp_path / "dk.safetensors")
    with torch.no_grad():
        assert (fresh.unet(x, 500, ctx) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("fmt", ["kohya", "peft", "diffusers_legacy"])
def test_every_format_round_trips(tiny_diffusers_folder, tmp_path, probe, fmt):
    ids, x = probe
    sd = _with_lora(tiny_diffusers_folder)
    f = save_lora(_parts(sd), tmp_path / f"{fmt}.safetensors", fmt=fmt)
    ctx, want = _run(sd, ids, x)
    fresh = load_model(tiny_diffusers_folder)
    loaded = load_lora(_parts(fresh), f, adapter="default")
    assert loaded.fmt == fmt
    got_ctx, got = _run(fresh, ids, x)
    assert (got_ctx - ctx).abs().max() <= 1e-6 and (got - want).abs().max() <= 1e-5
    if fmt == "kohya":  # bit-exact: the same A, B and alpha
        for name, layer in lora_layers(sd.unet):
            a, b = layer.lora["default"], fresh.unet.get_submodule(name).lora["default"]
            assert torch.equal(a.down.weight, b.down.weight) and torch.equal(a.up.weight, b.up.weight)
            assert a.alpha == b.alpha


def test_ldm_named_kohya_file_and_two_loras_with_weights(tiny_diffusers_folder, tmp_path, probe):
    ids, x = probe
    one, two = _with_lora(tiny_diffusers_folder, seed=1), _with_lora(tiny_diffusers_folder, seed=2)
    f1 = save_lora(_parts(one), tmp_path / "one.safetensors")
    f2 = save_lora(_parts(two), tmp_path / "two.safetensors")
    # Rewrite f2 with LDM module names (lora_unet_input_blocks_1_1_proj_in), as some trainers do.
    unet = load_model(tiny_diffusers_folder).unet
    names = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    to_ldm = ldm_keys.map_keys([n + ".weight" for n in names], ldm_keys.unet_prefix_map(unet.config), "")
    kohya_to_ldm = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"):
                    "lora_unet_" + v.removesuffix(".weight").replace(".", "_") for k, v in to_ldm.items()}
    renamed = {}
    for k, v in load_file(str(f2)).items():
        mod, _, rest = k.partition(".")
        renamed[kohya_to_ldm.get(mod, mod) + "." + rest] = v
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in renamed)
    save_file(renamed, str(tmp_path / "two_ldm.safetensors"))
    # Expected: layer-wise weighted sum 0.5 * LoRA one + 1.0 * LoRA two, computed by merging by hand.
    ref = load_model(tiny_diffusers_folder)
    for src, w in [(one, 0.5), (two, 1.0)]:
        for part in ("unet", "text_encoder"):
            for name, layer in lora_layers(getattr(src, part)):
                a = layer.lora["default"]
                with torch.no_grad():
                    getattr(ref, part).get_submodule(name).weight += w * a.delta_weight()
    want_ctx, want = _run(ref, ids, x)
    sd = load_model(tiny_diffusers_folder)
    load_lora(_parts(sd), f1, multiplier=0.5)
    load_lora(_parts(sd), tmp_path / "two_ldm.safetensors", multiplier=1.0)
    got_ctx, got = _run(sd, ids, x)
    assert (got_ctx - want_ctx).abs().max() <= 1e-5 and (got - want).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="already in use"):
        load_lora(_parts(sd), f1, multiplier=0.5)
    # A file stem that is no usable adapter name gets a prefix.
    (tmp_path / "eval.safetensors").write_bytes(f1.read_bytes())
    assert load_lora(_parts(sd), tmp_path / "eval.safetensors").adapter == "lora_eval"


def test_cross_model_transfer_and_merged_checkpoint(tiny_diffusers_folder, tmp_path, probe):
    """Experiment 4: a LoRA trained on one SD1.x base applied to another; then merged and saved."""
    from conftest import randomize
    from models.load import save_single_file
    ids, x = probe
    lora_file = save_lora(_parts(_with_lora(tiny_diffusers_folder)), tmp_path / "subject.safetensors")
    other = load_model(tiny_diffusers_folder)
    randomize(other.unet, seed=7)  # a different base of the same architecture
    _, other_base = _run(other, ids, x)
    load_lora(_parts(other), lora_file)
    ctx, with_lora = _run(other, ids, x)
    assert (with_lora - other_base).abs().max() > 1e-2
    remove_lora(other.unet, merge=True)
    remove_lora(other.text_encoder, merge=True)
    f = save_single_file(other, tmp_path / "merged.safetensors")
    merged = load_model(f, config=tiny_diffusers_folder)
    _, out = _run(merged, ids, x)
    assert (out - with_lora).abs().max() <= 5e-5


def test_bad_lora_files_are_refused(tiny_diffusers_folder, tmp_path):
    sd = _with_lora(tiny_diffusers_folder)
    good = load_file(str(save_lora(_parts(sd), tmp_path / "good.safetensors")))
    fresh = load_model(tiny_diffusers_folder)
    parts = _parts(fresh)
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}

    def refused(state, name, match):
        save_file(state, str(tmp_path / name))
        with pytest.raises(LoRAFileError, match=match):
            load_lora(parts, tmp_path / name)

    nan = dict(good)
    k = next(k for k in nan if k.endswith("lora_up.weight"))
    nan[k] = nan[k].clone()
    nan[k][0, 0] = float("nan")
    refused(nan, "nan.safetensors", "NaN or inf values in lora_")
    xl = dict(good)
    xl["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
    xl["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 4)
    refused(xl, "xl.safetensors", "lacks: lora_te2_.*SDXL")
    shape = dict(good)
    shape["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = torch.zeros(4, 32, 1, 1)
    refused(shape, "shape.safetensors", "shapes do not fit.*down_blocks_0_resnets_0_conv1")
    extra = dict(good)
    extra["lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a"] = torch.zeros(1)
    refused(extra, "extra.safetensors", "not LoRA weights.*hada_w1_a")
    refused({"weight": torch.zeros(1)}, "none.safetensors", "no LoRA keys")
    # Nothing was changed by the refused files.
    assert not list(lora_layers(fresh.unet))
    assert all(torch.equal(v, before[k]) for k, v in fresh.unet.state_dict().items())
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:100])
    with pytest.raises(Exception, match="cut.safetensors.*truncated or corrupt"):
        load_lora(parts, tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(parts, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        save_lora(_parts(sd), tmp_path / "x.safetensors", fmt="lycoris")


@pytest.mark.parametrize("fmt", ["peft", "diffusers_legacy"])
def test_our_diffusers_format_files_load_in_diffusers(tiny_diffusers_folder, tmp_path, probe, fmt):
    """alpha != rank: the scale is folded into B, so a reader that assumes alpha = rank gets our delta."""
    ids, x = probe
    sd = _with_lora(tiny_diffusers_folder, alpha=2.0)
    f = save_lora(_parts(sd), tmp_path / f"{fmt}.safetensors", fmt=fmt)
    pipe = _pipe(tiny_diffusers_folder)
    pipe.load_lora_weights(str(f))
    ctx_ref, out_ref = _run(pipe, ids, x, diffusers=True)
    ctx, out = _run(sd, ids, x)
    assert (ctx - ctx_ref).abs().max() <= 1e-5
    assert (out - out_ref).abs().max() <= 1e-5
