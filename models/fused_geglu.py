"""GEGLU's gate in one Triton kernel each way: out = hidden * gelu(gate) from the projection's output.

    hidden, gate = p.chunk(2, -1);  out = hidden * gelu(gate)        (Shazeer 2020, arXiv:2002.05202, eq. 6)
    gelu(g) = g * Phi(g),  Phi(g) = (1 + erf(g / sqrt 2)) / 2          (Hendrycks & Gimpel 2016, eq. 1; exact)
    d hidden = dout * gelu(g);  d gate = dout * hidden * (Phi(g) + g * phi(g)),  phi(g) = exp(-g^2/2) / sqrt(2 pi)

Why: in eager PyTorch the two halves of `chunk` are strided views, so gelu, its backward and the product
run through the slow strided elementwise path, and the backward of `chunk` is a concatenation: 6.6 ms of
the batch-8 bf16 step's 65 ms of kernels (experiments/bench/RESULTS.md). Here the forward reads p once
and writes out; the backward reads p and dout and writes dp whole; only p is kept for the backward
(instead of gate, gelu(gate) and hidden). CUDA (or Triton's interpreter) and a last dimension that is
contiguous; everything else takes the eager formula. Tested against it in tests/test_fused_kernels.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models import pdl
from models.triton_env import INTERPRET, available

if available():
    import triton
    import triton.language as tl

BLOCK = 1024

if available():
    @triton.jit
    def _gelu_parts(g):
        """Phi(g) and gelu(g) in fp32."""
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        return cdf, g * cdf

    @triton.jit
    def _geglu_kernel(p_ptr, out_ptr, N, INNER, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl.start(PDL)
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # over out's (M, INNER) elements
        mask = idx < N
        row, col = idx // INNER, idx % INNER
        base = row * 2 * INNER + col                                          # p is (M, 2 * INNER)
        h = tl.load(p_ptr + base, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(p_ptr + base + INNER, mask=mask, other=0.0).to(tl.float32)
        _, gelu = _gelu_parts(g)
        tl.store(out_ptr + idx, (h * gelu).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _geglu_backward_kernel(p_ptr, dout_ptr, dp_ptr, N, INNER, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl.start(PDL)
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < N
        row, col = idx // INNER, idx % INNER
        base = row * 2 * INNER + col
        h = tl.load(p_ptr + base, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(p_ptr + base + INNER, mask=mask, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        cdf, gelu = _gelu_parts(g)
        pdf = 0.3989422804014327 * tl.exp(-0.5 * g * g)
        tl.store(dp_ptr + base, (do * gelu).to(dp_ptr.dtype.element_ty), mask=mask)
        tl.store(dp_ptr + base + INNER, (do * h * (cdf + g * pdf)).to(dp_ptr.dtype.element_ty), mask=mask)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p):
        p = p.contiguous()
        inner = p.shape[-1] // 2
        out = p.new_empty(*p.shape[:-1], inner)
        n = out.numel()
        _geglu_kernel[(triton.cdiv(n, BLOCK),)](p, out, n, inner, BLOCK=BLOCK, **pdl.kw(p))
        ctx.save_for_backward(p)
        return out

    @staticmethod
    def backward(ctx, dout):
        p, = ctx.saved_tensors
        dout = dout.contiguous()
        dp = torch.empty_like(p)
        n = dout.numel()
        _geglu_backward_kernel[(triton.cdiv(n, BLOCK),)](p, dout, dp, n, p.shape[-1] // 2, BLOCK=BLOCK, **pdl.kw(p))
        return dp


def usable(p: torch.Tensor) -> bool:
    return available() and (p.is_cuda or INTERPRET) and p.shape[-1] % 2 == 0


def geglu(p: torch.Tensor) -> torch.Tensor:
    """hidden * gelu(gate) for p = cat([hidden, gate], -1): (..., 2I) -> (..., I)."""
    if not usable(p):
        hidden, gate = p.chunk(2, dim=-1)
        return hidden * F.gelu(gate)
    return _GEGLU.apply(p)
