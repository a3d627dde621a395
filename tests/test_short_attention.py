"""models/short_attention.py: attention over <= 128 keys in one Triton kernel each way equals softmax(QK^T/sqrt d)V
and its gradients, and the UNet's attentions use it where asked. Under Triton's interpreter on the CPU, compiled
for an H100, and on CUDA against fp32 where a GPU is present."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted

SCRIPT = r'''
import math, torch
from models import short_attention as sa
assert sa.INTERPRET
torch.manual_seed(0)

def ref(q, k, v, h):   # Vaswani et al. 2017, eq. 1, written out per head
    b, n, c = q.shape
    d = c // h
    Q, K, V = (t.reshape(b, t.shape[1], h, d).transpose(1, 2) for t in (q, k, v))
    P = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(d), -1)
    return (P @ V).transpose(1, 2).reshape(b, n, c)

# partial query blocks, keys 77 / 5 / 128 (a full tile), head dims 40 / 8 / 80 (padded to 64 / 16 / 128),
# scores large enough that an unstabilised softmax would overflow
# (query blocks of 16 to 64 rows, one per program or several)
cases = [(2, 70, 77, 2, 40, 1.0), (1, 33, 5, 3, 8, 30.0), (2, 64, 128, 1, 80, 1.0), (3, 130, 77, 2, 40, 1.0)]
configs = [(sa.FWD_CONFIG, sa.BWD_CONFIG), ((16, 4, 1), (32, 4, 100)), ((32, 4, 100), (16, 4, 1))]
for (b, n, keys, h, d, amp), (sa.FWD_CONFIG, sa.BWD_CONFIG) in [(c, w) for w in configs for c in cases]:
    q, k, v = (torch.randn(b, m, h * d) * s for m, s in ((n, amp), (keys, 1.0), (keys, 1.0)))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = sa.short_attention(q, k, v, h)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref(q, k, v, h), (q, k, v), dout)
    assert (out - ref(q, k, v, h)).abs().max() < 1e-5, (b, n, keys, h, d)
    for name, g, w in zip("qkv", got, want):
        assert (g - w).abs().max() < 1e-5 * max(1.0, w.abs().max().item()), (name, (g - w).abs().max(), (b, n, keys, h, d))
sa.FWD_CONFIG, sa.BWD_CONFIG = configs[0]
# strided rows (q a slice of a fused projection's output), as in Attention._fused_qkv
qkv = torch.randn(2, 50, 3 * 16, requires_grad=True)
q, k, v = qkv.split(16, -1)
out = sa.short_attention(q, k[:, :9], v[:, :9], 2)
assert (out - ref(q, k[:, :9], v[:, :9], 2)).abs().max() < 1e-5
g, = torch.autograd.grad(out.square().sum(), qkv)
w, = torch.autograd.grad(ref(q, k[:, :9], v[:, :9], 2).square().sum(), qkv)
assert (g - w).abs().max() < 1e-5, (g - w).abs().max()
# more than 128 keys, or a head dim over 64: not usable (torch's SDPA)
assert sa.usable(torch.zeros(1, 4, 128), torch.zeros(1, 128, 128), 2)
assert not sa.usable(torch.zeros(1, 4, 16), torch.zeros(1, 129, 16), 1)
assert not sa.usable(torch.zeros(1, 4, 160), torch.zeros(1, 77, 160), 2)

# the UNet routes its attentions with <= 128 keys through it (the tiny UNet's 8x8 latents: self-attention over
# 64 or 16 tokens and cross-attention over 77) and gives the same numbers
import sys
sys.path.insert(0, "tests")
from models.unet import Attention
from triton_helpers import count_calls, unet_on_off
calls = count_calls(sa._ShortAttention, "apply")
unet, outs, _ = unet_on_off(lambda u, on: u.set_short_attention(on))
n = sum(isinstance(m, Attention) for m in unet.modules())
assert calls.get("n", 0) == n > 0, (calls, n)
err = ((outs[0][0] - outs[1][0]).abs().max(), (outs[0][1] - outs[1][1]).abs().max())
assert err[0] < 1e-4 and err[1] < 1e-4 * outs[0][1].abs().max(), err
print("ok", calls)
'''


def test_short_attention_matches_torch_under_the_interpreter():
    run_interpreted(SCRIPT)


@pytest.mark.parametrize("block_d", [64, 128])
def test_short_attention_kernels_compile_for_an_h100(block_d):
    """The shipped block sizes, at the head dims used (40 and 64 in a 64-wide tile) and at 104 in a 128-wide one."""
    from models import short_attention as sa
    p, f, i = "*bf16", "*fp32", "i32"
    strides = {s: i for s in ("sq_b", "sq_n", "sk_b", "sk_l", "sv_b", "sv_l", "so_b", "so_n")}
    bm = sa.FWD_CONFIG[0]
    compile_for_h100(sa._fwd_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, o_ptr=p, lse_ptr=f, N=i, L=i, H=i,
                                          **strides, qk_scale="fp32", SPLIT=i),
                     {"D": block_d - 24, "BLOCK_M": bm, "BLOCK_L": 128, "BLOCK_D": block_d})
    bm = sa.BWD_CONFIG[0]
    compile_for_h100(sa._bwd_kernel, dict(q_ptr=p, k_ptr=p, v_ptr=p, o_ptr=p, do_ptr=p, lse_ptr=f, dq_ptr=p,
                                          dk_ptr=f, dv_ptr=f, N=i, L=i, H=i, C=i, **strides, sdo_b=i,
                                          sdo_n=i, part_stride=i, sm_scale="fp32", qk_scale="fp32", SPLIT=i),
                     {"D": block_d - 24, "BLOCK_M": bm, "BLOCK_L": 128, "BLOCK_D": block_d})


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,heads,d", [(4096, 8, 40), (1024, 20, 64), (4096, 10, 64)])
def test_short_attention_cuda(n, heads, d):
    """bf16 at SD1.5's (64x64: 8 x 40) and SDXL's (10 x 64, 20 x 64) cross-attention sizes, batch 8 x 77
    keys: output and gradients as close to fp32 as torch's own bf16 SDPA is (within 2x its error + 1e-3)."""
    import torch
    import torch.nn.functional as F

    from models import short_attention as sa
    torch.manual_seed(0)
    q = torch.randn(8, n, heads * d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 77, heads * d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    assert sa.usable(q, k, heads)

    def sdpa(q, k, v):
        split = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)

    def run(fn, dtype):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*ins)
        return [out.float(), *(g.float() for g in torch.autograd.grad(out, ins, dout.to(dtype)))]

    want = run(sdpa, torch.float32)
    ours = run(lambda q, k, v: sa.short_attention(q, k, v, heads), torch.bfloat16)
    torchs = run(sdpa, torch.bfloat16)
    for name, a, b, w in zip(("out", "dq", "dk", "dv"), ours, torchs, want):
        scale = w.abs().max().item()
        assert (a - w).abs().max() <= 2 * (b - w).abs().max() + 1e-3 * scale, (name, (a - w).abs().max(), (b - w).abs().max())
