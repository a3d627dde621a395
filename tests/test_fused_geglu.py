"""models/fused_geglu.py: GEGLU's gate in one Triton kernel each way equals hidden * gelu(gate), forward
and backward, and the UNet's feed-forwards use it when asked. Under Triton's interpreter on the CPU."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import torch, torch.nn.functional as F
from models import fused_geglu as fg
assert fg.INTERPRET
torch.manual_seed(0)
for shape in [(2, 7, 2 * 40), (3, 2 * 1280), (1, 5, 9, 2 * 3)]:   # sizes that leave partial blocks
    p = (torch.randn(shape) * 2).requires_grad_()
    out = fg.geglu(p)
    dout = torch.randn_like(out)
    dp, = torch.autograd.grad(out, p, dout)
    h, g = p.chunk(2, -1)
    ref = h * F.gelu(g)
    dref, = torch.autograd.grad(ref, p, dout)
    err = ((out - ref).abs().max(), (dp - dref).abs().max())
    assert err[0] < 1e-5 and err[1] < 1e-5, (shape, err)
# a strided input (the projection's output is contiguous; this checks the copy)
p = torch.randn(4, 2 * 8 * 2)[:, ::2].requires_grad_()
assert (fg.geglu(p) - p.chunk(2, -1)[0] * F.gelu(p.chunk(2, -1)[1])).abs().max() < 1e-5

# the UNet routes every feed-forward through it and gives the same numbers
import sys
sys.path.insert(0, "tests")
from models.unet import GEGLU
from triton_helpers import count_calls, unet_on_off
calls = count_calls(fg._GEGLU, "apply")
unet, outs, _ = unet_on_off(lambda u, on: u.set_fused_geglu(on))
n = sum(isinstance(m, GEGLU) for m in unet.modules())
assert calls.get("n", 0) == n > 0, (calls, n)
assert (outs[0][0] - outs[1][0]).abs().max() < 1e-4 and (outs[0][1] - outs[1][1]).abs().max() < 1e-4
print("ok", calls)
'''


def test_fused_geglu_matches_torch_under_the_interpreter():
    run_interpreted(SCRIPT)


def test_fused_geglu_kernels_compile_for_an_h100():
    from models import fused_geglu as fg
    p, i = "*bf16", "i32"
    compile_for_h100(fg._geglu_kernel, dict(p_ptr=p, out_ptr=p, N=i, INNER=i), {"BLOCK": fg.BLOCK})
    compile_for_h100(fg._geglu_backward_kernel, dict(p_ptr=p, dout_ptr=p, dp_ptr=p, N=i, INNER=i),
                     {"BLOCK": fg.BLOCK})
