"""Programmatic dependent launch (Hopper and later) for our Triton kernels.

A kernel launched with PDL may be scheduled while the kernel before it on the stream is still draining; its
programs first wait (`griddepcontrol.wait`: every prerequisite grid complete and its memory visible) and then
let the next PDL kernel be scheduled (`griddepcontrol.launch_dependents`). Nothing is read or written before
the wait, so the results are the same bits; what is saved is the gap between two dependent kernels (CUDA
Programming Guide, "Programmatic Dependent Launch and Synchronization"; PTX ISA, griddepcontrol).

Measured on an H100 (`python -m experiments.bench.pdl_probe`, chains of dependent Triton kernels replayed from
a CUDA graph): 0.3-0.5 us saved per kernel boundary, at every size from 4 K to 10 M elements. The UNet's
training step launches about 700 Triton kernels (experiments/bench/RESULTS.md, session 12).

Every kernel that takes the `PDL` constexpr calls `start(PDL)` before its first memory access, and is launched
with `**kw(tensor)`: {PDL: True, launch_pdl: True} on a CUDA device of compute capability 9.0 or more while
`enabled` (train.pdl), else {} (the kernel's default PDL=False: no wait, a plain launch; also under Triton's
interpreter on the CPU).
"""
from __future__ import annotations

import torch

from models.triton_env import INTERPRET, available

enabled = True          # train.pdl (training/loop.py); experiments/bench/graph_ab.py toggles it
_capable: dict = {}     # device index -> compute capability >= 9.0

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def start(PDL: tl.constexpr):
        """Wait for the previous grid on the stream (complete, memory visible), then let the next one in."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()


def kw(t: torch.Tensor) -> dict:
    """Launch arguments for a kernel working on `t`: PDL where it is enabled and the device supports it."""
    if not enabled or INTERPRET or not t.is_cuda:
        return {}
    i = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if i not in _capable:   # Hopper or later, and a Triton that has the instructions (3.3 and later)
        _capable[i] = torch.cuda.get_device_capability(i)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")
    return {"PDL": True, "launch_pdl": True} if _capable[i] else {}
