"""One side CUDA stream per device, for work beside the main stream's critical path: the LoRA weight gradients
(lora/grad_stream.py) and the UNet's text and timestep projections (models/ahead.py)."""
from __future__ import annotations

import torch

_streams: dict = {}   # device index -> stream


def side(device: torch.device) -> torch.cuda.Stream:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _streams:
        _streams[i] = torch.cuda.Stream(device=i)
    return _streams[i]
