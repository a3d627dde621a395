"""LoRA weight gradients on a second CUDA stream, beside the backward's critical path.

The backward's critical path is the chain of input gradients; a LoRA layer's weight gradients (dB = g^T h,
dA = gh^T drop(x): memory-bound reductions over all tokens, 2.3 ms of the batch-8 bf16 step's kernels on an
H100) are needed only by the optimizer. lora/linear_fn.py enqueues them here, on a side stream that first
waits for everything enqueued so far on the main one; the main stream goes on with the next layer's
backward (attention and convolutions, bound by their arithmetic, leave memory bandwidth and the SMs of
their tails free). The weight gradients are consumed by one place only, lora/half_weights.py's cast
backward, which calls `join()` first: the main stream waits for the side stream there. The tensors the side
stream reads stay referenced until the main stream has waited for their launch (`launch`: a few layers
later, or at the join). So the arithmetic, and the
results, are the same kernels on the same inputs as without the side stream (tests/test_fast_paths.py
compares them bit for bit on CUDA), and a CUDA graph records the fork and the join as graph edges.

Active only inside `half_weights` (which joins) on CUDA, while gradients are recorded; elsewhere `launch`
runs its function in place. train.lora_grad_stream.
"""
from __future__ import annotations

import contextlib

import torch

from models.side_stream import side as _side

enabled = True              # train.lora_grad_stream (training/loop.py); experiments/bench/graph_ab.py toggles it
window = 4                  # launches whose inputs are kept; the main stream waits for older ones (memory bound)
_active: list = []          # devices of the enclosing `active()` contexts
_pending: list = []         # (event after a launch's work, the tensors it reads), oldest first
_forked: set = set()        # side streams with work enqueued since the last join


def launch(fn, device: torch.device | None, reads: tuple):
    """fn() enqueued on the side stream of `device` after the main stream's work so far; `reads`: the tensors
    it reads, kept referenced until the main stream has waited for it. Outside an active context, on a CPU or
    for device None (results that someone other than half_weights' cast consumes): fn() as it is.

    The main stream waits for the launch `window` launches back before this one is enqueued, and that one's
    inputs are released: the side stream lags the backward by a few layers at most, so the layers' inputs
    and output gradients are not all held to the end of the backward (with gradient checkpointing that
    would keep every recomputed activation: +2 GiB on SDXL), and nothing is freed while the side stream
    may still read it (what is freed after the main stream's wait is reused after it, in stream order). A
    backward op that itself runs on the side stream (the cross-attention k/v that models/ahead.py computed
    there) releases nothing: the next launch from the main stream does."""
    if not (enabled and _active and device is not None and device.type == "cuda"):
        return fn()
    main, side = torch.cuda.current_stream(device), _side(device)
    while main != side and len(_pending) >= window:   # (a node of models/ahead.py's k/v runs on the side stream)
        event, _ = _pending.pop(0)
        main.wait_event(event)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
        event = torch.cuda.Event()
        event.record(side)
    _pending.append((event, [t for t in reads if t is not None]))
    _forked.add(side)
    return out


def join() -> None:
    """The main stream waits for the side streams' work; what they read may be freed from here on."""
    for side in _forked:
        torch.cuda.current_stream(side.device).wait_stream(side)
    _forked.clear()
    _pending.clear()


@contextlib.contextmanager
def active(device: torch.device):
    """Weight gradients of lora/linear_fn.py go to the side stream inside; joined on exit at the latest."""
    _active.append(device)
    try:
        yield
    finally:
        _active.pop()
        join()
