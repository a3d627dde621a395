"""Which fused attention kernel each of the UNet's attentions asks torch for first.

torch's SDPA picks a backend by fixed rules (on Hopper, torch 2.11: cuDNN first). At SD1.5's shapes the
fastest one depends on the head dim (experiments/bench/attention.py, H100, bf16, batch 8, forward and
backward; experiments/bench/RESULTS.md): cuDNN at d=40 (self-attention over 4,096 tokens 2.23 ms vs flash
3.94), FlashAttention-2 at d=80 (0.47 vs cuDNN 0.76), the memory-efficient kernel for cross-attention at
d=160 (0.27 vs cuDNN 0.45). A fixed table, not a timing at run time: the choice must not depend on a
measurement's noise, or a resumed run could compute with other kernels than the run it continues.

Policies (train.sdpa_backend / set_policy): "torch" (torch's own order), "auto" (the table below on
Hopper GPUs, where it was measured; torch's order elsewhere), or one backend name first ("cudnn", "flash",
"efficient", "math"). The preferred backend goes first in a priority list that keeps the others behind
it, so a shape it cannot run (a head dim, a dtype, a mask) falls back instead of failing.
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
    if policy not in ("torch", "auto", *NAMES):
        raise ValueError(f"sdpa_backend: {policy!r} is not one of torch, auto, {', '.join(NAMES)}")
    _policy = policy


def hopper_table(head_dim: int, self_attention: bool) -> SDPBackend:
    """The H100 measurement as a rule (experiments/bench/RESULTS.md, "Attention kernels")."""
    if head_dim <= 64:
        return SDPBackend.CUDNN_ATTENTION
    if head_dim <= 128:
        return SDPBackend.FLASH_ATTENTION
    return SDPBackend.CUDNN_ATTENTION if self_attention else SDPBackend.EFFICIENT_ATTENTION


def preferred(q: torch.Tensor, k: torch.Tensor) -> SDPBackend | None:
    """The backend to try first for q (B, h, N, d) against k (B, h, M, d); None: torch decides."""
    if _policy == "torch" or not q.is_cuda or not _PRIORITY or torch.compiler.is_compiling():
        return None
    if _policy in NAMES:
        return NAMES[_policy]
    if torch.cuda.get_device_capability(q.device)[0] != 9:  # the table was measured on Hopper only
        return None
    return hopper_table(q.shape[-1], q.shape[-2] == k.shape[-2])


def choose(q: torch.Tensor, k: torch.Tensor):
    """Context for one F.scaled_dot_product_attention call under the policy."""
    first = preferred(q, k)
    if first is None:
        return contextlib.nullcontext()
    return sdpa_kernel([first, *(b for b in _ORDER if b != first)], set_priority=True)
