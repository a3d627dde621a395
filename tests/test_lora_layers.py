"""LoRA layers and the walker: equal to peft's LoRA on diffusers' UNet; merging; adapters; training."""
import math

import pytest
import torch
from torch import nn

from conftest import UNET_CONFIGS, diffusers_unet
from lora.inject import (PRESETS, inject_lora, lora_layers, lora_parameters, merge_lora, remove_lora,
                         set_enabled, set_multiplier, unmerge_lora)
from lora.layers import LoRALayer
from models.checkpoint import load_strict
from models.unet import UNet2DConditionModel, UNetConfig
from test_unet import inputs

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"]  # Linear, 1x1, 3x3


def ours_from(ref):
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    load_strict(ours, ref.state_dict(), "diffusers UNet")
    return ours.eval()


def random_b(model, seed=0, adapter=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name, a in layer.lora.items():
                if adapter is None or name == adapter:
                    a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g) * 0.1)


@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_on_diffusers_unet(rslora):
    from peft import LoraConfig
    ref = diffusers_unet("sd15")
    ours = ours_from(ref)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                               use_rslora=rslora))
    report = inject_lora(ours, TARGETS, rank=4, alpha=8, rslora=rslora)
    peft_modules = {n for n, m in ref.named_modules() if hasattr(m, "lora_A")}
    assert set(report.modules) == peft_modules
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            m = ref.get_submodule(name)
            layer.lora["default"].down.weight.copy_(m.lora_A["default"].weight)
            layer.lora["default"].up.weight.copy_(m.lora_B["default"].weight)
            assert m.lora_B["default"].weight.abs().max() > 0  # B non-zero: the LoRA does something
        x, t, ctx, _ = inputs("sd15")
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
        ref.disable_adapters()
        base = ref(x, t, encoder_hidden_states=ctx).sample
    assert (got - base).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-5


def test_parameter_counts_full_sd15_equal_peft():
    from diffusers import UNet2DConditionModel as Ref
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel
    from models.text import SD15_TEXT_CONFIG
    cases = [(PRESETS["attention"], 32, 16, 6_377_472), (PRESETS["attention_proj_conv"], 16, 32, 12_374_016)]
    for targets, r, a, expected in cases:
        with torch.device("meta"):
            ours, ref = UNet2DConditionModel(), Ref(cross_attention_dim=768)
        assert inject_lora(ours, targets, rank=r, alpha=a).num_parameters == expected
        ref.add_adapter(LoraConfig(r=r, lora_alpha=a, target_modules=targets))
        assert sum(p.numel() for n, p in ref.named_parameters() if "lora_" in n) == expected
    with torch.device("meta"):
        ours = UNet2DConditionModel()
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    assert len(inject_lora(ours, "kohya", rank=4).modules) == 192  # kohya's default SD1.5 UNet modules
    assert len(inject_lora(te, "text", rank=4).modules) == 72


def _layer(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(6, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 6) if kind == "linear" else torch.randn(2, 6, 7, 7)
    return base, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_two_adapters_weighted_sum_equals_explicit_weight(kind):
    base, x = _layer(kind)
    layer = LoRALayer(base)
    a = layer.add_adapter("a", rank=2, alpha=1.0)
    b = layer.add_adapter("b", rank=3, alpha=6.0, init="gaussian")
    for ad in (a, b):
        nn.init.normal_(ad.up.weight)
    a.multiplier, b.multiplier = 0.5, 1.0
    # Worked out independently: W' = W + 0.5 * (1/2) B_a A_a + 1.0 * (6/3) B_b A_b
    def mat(ad):
        up = ad.up.weight.reshape(ad.up.weight.shape[0], -1)
        down = ad.down.weight.reshape(ad.rank, -1)
        return (up @ down).reshape(base.weight.shape)
    w = base.weight + 0.5 * 0.5 * mat(a) + 1.0 * 2.0 * mat(b)
    want = nn.functional.linear(x, w, base.bias) if kind == "linear" else \
        nn.functional.conv2d(x, w, base.bias, stride=2, padding=1)
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-5)
        w0 = base.weight.clone()
        layer.merge()
        assert torch.allclose(base.weight, w, atol=1e-6)
        assert torch.allclose(layer(x), want, atol=1e-5)  # merged adapters are not applied twice
        layer.unmerge()
        assert torch.equal(base.weight, w0)  # restored bit for bit


@pytest.mark.parametrize("kind", ["linear", "conv_cl", "conv"])
def test_lora_sum_runs_inside_the_up_matmul(kind):
    """add_to (the layer's path) adds the LoRA into the base output inside one addmm for Linear and for
    channels_last convs: no separate layer-sized add. Values and gradients equal base + up(down(x)) * s."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    base, x = _layer("linear" if kind == "linear" else "conv")
    if kind == "conv_cl":
        base, x = base.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    layer = LoRALayer(base).train()
    a = layer.add_adapter("a", rank=3, alpha=5.0)
    b = layer.add_adapter("b", rank=2, alpha=1.0)
    for ad in (a, b):
        nn.init.normal_(ad.up.weight)
    a.multiplier = 0.7
    x = x.requires_grad_()
    with Ops() as ops:
        y = layer(x)
    fused = kind != "conv"
    assert ("aten.addmm" in ops.seen) == fused and (ops.seen.count("aten.add") == 0) == fused, ops.seen
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, a.up.weight, a.down.weight, b.up.weight], gy)
    # the plain formula, worked out by hand: base(x) + sum_a m_a * (alpha_a / r_a) * B_a A_a x
    def delta(ad, m, s):
        return ad.up(ad.down(x)) * (m * s)
    want_y = base(x) + delta(a, 0.7, 5.0 / 3) + delta(b, 1.0, 0.5)
    want = torch.autograd.grad(want_y, [x, a.up.weight, a.down.weight, b.up.weight], gy)
    assert torch.allclose(y, want_y, atol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-4)


def test_merge_unmerge_remove_on_unet():
    ref = diffusers_unet("sd15")
    ours = ours_from(ref)
    x, t, ctx, _ = inputs("sd15")
    with torch.no_grad():
        base_out = ours(x, t, ctx)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    inject_lora(ours, TARGETS, rank=4, alpha=2, adapter="a")
    inject_lora(ours, ["to_q", "to_v"], rank=2, alpha=2, adapter="b")
    random_b(ours, 1)
    set_multiplier(ours, "a", 0.5)
    with torch.no_grad():
        lora_out = ours(x, t, ctx)
        merge_lora(ours)
        merged_out = ours(x, t, ctx)
        unmerge_lora(ours)
        again = ours(x, t, ctx)
        set_enabled(ours, False)
        disabled = ours(x, t, ctx)
        set_enabled(ours, True)
    assert (lora_out - base_out).abs().max() > 1e-2
    # merging changes the order of float additions (W+dW)x vs Wx+dWx: equal to fp32 rounding
    assert (merged_out - lora_out).abs().max() <= 5e-5
    assert (again - lora_out).abs().max() <= 5e-5
    assert torch.equal(disabled, base_out)  # unmerge restores the kept base weights exactly
    remove_lora(ours)
    assert not any(isinstance(m, LoRALayer) for m in ours.modules())
    after = ours.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_remove_without_merge_is_bit_exact_and_merge_refuses_nan():
    ours = ours_from(diffusers_unet("sd15"))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    inject_lora(ours, TARGETS, rank=4)
    remove_lora(ours, merge=False)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    inject_lora(ours, ["to_q"], rank=2)
    name, layer = next(lora_layers(ours))
    with torch.no_grad():
        layer.lora["default"].up.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        merge_lora(ours)


def test_only_lora_parameters_train():
    ours = ours_from(diffusers_unet("sd15"))
    inject_lora(ours, TARGETS, rank=4, alpha=4, dropout=0.1)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    assert len(trainable) == len(list(lora_parameters(ours)))
    base_before = {n: p.clone() for n, p in ours.named_parameters() if not p.requires_grad}
    lora_before = {n: p.clone() for n, p in ours.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    ours.train()
    x, t, ctx, _ = inputs("sd15")
    ours(x, t, ctx).square().mean().backward()
    opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in ours.named_parameters() if n in base_before)
    changed = [n for n, p in ours.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])]
    assert any(n.endswith("up.weight") for n in changed)


def test_lora_stays_fp32_on_half_base():
    base = nn.Linear(8, 4).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALayer(base)
    a = layer.add_adapter("default", rank=2)
    nn.init.normal_(a.up.weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and a.up.weight.dtype == torch.float32
    y.float().sum().backward()
    assert a.up.weight.grad.dtype == torch.float32 and base.weight.grad is None


def test_dropouts_only_in_training():
    base, x = _layer("linear")
    layer = LoRALayer(base)
    a = layer.add_adapter("default", rank=4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    nn.init.normal_(a.up.weight)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
        layer.train()
        torch.manual_seed(0)
        outs = [layer(x) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_walker_rules_and_errors():
    ours = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS["sd15"]))
    with pytest.raises(ValueError, match="nonexistent.*matched no module"):
        inject_lora(ours, ["nonexistent"], rank=2)
    with pytest.raises(ValueError, match="neither Linear nor Conv2d.*to_out \\(ModuleList\\)"):
        inject_lora(ours, ["to_out"], rank=2)
    rep = inject_lora(ours, r".*attn1\.to_(q|k)", rank=2, exclude=["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"],
                      overrides={r"^down_blocks": {"rank": 8, "alpha": 4}})
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" not in rep.modules
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k" in rep.modules
    assert rep.modules["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"][1:] == (8, 4.0)
    assert rep.modules["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"][1:] == (2, 2.0)
    assert all("attn2" not in n for n in rep.modules)  # regex is a full match
    with pytest.raises(ValueError, match="'eval' cannot be used"):
        inject_lora(ours, r".*attn1\.to_q", rank=2, adapter="eval")
    with pytest.raises(ValueError, match="already exists"):
        inject_lora(ours, r".*attn1\.to_q", rank=2)
    assert "modules" in str(rep) and f"{rep.num_parameters:,}" in str(rep)
    scale = next(lora_layers(ours))[1].lora["default"]
    assert math.isclose(scale.scale, 4 / 8)
