"""LoRA dropout masks kept from a checkpointed block's forward for its recomputation.

Gradient checkpointing runs a block's forward again in the backward pass, and LoRA dropout inside it
must draw the same masks again. torch's way (`preserve_rng_state`) saves the RNG state before each
block and restores it for the recomputation, which a CUDA graph cannot record. Here the forward keeps
each adapter's masks (bool: 1 byte per element of the adapter's input, against the 2-byte activations
that checkpointing saves) and the recomputation takes them back in order, so nothing random is drawn
twice and the block needs no RNG state. Passed to torch.utils.checkpoint as `context_fn`; the trainer
does so only for a step recorded as a CUDA graph (eagerly, saving the RNG state costs no memory).

Where Triton's kernels can regenerate a LoRA dropout mask from a seed (lora/dropout_down.py: CUDA, or the
interpreter), only the seed is kept (8 bytes) and the mask exists while its layer runs (`dropout_keep`): the kept
masks were SDXL's largest item at its peak in seed 004's step (0.53 GiB of bool masks;
experiments/bench/RESULTS.md, session 12).

While no checkpointed forward runs (`_mode` None), adapters use nn.Dropout as usual.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from typing import Callable

import torch

_mode: str | None = None                      # None | "record" | "replay"
_masks: dict[tuple[int, str], deque] = defaultdict(deque)


@contextlib.contextmanager
def _set(mode: str):
    global _mode
    prev, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = prev


def recording():
    """Masks drawn inside are kept (the checkpointed forward; tests use it for a plain forward)."""
    return _set("record")


def replaying():
    """Masks are taken back in the order they were kept (the recomputation)."""
    return _set("replay")


def context_fn():
    """torch.utils.checkpoint(..., context_fn=context_fn): (forward context, recomputation context)."""
    return recording(), replaying()


def active() -> bool:
    return _mode is not None


def clear() -> None:
    """Drop what was kept. Called before each micro-batch's forward: torch's checkpoint may stop a
    recomputation early, once the tensors it needs exist, leaving the masks of a block's tail unused."""
    _masks.clear()


def pending() -> int:
    return sum(len(q) for q in _masks.values())


def mask(owner: object, kind: str, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The mask `owner` uses for `kind` now: drawn (and kept, when recording) or the next kept one."""
    key = (id(owner), kind)
    if _mode == "replay":
        if not _masks[key]:
            raise RuntimeError(f"no kept {kind} mask to replay for {type(owner).__name__}: a checkpointed "
                               f"block was recomputed more often than it ran forward")
        return _masks[key].popleft()
    m = draw()
    if _mode == "record":
        _masks[key].append(m)
    return m


def dropout_seed(owner: object, device) -> torch.Tensor:
    """`owner`'s LoRA dropout seed for this call (lora/dropout_down.py's masks): drawn, and kept or replayed inside a
    checkpointed block."""
    from lora import dropout_down  # (imports Triton where installed)
    return mask(owner, "dropout_seed", lambda: dropout_down.new_seed(device))


def dropout_keep(owner: object, x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep-mask (bool, x's shape) of `owner`'s LoRA dropout inside a checkpointed block: regenerated from a
    kept seed where the Triton mask kernel runs, else itself kept (rand >= p, as nn.Dropout draws)."""
    from lora import dropout_down  # (imports Triton where installed)
    if dropout_down.can_regenerate(x):
        seed = dropout_seed(owner, x.device)
        return dropout_down.keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p).view(x.shape)
    return mask(owner, "dropout", lambda: torch.rand_like(x, dtype=torch.float32) >= p)
