"""3x3 convolutions with few input or few output channels (the UNet's conv_in, 4 -> 320, and conv_out, 320 -> 4) on
channels_last tensors in Triton, forward and input gradient (frozen weights).

Why: cuDNN runs these as implicit GEMMs with a 4-wide N or K and takes 45-64 us each at SD1.5's b8 step (12-17
TFLOP/s; experiments/bench/RESULTS.md, session 17, `conv_probe --step`), where each moves one 21 MB activation
(about 5 us at the memory bandwidth).

    y[p, o] = b[o] + sum_{t, i} x[p + s_t, i] W[o, i, t]       t = (kh, kw), s_t = (kh - 1, kw - 1), zero outside

- few inputs (9 Cin <= 128, `_gather_kernel`): each program gathers its positions' 9 Cin taps as one K <= 128 tile
  (x is small and stays in L2) and multiplies it by W arranged (9 Cin, Cout): one tl.dot, the output written once.
- few outputs (9 Cout <= 64, `_taps_kernel` + `_tap_sum_kernel`): P = x W_all, W_all (Cin, 9 Cout), in fp32 (x
  read once), then y[p, o] = b[o] + sum_t P[p + s_t, t, o] (P: 36 fp32 per position at Cout = 4).

The input gradient is the same convolution of the output gradient with the kernel flipped and transposed,
W'[i, o, t] = W[o, i, 8 - t] (e.g. Dumoulin & Visin 2016, "A guide to convolution arithmetic", section 4.1), so it
runs the other kernel: conv_out's input gradient gathers 4 channels. Accumulation in fp32, one rounding.
Tested against F.conv2d under Triton's interpreter (tests/test_thin_conv.py); UNet.set_thin_convs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import pdl
from models.bias_folding import is_channels_last
from models.nhwc_add import _rows                  # (B, C, H, W) channels_last -> its memory as (B*H*W, C)
from models.triton_env import INTERPRET, available

enabled = True   # UNet.set_thin_convs; experiments/bench/graph_ab.py toggles it

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, H, W, CIN, COUT, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        """y (M, COUT) = im2col(x) (M, 9 CIN) @ w (9 CIN, COUT) [+ b]: x (M, CIN) NHWC rows of B images H x W."""
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        tap, i = k // CIN, k % CIN
        dh, dw = tap // 3 - 1, tap % 3 - 1
        hw = m % (H * W)
        hh = (hw // W)[:, None] + dh[None, :]
        ww = (hw % W)[:, None] + dw[None, :]
        ok = (m[:, None] < M) & (tap[None, :] < 9) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        src = (m[:, None] + dh[None, :] * W + dw[None, :]) * CIN + i[None, :]
        a = tl.load(x_ptr + src, mask=ok, other=0.0)                                   # (BLOCK_M, BLOCK_K)
        wt = tl.load(w_ptr + k[:, None] * COUT + n[None, :], mask=(k[:, None] < 9 * CIN) & (n[None, :] < COUT),
                     other=0.0)                                                        # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a, wt)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < COUT, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * COUT + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < COUT))

    @triton.jit
    def _taps_kernel(x_ptr, w_ptr, p_ptr, M, CIN, NT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        """P (M, NT) fp32 = x (M, CIN) @ w (CIN, NT), NT = 9 COUT <= BLOCK_N: every tap's partial product."""
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, CIN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + m[:, None] * CIN + k[None, :], mask=(m[:, None] < M) & (k[None, :] < CIN), other=0.0)
            wt = tl.load(w_ptr + k[:, None] * NT + n[None, :], mask=(k[:, None] < CIN) & (n[None, :] < NT), other=0.0)
            acc += tl.dot(a, wt)
        tl.store(p_ptr + m[:, None] * NT + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < NT))

    @triton.jit
    def _tap_sum_kernel(p_ptr, b_ptr, y_ptr, M, H, W, COUT, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
        """y[p, o] = b[o] + sum_t P[p + s_t, t COUT + o] over the taps whose source lies inside the image."""
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        o = tl.arange(0, BLOCK_N)
        om = o < COUT
        hw = m % (H * W)
        h, w = hw // W, hw % W
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in tl.static_range(9):
            dh = t // 3 - 1
            dw = t % 3 - 1
            ok = (m < M) & (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
            src = (m + dh * W + dw) * (9 * COUT) + t * COUT
            acc += tl.load(p_ptr + src[:, None] + o[None, :], mask=ok[:, None] & om[None, :], other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + o, mask=om, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * COUT + o[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & om[None, :])


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """W (Cout, Cin, 3, 3) -> (9, Cin, Cout): tap t = 3 kh + kw."""
    return weight.permute(2, 3, 1, 0).reshape(9, weight.shape[1], weight.shape[0])


def _conv(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3x3, stride-1, padding-1 convolution of a channels_last x with taps wt (9, Cin, Cout) [+ bias]."""
    b, cin, h, w = x.shape
    cout = wt.shape[2]
    m = b * h * w
    xr = _rows(x)
    y = torch.empty(b, cout, h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    yr = _rows(y)
    bias_ = bias if bias is not None else xr
    if 9 * cin <= 128:                                                   # few inputs: gather
        bk = max(16, triton.next_power_of_2(9 * cin))
        bn = min(64, max(16, triton.next_power_of_2(cout)))
        grid = (triton.cdiv(m, 128), triton.cdiv(cout, bn))
        _gather_kernel[grid](xr, wt.reshape(9 * cin, cout).to(x.dtype).contiguous(), bias_, yr, m, h, w, cin, cout,
                             HAS_BIAS=bias is not None, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                             **pdl.kw(xr))
        return y
    nt = 9 * cout                                                        # few outputs: taps, then their sum
    wall = wt.permute(1, 0, 2).reshape(cin, nt).to(x.dtype).contiguous()   # (Cin, 9 Cout)
    p = torch.empty(m, nt, dtype=torch.float32, device=x.device)
    bn = max(16, triton.next_power_of_2(nt))
    _taps_kernel[(triton.cdiv(m, 128),)](xr, wall, p, m, cin, nt, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, num_warps=4,
                                         num_stages=3, **pdl.kw(xr))
    _tap_sum_kernel[(triton.cdiv(m, 256),)](p, bias_, yr, m, h, w, cout, HAS_BIAS=bias is not None, BLOCK_M=256,
                                            BLOCK_N=max(2, triton.next_power_of_2(cout)), num_warps=4, **pdl.kw(p))
    return y


class _ThinConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return _conv(x, _taps(weight), bias)

    @staticmethod
    def backward(ctx, g):
        weight, = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        g = g.contiguous(memory_format=torch.channels_last)
        flipped = _taps(weight).flip(0).transpose(1, 2)                 # (9, Cout, Cin): W'[i, o, t] = W[o, i, 8 - t]
        return _conv(g, flipped, None), None, None


def thin(conv: nn.Conv2d) -> bool:
    """A 3x3, stride-1, padding-1 dense convolution with 9 Cin <= 128 or 9 Cout <= 64 (either way of its
    gradient then runs on the kernels)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"
            and (9 * conv.in_channels <= 128 or 9 * conv.out_channels <= 64)
            and (9 * conv.out_channels <= 128 or 9 * conv.in_channels <= 64))


def usable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Triton, a 4-D fp16/bf16 input on CUDA (or any dtype under the interpreter) of the weight's dtype, laid out
    channels_last (or few enough channels to copy it so: 9 C <= 128, conv_in's latents), frozen weights (or no
    grad), offsets within int32."""
    frozen = not (torch.is_grad_enabled() and (conv.weight.requires_grad
                                               or (conv.bias is not None and conv.bias.requires_grad)))
    return (enabled and available() and frozen and x.ndim == 4 and x.dtype == conv.weight.dtype
            and ((x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)) or INTERPRET)
            and (is_channels_last(x) or 9 * x.shape[1] <= 128)
            and 9 * max(x.shape[1], conv.out_channels) * x.numel() // x.shape[1] < 2 ** 31)


def forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """nn.Conv2d.forward through the kernels where `usable` (under autocast to the weights' half dtype: x cast
    first, as autocast would), else torch's. The output is channels_last."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == self.weight.dtype:
        x = x.to(self.weight.dtype)                                     # the cast autocast gives F.conv2d too
    if usable(self, x):
        if not is_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)          # (B, C <= 14, H, W): a small copy
        return _ThinConv.apply(x, self.weight, self.bias)
    return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
