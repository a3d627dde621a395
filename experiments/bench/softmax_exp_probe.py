"""Is SD1.5's head-dim-40 self-attention bound by the softmax's exponentials? A probe, not a kernel we ship.

    python -m experiments.bench.softmax_exp_probe [BATCH]     (default 8: the b8 step's 64x64 level)

cuDNN's self-attention over 4,096 tokens takes the same time at head dims 32 to 64 (experiments/bench/RESULTS.md,
session 12), so its time is set by the work per score, not by the matmuls. This times a plain FlashAttention-2
forward in Triton (Dao 2023, algorithm 1; the online softmax in base 2) at head dim 40, against cuDNN's forward,
with a fraction of the exponentials computed on the FMA units instead of the special-function unit (as
FlashAttention-4 does on Blackwell): each key block is split in two halves, the second half's 2^x by
Cody-Waite range reduction and a cubic (2^x = 2^r * 2^f, r = round(x) by the 1.5 * 2^23 trick, f in [-1/2, 1/2],
2^f ~ 1 + f ln2 + (f ln2)^2/2 + (f ln2)^3/6, relative error < 1e-3: below bf16's 4e-3 rounding of P). Checks
the output against torch's math SDPA in fp32.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from experiments.bench.attention import time_ms


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA and integer units (no MUFU.EX2)."""
    x = tl.maximum(x, -126.0)
    t = x + 12582912.0                                    # 1.5 * 2^23: round(x) lands in the low mantissa bits
    r = t - 12582912.0
    f = x - r                                             # [-0.5, 0.5]
    p = 1.0 + f * (0.6931471805599453 + f * (0.2402265069591007 + f * 0.0555041086648216))
    e = (t.to(tl.int32, bitcast=True) - 0x4B400000) << 23  # round(x) moved to the exponent field
    return (p.to(tl.int32, bitcast=True) + e).to(tl.float32, bitcast=True)


@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, o_ptr, N, H, C, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FMA_HALF: tl.constexpr):
    """One (query block, batch * head) per program; q, k, v, o (B, N, H * D), unit last stride."""
    pm, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    base = b * N * C + h * D
    q = tl.load(q_ptr + base + m[:, None] * C + d[None, :], mask=dm[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    HALF: tl.constexpr = BLOCK_N // 2
    n1 = tl.arange(0, HALF)
    for n0 in range(0, N, BLOCK_N):
        ka = tl.load(k_ptr + base + (n0 + n1)[:, None] * C + d[None, :], mask=dm[None, :], other=0.0)
        kb = tl.load(k_ptr + base + (n0 + HALF + n1)[:, None] * C + d[None, :], mask=dm[None, :], other=0.0)
        sa = tl.dot(q, tl.trans(ka)) * qk_scale                       # (BLOCK_M, HALF), log2 units
        sb = tl.dot(q, tl.trans(kb)) * qk_scale
        m_new = tl.maximum(m_i, tl.maximum(tl.max(sa, 1), tl.max(sb, 1)))
        alpha = tl.math.exp2(m_i - m_new)
        pa = tl.math.exp2(sa - m_new[:, None])
        if FMA_HALF:
            pb = _exp2_fma(sb - m_new[:, None])
        else:
            pb = tl.math.exp2(sb - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pa, 1) + tl.sum(pb, 1)
        va = tl.load(v_ptr + base + (n0 + n1)[:, None] * C + d[None, :], mask=dm[None, :], other=0.0)
        vb = tl.load(v_ptr + base + (n0 + HALF + n1)[:, None] * C + d[None, :], mask=dm[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(pa.to(va.dtype), va, acc)
        acc = tl.dot(pb.to(vb.dtype), vb, acc)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + base + m[:, None] * C + d[None, :], out.to(o_ptr.dtype.element_ty), mask=dm[None, :])


def attention(q, k, v, heads: int, fma_half: bool, block_m: int, block_n: int, warps: int, stages: int):
    b, n, c = q.shape
    d = c // heads
    o = torch.empty_like(q)
    _fwd[(n // block_m, b * heads)](q, k, v, o, n, heads, c, d ** -0.5 * 1.4426950408889634, D=d,
                                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d),
                                    FMA_HALF=fma_half, num_warps=warps, num_stages=stages)
    return o


def main():
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    n, heads, d = 4096, 8, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, heads * d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    heads_view = [t.view(b, n, heads, d).transpose(1, 2) for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*[t.float() for t in heads_view]).transpose(1, 2).reshape(b, n, -1)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = time_ms(lambda: F.scaled_dot_product_attention(*heads_view))
    print(f"cuDNN forward, B={b}, 4,096 tokens, 8 heads x 40: {cudnn:.3f} ms")
    print("| block_m | block_n | warps | stages | exp2 on MUFU: ms (max err) | half on FMA: ms (max err) |")
    print("|---|---|---|---|---|---|")
    for bm, bn, warps, stages in [(64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2),
                                  (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 3)]:
        cells = []
        for fma in (False, True):
            try:
                out = attention(q, k, v, heads, fma, bm, bn, warps, stages)
                err = (out.float() - ref).abs().max().item()
                ms = time_ms(lambda: attention(q, k, v, heads, fma, bm, bn, warps, stages))
                cells.append(f"{ms:.3f} ({err:.1e})")
            except Exception as e:  # out of shared memory or registers for this configuration
                cells.append(f"- ({type(e).__name__})")
        print(f"| {bm} | {bn} | {warps} | {stages} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
