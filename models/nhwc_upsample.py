"""Nearest-neighbour 2x upsampling of channels_last tensors in Triton, forward and backward.

    y[b, c, 2h + i, 2w + j] = x[b, c, h, w]                  (i, j in {0, 1})
    dx[b, c, h, w] = sum over i, j of dy[b, c, 2h + i, 2w + j]

Why: torch's NHWC nearest kernel took 72 us per call in the batch-8 bf16 step on an H100 (0.215 ms for the
UNet's three upsamplers, experiments/bench/RESULTS.md, session 7) where one pass over the data takes about
a fifth of that; here each program copies whole channel rows. CUDA (or Triton's interpreter), channels_last
inputs, scale 2 only; Upsample2D (models/blocks.py) uses torch's F.interpolate everywhere else. Tested against
F.interpolate under the interpreter (tests/test_nhwc_upsample.py).
"""
from __future__ import annotations

import torch

from models import pdl
from models.bias_folding import is_channels_last
from models.triton_env import INTERPRET, available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _up_kernel(x_ptr, y_ptr, P, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """Output pixels p = (b * 2H + oh) * 2W + ow, channels c: y[p, c] = x[(b * H + oh // 2) * W + ow // 2, c]."""
        pdl.start(PDL)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row, ow = p // (2 * W), p % (2 * W)                       # row = b * 2H + oh
        src = (row // 2) * W + ow // 2                            # (b * H + oh // 2) * W + ow // 2
        mask = (p[:, None] < P) & (c[None, :] < C)
        v = tl.load(x_ptr + src[:, None].to(tl.int64) * C + c[None, :], mask=mask)
        tl.store(y_ptr + p[:, None].to(tl.int64) * C + c[None, :], v, mask=mask)

    @triton.jit
    def _up_grad_kernel(dy_ptr, dx_ptr, Q, W, C, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """Input pixels q = (b * H + h) * W + w: dx[q, c] = the sum of dy over its four output pixels, in fp32."""
        pdl.start(PDL)
        q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row, w = q // W, q % W                                    # row = b * H + h
        top = (2 * row) * (2 * W) + 2 * w                         # output pixel (b, 2h, 2w)
        mask = (q[:, None] < Q) & (c[None, :] < C)
        acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(2):
            for j in tl.static_range(2):
                o = (top + i * 2 * W + j).to(tl.int64)
                acc += tl.load(dy_ptr + o[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + q[:, None].to(tl.int64) * C + c[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(pixels: int, c: int, block_p: int, block_c: int) -> tuple:
    return triton.cdiv(pixels, block_p), triton.cdiv(c, block_c)


def _blocks(c: int) -> tuple[int, int]:
    block_c = min(256, triton.next_power_of_2(c))
    return max(1, 4096 // block_c), block_c


class _Upsample2x(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        b, c, h, w = x.shape
        y = torch.empty(b, c, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        bp, bc = _blocks(c)
        _up_kernel[_grid(b * 4 * h * w, c, bp, bc)](x, y, b * 4 * h * w, w, c, BLOCK_P=bp, BLOCK_C=bc, **pdl.kw(x))
        return y

    @staticmethod
    def backward(ctx, dy):
        b, c, oh, ow = dy.shape
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = torch.empty(b, c, oh // 2, ow // 2, dtype=dy.dtype, device=dy.device, memory_format=torch.channels_last)
        bq, bc = _blocks(c)
        _up_grad_kernel[_grid(b * oh * ow // 4, c, bq, bc)](dy, dx, b * oh * ow // 4, ow // 2, c, BLOCK_Q=bq,
                                                            BLOCK_C=bc, **pdl.kw(dy))
        return dx


def usable(x: torch.Tensor) -> bool:
    """Triton on CUDA (or its interpreter), a 4-D channels_last input."""
    return available() and (x.is_cuda or INTERPRET) and x.dim() == 4 and is_channels_last(x)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="nearest") for a channels_last x: channels_last (B, C, 2H, 2W)."""
    return _Upsample2x.apply(x)
