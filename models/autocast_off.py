"""`with autocast_off(x):` runs its body outside autocast on x's device, as `torch.autocast(type,
enabled=False)` does, and is a no-op where autocast is off or where the device type has no autocast at
all (meta tensors: experiments/bench/flops.py counts FLOPs on the meta device, where
torch.autocast("meta") raises)."""
from __future__ import annotations

import contextlib

import torch


def autocast_off(x: torch.Tensor):
    try:
        on = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:   # "unknown device type for autocast"
        on = False
    return torch.autocast(x.device.type, enabled=False) if on else contextlib.nullcontext()
