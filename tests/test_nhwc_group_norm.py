"""models/nhwc_group_norm.py: GroupNorm kernels on channels_last tensors equal torch's GroupNorm, forward
and backward, and the UNet routes its GroupNorms through them when asked. The kernels run under Triton's
interpreter on the CPU (TRITON_INTERPRET=1, set before Triton is imported: hence a subprocess)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import torch, torch.nn.functional as F
from models import nhwc_group_norm as ng
assert ng.INTERPRET
torch.manual_seed(0)
# odd sizes: channels per group 2, 5, 3 (masked to powers of two), H*W not a multiple of the blocks
for (b, c, h, w, g) in [(2, 64, 5, 7, 32), (1, 40, 3, 3, 8), (2, 96, 9, 4, 32)]:
    x = (torch.randn(b, c, h, w) * 3 + 2).to(memory_format=torch.channels_last).requires_grad_()
    wt, bs = torch.randn(c), torch.randn(c)
    y = ng.group_norm_nhwc(x, g, wt, bs, 1e-5)
    dy = torch.randn_like(y)
    dx, = torch.autograd.grad(y, x, dy)
    x2 = x.detach().contiguous().requires_grad_()
    y2 = F.group_norm(x2, g, wt, bs, 1e-5)
    dx2, = torch.autograd.grad(y2, x2, dy)
    assert (y - y2).abs().max() < 1e-5 and (dx - dx2).abs().max() < 1e-5, ((y - y2).abs().max(), (dx - dx2).abs().max())
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)

# the UNet's GroupNorms go through the kernels with nhwc=True, and give torch's numbers
import sys
sys.path.insert(0, "tests")
from conftest import UNET_CONFIGS
from models.unet import UNet2DConditionModel, UNetConfig
calls = {"n": 0}
orig = ng.group_norm_nhwc
def counted(*a, **k):
    calls["n"] += 1
    return orig(*a, **k)
ng.group_norm_nhwc = counted
unet = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS["sd15"])).to(memory_format=torch.channels_last)
unet.requires_grad_(False)
x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
t, ctx = torch.tensor([10, 500]), torch.randn(2, 77, UNET_CONFIGS["sd15"]["cross_attention_dim"])
outs = []
for nhwc in (False, True):
    unet.set_norms_in_weight_dtype(True, nhwc=nhwc)
    y = unet(x, t, ctx)
    outs.append((y, torch.autograd.grad(y.square().sum(), x)[0]))
n_gn = sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
assert calls["n"] == n_gn, (calls["n"], n_gn)  # every GroupNorm: all their inputs are channels_last
assert (outs[0][0] - outs[1][0]).abs().max() < 1e-4 and (outs[0][1] - outs[1][1]).abs().max() < 1e-4
print("ok", calls["n"], n_gn)
'''


def test_nhwc_group_norm_matches_torch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_nhwc_group_norm_kernels_compile_for_an_h100():
    """The interpreter does not check what the compiler checks (loop-carried types, layouts): compile the
    four kernels for sm_90 in bf16, as a GPU run would, with Triton's bundled ptxas (no GPU needed)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models import nhwc_group_norm as ng
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this Triton's ASTSource takes other arguments")
    p, f, i = "*bf16", "*fp32", "i32"
    blocks = {"stats": {"BLOCK_HW": 256, "BLOCK_C": 16}, "apply": {"BLOCK_HW": 32, "BLOCK_C": 128}}
    kernels = [
        (ng._stats_kernel, dict(x_ptr=p, mean_ptr=f, rstd_ptr=f, HW=i, C=i, CG=i, G=i, inv_n="fp32", eps="fp32"),
         blocks["stats"]),
        (ng._apply_kernel, dict(x_ptr=p, y_ptr=p, mean_ptr=f, rstd_ptr=f, w_ptr=p, b_ptr=p, HW=i, C=i, CG=i, G=i),
         blocks["apply"]),
        (ng._grad_stats_kernel, dict(x_ptr=p, dy_ptr=p, w_ptr=p, mean_ptr=f, rstd_ptr=f, sg_ptr=f, sgx_ptr=f, HW=i,
                                     C=i, CG=i, G=i), blocks["stats"]),
        (ng._grad_x_kernel, dict(x_ptr=p, dy_ptr=p, dx_ptr=p, w_ptr=p, mean_ptr=f, rstd_ptr=f, sg_ptr=f, sgx_ptr=f,
                                 HW=i, C=i, CG=i, G=i, inv_n="fp32"), blocks["apply"]),
    ]
    for fn, sig, const in kernels:
        sig = {**sig, **{k: "constexpr" for k in const}}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
        assert ".entry" in compiled.asm["ptx"] and compiled.asm.get("cubin"), fn.__name__
