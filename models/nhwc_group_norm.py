"""GroupNorm on channels_last tensors without layout copies (Triton kernels; frozen affine parameters).

Why: CUDA's native GroupNorm reads NCHW only, so in a channels_last UNet every GroupNorm input is copied
to NCHW and every convolution input back to NHWC, forward and backward: 13.8 of the 80.6 ms of kernels
in the batch-8 bf16 step. Measured on an H100 (experiments/bench/RESULTS.md): that step 0.0826 -> 0.0675
s with these kernels, 0.0585 s with the SiLU fused and the reductions split into tiles.

    y = (x - mean_bg) * rstd_bg * weight_c + bias_c      (Wu & He 2018, arXiv:1803.08494, eq. 1-2)

Statistics per (sample b, group g) over H*W*C/G values in fp32: each group is split into tiles (many
programs, so the reduction fills the GPU), each tile's mean and squared deviations from it are taken in
two passes over registers (no cancellation), and the tiles are combined exactly (Chan et al. 1979).
The backward for x (weight and bias frozen, as in LoRA training):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dy * weight,  means over the (b, g) group

`shift` (B, C) is added to x as it is read, in fp32 (a resnet's conv bias and timestep embedding; its
gradient, where one is wanted, is dx summed over H, W).

`silu=True` returns silu(y) = y * sigmoid(y) (Elfwing et al. 2018, eq. 3) from the same kernel, as the
resnets' GroupNorm -> SiLU needs: one pass instead of two, and only x is kept for the backward, which
recomputes y and applies silu'(y) = s * (1 + y * (1 - s)), s = sigmoid(y), to the incoming gradient.

Used only for CUDA, channels_last inputs, frozen affine parameters and `set_norms_in_weight_dtype`'s
half norms (models/unet.py); everything else takes torch's GroupNorm. Tested against F.group_norm with
Triton's interpreter on the CPU (tests/test_nhwc_group_norm.py) and on the GPU against fp32
(tests/test_fast_paths.py).
"""
from __future__ import annotations

import torch

from models import pdl
from models.triton_env import INTERPRET, available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _group_tile(pid_bg, tile, HW, C, CG, G, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """Offsets and mask of rows [tile * BLOCK_HW, +BLOCK_HW) of group g of sample b (pid_bg = b * G + g)."""
        b, g = pid_bg // G, pid_bg % G
        c = tl.arange(0, BLOCK_C)
        cmask = c < CG
        r = tile * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = (r[:, None] < HW) & cmask[None, :]
        return b * HW * C + g * CG + r[:, None] * C + c[None, :], mask, g, c, cmask, b

    @triton.jit
    def _load_group_tile(x_ptr, shift_ptr, off, mask, b, g, c, cmask, C, CG, SHIFT: tl.constexpr):
        """x (+ shift[b, channel] where SHIFT) in fp32, 0 outside the mask."""
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if SHIFT:
            sh = tl.load(shift_ptr + b * C + g * CG + c, mask=cmask, other=0.0)
            x = tl.where(mask, x + sh[None, :], 0.0)
        return x

    @triton.jit
    def _stats_kernel(x_ptr, shift_ptr, pmean_ptr, pm2_ptr, HW, C, CG, G, S,
                      SHIFT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """One tile of one (b, g): its mean and sum of squared deviations from that mean (two passes over
        registers), to be combined over the group's S tiles by _combine_stats_kernel."""
        pdl.start(PDL)
        pid, tile = tl.program_id(0), tl.program_id(1)
        off, mask, g, c, cmask, b = _group_tile(pid, tile, HW, C, CG, G, BLOCK_HW, BLOCK_C)
        x = _load_group_tile(x_ptr, shift_ptr, off, mask, b, g, c, cmask, C, CG, SHIFT)
        n = tl.minimum(HW - tile * BLOCK_HW, BLOCK_HW) * CG
        mean = tl.sum(x, axis=None) / n
        d = tl.where(mask, x - mean, 0.0)
        tl.store(pmean_ptr + pid * S + tile, mean)
        tl.store(pm2_ptr + pid * S + tile, tl.sum(d * d, axis=None))

    @triton.jit
    def _combine_stats_kernel(pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, HW, CG, S, eps,
                              BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
        """Chan, Golub & LeVeque 1979 (pairwise update, eq. 2.1 generalised to S parts):
        mean = sum n_s mean_s / n,  M2 = sum (M2_s + n_s (mean_s - mean)^2)."""
        pdl.start(PDL)
        pid = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        sm = s < S
        n_s = (tl.minimum(HW - s * BLOCK_HW, BLOCK_HW) * CG).to(tl.float32)
        n_s = tl.where(sm, n_s, 0.0)
        mean_s = tl.load(pmean_ptr + pid * S + s, mask=sm, other=0.0)
        m2_s = tl.load(pm2_ptr + pid * S + s, mask=sm, other=0.0)
        n = tl.sum(n_s, axis=0)
        mean = tl.sum(n_s * mean_s, axis=0) / n
        dm = mean_s - mean
        m2 = tl.sum(m2_s + n_s * dm * dm, axis=0)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(m2 / n + eps))

    @triton.jit
    def _sum_parts_kernel(part_ptr, out_ptr, S, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
        """out[i] = sum_s part[i, s] (the backward's per-group sums, in a fixed order: deterministic)."""
        pdl.start(PDL)
        pid = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        v = tl.load(part_ptr + pid * S + s, mask=s < S, other=0.0)
        tl.store(out_ptr + pid, tl.sum(v, axis=0))

    @triton.jit
    def _normalised_tile(x_ptr, shift_ptr, mean_ptr, rstd_ptr, HW, C, CG, G, SHIFT: tl.constexpr,
                         BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's (BLOCK_HW, BLOCK_C) tile of sample b: xhat = (x [+ shift] - mean) * rstd in fp32,
        with the tile's offsets, mask, channels, their group indices and rstd (the elementwise kernels' common
        part)."""
        b = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        mask = (r[:, None] < HW) & cm[None, :]
        off = b * HW * C + r[:, None] * C + c[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if SHIFT:
            x += tl.load(shift_ptr + b * C + c, mask=cm, other=0.0)[None, :]
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
    def _apply_kernel(x_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, HW, C, CG, G, SILU: tl.constexpr,
                      SHIFT: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        pdl.start(PDL)
        xhat, off, mask, c, cm, grp, rstd = _normalised_tile(x_ptr, shift_ptr, mean_ptr, rstd_ptr, HW, C, CG, G,
                                                             SHIFT, BLOCK_HW, BLOCK_C)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
        y = xhat * w[None, :] + bias[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _grad_stats_kernel(x_ptr, shift_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, psg_ptr, psgx_ptr, HW, C,
                           CG, G, S, SILU: tl.constexpr, SHIFT: tl.constexpr, BLOCK_HW: tl.constexpr,
                           BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """One tile of one (b, g): sums of g = dy * w and of g * xhat (summed over tiles by _sum_parts_kernel)."""
        pdl.start(PDL)
        pid, tile = tl.program_id(0), tl.program_id(1)
        off, mask, g, c, cmask, b = _group_tile(pid, tile, HW, C, CG, G, BLOCK_HW, BLOCK_C)
        w = tl.load(w_ptr + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)
        xhat = (_load_group_tile(x_ptr, shift_ptr, off, mask, b, g, c, cmask, C, CG, SHIFT) - mean) * rstd
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            dy = _silu_grad(dy, xhat, w, b_ptr + g * CG, c, cmask)
        gr = dy * w[None, :]
        tl.store(psg_ptr + pid * S + tile, tl.sum(gr, axis=None))
        tl.store(psgx_ptr + pid * S + tile, tl.sum(tl.where(mask, gr * xhat, 0.0), axis=None))

    @triton.jit
    def _grad_x_kernel(x_ptr, shift_ptr, dy_ptr, res_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr,
                       HW, C, CG, G, inv_n, SILU: tl.constexpr, SHIFT: tl.constexpr, RES: tl.constexpr,
                       BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """dx (+ the residual path's gradient res where RES: one pass instead of autograd's separate sum)."""
        pdl.start(PDL)
        xhat, off, mask, c, cm, grp, rstd = _normalised_tile(x_ptr, shift_ptr, mean_ptr, rstd_ptr, HW, C, CG, G,
                                                             SHIFT, BLOCK_HW, BLOCK_C)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        mg = tl.load(sg_ptr + grp, mask=cm, other=0.0) * inv_n          # mean of g over the group
        mgx = tl.load(sgx_ptr + grp, mask=cm, other=0.0) * inv_n        # mean of g * xhat
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if SILU:
            dy = _silu_grad(dy, xhat, w, b_ptr, c, cm)
        dx = rstd[None, :] * (dy * w[None, :] - mg[None, :] - xhat * mgx[None, :])
        if RES:
            dx += tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


fuse_residual_grad = True   # passthrough's gradient summed in the backward kernel (graph_ab toggles it)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels_last -> its memory as (B, H*W, C), no copy."""
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _blocks(hw: int, c: int, cg: int) -> dict:
    """Tile sizes: the reductions split each (b, g) into S tiles of about 2,048 values (enough programs to
    fill the GPU: at 64x64 latents and 10 channels per group, 32 tiles per group); the elementwise kernels
    take 32 positions x up to 128 channels."""
    block_cg = triton.next_power_of_2(cg)
    stats_hw = max(1, min(triton.next_power_of_2(hw), 2048 // block_cg))
    s = triton.cdiv(hw, stats_hw)
    return dict(stats_hw=stats_hw, block_cg=block_cg, s=s, block_s=triton.next_power_of_2(s),
                apply_hw=32, apply_c=min(triton.next_power_of_2(c), 128))


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, silu, shift, passthrough=False):
        b, c, h, w = x.shape
        hw, cg = h * w, c // groups
        xv = _nhwc(x)                                                   # (B, HW, C) view
        sh = xv if shift is None else shift                             # (B, C) fp32, or an unused pointer
        y = torch.empty_like(x)                                         # channels_last, like x
        k = _blocks(hw, c, cg)
        parts = torch.empty(2, b * groups, k["s"], device=x.device, dtype=torch.float32)  # per-tile mean, M2
        stats = torch.empty(2, b * groups, device=x.device, dtype=torch.float32)
        mean, rstd = stats[0], stats[1]
        on = shift is not None
        _stats_kernel[(b * groups, k["s"])](xv, sh, parts[0], parts[1], hw, c, cg, groups, k["s"], SHIFT=on,
                                            BLOCK_HW=k["stats_hw"], BLOCK_C=k["block_cg"], **pdl.kw(xv))
        _combine_stats_kernel[(b * groups,)](parts[0], parts[1], mean, rstd, hw, cg, k["s"], eps,
                                             BLOCK_HW=k["stats_hw"], BLOCK_S=k["block_s"], **pdl.kw(parts))
        grid = (b, triton.cdiv(hw, k["apply_hw"]), triton.cdiv(c, k["apply_c"]))
        _apply_kernel[grid](xv, sh, _nhwc(y), mean, rstd, weight, bias, hw, c, cg, groups, SILU=silu, SHIFT=on,
                            BLOCK_HW=k["apply_hw"], BLOCK_C=k["apply_c"], **pdl.kw(xv))
        ctx.save_for_backward(x, weight, bias, mean, rstd, shift)
        ctx.groups, ctx.silu = groups, silu
        ctx.set_materialize_grads(False)
        return (y, x.view_as(x)) if passthrough else y

    @staticmethod
    def backward(ctx, dy, dres=None):
        if dy is None:                                                  # y unused: x's gradient is the residual's
            return dres, None, None, None, None, None, None, None
        x, weight, bias, mean, rstd, shift = ctx.saved_tensors
        b, c, h, w = x.shape
        groups = ctx.groups
        hw, cg = h * w, c // groups
        dy = dy.contiguous(memory_format=torch.channels_last)
        xv, dyv = _nhwc(x), _nhwc(dy)
        sh, on = (xv, False) if shift is None else (shift, True)
        k = _blocks(hw, c, cg)
        parts = torch.empty(2, b * groups, k["s"], device=x.device, dtype=torch.float32)
        sums = torch.empty(2, b * groups, device=x.device, dtype=torch.float32)
        sg, sgx = sums[0], sums[1]
        _grad_stats_kernel[(b * groups, k["s"])](xv, sh, dyv, weight, bias, mean, rstd, parts[0], parts[1], hw, c,
                                                 cg, groups, k["s"], SILU=ctx.silu, SHIFT=on,
                                                 BLOCK_HW=k["stats_hw"], BLOCK_C=k["block_cg"], **pdl.kw(xv))
        _sum_parts_kernel[(2 * b * groups,)](parts, sums, k["s"], BLOCK_S=k["block_s"], **pdl.kw(parts))
        dx = torch.empty_like(x)
        grid = (b, triton.cdiv(hw, k["apply_hw"]), triton.cdiv(c, k["apply_c"]))
        res = dres is not None
        resv = _nhwc(dres.contiguous(memory_format=torch.channels_last)) if res else dyv
        _grad_x_kernel[grid](xv, sh, dyv, resv, _nhwc(dx), weight, bias, mean, rstd, sg, sgx, hw, c, cg, groups,
                             1.0 / (hw * cg), SILU=ctx.silu, SHIFT=on, RES=res, BLOCK_HW=k["apply_hw"],
                             BLOCK_C=k["apply_c"], **pdl.kw(xv))
        dshift = dx.float().sum(dim=(2, 3)) if on and ctx.needs_input_grad[6] else None   # (B, C)
        return dx, None, None, None, None, None, dshift, None


def usable(norm: torch.nn.GroupNorm, x: torch.Tensor) -> bool:
    """Where the kernels apply: Triton present, a 4-D channels_last input (not also NCHW-contiguous) on
    CUDA (or anywhere under Triton's interpreter), affine parameters that need no gradient (frozen, or
    grad mode off, as in sampling), fewer than 2**31 elements (the kernels' offsets are int32: a VAE's 1024x1024
    activations at batch 16 would overflow) and at most 65,535 x 32 positions (the elementwise kernels' second grid
    dimension: a VAE decoding 2048x2048 would exceed it)."""
    affine_grad = torch.is_grad_enabled() and (norm.weight.requires_grad or norm.bias.requires_grad)
    return (available() and (x.is_cuda or INTERPRET) and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous() and norm.affine and not affine_grad and x.numel() < 2 ** 31
            and x.shape[2] * x.shape[3] <= 65535 * 32)


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float, silu: bool = False, shift: torch.Tensor | None = None, passthrough: bool = False):
    """F.group_norm(x + shift[:, :, None, None], groups, weight, bias, eps) for a channels_last x (then F.silu
    where `silu`); the output is channels_last. `shift` (B, C) or (C,), added in fp32 as x is read: a resnet's
    conv bias plus its timestep embedding (models/blocks.py), which then never make a pass of their own.

    `passthrough`: returns (y, x') with x' the same values as x (a view): the residual path uses x' instead of
    x, and the backward adds x''s gradient to the norm's own in its last pass (`fuse_residual_grad`), where
    autograd would sum the two in a kernel of its own (read 2 tensors, write 1)."""
    b, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {groups} groups")
    if shift is not None:
        shift = shift.float().expand(b, c).contiguous()                 # (B, C) fp32
    if passthrough and shift is not None:
        raise ValueError("group_norm_nhwc: passthrough with a shift (the residual path would skip the shift)")
    if passthrough and not fuse_residual_grad:
        return _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu, shift), x
    return _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu, shift, passthrough)
