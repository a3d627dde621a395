"""skip + h + bias in one Triton pass over channels_last tensors (a resnet's conv2 bias folded into its
residual sum, models/bias_folding.py): torch would add the bias through its strided broadcast kernel, then
the skip. Tested under Triton's interpreter (tests/test_bias_folding.py)."""
from __future__ import annotations

import torch

from models import pdl
from models.triton_env import available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_bias_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """out[m, c] = a[m, c] + b[m, c] + bias[c] on (M, C) row-major views, summed in fp32."""
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (m[:, None] < M) & (c[None, :] < C)
        off = m[:, None] * C + c[None, :]
        a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        tl.store(out_ptr + off, (a + b + bias[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels_last -> its memory as (B*H*W, C), no copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _AddWithBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias):
        out = torch.empty_like(a)
        m, c = a.numel() // a.shape[1], a.shape[1]
        grid = (triton.cdiv(m, 32), triton.cdiv(c, 128))
        _add_bias_kernel[grid](_rows(a), _rows(b), bias, _rows(out), m, c, BLOCK_M=32, BLOCK_C=128, **pdl.kw(_rows(a)))
        return out

    @staticmethod
    def backward(ctx, g):
        dbias = g.float().sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return g, g, dbias


def add_with_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """a + b + bias[None, :, None, None] for same-shape, same-dtype channels_last a, b."""
    return _AddWithBias.apply(a, b, bias.contiguous())
