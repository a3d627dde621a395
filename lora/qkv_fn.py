"""Self-attention's LoRA'd q, k, v projections as one autograd function over lora/qkv_mm.py's kernels.

    q, k, v = x W_j^T + s * (drop_j(x) A_j^T) B_j^T             (Hu et al. 2021, eq. 3, for j = q, k, v)
    dx      = sum_j [ g_j W_j + keep_j/(1-p) * ((s g_j B_j) A_j) ]
    dB_j    = g_j^T h_j,   dA_j = (s g_j B_j)^T drop_j(x)        (lora/grad_stream.py's side stream, as linear_fn)

The same arithmetic as three calls of lora/linear_fn.py's function (the same dropout seeds, drawn in the order q,
k, v; q, k, v and h_j the same bits), with x read once by the down projections and once by the GEMMs, and one
input gradient instead of three added by autograd. Used by models/unet.py's Attention for self-attention when
each of to_q, to_k, to_v is a LoRALayer that lora_linear would run (one active adapter, frozen bias-free Linear)
with the same rank, scale, dropout and weight shape, on the path lora_mm takes (Triton, CUDA half precision
or the interpreter, an input of dropout_down.min_elements or more, a weight of lora_mm.max_weight or fewer
elements: the 64x64 level of SD1.5 and SDXL's 640-wide level is not); `lora_qkv` returns None otherwise.
UNet.set_fused_qkv_lora; train.fused_qkv_lora.
"""
from __future__ import annotations

import torch

from lora import dropout_down, grad_stream, lora_mm, mask_replay, qkv_mm
from lora.linear_fn import _compute_dtype
from models.autocast_off import autocast_off

enabled = True   # with UNet.set_fused_qkv_lora; experiments/bench/graph_ab.py toggles it


class _LoRAQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, wk, wv, aq, ak, av, bq, bk, bv, scale, p, seeds, side):
        dt = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt).contiguous()                 # (M, K)
        w = torch.stack([wq, wk, wv]).to(dt)                               # (3, N, K)
        a = torch.stack([aq, ak, av]).to(dt)                               # (3, r, K)
        b = torch.stack([bq, bk, bv]).to(dt)                               # (3, N, r)
        ctx.scale, ctx.p, ctx.shape, ctx.side = scale, p, shape, side
        ctx.dtypes = (x.dtype, aq.dtype, bq.dtype)
        with autocast_off(x):
            h = qkv_mm.down(x2, a, seeds, p, scale)                        # (3, M, r)
            y = qkv_mm.forward(x2, w, h, b)                                # (3, M, N)
        ctx.save_for_backward(x2, h, w, a, b, *(seeds or ()))
        out = y.view(3, *shape[:-1], y.shape[-1])
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, gq, gk, gv):
        x2, h, w, a, b, *seeds = ctx.saved_tensors
        seeds = seeds or None
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        m, n = h.shape[1], w.shape[1]
        gs = [torch.zeros(m, n, dtype=w.dtype, device=w.device) if g is None else g.reshape(m, n).to(w.dtype)
              for g in (gq, gk, gv)]                                       # 3 x (M, N)
        with autocast_off(x2):
            dx, gh = qkv_mm.input_grad(gs, w, b, a, seeds, ctx.p, ctx.scale)   # (M, K), (3, M, r)
        dx = dx.view(ctx.shape).to(x_dtype) if ctx.needs_input_grad[0] else None

        def weight_grads():   # dA_j (r, K) and dB_j (N, r) for j = q, k, v
            if seeds is None:
                da = [(gh[j].t() @ x2) for j in range(3)]
            else:
                da = [dropout_down.grad_down(x2, gh[j], seeds[j], ctx.p) for j in range(3)]
            return [t.to(a_dtype) for t in da] + [(gs[j].t() @ h[j]).to(b_dtype) for j in range(3)]
        side = x2.device if ctx.side else None
        grads = grad_stream.launch(weight_grads, side, (x2, h, gh, *gs, *(seeds or ())))
        return (dx, None, None, None, *grads, None, None, None, None)


def _adapters(mods) -> list | None:
    """Each module's one adapter if all three can run together here, else None."""
    if not all(getattr(m, "fused_backward", False) for m in mods):
        return None
    adapters = [m._single_adapter() for m in mods]
    if any(a is None for a in adapters):
        return None
    bases = [m.base_layer for m in mods]
    if any(b.bias is not None or b.weight.shape != bases[0].weight.shape or b.weight.dtype != bases[0].weight.dtype
           for b in bases):
        return None
    same = {(a.rank, a.scale * a.multiplier, a.dropout_p, a.cast_weights is not None) for a in adapters}
    return adapters if len(same) == 1 else None


def lora_qkv(x: torch.Tensor, to_q, to_k, to_v) -> tuple | None:
    """(q, k, v) of a self-attention through the fused function, or None where it does not apply (the caller
    then runs the three layers)."""
    if not (enabled and torch.is_grad_enabled()):
        return None
    adapters = _adapters((to_q, to_k, to_v))
    if adapters is None:
        return None
    a0 = adapters[0]
    w = to_q.base_layer.weight
    if not (dropout_down.usable(x, _compute_dtype(x), a0.rank) and lora_mm.usable(w)):
        return None
    p = a0.dropout_p
    seeds = [mask_replay.dropout_seed(a, x.device) for a in adapters] if p > 0 else None   # lora_linear's order
    downs, ups = zip(*(a.weights() for a in adapters))
    return _LoRAQKV.apply(x, to_q.base_layer.weight, to_k.base_layer.weight, to_v.base_layer.weight, *downs, *ups,
                          a0.scale * a0.multiplier, p, seeds, a0.cast_weights is not None)
