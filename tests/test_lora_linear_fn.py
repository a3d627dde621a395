"""lora/linear_fn.py: a frozen Linear with one LoRA adapter as one autograd function gives autograd's output
(the same dropout masks) and gradients, under fp32 and bf16 autocast, with kept masks inside checkpointed
blocks, and in a training run."""
import pytest
import torch

from lora.layers import LoRALayer


def _layer(p, bias=True):
    torch.manual_seed(0)
    layer = LoRALayer(torch.nn.Linear(24, 40, bias=bias).requires_grad_(False))
    a = layer.add_adapter("default", rank=4, alpha=2, dropout=p)
    torch.nn.init.normal_(a.up.weight, std=0.2)                     # B non-zero: the LoRA term counts
    a.multiplier = 0.7
    return layer, a


def _run(layer, a, fused, x, seed=3, autocast=False):
    layer.fused_backward = fused
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    grads = torch.autograd.grad(y, [xi, a.down.weight, a.up.weight], g)
    return y.detach(), grads


@pytest.mark.parametrize("p,bias", [(0.0, True), (0.3, True), (0.3, False)])
def test_fused_lora_linear_equals_autograd(p, bias):
    layer, a = _layer(p, bias)
    layer.train()
    x = torch.randn(2, 5, 24)
    y0, g0 = _run(layer, a, False, x)
    y1, g1 = _run(layer, a, True, x)
    assert torch.allclose(y0, y1, atol=1e-6, rtol=1e-6)             # same masks (same RNG draws), same sums
    assert all(torch.allclose(u, v, atol=1e-5, rtol=1e-5) for u, v in zip(g0, g1))
    assert all(v.abs().max() > 0 for v in g1)
    if p:  # another seed draws other masks: the comparison could fail
        y2, _ = _run(layer, a, True, x, seed=4)
        assert not torch.allclose(y1, y2)


def test_fused_lora_linear_under_bf16_autocast_and_cast_weights():
    from lora.half_weights import half_weights
    layer, a = _layer(0.3)
    layer.train()
    x = torch.randn(2, 5, 24).bfloat16()
    y0, g0 = _run(layer, a, False, x, autocast=True)
    with half_weights([a], torch.bfloat16):
        y1, g1 = _run(layer, a, True, x, autocast=True)
    assert y1.dtype == torch.bfloat16 and g1[1].dtype == torch.float32 and g1[0].dtype == torch.bfloat16
    for u, v in zip((y0,) + g0, (y1,) + g1):   # the fused dx rounds once (g W + LoRA term in the GEMM)
        assert (u.float() - v.float()).abs().max() <= 2e-2 * v.float().abs().max(), (u - v).abs().max()


def test_fused_path_only_where_it_applies():
    layer, a = _layer(0.1)
    layer.fused_backward = True
    assert layer._single_adapter() is a
    a.rank_dropout = 0.2
    layer.train()
    assert layer._single_adapter() is None                          # rank dropout: add_lora's path
    a.rank_dropout = 0.0
    layer.add_adapter("second", rank=2)
    assert layer._single_adapter() is None                          # two adapters
    layer.lora["second"].enabled = False
    assert layer._single_adapter() is a
    conv = LoRALayer(torch.nn.Conv2d(4, 8, 3).requires_grad_(False))
    conv.add_adapter("default", rank=2)
    assert conv._single_adapter() is None                           # convolutions keep autograd


@pytest.mark.parametrize("ckpt", [False, True])
def test_fused_lora_in_a_unet_with_checkpointing_and_kept_masks(tiny_diffusers_folder, ckpt):
    """The UNet's attention LoRA with dropout through the fused function: the same output and LoRA gradients as
    autograd's path, also when checkpointed blocks replay their kept masks (as in a CUDA graph)."""
    from lora_grads import unet_lora_grads
    from models.load import load_model

    def grads(fused):
        unet = load_model(tiny_diffusers_folder).unet
        return unet_lora_grads(unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in"], fused, ckpt)
    out_a, ga = grads(False)
    out_b, gb = grads(True)
    assert torch.allclose(out_a, out_b, atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(ga, gb))


def test_training_with_the_fused_lora_backward_gives_the_same_run(tiny_diffusers_folder, tiny_data, tmp_path):
    from test_fast_paths import _close, _losses
    _, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "a", "lora.dropout=0.1",
                        "train.fused_lora_backward=false")
    tr, l2, p2 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "b", "lora.dropout=0.1",
                         "train.fused_lora_backward=true")
    assert all(layer.fused_backward for m in [tr.sd.unet] for layer in m.modules() if isinstance(layer, LoRALayer))
    assert l1 == pytest.approx(l2, rel=1e-5) and _close(p1, p2, 1e-4) and l1[0] != l1[-1]


def test_weight_gradients_go_to_the_side_stream_only_under_half_weights(monkeypatch):
    """lora/grad_stream.py: the LoRA function hands its weight gradients to the side stream only where the
    adapter's weights are half_weights' casts (whose backward joins the stream); with the module's own
    parameters (consumed by AccumulateGrad at once) they stay on the main stream. On a CPU `launch` runs them in
    place; tests/test_fast_paths.py checks the CUDA side stream bit for bit."""
    from lora import grad_stream
    from lora.half_weights import half_weights
    seen = []
    real = grad_stream.launch
    monkeypatch.setattr(grad_stream, "launch", lambda fn, device, reads: (seen.append(device), real(fn, device, reads))[1])
    layer, a = _layer(0.3)
    layer.train()
    layer.fused_backward = True
    x = torch.randn(2, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().square().sum().backward()
        with half_weights([a], torch.bfloat16):
            layer(x).float().square().sum().backward()
    assert seen == [None, torch.device("cpu")], seen
    assert a.down.weight.grad.abs().sum() > 0 and not grad_stream._pending and not grad_stream._forked
