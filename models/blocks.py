"""Building blocks shared by the UNet and the VAE.

Attribute names are the diffusers names (`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`,
`downsamplers.0.conv`), so that diffusers checkpoints load with one strict call and kohya LoRA
names map 1:1. Reference: diffusers/models/resnet.py, downsampling.py, upsampling.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import ahead, bias_folding, sdpa_backend, subpixel_upsample
from models.autocast_off import autocast_off


def _norm_in_weight_dtype(self: nn.Module, x: torch.Tensor, silu: bool = False,
                          shift: torch.Tensor | None = None, passthrough: bool = False):
    """The norm in its weights' dtype; `silu` and `shift` (GroupNorms with `nhwc` only, see
    blocks.ResnetBlock2D) return silu(norm(x + shift[:, :, None, None])). `passthrough` (GroupNorms) returns
    (y, x') where the caller's residual path then reads x' (x's values): on the NHWC kernels the two paths'
    gradients are summed in the norm's backward pass (models/nhwc_group_norm.py), elsewhere x' is x."""
    x_in = x
    with autocast_off(x):
        x = x.to(self.weight.dtype)
        if self.__dict__.get("nhwc"):
            from models import nhwc_group_norm  # Triton: imported only where asked for
            if nhwc_group_norm.usable(self, x):  # no NCHW copy around the norm, SiLU in the same kernel
                fused = passthrough and x is x_in                         # (y, x') from the kernel's function
                y = nhwc_group_norm.group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps, silu,
                                                    shift, passthrough=fused)
                return y if fused or not passthrough else (y, x_in)
        if shift is not None:
            x = x + shift.to(x.dtype).expand(x.shape[:2])[:, :, None, None]
        y = type(self).forward(self, x)
        y = F.silu(y) if silu else y
        return (y, x_in) if passthrough else y


def set_norms_in_weight_dtype(module: nn.Module, enabled: bool = True, nhwc: bool = False) -> None:
    """Every GroupNorm/LayerNorm in `module` runs in its weights' dtype, outside autocast (_norm_in_weight_dtype);
    nhwc: its GroupNorms of channels_last CUDA inputs on models/nhwc_group_norm.py's kernels. Off: torch's modules
    as they were. (UNet.set_norms_in_weight_dtype, AutoencoderKL.set_nhwc_norms.)"""
    for m in module.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            if enabled:
                m.forward = _norm_in_weight_dtype.__get__(m)
                m.nhwc = nhwc and isinstance(m, nn.GroupNorm)
                m.in_weight_dtype = True
            else:
                for k in ("forward", "nhwc", "in_weight_dtype"):
                    m.__dict__.pop(k, None)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """F.silu(norm(x)), in one kernel where the UNet's norms run NHWC (models/unet.set_norms_in_weight_dtype)."""
    return norm(x, silu=True) if norm.__dict__.get("nhwc") else F.silu(norm(x))


def norm_and_residual(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False):
    """(norm(x), then F.silu where `silu`; x') for a block whose residual path reads x: with the NHWC kernels x' is
    a view of x whose gradient the norm's backward adds to its own in one pass (models/nhwc_group_norm.py),
    elsewhere x' is x and autograd sums the two."""
    if norm.__dict__.get("nhwc"):
        return norm(x, silu=silu, passthrough=True)
    y = norm(x)
    return (F.silu(y) if silu else y), x


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional timestep embedding added in between.

    Ho et al. 2020 (DDPM) appendix B; the layout of ldm/modules/diffusionmodules/openaimodel.py.
    `temb_channels=None` gives the VAE's block (no `time_emb_proj`).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None,
                 groups: int = 32, eps: float = 1e-5, dropout: float = 0.0,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    fold_biases = False  # UNet.set_bias_folding: with NHWC norms, _forward_biases_folded

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if self.fold_biases and self.norm2.__dict__.get("nhwc"):
            return self._forward_biases_folded(x, temb)
        h = self.conv1(norm_silu(self.norm1, x))                   # (B, Cout, H, W)
        if self.time_emb_proj is not None:
            h = h + self._time_proj(temb)[:, :, None, None]         # temb (B, T) -> (B, Cout, 1, 1)
        h = norm_silu(self.norm2, h)                                # (conv1's output freed here without grad:
        h = self.conv2(self.dropout(h))                             # the VAE at 1024^2 fp32, 0.5 GiB a tensor)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out

    def _time_proj(self, temb: torch.Tensor) -> torch.Tensor:
        """time_emb_proj(silu(temb)): (B, T) -> (B, Cout), or the value models/ahead.py computed for it."""
        got = ahead.take(self)
        return got if got is not None else self.time_emb_proj(F.silu(temb))

    def _forward_biases_folded(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """forward() where the norms run NHWC (models/bias_folding.py): conv1's bias and the timestep
        embedding enter norm2 as its shift; conv2's bias goes into the shortcut's bias or the residual sum."""
        h, x = norm_and_residual(self.norm1, x, silu=True)                          # x: the residual path's
        h = bias_folding.conv_without_bias(self.conv1, h)                           # (B, Cout, H, W)
        shift = bias_folding.bias_of(self.conv1)                                    # (Cout,)
        if self.time_emb_proj is not None:
            t = self._time_proj(temb).float()                                       # (B, Cout)
            shift = t if shift is None else t + shift.float()
        h = self.norm2(h, silu=True, shift=shift)
        h = bias_folding.conv_without_bias(self.conv2, self.dropout(h))
        b2 = bias_folding.bias_of(self.conv2)
        if self.conv_shortcut is not None:
            out = bias_folding.pointwise(self.conv_shortcut, x, extra_bias=b2) + h
        else:
            out = bias_folding.add_with_bias(x, h, b2)
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE uses padding 0 with an asymmetric (0, 1, 0, 1) pad, as LDM does."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2 (or to an explicit size, for latents not divisible by 2**n) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    nhwc_kernel = False  # UNet.set_nhwc_upsampling: models/nhwc_upsample.py for channels_last inputs on CUDA
    subpixel = False     # set_subpixel_upsampling: the conv on the low-resolution input (models/subpixel_upsample.py)
    keep_parity_kernels = True   # its kernels kept between calls (off under gradient checkpointing: memory first)

    def release_caches(self) -> None:
        """Drop what was derived from the weights (models/pipeline.parts_on, when they go back to host memory)."""
        self.__dict__.pop("_parity", None)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        doubled = size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3])
        if self.subpixel and doubled and subpixel_upsample.usable(self.conv, x):
            kernels = None
            if self.keep_parity_kernels:
                cache = self.__dict__.setdefault("_parity", subpixel_upsample.ParityKernelCache())
                kernels = cache.get(self.conv.weight, subpixel_upsample.layout(x))
            return subpixel_upsample.upsample_conv(x, self.conv, kernels)
        if self.nhwc_kernel and doubled:
            from models import nhwc_upsample  # Triton: imported only where asked for
            if nhwc_upsample.usable(x):
                return self.conv(nhwc_upsample.upsample2x(x))
        # nearest copies values, so fp16/bf16 need no fp32 round trip (torch >= 2.1 has the kernels); outside
        # autocast, which would otherwise run it in fp32 on CUDA (the batch-8 profile: fp32 kernels and copies)
        with autocast_off(x):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
                F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              upcast: bool = False, short_kernel: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, N, heads*d) tensors -> (B, N, heads*d).

    Vaswani et al. 2017, eq. 1, through torch's fused SDPA kernels. `upcast` computes in fp32
    (SD2.1's `upcast_attention`, which avoids fp16 overflow in the softmax). `short_kernel`: at most 128 keys
    (cross-attention's text tokens) go through models/short_attention.py's Triton kernels where usable.
    """
    if short_kernel and not upcast:
        from models import short_attention  # Triton: imported only where asked for
        if short_attention.usable(q, k, heads) and v.dtype == q.dtype:
            return short_attention.short_attention(q, k, v, heads)
    if not upcast and sdpa_backend.fa4(q, k, heads):
        from models import fa4_attention  # optional package: imported only where asked for
        return fa4_attention.attention(q, k, v, heads)
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q = q.view(b, n, heads, d).transpose(1, 2)                    # (B, h, N, d)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)           # (B, h, M, d)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)           # (B, h, M, d)
    with sdpa_backend.choose(q):                                  # models/sdpa_backend.py: which kernel
        out = F.scaled_dot_product_attention(q, k, v)             # (B, h, N, d)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)     # (B, N, h*d)
