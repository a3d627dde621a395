"""models/fused_layer_norm.py: LayerNorm, and the residual sum before it, in one Triton kernel each way equal
torch's add and LayerNorm, forward and backward (the residual path's gradient included), and the UNet's
transformer blocks use them when asked. Under Triton's interpreter on the CPU."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import torch, torch.nn.functional as F
from models import fused_layer_norm as fl
assert fl.INTERPRET
torch.manual_seed(0)
# row lengths that are not powers of two (masked), row counts that leave a partial tile
for shape in [(2, 7, 40), (3, 320), (1, 5, 9, 24), (3, 1280)]:
    c = shape[-1]
    norm = torch.nn.LayerNorm(c, eps=1e-5).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    x = (torch.randn(shape) * 3 + 1).requires_grad_()
    a = torch.randn(shape).requires_grad_()
    # plain: y = norm(x)
    y = fl.add_layer_norm(None, x, norm)
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, x, dy)
    y2 = F.layer_norm(x, (c,), norm.weight, norm.bias, 1e-5)
    dx2, = torch.autograd.grad(y2, x, dy)
    err = ((y - y2).abs().max(), (dx - dx2).abs().max())
    assert err[0] < 1e-5 and err[1] < 1e-5, (shape, err)
    # with the residual sum, s used further on (as the block's residual stream): both gradients reach a and x
    s, y = fl.add_layer_norm(a, x, norm)
    ds = torch.randn_like(s)
    loss = (y * dy).sum() + (s * ds).sum()
    da, dx = torch.autograd.grad(loss, (a, x))
    s2 = a + x
    y2 = F.layer_norm(s2, (c,), norm.weight, norm.bias, 1e-5)
    da2, dx2 = torch.autograd.grad((y2 * dy).sum() + (s2 * ds).sum(), (a, x))
    err = ((s - s2).abs().max(), (y - y2).abs().max(), (da - da2).abs().max(), (dx - dx2).abs().max())
    assert err[0] == 0 and err[1] < 1e-5 and err[2] < 1e-5 and err[3] < 1e-5, (shape, err)
    assert (ds - da2).abs().max() > 0.1   # the norm's own gradient is in there (a gradient that could be wrong)
    # s not used further: only the norm's gradient
    s, y = fl.add_layer_norm(a, x, norm)
    da, = torch.autograd.grad((y * dy).sum(), a)
    da2, = torch.autograd.grad((F.layer_norm(a + x, (c,), norm.weight, norm.bias, 1e-5) * dy).sum(), a)
    assert (da - da2).abs().max() < 1e-5

# bf16: s within one bf16 step of torch's add (the interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to
# nearest, checked equal by test_fused_layer_norm_cuda), y within bf16 rounding of torch's LayerNorm of s
norm = torch.nn.LayerNorm(320).to(torch.bfloat16).requires_grad_(False)
torch.nn.init.normal_(norm.weight, 1.0, 0.5)
x, a = torch.randn(2, 64, 320, dtype=torch.bfloat16), torch.randn(2, 64, 320, dtype=torch.bfloat16)
s, y = fl.add_layer_norm(a, x, norm)
assert ((s.float() - (a + x).float()).abs() <= (a + x).float().abs() * 2 ** -7).all()
assert (y.float() - norm(s).float()).abs().max() < 0.07

# where the kernels do not apply: trainable affine parameters (unless under no_grad), another dtype, no Triton
ln = torch.nn.LayerNorm(16)
xc = torch.randn(2, 16)
assert not fl.usable(ln, xc)
with torch.no_grad():
    assert fl.usable(ln, xc)
ln.requires_grad_(False)
assert fl.usable(ln, xc) and not fl.usable(ln, xc.double()) and not fl.usable(ln, xc, torch.randn(2, 8))
s, y = fl.add_layer_norm(xc, xc, torch.nn.LayerNorm(16))   # trainable: torch's ops, weight gradients kept
assert torch.equal(s, 2 * xc) and y.grad_fn is not None and "NativeLayerNorm" in type(y.grad_fn).__name__

# the UNet's transformer blocks: every LayerNorm goes through the kernels, same output and input gradient
import sys
sys.path.insert(0, "tests")
from models.unet import BasicTransformerBlock
from triton_helpers import count_calls, unet_on_off
calls = count_calls(fl._AddLayerNorm, "apply", lambda a, *rest: "add" if a is not None else "plain")
def init_norms(unet):
    for m in unet.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3)
            torch.nn.init.normal_(m.bias, 0.0, 0.3)
unet, outs, (x, t, ctx) = unet_on_off(lambda u, on: u.set_fused_layer_norms(on), init=init_norms)
n = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
assert calls == {"plain": n, "add": 2 * n} and n > 0, (calls, n)
err = ((outs[0][0] - outs[1][0]).abs().max(), (outs[0][1] - outs[1][1]).abs().max())
assert err[0] < 1e-4 and err[1] < 1e-4 * outs[0][1].abs().max(), err
# under autocast with norms that autocast would run in fp32: the blocks keep torch's path
calls.update(plain=0, add=0)
with torch.autocast("cpu", dtype=torch.bfloat16):
    unet(x, t, ctx)
assert calls == {"plain": 0, "add": 0}, calls
print("ok", calls)
'''


def test_fused_layer_norm_matches_torch_under_the_interpreter():
    run_interpreted(SCRIPT)


@pytest.mark.parametrize("c", [320, 1280])
def test_fused_layer_norm_kernels_compile_for_an_h100(c):
    from models import fused_layer_norm as fl
    p, f, i = "*bf16", "*fp32", "i32"
    kw = fl.blocks(c)
    for add in (False, True):
        compile_for_h100(fl._forward_kernel, dict(a_ptr=p, x_ptr=p, s_ptr=p, y_ptr=p, w_ptr=p, b_ptr=p, mean_ptr=f,
                                                  rstd_ptr=f, M=i, C=i, eps="fp32"), {"ADD": add, **kw})
        compile_for_h100(fl._backward_kernel, dict(dy_ptr=p, dres_ptr=p, s_ptr=p, w_ptr=p, mean_ptr=f, rstd_ptr=f,
                                                   ds_ptr=p, M=i, C=i), {"RES": add, **kw})


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_fused_layer_norm_cuda():
    """On the GPU at the 64x64 level's size, bf16: s equals torch's add bit for bit, y and both gradients within
    bf16 rounding of torch's fp32 LayerNorm of the same s."""
    import torch
    import torch.nn.functional as F
    from models import fused_layer_norm as fl
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(320, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.5)
    torch.nn.init.normal_(norm.bias, 0.0, 0.5)
    a, x = (torch.randn(8, 4096, 320, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    s, y = fl.add_layer_norm(a, x, norm)
    assert torch.equal(s, a.detach() + x.detach())
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    da, dx = torch.autograd.grad((y * dy).float().sum() + (s * ds).float().sum(), (a, x))
    s32 = s.detach().float().requires_grad_()
    y32 = F.layer_norm(s32, (320,), norm.weight.float(), norm.bias.float(), norm.eps)
    ds32, = torch.autograd.grad((y32 * dy.float()).sum() + (s32 * ds.float()).sum(), s32)
    assert (y.float() - y32).abs().max() < 0.05
    assert torch.equal(da, dx) and (da.float() - ds32).abs().max() < 0.05 * ds32.abs().max()
