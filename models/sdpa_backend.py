"""Which fused attention kernel the UNet's attentions ask torch for first (train.sdpa_backend).

"torch" (the default) keeps torch's own order (on Hopper with torch 2.11: cuDNN first). Naming a backend
("cudnn", "flash", "efficient", "math") puts it first in a priority list that keeps the others behind it,
so a shape it cannot run falls back instead of failing: for comparing kernels, or "math" for a reference.
"fa4" runs FlashAttention-4's kernels from the optional flash-attn-4 package (models/fa4_attention.py) where
they take the shape, torch's order elsewhere; "auto" is "fa4" where that package imports and "torch" where not.

Measured, not guessed: a table picking per head dim the fastest kernel of experiments/bench/attention.py
(cuDNN at d=40, FlashAttention-2 at d=80, the memory-efficient kernel for cross-attention at d=160) made
the whole step slower than torch's order on an H100 (batch 8 bf16 0.0638 vs 0.0614 s, report 0.0281 vs
0.0267 s, same call; experiments/bench/RESULTS.md), and the microbenchmark's cuDNN timing at d=80 moved
from 0.76 to 0.35 ms between two machines. So no table ships.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

NAMES = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6
_policy = "torch"


def set_policy(policy: str) -> None:
    global _policy
    if policy not in ("torch", "auto", "fa4", *NAMES):
        raise ValueError(f"sdpa_backend: {policy!r} is not one of torch, auto, fa4, {', '.join(NAMES)}")
    from models import fa4_attention
    if policy == "auto":
        policy = "fa4" if fa4_attention.available() else "torch"
    if policy == "fa4":
        if not fa4_attention.available():
            raise ValueError("sdpa_backend=fa4 needs the flash-attn-4 package (`pip install flash-attn-4`, which "
                             "brings nvidia-cutlass-dsl) and a Hopper or newer GPU; it does not import here: use "
                             "sdpa_backend=torch")
    elif policy != "torch" and not _PRIORITY:
        raise ValueError(f"sdpa_backend={policy} needs torch >= 2.6 (sdpa_kernel's set_priority); "
                         f"this is {torch.__version__}: use sdpa_backend=torch")
    _policy = policy


def describe() -> str:
    """The policy in force (after "auto" is resolved), for a run's run_info.json: with fa4, the package's version
    and the backward route in force (BACKWARD_FIX's, or the one it fell back to)."""
    if _policy != "fa4":
        return _policy
    from importlib import metadata

    from models import fa4_attention
    try:
        version = metadata.version("flash-attn-4")
    except metadata.PackageNotFoundError:
        version = "version unknown"
    return f"fa4 (flash-attn-4 {version}, backward {fa4_attention.backward_route(fa4_attention.BACKWARD_FIX)})"


def fa4(q: torch.Tensor, k: torch.Tensor, heads: int) -> bool:
    """Whether this attention runs FlashAttention-4's kernels (policy fa4 and a shape they take)."""
    if _policy != "fa4":
        return False
    from models import fa4_attention
    return fa4_attention.usable(q, k, heads)


def choose(q: torch.Tensor):
    """Context for one F.scaled_dot_product_attention call under the policy (CUDA only; not while compiling)."""
    if _policy not in NAMES or not q.is_cuda or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    first = NAMES[_policy]
    return sdpa_kernel([first, *(b for b in _ORDER if b != first)], set_priority=True)
