"""The LoRA weights in the autocast dtype, cast in one multi-tensor copy per micro-batch.

Under autocast every fp32 LoRA weight is cast to fp16/bf16 where it is used: one kernel per weight
forward, and backward one more to cast its gradient to fp32 plus one to add it into `.grad` (265
weights at SD1.5 r32 attention: ~800 tiny kernels, 2.2 ms of the batch-8 bf16 step on an H100,
experiments/bench/RESULTS.md). Here one `torch._foreach_copy_` casts them all forward; backward, one
multi-tensor copy casts the gradients to fp32 and one multi-tensor add accumulates them into the
preallocated `.grad` tensors. The values are the same as autocast's: the same roundings of the same
numbers (tests/test_fast_paths.py compares a run with and without, bit for bit).

    with half_weights(adapters, torch.bfloat16):   # around a micro-batch's forward *and* backward
        loss = model(...); loss.backward()            # (a checkpointed block's recomputation reads them too)

Inside, `LoRAAdapter.weights()` returns the cast pair; outside, the module's own parameters. On CUDA the
LoRA functions' weight gradients run on a side stream inside (lora/grad_stream.py); the cast's backward, their
only consumer, joins it.
"""
from __future__ import annotations

import contextlib

import torch

from lora import grad_stream


class _CastAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype, *params):
        out = [torch.empty_like(p, dtype=dtype) for p in params]   # same shapes and strides (preserve_format)
        torch._foreach_copy_(out, list(params))
        ctx.save_for_backward(*params)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        grad_stream.join()     # the LoRA weight gradients computed on the side stream (lora/grad_stream.py)
        params = ctx.saved_tensors
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not used:
            return (None,) * (1 + len(params))
        g32 = [torch.empty_like(p) for p, _ in used]
        torch._foreach_copy_(g32, [g for _, g in used])             # half -> fp32, as autocast's cast backward
        if all(p.grad is not None for p, _ in used):                # the trainer's fixed gradient buffers
            torch._foreach_add_([p.grad for p, _ in used], g32)     # AccumulateGrad's in-place add, batched
            return (None,) * (1 + len(params))
        it = iter(g32)
        return (None,) + tuple(next(it) if g is not None else None for g in grads)


@contextlib.contextmanager
def half_weights(adapters: list, dtype: torch.dtype):
    """Give each adapter (lora.layers.LoRAAdapter) its down/up weights cast to `dtype` for the duration."""
    params = [w for a in adapters for w in (a.down.weight, a.up.weight)]
    cast = _CastAll.apply(dtype, *params) if torch.is_grad_enabled() else \
        tuple(p.detach().to(dtype) for p in params)
    for i, a in enumerate(adapters):
        a.cast_weights = (cast[2 * i], cast[2 * i + 1])
    device = params[0].device if params else torch.device("cpu")
    try:
        with grad_stream.active(device) if device.type == "cuda" else contextlib.nullcontext():
            yield
    finally:
        for a in adapters:
            a.cast_weights = None
