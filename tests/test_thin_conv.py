"""models/thin_conv.py: 3x3 convolutions with few input channels (gathered taps) or few output channels (tap
products, then their shifted sum) equal F.conv2d, forward and input gradient, on channels_last and NCHW inputs,
and the UNet's conv_in/conv_out go through them when asked. Kernels under Triton's interpreter on the CPU."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import torch, torch.nn.functional as F
from torch import nn
from models import thin_conv as tc
assert tc.INTERPRET
torch.manual_seed(0)
# (Cin, Cout): conv_in's and conv_out's kinds, odd channel counts and a bias-free one; H, W not multiples of anything
for cin, cout, bias in [(4, 24, True), (24, 4, True), (3, 40, False), (40, 5, True), (4, 4, True)]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias).requires_grad_(False)
    with torch.no_grad():
        conv.weight.normal_()
        if bias:
            conv.bias.normal_()
    assert tc.thin(conv)
    for layout in (torch.channels_last, torch.contiguous_format):
        if layout is torch.contiguous_format and 9 * cin > 128:
            continue                                   # many channels: only channels_last inputs are taken
        x = torch.randn(2, cin, 9, 7).to(memory_format=layout).requires_grad_()
        assert tc.usable(conv, x)
        y = tc.forward(conv, x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(y)
        dx, = torch.autograd.grad(y, x, g)
        y2 = F.conv2d(x, conv.weight, conv.bias, padding=1)
        dx2, = torch.autograd.grad(y2, x, g)
        err = ((y - y2).abs().max().item(), (dx - dx2).abs().max().item())
        assert err[0] < 1e-4 and err[1] < 1e-4, (cin, cout, layout, err)
        assert y2.abs().max() > 1 and dx2.abs().max() > 1

# not taken: a 3x3 conv wide on both sides, a strided one, trainable weights while recording gradients
assert not tc.thin(nn.Conv2d(64, 64, 3, padding=1)) and not tc.thin(nn.Conv2d(4, 32, 3, stride=2, padding=1))
conv = nn.Conv2d(4, 8, 3, padding=1)
x = torch.randn(1, 4, 5, 5).to(memory_format=torch.channels_last)
assert not tc.usable(conv, x)
with torch.no_grad():
    assert tc.usable(conv, x)

# the UNet's conv_in and conv_out through the kernels (channels_last), same output and input gradient
import sys
sys.path.insert(0, "tests")
from triton_helpers import count_calls, unet_on_off
calls = count_calls(tc, "_conv", lambda x, wt, b: (x.shape[1], wt.shape[2]))
unet, outs, _ = unet_on_off(lambda u, on: u.set_thin_convs(on), channels_last=True)
c0 = unet.config.block_out_channels[0]
assert calls == {(4, c0): 2, (c0, 4): 2}, calls   # conv_in and conv_out forward, and each one's input gradient
assert (outs[0][0] - outs[1][0]).abs().max() < 1e-4 and (outs[0][1] - outs[1][1]).abs().max() < 1e-4
unet.set_thin_convs(False)
assert "forward" not in unet.conv_in.__dict__
print("ok", calls)
'''


def test_thin_conv_matches_torch_under_the_interpreter():
    run_interpreted(SCRIPT)


def test_thin_conv_kernels_compile_for_an_h100():
    from models import thin_conv as tc
    p, f, i = "*bf16", "*fp32", "i32"
    compile_for_h100(tc._gather_kernel, dict(x_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p, M=i, H=i, W=i, CIN=i, COUT=i),
                     {"HAS_BIAS": True, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64})
    compile_for_h100(tc._taps_kernel, dict(x_ptr=p, w_ptr=p, p_ptr=f, M=i, CIN=i, NT=i),
                     {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64})
    compile_for_h100(tc._tap_sum_kernel, dict(p_ptr=f, b_ptr=p, y_ptr=p, M=i, H=i, W=i, COUT=i),
                     {"HAS_BIAS": True, "BLOCK_M": 256, "BLOCK_N": 4})


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_thin_conv_cuda_at_sd15_size():
    """conv_in's and conv_out's shapes at SD1.5's b8 in bf16: within bf16 rounding of fp32 torch, both ways."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from models import thin_conv as tc
    torch.manual_seed(0)
    for cin, cout in ((4, 320), (320, 4)):
        conv = nn.Conv2d(cin, cout, 3, padding=1).cuda().to(torch.bfloat16).requires_grad_(False)
        x = torch.randn(8, cin, 64, 64, device="cuda", dtype=torch.bfloat16)
        x = x.to(memory_format=torch.channels_last).requires_grad_()
        assert tc.usable(conv, x)
        y = tc.forward(conv, x)
        g = torch.randn_like(y)
        dx, = torch.autograd.grad(y, x, g)
        x32 = x.detach().float().requires_grad_()
        y32 = F.conv2d(x32, conv.weight.float(), conv.bias.float(), padding=1)
        dx32, = torch.autograd.grad(y32, x32, g.float())
        for got, ref in ((y, y32), (dx, dx32)):
            err = (got.float() - ref).abs().max().item()
            assert err <= 0.02 * ref.abs().max().item(), (cin, cout, err)
