"""lora/qkv_mm.py and lora/qkv_fn.py: self-attention's LoRA'd q, k, v in one kernel each way equal torch's arithmetic
on the same masks (with and without dropout), give the same bits as the per-layer kernels for q, k, v and h, route a
self-attention through one function (not cross-attention, not mismatched adapters, not without grad), and a UNet
with them gives the per-layer path's output and LoRA gradients, also checkpointed. Interpreter on the CPU, compiled
for an H100, and on CUDA at the 64x64 level's batch-8 size."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import sys
import torch
sys.path.insert(0, "tests")
from triton_helpers import count_calls
from lora import dropout_down as dd, lora_mm, qkv_mm, qkv_fn
assert dd.INTERPRET
dd.min_elements = 0                                 # the tests' inputs are tiny
torch.manual_seed(0)
M, K, N, R, p, s = 150, 72, 40, 4, 0.3, 0.7        # not multiples of the blocks; rank padded to 16
x = torch.randn(M, K)
w, a, up = torch.randn(3, N, K), torch.randn(3, R, K), torch.randn(3, N, R)
seeds = [torch.tensor([v], dtype=torch.int64) for v in (11, 12, 13)]
keep = [dd.keep_mask(t, M, K, p) for t in seeds]
small = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)   # several column blocks and a reduction loop

# the down projections: x * keep_j / (1-p) A_j^T, and the same bits as dropout_down's kernel per j
h = qkv_mm.down(x, a, seeds, p, s)
for j in range(3):
    assert (h[j] - s * (x * keep[j] / (1 - p)) @ a[j].t()).abs().max() < 1e-4
    assert torch.equal(h[j], dd.down(x, a[j], seeds[j], p, s))
h0 = qkv_mm.down(x, a, None, 0.0, s)                # p = 0: no mask
assert all((h0[j] - s * x @ a[j].t()).abs().max() < 1e-4 for j in range(3))

# the projections: y_j = x W_j^T + h_j B_j^T, the same bits as lora_mm's kernel per j
for cfg in (None, small):
    y = qkv_mm.forward(x, w, h, up, cfg)
    for j in range(3):
        assert (y[j] - (x @ w[j].t() + h[j] @ up[j].t())).abs().max() < 1e-4
        assert torch.equal(y[j], lora_mm.forward(x, w[j], None, h[j], up[j], cfg))

# the input gradient: one sum of the three, with each mask; gh_j = s g_j B_j
gs = [torch.randn(M, N) for _ in range(3)]
gh_want = [s * gs[j] @ up[j] for j in range(3)]
for sd, pp, kp in ((seeds, p, keep), (None, 0.0, [torch.ones(M, K, dtype=torch.bool)] * 3)):
    dx_want = sum(gs[j] @ w[j] + kp[j] / (1 - pp) * (gh_want[j] @ a[j]) for j in range(3))
    for cfg in (None, small):
        dx, gh = qkv_mm.input_grad(gs, w, up, a, sd, pp, s, cfg)
        assert all((gh[j] - gh_want[j]).abs().max() < 1e-4 for j in range(3))
        assert (dx - dx_want).abs().max() < 1e-3, (dx - dx_want).abs().max()

# an Attention of the UNet: q, k, v through one function, with the per-layer path's numbers; to_out per layer
from lora.inject import inject_lora, lora_parameters, set_fused_lora_backward
from models.unet import Attention
torch.manual_seed(3)
attn = Attention(K, heads=4, head_dim=N // 4).requires_grad_(False)
inject_lora(attn, ["to_q", "to_k", "to_v", "to_out.0"], rank=R, alpha=2, dropout=p)
for n_, prm in attn.named_parameters():
    if "lora.default.up" in n_:
        prm.data.normal_(0, 0.2)
set_fused_lora_backward(attn)
attn.train()
xi = torch.randn(3, 50, K, requires_grad=True)
params = list(lora_parameters(attn))
fused, per_layer = count_calls(qkv_mm, "forward"), count_calls(lora_mm, "forward")
outs = []
for on in (True, False):
    attn.fused_qkv_lora = on
    torch.manual_seed(5)                            # the same seeds drawn, in the order q, k, v
    y = attn(xi)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    outs.append((y, torch.autograd.grad(y, [xi, *params], gy)))
assert fused == {"n": 1} and per_layer == {"n": 5}, (fused, per_layer)   # to_out twice, q/k/v once unfused
(y1, g1), (y2, g2) = outs
assert torch.equal(y1, y2)                          # q, k, v the same bits, so the attention's output too
assert all((u - v).abs().max() < 1e-4 * max(1.0, v.abs().max().item()) for u, v in zip(g1, g2))
assert all(float(v.abs().max()) > 0 for v in g1)

# where it does not apply: cross-attention, no grad, adapters that differ
fused.clear()
ctx = torch.randn(3, 7, K)
attn(xi, ctx).sum().backward()
with torch.no_grad():
    attn(xi)
attn.fused_qkv_lora = True
attn.to_v.lora.default.rank = R + 1                 # (only compared, never used: the per-layer path runs)
assert qkv_fn.lora_qkv(xi, attn.to_q, attn.to_k, attn.to_v) is None
attn.to_v.lora.default.rank = R
attn.to_k.lora.default.multiplier = 0.5
assert qkv_fn.lora_qkv(xi, attn.to_q, attn.to_k, attn.to_v) is None
assert fused == {}, fused

# a UNet: the fused path's output and LoRA gradients = the per-layer path's, plain and checkpointed (seeds kept)
from conftest import UNET_CONFIGS
from models.unet import UNet2DConditionModel, UNetConfig
from lora_grads import unet_lora_grads
def grads(on, ckpt):
    torch.manual_seed(1)
    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS["sd15"])).requires_grad_(False)
    unet.set_fused_qkv_lora(on)
    return unet_lora_grads(unet, ["to_q", "to_k", "to_v", "to_out.0"], fused=True, ckpt=ckpt)
fused.clear()
(o1, g1), (o2, g2), (o3, g3) = grads(False, False), grads(True, False), grads(True, True)
assert fused.get("n", 0) >= 4, fused                # every self-attention, each time it ran forward
assert torch.equal(o1, o2) and torch.allclose(o2, o3, atol=1e-6)
for u, v, c in zip(g1, g2, g3):
    assert torch.allclose(u, v, rtol=1e-4, atol=1e-7) and torch.allclose(v, c, rtol=1e-4, atol=1e-7)
print("ok")
'''


def test_fused_qkv_lora_under_the_interpreter():
    run_interpreted(SCRIPT)


def test_fused_qkv_kernels_compile_for_an_h100():
    from lora import qkv_mm
    h, i, f, s = "*bf16", "i32", "fp32", "*i64"
    compile_for_h100(qkv_mm._down3_kernel, dict(x_ptr=h, a_ptr=h, h_ptr=h, s0_ptr=s, s1_ptr=s, s2_ptr=s, M=i, K=i,
                                                R=i, p=f, scale=f),
                     {"DROPOUT": True, "BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 32})
    c = {k: v for k, v in qkv_mm.FWD.items() if k.isupper()}
    compile_for_h100(qkv_mm._fwd3_kernel, dict(x_ptr=h, w_ptr=h, h_ptr=h, up_ptr=h, y_ptr=h, M=i, N=i, K=i, R=i),
                     {**c, "BLOCK_R": 32})
    c = {k: v for k, v in qkv_mm.DGRAD.items() if k.isupper()}
    for drop in (True, False):
        compile_for_h100(qkv_mm._dgrad3_kernel, dict(g0_ptr=h, g1_ptr=h, g2_ptr=h, w_ptr=h, up_ptr=h, a_ptr=h,
                                                     s0_ptr=s if drop else h, s1_ptr=s if drop else h,
                                                     s2_ptr=s if drop else h, dx_ptr=h, gh_ptr=h, M=i, N=i, K=i,
                                                     R=i, p=f, scale=f, inv_keep=f),
                         {**c, "DROPOUT": drop, "BLOCK_R": 32})


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_fused_qkv_cuda_at_the_64x64_level():
    """bf16 at [32768, 320] x 3 x [320, 320], r 32: q, k, v and h the bits of the per-layer kernels; the one input
    gradient within bf16 rounding of fp32 torch and no further from it than the per-layer kernels' sum."""
    import torch

    from lora import dropout_down as dd
    from lora import lora_mm, qkv_mm
    torch.manual_seed(0)
    m, c, r, p, s = 32768, 320, 32, 0.1, 0.5
    dt = torch.bfloat16
    x = torch.randn(m, c, device="cuda", dtype=dt)
    gs = [torch.randn(m, c, device="cuda", dtype=dt) for _ in range(3)]
    w = (torch.randn(3, c, c, device="cuda") * c ** -0.5).to(dt)
    a, up = (torch.randn(3, r, c, device="cuda") * 0.1).to(dt), (torch.randn(3, c, r, device="cuda") * 0.1).to(dt)
    seeds = [dd.new_seed("cuda") for _ in range(3)]
    h = qkv_mm.down(x, a, seeds, p, s)
    y = qkv_mm.forward(x, w, h, up)
    for j in range(3):
        assert torch.equal(h[j], dd.down(x, a[j], seeds[j], p, s))
        assert torch.equal(y[j], lora_mm.forward(x, w[j], None, h[j], up[j]))
    dx, gh = qkv_mm.input_grad(gs, w, up, a, seeds, p, s)
    ref, want = 0, 0
    for j in range(3):
        dxj, ghj = lora_mm.input_grad(gs[j], w[j], up[j], a[j], seeds[j], p, s)
        assert torch.equal(gh[j], ghj)
        ref = ref + dxj                                                        # autograd's bf16 sum
        keep = dd.keep_mask(seeds[j], m, c, p)
        want = want + gs[j].float() @ w[j].float() + keep / (1 - p) * (ghj.float() @ a[j].float())
    assert (dx.float() - want).abs().max() <= (ref.float() - want).abs().max() * 1.01 + 1e-3
