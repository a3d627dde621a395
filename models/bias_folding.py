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
  shortcut, else one kernel computes skip + h + bias (`add_with_bias`).

The function is the same; only where the roundings fall moves (tests/test_bias_folding.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nhwc_group_norm import INTERPRET, available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_bias_kernel(a_ptr, b_ptr, bias_ptr, out_ptr, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """out[m, c] = a[m, c] + b[m, c] + bias[c] on (M, C) row-major views, summed in fp32."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (m[:, None] < M) & (c[None, :] < C)
        off = m[:, None] * C + c[None, :]
        a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        tl.store(out_ptr + off, (a + b + bias[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _channels_last(t: torch.Tensor) -> bool:
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) channels_last -> its memory as (B*H*W, C), no copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _AddWithBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, bias):
        out = torch.empty_like(a)
        m, c = a.numel() // a.shape[1], a.shape[1]
        grid = (triton.cdiv(m, 32), triton.cdiv(c, 128))
        _add_bias_kernel[grid](_rows(a), _rows(b), bias, _rows(out), m, c, BLOCK_M=32, BLOCK_C=128)
        return out

    @staticmethod
    def backward(ctx, g):
        dbias = g.float().sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return g, g, dbias


def add_with_bias(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a + b + bias[None, :, None, None] (a, b (B, C, H, W)): one Triton pass for same-dtype channels_last
    tensors on CUDA, else torch's adds."""
    if bias is None:
        return a + b
    if (available() and (a.is_cuda or INTERPRET) and a.dtype == b.dtype and _channels_last(a) and _channels_last(b)
            and a.shape == b.shape):
        return _AddWithBias.apply(a, b, bias.contiguous())
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
    if not (_channels_last(x) and base.kernel_size == (1, 1) and base.stride == (1, 1) and base.padding == (0, 0)
            and base.groups == 1):
        y = F.conv2d(x, base.weight, bias, base.stride, base.padding, base.dilation, base.groups)
    else:
        b, c, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1), base.weight.reshape(base.out_channels, c), bias)  # (B, H, W, Cout)
        y = y.permute(0, 3, 1, 2)                                       # (B, Cout, H, W), channels_last
    return conv.add_lora(x, y) if hasattr(conv, "add_lora") else y
