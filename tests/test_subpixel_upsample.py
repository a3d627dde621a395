"""models/subpixel_upsample.py: nearest 2x + 3x3 conv computed as one 2x2 conv on the low-resolution input with its
four output parities interleaved equals F.interpolate + conv2d (fp64: to rounding), forward and gradients; the
Triton interleave kernels equal the torch path under the interpreter; the UNet and the VAE route their upsamplers
through it when asked, and match diffusers'."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import subpixel_upsample as sp


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """The tests' images are small: the sub-pixel form for any size (GPU default: from 1,024 input pixels)."""
    monkeypatch.setattr(sp, "MIN_PIXELS", 1)


def direct(x, conv):
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 8, 8, 5, 5), (2, 3, 6, 1, 2), (1, 4, 4, 1, 1)])
def test_subpixel_form_equals_upsampling_then_conv_in_fp64(shape, layout):
    b, cin, cout, h, w = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1).double().requires_grad_(False)
    conv.bias.requires_grad_(True)          # a trained bias gets its gradient too
    x = torch.randn(b, cin, h, w, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    assert sp.usable(conv, x)
    kept = sp.parity_kernels(conv.weight, sp.layout(x))
    y, y2 = sp.upsample_conv(x, conv), direct(x, conv)
    assert torch.equal(y, sp.upsample_conv(x, conv, kept))             # kernels kept or computed per call
    assert y.shape == (b, cout, 2 * h, 2 * w) and y.is_contiguous(memory_format=layout)
    dy = torch.randn_like(y2)
    gx, gb = torch.autograd.grad(y, (x, conv.bias), dy)
    gx2, gb2 = torch.autograd.grad(y2, (x, conv.bias), dy)
    assert (y - y2).abs().max() < 1e-12 and (gx - gx2).abs().max() < 1e-12 and (gb - gb2).abs().max() < 1e-12


def test_parity_kernels_by_hand():
    """K_ac sums the 3x3 kernel's rows and columns as worked out in the module's docstring: e.g. parity (0, 1)
    takes rows (W0, W1 + W2) and columns (W0 + W1, W2)."""
    w = torch.arange(1.0, 10.0).view(1, 1, 3, 3)    # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    k = sp.parity_kernels(w)[:, 0]                   # (4, 2, 2): parities (0,0), (0,1), (1,0), (1,1)
    assert k[0].tolist() == [[1, 2 + 3], [4 + 7, 5 + 6 + 8 + 9]]
    assert k[1].tolist() == [[1 + 2, 3], [4 + 5 + 7 + 8, 6 + 9]]
    assert k[2].tolist() == [[1 + 4, 2 + 3 + 5 + 6], [7, 8 + 9]]
    assert k[3].tolist() == [[1 + 2 + 4 + 5, 3 + 6], [7 + 8, 9]]
    w = torch.randn(5, 3, 3, 3)
    assert torch.equal(sp.parity_kernels(w, torch.channels_last), sp.parity_kernels(w))   # the same values
    assert sp.parity_kernels(w, torch.channels_last).is_contiguous(memory_format=torch.channels_last)


def test_usable_only_for_frozen_plain_3x3_convolutions():
    x = torch.randn(1, 4, 3, 3)
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    assert sp.usable(conv, x)
    assert not sp.usable(nn.Conv2d(4, 4, 3, padding=1), x)                              # trained weight
    with torch.no_grad():
        assert sp.usable(nn.Conv2d(4, 4, 3, padding=1), x)                              # ... not here
    assert not sp.usable(nn.Conv2d(4, 4, 1).requires_grad_(False), x)
    assert not sp.usable(nn.Conv2d(4, 4, 3, padding=1, stride=2).requires_grad_(False), x)
    sp.MIN_PIXELS = 2 * 3 * 3
    assert not sp.usable(conv, x) and sp.usable(conv, x.expand(2, -1, -1, -1))     # small inputs: direct form


def test_parity_kernel_cache_follows_the_weight():
    conv = nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
    cache = sp.ParityKernelCache()
    k1 = cache.get(conv.weight)
    assert cache.get(conv.weight) is k1                       # reused while nothing changed
    assert cache.get(conv.weight, torch.channels_last) is not k1 and cache.get(conv.weight) is not k1
    with torch.no_grad():
        conv.weight += 1.0                                    # an in-place update (a LoRA merge) bumps the version
    k2 = cache.get(conv.weight)
    assert k2 is not k1 and torch.equal(k2, sp.parity_kernels(conv.weight))
    conv.weight.data = conv.weight.detach() * 2               # other memory (models/pipeline.parts_on)
    assert torch.equal(cache.get(conv.weight), sp.parity_kernels(conv.weight))


def _tiny_unet_on_off(channels_last, monkeypatch):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from triton_helpers import count_calls, unet_on_off
    monkeypatch.setattr(sp, "upsample_conv", sp.upsample_conv)   # restored after count_calls' wrapper
    calls = count_calls(sp, "upsample_conv")
    unet, outs, _ = unet_on_off(lambda u, on: u.set_subpixel_upsampling(on), channels_last=channels_last)
    return unet, outs, calls


@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_upsamplers_go_through_it_with_the_same_output(channels_last, monkeypatch):
    from models.blocks import Upsample2D
    unet, outs, calls = _tiny_unet_on_off(channels_last, monkeypatch)
    n = sum(isinstance(m, Upsample2D) for m in unet.modules())
    assert calls.get("n", 0) == n > 0
    (y0, g0), (y1, g1) = outs
    assert (y0 - y1).abs().max() < 1e-5 * y0.abs().max() and (g0 - g1).abs().max() < 1e-5 * g0.abs().max()


def test_gradient_checkpointing_keeps_no_kernels_and_the_same_gradients(monkeypatch):
    """Under checkpointing the parity kernels are computed per call (and in the backward), none kept."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from triton_helpers import unet_on_off

    from models.blocks import Upsample2D

    def toggle(u, on):
        u.set_subpixel_upsampling(True)
        u.set_gradient_checkpointing(on)
        u.train(on)
    unet, ((y0, g0), (y1, g1)), _ = unet_on_off(toggle)
    ups = [m for m in unet.modules() if isinstance(m, Upsample2D)]
    assert ups and all(not m.keep_parity_kernels and "_parity" not in m.__dict__ for m in ups)
    assert (y0 - y1).abs().max() < 1e-6 and (g0 - g1).abs().max() < 1e-6 * g0.abs().max()


SCRIPT = r'''
import torch, torch.nn.functional as F
from torch import nn
from models import subpixel_upsample as sp
assert sp.INTERPRET
torch.manual_seed(0)
for (b, cin, cout, h, w, bias) in [(2, 6, 40, 3, 5, True), (1, 4, 3, 4, 4, False), (2, 8, 136, 2, 3, True)]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias).requires_grad_(False)
    x = torch.randn(b, cin, h, w).to(memory_format=torch.channels_last).requires_grad_()
    z = F.conv2d(x.detach(), sp.parity_kernels(conv.weight, torch.channels_last), None, 1, 1)
    assert sp._triton_path(z) and not sp._triton_path(z.contiguous())
    y = sp._interleave(z, conv.bias, cout)                       # the Triton kernel
    y2 = sp._interleave(z.contiguous(), conv.bias, cout)         # torch's strided add
    assert torch.equal(y, y2) and y.is_contiguous(memory_format=torch.channels_last), (b, cin, cout, h, w)
    dy = torch.randn_like(y)
    cl, nchw = torch.channels_last, torch.contiguous_format
    dz = sp._gather(dy, z.shape, cl)                             # the Triton kernel
    assert torch.equal(dz, sp._gather(dy, z.shape, nchw).contiguous(memory_format=cl))
    assert torch.equal(sp._gather(dy.contiguous(), z.shape, cl), dz)   # an NCHW gradient is laid out first
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = sp.upsample_conv(x, conv)
    assert (got - ref).abs().max() < 1e-5 and got.is_contiguous(memory_format=cl)
    gx, = torch.autograd.grad(got, x, dy)
    gx2, = torch.autograd.grad(ref, x, dy)
    assert (gx - gx2).abs().max() < 1e-4 and gx.is_contiguous(memory_format=cl)
print("ok")
'''


def test_interleave_kernels_match_torch_under_the_interpreter():
    pytest.importorskip("triton")
    from triton_helpers import run_interpreted
    run_interpreted(SCRIPT)


def test_interleave_kernels_compile_for_an_h100():
    pytest.importorskip("triton")
    from triton_helpers import compile_for_h100
    p, i = "*bf16", "i32"
    bp, bc = sp._blocks(640)
    compile_for_h100(sp._interleave_kernel, dict(z_ptr=p, bias_ptr=p, y_ptr=p, P=i, H=i, W=i, C=i),
                     {"HAS_BIAS": True, "BLOCK_P": bp, "BLOCK_C": bc})
    compile_for_h100(sp._gather_kernel, dict(dy_ptr=p, dz_ptr=p, Q=i, H=i, W=i, C=i), {"BLOCK_Q": bp, "BLOCK_C": bc})


def test_parts_on_drops_the_parity_kernels_with_the_device_weights():
    from models.blocks import Upsample2D
    from models.pipeline import parts_on
    up = Upsample2D(4).requires_grad_(False)
    up.subpixel = True
    x = torch.randn(1, 4, 3, 3)
    with parts_on("cpu", up):
        want = up(x)
        assert "_parity" in up.__dict__
    assert "_parity" not in up.__dict__
    assert torch.equal(up(x), want)
