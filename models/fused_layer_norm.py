"""LayerNorm, and the residual sum before it, in one Triton kernel each way (frozen affine parameters).

    s = a + x                        (the transformer block's residual sum, rounded to x's dtype as torch's add)
    y = (s - mean) * rstd * w + b    (Ba et al. 2016, arXiv:1607.06450, eq. 4; mean and variance over the row)
    ds = rstd * (g - mean(g) - shat * mean(g * shat)) + ds_res,   g = dy * w,  shat = (s - mean) * rstd

ds_res is the gradient that reaches s along the residual path; a and x both receive ds.

Why: in the batch-8 bf16 step torch's LayerNorm kernel takes 52 us per [32768, 320] row block forward and
38 us backward where a pass over the data takes about 13 and 19 (one program per 320-value row), and each
residual sum before a norm is a kernel of its own forward (read a, x, write s) and backward (the two
gradients of s summed): experiments/bench/RESULTS.md, session 7. Here the forward reads a and x once and
writes s and y; the backward reads dy, s and the residual gradient and writes ds once.

Statistics in fp32 in two passes over registers (mean, then squared deviations: no cancellation). Used by
models/unet.py's BasicTransformerBlock with `set_fused_layer_norms` for half norms on CUDA (or Triton's
interpreter); everything else (trainable norms, fp32 under autocast, no Triton) takes torch's ops.
Tested against torch with the interpreter on the CPU (tests/test_fused_layer_norm.py).
"""
from __future__ import annotations

import torch
from torch import nn

from models import pdl
from models.triton_env import INTERPRET, available

MAX_C = 8192  # one row per program's registers


def blocks(c: int) -> dict:
    """Rows of length c in tiles of about 4,096 values: (rows per program, the power of two >= c)."""
    block_c = triton.next_power_of_2(c)
    return {"BLOCK_R": max(1, 4096 // block_c), "BLOCK_C": block_c}


if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rows(M, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        return rows, cols, rows[:, None] * C + cols[None, :], mask

    @triton.jit
    def _forward_kernel(a_ptr, x_ptr, s_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, M, C, eps,
                        ADD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        pdl.start(PDL)
        rows, cols, off, mask = _rows(M, C, BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + off, mask=mask, other=0.0)
        if ADD:  # rounded to the storage dtype before the statistics, as torch's add then LayerNorm
            x = (tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)).to(x.dtype)
            tl.store(s_ptr + off, x, mask=mask)
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / C                                      # (BLOCK_R,)
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        y = d * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=rows < M)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)

    @triton.jit
    def _backward_kernel(dy_ptr, dres_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, ds_ptr, M, C,
                         RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        pdl.start(PDL)
        rows, cols, off, mask = _rows(M, C, BLOCK_R, BLOCK_C)
        mean = tl.load(mean_ptr + rows, mask=rows < M, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        s = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
        shat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32) * w[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_gs = tl.sum(g * shat, axis=1) / C
        ds = (g - mean_g[:, None] - shat * mean_gs[:, None]) * rstd[:, None]
        if RES:
            ds += tl.load(dres_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(ds_ptr + off, ds.to(ds_ptr.dtype.element_ty), mask=mask)


class _AddLayerNorm(torch.autograd.Function):
    """(a or None, x, weight, bias, eps) -> (s, y) with a, or y alone without."""

    @staticmethod
    def forward(ctx, a, x, weight, bias, eps):
        shape, c = x.shape, x.shape[-1]
        x2 = x.reshape(-1, c).contiguous()                               # (M, C)
        m = x2.shape[0]
        add = a is not None
        a2 = a.reshape(-1, c).contiguous() if add else x2
        s = torch.empty_like(x2) if add else x2
        y = torch.empty_like(x2)
        mean = x2.new_empty(m, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        kw = blocks(c)
        _forward_kernel[(triton.cdiv(m, kw["BLOCK_R"]),)](a2, x2, s, y, weight, bias, mean, rstd, m, c, eps,
                                                           ADD=add, **kw, **pdl.kw(a2))
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.add, ctx.shape = add, shape
        return (s.view(shape), y.view(shape)) if add else y.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        s, weight, mean, rstd = ctx.saved_tensors
        dres, dy = grads if ctx.add else (None, grads[0])
        m, c = s.shape
        if dy is None:  # y unused: s's gradient is the residual's
            return (dres, dres, None, None, None) if ctx.add else (None, None, None, None, None)
        dy = dy.reshape(m, c).contiguous()
        res = dres is not None
        dres = dres.reshape(m, c).contiguous() if res else dy
        ds = torch.empty_like(s)
        kw = blocks(c)
        _backward_kernel[(triton.cdiv(m, kw["BLOCK_R"]),)](dy, dres, s, weight, mean, rstd, ds, m, c, RES=res, **kw, **pdl.kw(dy))
        ds = ds.view(ctx.shape)
        return (ds if ctx.add else None), ds, None, None, None


def usable(norm: nn.LayerNorm, x: torch.Tensor, a: torch.Tensor | None = None) -> bool:
    """Triton on CUDA (or its interpreter), frozen (or no-grad) affine parameters of x's dtype, x's last
    dimension the normalised one, a (if any) of x's shape and dtype."""
    w = norm.weight
    return (available() and (x.is_cuda or INTERPRET) and w is not None and norm.bias is not None
            and len(norm.normalized_shape) == 1 and x.shape[-1] == w.shape[0] <= MAX_C
            and x.dtype == w.dtype == norm.bias.dtype
            and not ((w.requires_grad or norm.bias.requires_grad) and torch.is_grad_enabled())
            and (a is None or (a.shape == x.shape and a.dtype == x.dtype)))


def add_layer_norm(a: torch.Tensor | None, x: torch.Tensor, norm: nn.LayerNorm):
    """With a: (s, norm(s)) for s = a + x; without: norm(x). The Triton kernels where `usable`, else
    torch's add and the norm module itself (which may run in its weights' dtype: unet.set_norms_in_weight_dtype)."""
    if usable(norm, x, a):
        return _AddLayerNorm.apply(a, x, norm.weight, norm.bias, norm.eps)
    if a is None:
        return norm(x)
    s = a + x
    return s, norm(s)
