"""models/nhwc_upsample.py: nearest 2x upsampling of channels_last tensors in Triton equals F.interpolate,
forward and backward, and the UNet's upsamplers use it when asked. Under Triton's interpreter on the CPU."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import torch, torch.nn.functional as F
from models import nhwc_upsample as nu
assert nu.INTERPRET
torch.manual_seed(0)
for (b, c, h, w) in [(2, 40, 3, 5), (1, 3, 4, 4), (2, 320, 2, 3)]:   # channels not a multiple of the blocks
    x = torch.randn(b, c, h, w).to(memory_format=torch.channels_last).requires_grad_()
    assert nu.usable(x) and not nu.usable(x.detach().contiguous())
    y = nu.upsample2x(x)
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, x, dy)
    y2 = F.interpolate(x, scale_factor=2.0, mode="nearest")
    dx2, = torch.autograd.grad(y2, x, dy)
    assert torch.equal(y, y2) and y.is_contiguous(memory_format=torch.channels_last), (b, c, h, w)
    assert (dx - dx2).abs().max() < 1e-5 and dx.is_contiguous(memory_format=torch.channels_last)
    # an NCHW gradient (as a loss on an NCHW copy sends back) is laid out first
    dx3, = torch.autograd.grad(nu.upsample2x(x), x, dy.contiguous())
    assert (dx3 - dx2).abs().max() < 1e-5

# the UNet's upsamplers go through it with set_nhwc_upsampling, same output and input gradient
import sys
sys.path.insert(0, "tests")
from models.blocks import Upsample2D
from triton_helpers import count_calls, unet_on_off
calls = count_calls(nu._Upsample2x, "apply")
unet, outs, _ = unet_on_off(lambda u, on: u.set_nhwc_upsampling(on), channels_last=True)
n = sum(isinstance(m, Upsample2D) for m in unet.modules())
assert calls.get("n", 0) == n > 0, (calls, n)
assert (outs[0][0] - outs[1][0]).abs().max() < 1e-5 and (outs[0][1] - outs[1][1]).abs().max() < 1e-4
print("ok", calls)
'''


def test_nhwc_upsample_matches_torch_under_the_interpreter():
    run_interpreted(SCRIPT)


def test_nhwc_upsample_kernels_compile_for_an_h100():
    from models import nhwc_upsample as nu
    p, i = "*bf16", "i32"
    bp, bc = nu._blocks(640)
    compile_for_h100(nu._up_kernel, dict(x_ptr=p, y_ptr=p, P=i, W=i, C=i), {"BLOCK_P": bp, "BLOCK_C": bc})
    compile_for_h100(nu._up_grad_kernel, dict(dy_ptr=p, dx_ptr=p, Q=i, W=i, C=i), {"BLOCK_Q": bp, "BLOCK_C": bc})
