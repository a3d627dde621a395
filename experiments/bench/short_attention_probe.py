"""Cross-attention kernels alone: torch's SDPA (cuDNN first on Hopper) against models/short_attention.py, forward
and forward + backward, at the UNet's cross-attention shapes (77 keys), each timed over CUDA-graph replays of 20
calls (the Triton launches' host overhead out of the way, as in the training step's graph; session 10's numbers
took the best of 5 replays, `lora_gemm_probe.graph_us` their mean); then the Triton
kernels' block sizes and warps, and the backward's programs per SM.

    python -m experiments.bench.short_attention_probe [--configs]
"""
import sys

import torch
import torch.nn.functional as F

from experiments.bench.lora_gemm_probe import graph_us
from models import short_attention as sa

SHAPES = [  # (name, batch, queries, heads, head dim)
    ("sd15 64x64 b8", 8, 4096, 8, 40), ("sd15 32x32 b8", 8, 1024, 8, 80),
    ("sd15 64x64 b2", 2, 4096, 8, 40), ("sdxl 64x64 b1", 1, 4096, 10, 64), ("sdxl 32x32 b1", 1, 1024, 20, 64),
]


def sdpa(q, k, v, heads):
    d = q.shape[-1] // heads
    split = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(*split).transpose(1, 2).flatten(2)


def time_pair(fn, b, n, h, d):
    q = torch.randn(b, n, h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, 77, h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(b, n, h * d, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fwd = graph_us(lambda: fn(q, k, v, h))
    both = graph_us(lambda: torch.autograd.grad(fn(q, k, v, h), (q, k, v), dout))
    return fwd, both


def main():
    print(f"{'shape':16s} {'torch fwd':>10s} {'ours fwd':>9s} {'torch f+b':>10s} {'ours f+b':>9s}  (us)")
    for name, b, n, h, d in SHAPES:
        t = time_pair(sdpa, b, n, h, d)
        o = time_pair(sa.short_attention, b, n, h, d)
        print(f"{name:16s} {t[0]:10.1f} {o[0]:9.1f} {t[1]:10.1f} {o[1]:9.1f}", flush=True)
    if "--configs" not in sys.argv:
        return
    fwd0, bwd0 = sa.FWD_CONFIG, sa.BWD_CONFIG
    for name, b, n, h, d in SHAPES[:1] + SHAPES[2:4]:
        fwd_rows, rows = [], []
        for bm in (32, 64, 128):
            for warps in (4, 8):
                for per in (1, 2, 8, 1000):
                    sa.FWD_CONFIG = (bm, warps, per)
                    fwd_rows.append(_try(0, (b, n, h, d),
                                     f"fwd BLOCK_M {bm} warps {warps} programs/SM {per}"))
        sa.FWD_CONFIG = fwd0
        for bm in (32, 64):
            for warps in (4, 8):
                for per in (2, 4, 8):
                    sa.BWD_CONFIG = (bm, warps, per)
                    rows.append(_try(1, (b, n, h, d), f"f+b BLOCK_M {bm} warps {warps} programs/SM {per}"))
        sa.BWD_CONFIG = bwd0
        print(name)
        for us, what in sorted(fwd_rows)[:4] + sorted(rows)[:6]:
            print(f"    {us:8.1f} us  {what}")


def _try(part: int, shape: tuple, what: str):
    """(us of the forward (part 0) or forward + backward (1) with the current configs, what)."""
    try:
        return time_pair(sa.short_attention, *shape)[part], what
    except Exception as e:  # noqa: BLE001 - out of shared memory / registers: say so, go on
        return float("inf"), f"{what}: {type(e).__name__}"

if __name__ == "__main__":
    main()
