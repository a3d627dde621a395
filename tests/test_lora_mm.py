"""lora/lora_mm.py: the frozen projection with its LoRA term in one Triton GEMM equals torch's arithmetic
(forward with and without a bias; the input gradient with the seed's dropout mask, and gh), the LoRA function
routes 320-wide projections on the dropout path through it (not larger ones) with the numbers of the cuBLAS
path, and a LoRA layer's gradients match torch on the same mask. Interpreter on the CPU, compiled for an H100,
and on CUDA at the 64x64 level's batch-8 size."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import sys
import torch
sys.path.insert(0, "tests")
from triton_helpers import count_calls
from lora import dropout_down as dd, lora_mm
assert dd.INTERPRET
dd.min_elements = 0                                 # the tests' inputs are tiny
torch.manual_seed(0)
M, K, N, R, p, s = 150, 72, 40, 4, 0.3, 0.7        # not multiples of the blocks; rank padded to 16
x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
a, up, h = torch.randn(R, K), torch.randn(N, R), torch.randn(M, R)
for bias in (b, None):
    want = x @ w.t() + h @ up.t() + (0 if bias is None else bias)
    assert (lora_mm.forward(x, w, bias, h, up) - want).abs().max() < 1e-4
small = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)   # several column blocks and a reduction loop
assert (lora_mm.forward(x, w, b, h, up, small) - (x @ w.t() + h @ up.t() + b)).abs().max() < 1e-4

seed = torch.tensor([1234], dtype=torch.int64)
keep = dd.keep_mask(seed, M, K, p)
g = torch.randn(M, N)
gh_want = s * g @ up
dx_want = g @ w + keep / (1 - p) * (gh_want @ a)
for cfg in (None, small):
    dx, gh = lora_mm.input_grad(g, w, up, a, seed, p, s, cfg)
    assert (gh - gh_want).abs().max() < 1e-4, (gh - gh_want).abs().max()
    assert (dx - dx_want).abs().max() < 1e-4, (dx - dx_want).abs().max()

# the LoRA function: 320-wide (here: small) projections through lora_mm, with the cuBLAS path's numbers
from lora.layers import LoRALayer
fixed = torch.tensor([77], dtype=torch.int64)
dd.new_seed = lambda device: fixed.clone()
layer = LoRALayer(torch.nn.Linear(K, N).requires_grad_(False))
ad = layer.add_adapter("default", rank=R, alpha=2, dropout=p)
torch.nn.init.normal_(ad.up.weight, std=0.2)
layer.train()
layer.fused_backward = True
xi = torch.randn(3, 50, K, requires_grad=True)
fwd, bwd = count_calls(lora_mm, "forward"), count_calls(lora_mm, "input_grad")
outs = []
for on in (True, False):
    lora_mm.enabled = on
    y = layer(xi)
    gy = torch.randn_like(y, generator=torch.Generator().manual_seed(3))
    outs.append((y, torch.autograd.grad(y, [xi, ad.down.weight, ad.up.weight], gy)))
assert fwd == {"n": 1} and bwd == {"n": 1}, (fwd, bwd)
(y1, g1), (y2, g2) = outs
assert (y1 - y2).abs().max() < 1e-4 and all((u - v).abs().max() < 1e-4 for u, v in zip(g1, g2))
m = dd.keep_mask(fixed, 150, K, p).view(3, 50, K)
xr = xi.detach().clone().requires_grad_()
yr = layer.base_layer(xr) + (xr * m / (1 - p)) @ ad.down.weight.t() @ ad.up.weight.t() * ad.scale
want = torch.autograd.grad(yr, [xr, ad.down.weight, ad.up.weight], gy)
assert all((u - v).abs().max() < 1e-3 * max(1.0, v.abs().max().item()) for u, v in zip(g1, want))
lora_mm.enabled = True
lora_mm.max_weight = K * N - 1                      # a larger weight keeps cuBLAS
layer(xi).sum().backward()
assert fwd == {"n": 1} and bwd == {"n": 1}, (fwd, bwd)
print("ok")
'''


def test_lora_gemm_under_the_interpreter():
    run_interpreted(SCRIPT)


def test_lora_gemm_kernels_compile_for_an_h100():
    from lora import lora_mm
    h, i, f = "*bf16", "i32", "fp32"
    c = {k: v for k, v in lora_mm.FWD.items() if k.isupper()}
    compile_for_h100(lora_mm._fwd_kernel, dict(x_ptr=h, w_ptr=h, b_ptr=h, h_ptr=h, up_ptr=h, y_ptr=h, M=i, N=i, K=i,
                                               R=i), {**c, "HAS_BIAS": True, "BLOCK_R": 32})
    c = {k: v for k, v in lora_mm.DGRAD.items() if k.isupper()}
    compile_for_h100(lora_mm._dgrad_kernel, dict(g_ptr=h, w_ptr=h, up_ptr=h, a_ptr=h, seed_ptr="*i64", dx_ptr=h,
                                                 gh_ptr=h, M=i, N=i, K=i, R=i, p=f, scale=f, inv_keep=f),
                     {**c, "BLOCK_R": 32})


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_lora_gemm_cuda_at_the_64x64_level():
    """bf16 at [32768, 320] x [320, 320], r 32: the one-GEMM results within bf16 rounding of fp32 torch, and
    no further from it than cuBLAS's two-GEMM path."""
    import torch

    from lora import dropout_down as dd
    from lora import lora_mm
    torch.manual_seed(0)
    m, c, r, p, s = 32768, 320, 32, 0.1, 0.5
    dt = torch.bfloat16
    x, g = (torch.randn(m, c, device="cuda", dtype=dt) for _ in range(2))
    w = (torch.randn(c, c, device="cuda") * c ** -0.5).to(dt)
    b = torch.randn(c, device="cuda", dtype=dt)
    a, up = (torch.randn(r, c, device="cuda") * 0.1).to(dt), (torch.randn(c, r, device="cuda") * 0.1).to(dt)
    seed = dd.new_seed("cuda")
    h = dd.down(x, a, seed, p, s)
    xf, wf, bf, af, upf, hf, gf = (t.float() for t in (x, w, b, a, up, h, g))
    y = lora_mm.forward(x, w, b, h, up)
    y_ref = torch.nn.functional.linear(x, w, b).addmm_(h, up.t())
    want = xf @ wf.t() + bf + hf @ upf.t()
    assert (y.float() - want).abs().max() <= (y_ref.float() - want).abs().max() * 1.01 + 1e-3
    keep = dd.keep_mask(seed, m, c, p)
    dx, gh = lora_mm.input_grad(g, w, up, a, seed, p, s)
    gh_want = s * gf @ upf
    assert (gh.float() - gh_want).abs().max() < 2e-2 * gh_want.abs().max()
    dx_want = gf @ wf + keep / (1 - p) * (gh.float() @ af)
    dx_ref = g @ w
    dd.add_grad_input_(dx_ref, gh, a, seed, p)
    assert (dx.float() - dx_want).abs().max() <= (dx_ref.float() - dx_want).abs().max() * 1.01 + 1e-3
