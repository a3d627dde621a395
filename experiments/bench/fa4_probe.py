"""FlashAttention-4's Hopper kernels (the `flash-attn-4` package, CuTe DSL) against torch's SDPA (cuDNN) at SD1.5's
self-attention shapes, batch 8 bf16: forward, forward + backward, and each one's error against fp32.

    python -m experiments.bench.fa4_probe [BATCH]

cuDNN's kernel at the 64x64 level's head dim 40 takes the time of head dim 64 (RESULTS.md, session 9: bound by the
softmax's per-score work, not by the matmuls). FlashAttention-3's design (Shah et al. 2024: producer/consumer
warpgroups, the softmax of one tile overlapped with the other's GEMMs), which flash-attn-4 also ships for sm90, is
the known way past that. Needs flash-attn-4 and nvidia-cutlass-dsl importable; prints why not otherwise.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from experiments.bench.attention import time_ms

SHAPES = [("self 64x64 d40", 4096, 8, 40), ("self 32x32 d80", 1024, 8, 80), ("self 16x16 d160", 256, 8, 160)]


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).abs().max() / ref.abs().max()).item()


def main():
    b = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as e:  # noqa: BLE001 - the probe reports any import failure
        print(f"flash-attn-4 not importable: {type(e).__name__}: {e}")
        return
    print("| shape (B, N, heads x d) | cuDNN fwd ms | FA4 fwd ms | cuDNN fwd+bwd ms | FA4 fwd+bwd ms | "
          "rel. err cuDNN (out, dq) | rel. err FA4 (out, dq) |")
    print("|---|---|---|---|---|---|---|")
    for name, n, h, d in SHAPES:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        g = torch.randn_like(q)

        def sdpa():   # (B, N, h, d) -> SDPA's (B, h, N, d) views and back
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2)).transpose(1, 2)

        def fa4():
            out = flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        # fp32 reference on the same bf16 inputs
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2)).transpose(1, 2)
        ref.backward(g.float())
        errs = {}
        for label, fn in (("cudnn", sdpa), ("fa4", fa4)):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                q.grad = None
                o = fn()
                o.backward(g)
                errs[label] = (_err(o, ref), _err(q.grad, qf.grad))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            c_f = time_ms(sdpa)
            c_b = time_ms(lambda: sdpa().backward(g))
        f_f = time_ms(fa4)
        f_b = time_ms(lambda: fa4().backward(g))
        print(f"| {name} ({b}, {n}, {h} x {d}) | {c_f:.3f} | {f_f:.3f} | {c_b:.3f} | {f_b:.3f} | "
              f"{errs['cudnn'][0]:.1e}, {errs['cudnn'][1]:.1e} | {errs['fa4'][0]:.1e}, {errs['fa4'][1]:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
