"""Convolution biases folded into the operations next to them (channels_last UNet on CUDA).

torch adds a convolution's bias after cuDNN's kernel, in a separate broadcast add that walks a
channels_last output through its strided kernel: 138 such adds (conv biases and the resnets' timestep
embedding) took 1.9 ms of the batch-8 bf16 step on an H100 (experiments/bench/RESULTS.md). Where the
UNet runs NHWC they are folded instead:

- a 1x1 convolution (proj_in, proj_out, conv_shortcut) is a matrix product over the channels of the
  NHWC memory, (B*H*W, Cin) @ (Cin, Cout): `F.linear` adds its bias in cuBLAS's epilogue;
- a resnet's conv1 bias and timestep embedding enter its second GroupNorm as a per-(sample, channel)
  shift, added as the norm reads its input (models/nhwc_group_norm.py);
- a resnet's conv2 bias joins the residual sum: into the shortcut's bias where there is a 1x1
  shortcut, else one kernel computes skip + h + bias (`add_with_bias`, models/nhwc_add.py).

The function is the same; only where the roundings fall moves (tests/test_bias_folding.py).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out NHWC (and not also NCHW-contiguous, as 1x1 images are)."""
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def add_with_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a + b + bias[None, :, None, None] (a, b (B, C, H, W)): one Triton pass for same-dtype channels_last
    tensors on CUDA (models/nhwc_add.py, imported only then), else torch's adds."""
    if bias is None:
        return a + b
    if (a.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and a.dtype == b.dtype and a.shape == b.shape \
            and is_channels_last(a) and is_channels_last(b) and a.numel() < 2 ** 31:  # (the kernel's int32 offsets)
        from models import nhwc_add  # Triton: imported only where it can run
        if nhwc_add.available():
            return nhwc_add.add_with_bias(a, b, bias)
    return a + b + bias.to(b.dtype)[None, :, None, None]


def _base(m: nn.Module) -> nn.Module:
    return getattr(m, "base_layer", m)


def conv_without_bias(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv(x) less its bias (a plain nn.Conv2d or a LoRA layer around one): the caller adds the bias."""
    base = _base(conv)
    y = F.conv2d(x, base.weight, None, base.stride, base.padding, base.dilation, base.groups)
    return conv.add_lora(x, y) if hasattr(conv, "add_lora") else y


def bias_of(conv: nn.Module) -> torch.Tensor | None:
    return _base(conv).bias


def pointwise(conv: nn.Module, x: torch.Tensor, extra_bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 convolution (plain or with LoRA) of a channels_last x as a matrix product over its NHWC memory,
    bias (+ extra_bias) in the GEMM's epilogue; the output is channels_last. Elsewhere torch's conv."""
    base = _base(conv)
    bias = base.bias if extra_bias is None else (extra_bias if base.bias is None else base.bias + extra_bias)
    if not (is_channels_last(x) and base.kernel_size == (1, 1) and base.stride == (1, 1) and base.padding == (0, 0)
            and base.groups == 1):
        y = F.conv2d(x, base.weight, bias, base.stride, base.padding, base.dilation, base.groups)
    else:
        b, c, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1), base.weight.reshape(base.out_channels, c), bias)  # (B, H, W, Cout)
        y = y.permute(0, 3, 1, 2)                                       # (B, Cout, H, W), channels_last
    return conv.add_lora(x, y) if hasattr(conv, "add_lora") else y
