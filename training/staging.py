"""Host -> device copies that never make the host wait for the GPU.

A copy from ordinary (pageable) host memory waits for the device; a copy from pinned memory runs
in the background. The host writes a step's inputs into one of two pinned buffers per input, and
waits only if that buffer's previous copy (two steps ago) has not finished yet, so the CPU prepares
step k+1 while the GPU computes step k. The device-side buffers are fixed per input shape: the
same memory every step, as a CUDA graph needs.
"""
from __future__ import annotations

import torch


class Stager:
    def __init__(self, device: torch.device, depth: int = 2):
        self.device, self.depth = device, depth
        self.slots: dict[tuple, list] = {}   # (name, shape, dtype) -> [pinned buffers], [events], next slot
        self.dev: dict[tuple, torch.Tensor] = {}

    def __call__(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: host tensor} -> {name: device tensor}; the device tensors are reused for the same shapes."""
        if self.device.type != "cuda":   # nothing to overlap; the same fixed buffers all the same
            out = {}
            for name, t in tensors.items():
                key = (name, tuple(t.shape), t.dtype)
                if key not in self.dev:
                    self.dev[key] = torch.empty_like(t, device=self.device)
                out[name] = self.dev[key].copy_(t)
            return out
        out = {}
        for name, t in tensors.items():
            key = (name, tuple(t.shape), t.dtype)
            if key not in self.slots:
                self.slots[key] = [[torch.empty_like(t, device="cpu").pin_memory() for _ in range(self.depth)],
                                   [None] * self.depth, 0]
                self.dev[key] = torch.empty_like(t, device=self.device)
            bufs, events, i = self.slots[key]
            if events[i] is not None:
                events[i].synchronize()          # the copy that last read this pinned buffer is done
            bufs[i].copy_(t)
            self.dev[key].copy_(bufs[i], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            events[i] = ev
            self.slots[key][2] = (i + 1) % self.depth
            out[name] = self.dev[key]
        return out
