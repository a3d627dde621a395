"""GroupNorm on channels_last tensors without layout copies (Triton kernels; frozen affine parameters).

Why: CUDA's native GroupNorm reads NCHW only, so in a channels_last UNet every GroupNorm input is copied
to NCHW and every convolution input back to NHWC, forward and backward: 13.8 of the 80.6 ms of kernels
in the batch-8 bf16 step (experiments/bench/RESULTS.md, "Where batch 8's time goes").

    y = (x - mean_bg) * rstd_bg * weight_c + bias_c      (Wu & He 2018, arXiv:1803.08494, eq. 1-2)

Statistics per (sample b, group g) over H*W*C/G values in fp32, in two passes (the mean, then the
squared deviations from it: no cancellation), accumulated in block-shaped registers and reduced once.
The backward for x (weight and bias frozen, as in LoRA training):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * weight,  means over the (b, g) group

`silu=True` returns silu(y) = y * sigmoid(y) (Elfwing et al. 2018, eq. 3) from the same kernel, as the
resnets' GroupNorm -> SiLU needs: one pass instead of two, and only x is kept for the backward, which
recomputes y and applies silu'(y) = s * (1 + y * (1 - s)), s = sigmoid(y), to the incoming gradient.

Used only for CUDA, channels_last inputs, frozen affine parameters and `set_norms_in_weight_dtype`'s
half norms (models/unet.py); everything else takes torch's GroupNorm. Tested against F.group_norm with
Triton's interpreter on the CPU (tests/test_nhwc_group_norm.py).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch builds without Triton (CPU wheels)
    triton = None


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: the kernels run on CPU tensors


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, rstd_ptr, HW, C, CG, G, inv_n, eps,
                      BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)                      # one (b, g) per program
        b, g = pid // G, pid % G
        c = tl.arange(0, BLOCK_C)
        cmask = c < CG
        base = x_ptr + b * HW * C + g * CG
        acc = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)   # block-shaped accumulators, reduced after the loop
        for start in range(0, HW, BLOCK_HW):
            r = start + tl.arange(0, BLOCK_HW)
            mask = (r[:, None] < HW) & cmask[None, :]
            acc += tl.load(base + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=None) * inv_n
        acc2 = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)  # second pass: sum of squared deviations (stable)
        for start in range(0, HW, BLOCK_HW):
            r = start + tl.arange(0, BLOCK_HW)
            mask = (r[:, None] < HW) & cmask[None, :]
            v = tl.load(base + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - mean, 0.0)
            acc2 += d * d
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(tl.sum(acc2, axis=None) * inv_n + eps))

    @triton.jit
    def _normalised_tile(x_ptr, mean_ptr, rstd_ptr, HW, C, CG, G, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's (BLOCK_HW, BLOCK_C) tile of sample b: xhat = (x - mean) * rstd in fp32, with the
        tile's offsets, mask, channels, their group indices and rstd (the elementwise kernels' common part)."""
        b = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        mask = (r[:, None] < HW) & cm[None, :]
        off = b * HW * C + r[:, None] * C + c[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        grp = b * G + c // CG
        mean = tl.load(mean_ptr + grp, mask=cm, other=0.0)
        rstd = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
        return (x - mean[None, :]) * rstd[None, :], off, mask, c, cm, grp, rstd

    @triton.jit
    def _silu_grad(dy, xhat, w, bias_ptr, c, cm):
        """dy (the gradient of silu(y)) times silu'(y), y = xhat * w + bias recomputed."""
        bias = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
        y = xhat * w[None, :] + bias[None, :]
        s = tl.sigmoid(y)
        return dy * s * (1.0 + y * (1.0 - s))

    @triton.jit
    def _apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW, C, CG, G,
                      SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        xhat, off, mask, c, cm, grp, rstd = _normalised_tile(x_ptr, mean_ptr, rstd_ptr, HW, C, CG, G,
                                                             BLOCK_HW, BLOCK_C)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
        y = xhat * w[None, :] + bias[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_stats_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr, HW, C, CG, G,
                           SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        b, g = pid // G, pid % G
        c = tl.arange(0, BLOCK_C)
        cmask = c < CG
        w = tl.load(w_ptr + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)
        base = b * HW * C + g * CG
        acc_g = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
        acc_gx = tl.zeros((BLOCK_HW, BLOCK_C), tl.float32)
        for start in range(0, HW, BLOCK_HW):
            r = start + tl.arange(0, BLOCK_HW)
            mask = (r[:, None] < HW) & cmask[None, :]
            off = base + r[:, None] * C + c[None, :]
            xhat = (tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if SILU:
                dy = _silu_grad(dy, xhat, w, b_ptr + g * CG, c, cmask)
            gr = dy * w[None, :]
            acc_g += gr
            acc_gx += tl.where(mask, gr * xhat, 0.0)
        tl.store(sg_ptr + pid, tl.sum(acc_g, axis=None))
        tl.store(sgx_ptr + pid, tl.sum(acc_gx, axis=None))

    @triton.jit
    def _grad_x_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr, HW, C, CG, G,
                       inv_n, SILU: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        xhat, off, mask, c, cm, grp, rstd = _normalised_tile(x_ptr, mean_ptr, rstd_ptr, HW, C, CG, G,
                                                             BLOCK_HW, BLOCK_C)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        mg = tl.load(sg_ptr + grp, mask=cm, other=0.0) * inv_n          # mean of g over the group
        mgx = tl.load(sgx_ptr + grp, mask=cm, other=0.0) * inv_n        # mean of g * xhat
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if SILU:
            dy = _silu_grad(dy, xhat, w, b_ptr, c, cm)
        dx = rstd[None, :] * (dy * w[None, :] - mg[None, :] - xhat * mgx[None, :])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels_last -> its memory as (B, H*W, C), no copy."""
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _blocks(hw: int, c: int, cg: int) -> dict:
    block_cg = triton.next_power_of_2(cg)
    return dict(stats_hw=max(1, min(triton.next_power_of_2(hw), 4096 // block_cg)), block_cg=block_cg,
                apply_hw=32, apply_c=min(triton.next_power_of_2(c), 128))


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, silu):
        b, c, h, w = x.shape
        hw, cg = h * w, c // groups
        xv = _nhwc(x)                                                   # (B, HW, C) view
        y = torch.empty_like(x)                                         # channels_last, like x
        mean = torch.empty(b * groups, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        k = _blocks(hw, c, cg)
        _stats_kernel[(b * groups,)](xv, mean, rstd, hw, c, cg, groups, 1.0 / (hw * cg), eps,
                                     BLOCK_HW=k["stats_hw"], BLOCK_C=k["block_cg"])
        grid = (b, triton.cdiv(hw, k["apply_hw"]), triton.cdiv(c, k["apply_c"]))
        _apply_kernel[grid](xv, _nhwc(y), mean, rstd, weight, bias, hw, c, cg, groups, SILU=silu,
                            BLOCK_HW=k["apply_hw"], BLOCK_C=k["apply_c"])
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        b, c, h, w = x.shape
        groups = ctx.groups
        hw, cg = h * w, c // groups
        dy = dy.contiguous(memory_format=torch.channels_last)
        xv, dyv = _nhwc(x), _nhwc(dy)
        sg, sgx = torch.empty_like(mean), torch.empty_like(mean)
        k = _blocks(hw, c, cg)
        _grad_stats_kernel[(b * groups,)](xv, dyv, weight, bias, mean, rstd, sg, sgx, hw, c, cg, groups,
                                          SILU=ctx.silu, BLOCK_HW=k["stats_hw"], BLOCK_C=k["block_cg"])
        dx = torch.empty_like(x)
        grid = (b, triton.cdiv(hw, k["apply_hw"]), triton.cdiv(c, k["apply_c"]))
        _grad_x_kernel[grid](xv, dyv, _nhwc(dx), weight, bias, mean, rstd, sg, sgx, hw, c, cg, groups,
                             1.0 / (hw * cg), SILU=ctx.silu, BLOCK_HW=k["apply_hw"], BLOCK_C=k["apply_c"])
        return dx, None, None, None, None, None


def usable(norm: torch.nn.GroupNorm, x: torch.Tensor) -> bool:
    """Where the kernels apply: Triton present, a 4-D channels_last input (not also NCHW-contiguous) on
    CUDA (or anywhere under Triton's interpreter), affine parameters that need no gradient."""
    return (available() and (x.is_cuda or INTERPRET) and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous() and norm.affine and not norm.weight.requires_grad
            and not norm.bias.requires_grad)


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps) for a channels_last x (then F.silu where `silu`); the
    output is channels_last."""
    if x.shape[1] % groups:
        raise ValueError(f"GroupNorm: {x.shape[1]} channels do not split into {groups} groups")
    return _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu)
