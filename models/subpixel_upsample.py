"""Nearest 2x upsampling followed by a 3x3 convolution, computed on the low-resolution input (sub-pixel form).

    y = conv3x3(up2(x)) + b,        up2(x)[2i + a, 2j + c] = x[i, j]                   (a, c in {0, 1})

Output row 2i + a reads rows 2i + a - 1, 2i + a, 2i + a + 1 of up2(x) with the kernel's rows W[0], W[1], W[2],
and those are input rows
    a = 0:  i - 1, i, i      -> weights (W[0], W[1] + W[2]) at input rows (i - 1, i)
    a = 1:  i, i, i + 1      -> weights (W[0] + W[1], W[2]) at input rows (i, i + 1)
(columns alike). So each output parity (a, c) is a 2x2 convolution of x with K_ac = R_a W R_c^T, where
R_0 = [[1, 0, 0], [0, 1, 1]] and R_1 = [[1, 1, 0], [0, 0, 1]]; stacked as 4 * Cout output channels they are one
convolution of x padded by 1:
    Z = conv2x2(x, K, padding=1)                              (B, 4 Cout, h + 1, w + 1)
    y[:, :, 2i + a, 2j + c] = Z[:, (2a + c) Cout : (2a + c + 1) Cout, i + a, j + c] + b
That is 4/9 of the direct form's multiply-adds (times (1 + 1/h)(1 + 1/w) for the padding), and up2(x) is never
stored; one strided pass interleaves Z's parities into y and adds the bias (which torch would add in a separate
pass over a channels_last output). The decomposition is the sub-pixel convolution of Shi et al. 2016, "Real-Time
Single Image and Video Super-Resolution Using an Efficient Sub-Pixel Convolutional Neural Network" (sec. 2.2,
the equivalence of a strided/upsampled convolution and a convolution at low resolution followed by a periodic
shuffling). The parity kernels sum kernel weights before multiplying (in fp32, then rounded once to the
weights' dtype), so roundings move within the dtype's precision; the function is the same
(tests/test_subpixel_upsample.py against F.interpolate + conv2d, and the UNet against diffusers').

Used by Upsample2D (models/blocks.py) for plain frozen convolutions (a LoRA-wrapped or trained upsampler
convolution keeps the direct form) when `UNet.set_subpixel_upsampling` (or the VAE's) turned it on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from models import pdl
from models.bias_folding import is_channels_last
from models.triton_env import INTERPRET, available

enabled = True   # a process-wide off switch (experiments/bench/graph_ab.py compares the step without it)
# Below this many input pixels (batch x height x width) the direct form is kept: on an H100 in bf16 cuDNN's 2x2
# convolution lost at 512 (SD1.5's 8x8 level at batch 8, its 16x16 at batch 2: 0.25 against 0.20 ms forward and
# input gradient) and won from 2,048 on (its 16x16 level at batch 8: 0.49 against 0.68 ms; its 32x32 at batch 2
# 0.15 against 0.23); experiments/bench/subpixel_probe.py, RESULTS.md session 13.
MIN_PIXELS = 1024

def parity_kernels(weight: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> (4 * Cout, Cin, 2, 2) in `memory_format`: output channel (2a + c) * Cout + o holds
    K_ac = R_a W_o R_c^T, summed in fp32 (fp64 weights: fp64) and rounded once to the weight's dtype."""
    cout, cin = weight.shape[:2]
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    rows = torch.stack((w[:, :, 0], w[:, :, 1] + w[:, :, 2], w[:, :, 0] + w[:, :, 1], w[:, :, 2]))  # (a u, O, I, 3)
    k = torch.stack((rows[..., 0], rows[..., 1] + rows[..., 2], rows[..., 0] + rows[..., 1], rows[..., 2]),
                    -1)                                                                            # (a u, O, I, c v)
    out = torch.empty(4 * cout, cin, 2, 2, dtype=weight.dtype, device=weight.device, memory_format=memory_format)
    out.view(2, 2, cout, cin, 2, 2).copy_(k.view(2, 2, cout, cin, 2, 2).permute(0, 4, 2, 3, 1, 5))  # (a, c, O, I, u, v)
    return out


def layout(t: torch.Tensor):
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def _parity_views(z: torch.Tensor, y: torch.Tensor, cout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, 4 Cout, h + 1, w + 1) and y (B, Cout, 2h, 2w), any memory layout, as matching 6-D views indexed
    (b, o, i, a, j, c): y's [b, o, 2i + a, 2j + c] and z's [b, (2a + c) Cout + o, i + a, j + c]."""
    b, _, h2, w2 = y.shape
    h, w = h2 // 2, w2 // 2
    zb, zc, zh, zw = z.stride()
    yb, yc, yh, yw = y.stride()
    size = (b, cout, h, 2, w, 2)
    zv = z.as_strided(size, (zb, zc, zh, zh + 2 * cout * zc, zw, zw + cout * zc), z.storage_offset())
    yv = y.as_strided(size, (yb, yc, 2 * yh, yh, 2 * yw, yw), y.storage_offset())
    return zv, yv


if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _interleave_kernel(z_ptr, bias_ptr, y_ptr, P, H, W, C, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
        """NHWC. Output pixels p = (b * 2H + oh) * 2W + ow, channels o, parity (a, c) = (oh % 2, ow % 2):
        y[p, o] = z[(b * (H + 1) + oh // 2 + a) * (W + 1) + ow // 2 + c, (2a + c) * C + o] + bias[o]."""
        pdl.start(PDL)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        o = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ow, t = p % (2 * W), p // (2 * W)
        oh, b = t % (2 * H), t // (2 * H)
        a, c = oh % 2, ow % 2
        src = ((b * (H + 1) + oh // 2 + a) * (W + 1) + ow // 2 + c).to(tl.int64) * (4 * C) + (2 * a + c) * C
        mask = (p[:, None] < P) & (o[None, :] < C)
        v = tl.load(z_ptr + src[:, None] + o[None, :], mask=mask)
        if HAS_BIAS:
            v = v.to(tl.float32) + tl.load(bias_ptr + o, mask=o < C).to(tl.float32)[None, :]
        tl.store(y_ptr + p[:, None].to(tl.int64) * C + o[None, :], v.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_kernel(dy_ptr, dz_ptr, Q, H, W, C, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
                       PDL: tl.constexpr = False):
        """The forward's transpose, NHWC: z pixels q = (b * (H + 1) + r) * (W + 1) + s; program_id(1) holds the
        parity (a, c) and a block of its C channels: dz[q, (2a + c) * C + o] = dy[(b * 2H + 2(r - a) + a) * 2W
        + 2(s - c) + c, o] where 0 <= r - a < H and 0 <= s - c < W, else 0 (the padding's row and column)."""
        pdl.start(PDL)
        q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        n_blocks = tl.cdiv(C, BLOCK_C)
        parity, blk = tl.program_id(1) // n_blocks, tl.program_id(1) % n_blocks
        a, c = parity // 2, parity % 2
        o = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        s, t = q % (W + 1), q // (W + 1)
        r, b = t % (H + 1), t // (H + 1)
        i, j = r - a, s - c
        inside = (q < Q) & (i >= 0) & (i < H) & (j >= 0) & (j < W)
        src = ((b * 2 * H + 2 * i + a) * (2 * W) + 2 * j + c).to(tl.int64) * C
        v = tl.load(dy_ptr + src[:, None] + o[None, :], mask=inside[:, None] & (o[None, :] < C), other=0.0)
        dst = q.to(tl.int64) * (4 * C) + parity * C
        tl.store(dz_ptr + dst[:, None] + o[None, :], v, mask=(q[:, None] < Q) & (o[None, :] < C))


def _blocks(c: int) -> tuple[int, int]:
    block_c = min(128, triton.next_power_of_2(c))
    return max(1, 4096 // block_c), block_c


def _triton_path(z: torch.Tensor) -> bool:
    return available() and (z.is_cuda or INTERPRET) and is_channels_last(z)


def _interleave(z: torch.Tensor, bias: torch.Tensor | None, cout: int) -> torch.Tensor:
    """Z's four parities into y, plus the bias: one strided pass (Triton for channels_last on CUDA)."""
    b, _, h1, w1 = z.shape
    h, w = h1 - 1, w1 - 1
    y = torch.empty(b, cout, 2 * h, 2 * w, dtype=z.dtype, device=z.device, memory_format=layout(z))
    if _triton_path(z):
        bp, bc = _blocks(cout)
        pixels = b * 4 * h * w
        _interleave_kernel[(triton.cdiv(pixels, bp), triton.cdiv(cout, bc))](
            z, z if bias is None else bias, y, pixels, h, w, cout, HAS_BIAS=bias is not None,
            BLOCK_P=bp, BLOCK_C=bc, **pdl.kw(z))
        return y
    zv, yv = _parity_views(z, y, cout)
    if bias is None:
        yv.copy_(zv)
    else:
        torch.add(zv, bias.to(z.dtype).view(1, cout, 1, 1, 1, 1), out=yv)
    return y


def _gather(dy: torch.Tensor, z_shape: tuple, fmt) -> torch.Tensor:
    """The transpose of _interleave: dZ from dy, zeros in the padding's row and column of each parity."""
    b, c4, h1, w1 = z_shape
    cout = c4 // 4
    if fmt == torch.channels_last and available() and (dy.is_cuda or INTERPRET):
        dy = dy.contiguous(memory_format=torch.channels_last)
        dz = torch.empty(z_shape, dtype=dy.dtype, device=dy.device, memory_format=torch.channels_last)
        bq, bc = _blocks(cout)
        pixels = b * h1 * w1
        _gather_kernel[(triton.cdiv(pixels, bq), 4 * triton.cdiv(cout, bc))](
            dy, dz, pixels, h1 - 1, w1 - 1, cout, BLOCK_Q=bq, BLOCK_C=bc, **pdl.kw(dy))
        return dz
    dz = torch.empty(z_shape, dtype=dy.dtype, device=dy.device, memory_format=fmt).zero_()
    zv, yv = _parity_views(dz, dy, cout)
    zv.copy_(yv)
    return dz


class _SubpixelConv(torch.autograd.Function):
    """y = interleave(conv2x2(x, K, padding=1)) + b. Nothing of x is kept for the backward (the weight is frozen:
    dx = conv2x2^T(gather(dy), K) needs only K), where torch's convolution would keep its input: up2(x), 4x as
    large, in the direct form. K is the caller's (kept) or computed again in the backward from W."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        fmt = layout(x)
        k = kernels if kernels is not None else parity_kernels(weight, fmt)
        with torch.autocast(dev, enabled=False):
            z = F.conv2d(x.to(dtype), k.to(dtype), None, 1, 1)                 # (B, 4 Cout, h + 1, w + 1)
            y = _interleave(z, bias, weight.shape[0])                          # (B, Cout, 2h, 2w)
        ctx.save_for_backward(weight, kernels)
        ctx.meta = (x.dtype, dtype, fmt, z.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, kernels = ctx.saved_tensors
        x_dtype, dtype, fmt, z_shape = ctx.meta
        db = dy.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            k = kernels if kernels is not None else parity_kernels(weight, fmt)
            with torch.autocast(dy.device.type, enabled=False):
                dz = _gather(dy.to(dtype), z_shape, fmt)
                dx = F.conv_transpose2d(dz, k.to(dtype), None, 1, 1).to(x_dtype)   # (B, Cin, h, w)
        return dx, None, db, None


def usable(conv: nn.Module, x: torch.Tensor) -> bool:
    """A plain 3x3, stride 1, padding 1 convolution whose weight is not trained here (frozen, or no grad), on a 4-D
    input of at least MIN_PIXELS pixels."""
    return (enabled and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and not (conv.weight.requires_grad and torch.is_grad_enabled())
            and x.ndim == 4 and x.shape[0] * x.shape[2] * x.shape[3] >= MIN_PIXELS)


class ParityKernelCache:
    """The parity kernels of one frozen convolution, computed again when its weight changed: other memory (a
    dtype or device move, or models/pipeline.parts_on pointing it elsewhere) or an in-place update (a LoRA
    merge bumps the tensor's version; a write through `.data` would not be seen). The source's storage is
    held weakly: while it lives its address is not reused, and once freed the kernels are dropped."""

    def __init__(self):
        self.source, self.key, self.kernels = None, None, None

    def get(self, weight: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.shape, memory_format)
        if self.source is None or self.source.expired() or key != self.key:
            self.kernels = None
            self.source, self.key = StorageWeakRef(weight.untyped_storage()), key
            self.kernels = parity_kernels(weight.detach(), memory_format)
        return self.kernels


def set_subpixel_upsampling(model: nn.Module, enabled: bool = True) -> None:
    """Every Upsample2D in `model` (a UNet or a VAE) computes its convolution in the sub-pixel form where usable."""
    from models.blocks import Upsample2D
    for m in model.modules():
        if isinstance(m, Upsample2D):
            m.subpixel = enabled


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d, kernels: torch.Tensor | None = None) -> torch.Tensor:
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for x (B, Cin, h, w) -> (B, Cout, 2h, 2w), in x's
    memory layout. `kernels`: parity_kernels(conv.weight, layout(x)), kept by the caller; None: computed here and
    again in the backward (nothing kept: gradient checkpointing's choice, memory over time)."""
    return _SubpixelConv.apply(x, conv.weight, conv.bias, kernels)
