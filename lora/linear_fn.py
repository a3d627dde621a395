"""A frozen nn.Linear with one LoRA adapter as a single autograd function, so that the adapter's input
gradient is added inside the base layer's backward GEMM.

    y  = x W^T + b + s * (drop(x) A^T) B^T                      (Hu et al. 2021, eq. 3; s = alpha/r * multiplier)
    dB = g^T h,   h = s * drop(x) A^T                           (N, r)
    dA = (s * g B)^T drop(x)                                    (r, K)
    dx = g W + mask/(1-p) * ((s * g B) A)                       (M, K)

Autograd would compute g W and the LoRA term separately and add them in a layer-sized elementwise
kernel (96 of them per batch-8 SD1.5 step with attention LoRA: the q/k/v/out projections on image
tokens); here the LoRA term is the C of one addmm, which cuBLAS adds in its epilogue. With dropout on
CUDA in half precision (inputs of 4M elements or more) the mask is a seed instead and the dropout runs
inside Triton kernels for the down projection and its gradients (lora/dropout_down.py: the dropped
input is never stored; dx is g W with the masked LoRA term added in place; for 320-wide layers the
projection with its LoRA term, and the input gradient with gh, are each one Triton GEMM,
lora/lora_mm.py); elsewhere the mask is drawn by torch's own dropout kernel (the same masks as
nn.Dropout under the same seed). Inside a checkpointed block the seed or mask comes from
lora/mask_replay.py. The weight gradients (dA, dB), which only the optimizer needs, are enqueued on
lora/grad_stream.py's side stream where the adapter's weights are half_weights' casts (that cast's backward
joins it). Used by LoRALayer for Linear bases with one active adapter and no rank or
module dropout, while gradients are recorded
(lora.inject.set_fused_lora_backward; train.fused_lora_backward).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lora import dropout_down, grad_stream, lora_mm, mask_replay
from models.autocast_off import autocast_off


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except RuntimeError:   # a device type autocast does not know
        pass
    return x.dtype


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b) with the scale applied in the GEMM's epilogue (alpha; beta = 0 ignores the input): no
    separate elementwise kernel for the (M, r) product (196 of them per batch-8 step)."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=scale)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, scale, p, mask, side):
        dt = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)                                # (M, K)
        w, a, b_up = weight.to(dt), down.to(dt), up.to(dt)                  # (N, K), (r, K), (N, r)
        ctx.scale, ctx.p, ctx.shape, ctx.side = scale, p, shape, side
        ctx.dtypes = (x.dtype, down.dtype, up.dtype)
        ctx.seeded = mask is not None and mask.dtype == torch.int64         # a seed: lora/dropout_down.py
        with autocast_off(x):
            if ctx.seeded:                                                  # dropout inside the down projection
                x2 = x2.contiguous()
                h = dropout_down.down(x2, a, mask, p, scale)                # (M, r)
                ctx.one_gemm = lora_mm.usable(w)
                b_dt = None if bias is None else bias.to(dt)
                if ctx.one_gemm:                                            # x W^T + b + h B^T in one kernel
                    y = lora_mm.forward(x2, w, b_dt, h, b_up)
                else:
                    y = F.linear(x2, w, b_dt).addmm_(h, b_up.t())
                ctx.save_for_backward(x2, h, w, a, b_up, mask)
                return y.view(*shape[:-1], y.shape[-1])
            y = F.linear(x2, w, None if bias is None else bias.to(dt))      # (M, N), bias in the epilogue
            if p > 0 and mask is None and x2.is_cuda:
                xd, mask = torch.native_dropout(x2, p, True)                # nn.Dropout's CUDA kernel: same masks
            elif p > 0 and mask is None:                                    # nn.Dropout on a CPU: scaled noise
                mask = torch.empty_like(x2).bernoulli_(1 - p).div_(1 - p)
                xd = x2 * mask
            elif p > 0:                                                     # a kept mask (mask_replay)
                mask = mask.reshape(x2.shape)
                xd = x2 * mask * (1.0 / (1.0 - p))
            else:
                xd = x2
            h = _scaled_mm(xd, a.t(), scale)                                # (M, r)
            y.addmm_(h, b_up.t())                                           # y += h B^T (cuBLAS epilogue)
        ctx.save_for_backward(xd, h, w, a, b_up, mask if p > 0 else None)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        xd, h, w, a, b_up, mask = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g2 = g.reshape(-1, g.shape[-1]).to(w.dtype)                         # (M, N)
        want_down, want_up = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        side = g2.device if ctx.side else None   # the weight gradients on lora/grad_stream.py's side stream
        dx = None
        if ctx.seeded:                                                      # xd is x; `mask` the seed
            if ctx.needs_input_grad[0] and ctx.one_gemm:                    # g W + masked (gh A), and gh: one kernel
                dx, gh = lora_mm.input_grad(g2, w, b_up, a, mask, ctx.p, ctx.scale)
            else:
                gh = _scaled_mm(g2, b_up, ctx.scale)                        # (M, r)
                if ctx.needs_input_grad[0]:
                    dx = g2 @ w                                             # (M, K)
                    dropout_down.add_grad_input_(dx, gh, a, mask, ctx.p)    # += keep/(1-p) * (gh A)
            grad_a = lambda: dropout_down.grad_down(xd, gh, mask, ctx.p)    # (r, K), the seed's mask
        else:
            gh = _scaled_mm(g2, b_up, ctx.scale)                            # (M, r)
            if ctx.needs_input_grad[0]:
                t = gh @ a                                                  # (M, K)
                if mask is not None and mask.dtype == torch.bool:
                    t = torch.ops.aten.native_dropout_backward(t, mask, 1.0 / (1.0 - ctx.p))
                elif mask is not None:
                    t = t * mask
                dx = torch.addmm(t, g2, w)                                  # t + g W, one GEMM
            grad_a = lambda: gh.t() @ xd                                    # (r, K), xd dropped already
        dx = None if dx is None else dx.view(ctx.shape).to(x_dtype)
        d_down, d_up = grad_stream.launch(lambda: (grad_a().to(a_dtype) if want_down else None,    # (r, K)
                                                   (g2.t() @ h).to(b_dtype) if want_up else None),  # (N, r)
                                          side, (g2, h, xd, gh, mask))
        return dx, None, None, d_down, d_up, None, None, None, None


def lora_linear(x: torch.Tensor, base: torch.nn.Linear, adapter) -> torch.Tensor:
    """base(x) + adapter(x) for a frozen nn.Linear and one LoRAAdapter (lora/layers.py)."""
    down, up = adapter.weights()
    p = adapter.dropout_p
    mask = None
    if p > 0 and dropout_down.usable(x, _compute_dtype(x), adapter.rank):  # the mask as a seed, regenerated
        mask = mask_replay.dropout_seed(adapter, x.device)
    elif p > 0 and mask_replay.active():  # inside a checkpointed block: a kept mask, as LoRAAdapter.scaled_down
        mask = mask_replay.dropout_keep(adapter, x, p)
    side = adapter.cast_weights is not None   # weight gradients consumed by half_weights' cast only: side stream
    return _LoRALinear.apply(x, base.weight, base.bias, down, up, adapter.scale * adapter.multiplier, p, mask, side)
