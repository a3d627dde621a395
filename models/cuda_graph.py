"""CUDA graphs: record a function's kernels once, replay them with one launch.

A Stable Diffusion UNet step is thousands of small kernels; launched one by one from Python, an
H100 waits on the CPU for most of the step. A graph replays the whole recorded sequence (PyTorch's
"whole network capture", docs: notes/cuda.html#cuda-graphs). The recorded function must read its
inputs from fixed ("static") tensors, never sync with the host, and never branch on tensor values;
what it returns lives in the graph's memory and is overwritten by the next replay.

`capture` is the generic recorder (warm-up on a side stream, optional state restore, capture);
`GraphedUNet` wraps a UNet for sampling: one graph per input shape and LoRA state.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn


def capture(fn: Callable[[], object], warmup: int = 2, restore: Callable[[], None] | None = None,
            pool=None, stream: torch.cuda.Stream | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run `fn` `warmup` times on a side stream (kernel selection, lazy allocations, compilation),
    call `restore` (undo what the warm-up runs changed), then record one call on the same stream.
    -> (graph, its output).

    Pass the caller's own `stream` to keep recording on one stream: cuBLAS keeps a workspace (32 MiB on
    an H100) for every stream it has run on, for the life of the process; a fresh stream per recording,
    plus torch's own capture stream, cost 67 MB of sampling's peak (experiments/bench/memory_phases.py)."""
    s = stream if stream is not None else torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    if restore is not None:
        restore()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-up's blocks belong to the side stream: give them back before recording
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=s):
        out = fn()
    return graph, out


@contextmanager
def on_stream(stream: torch.cuda.Stream | None):
    """Run the enclosed CUDA work on `stream` (ordered after the current stream's work, and before what
    follows); None: where it would run anyway."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def lora_signature(module: nn.Module) -> tuple:
    """What a recorded LoRA forward depends on besides tensor values: enabled, multiplier, merged."""
    from lora.layers import LoRALayer
    sig = []
    for m in module.modules():
        if isinstance(m, LoRALayer):
            sig.append((tuple(sorted(m.merged)),
                        tuple((n, a.enabled, a.multiplier) for n, a in m.lora.items())))
    return tuple(sig)


class GraphedUNet:
    """`unet(x, t, ctx, added_cond)` for inference, replayed from CUDA graphs (one per shape and LoRA state).

    Tensor values (weights, trained LoRA parameters, inputs) may change between calls: the graph reads
    them from the same memory. Changing a LoRA's multiplier, enabling or merging it records a new graph.
    """

    def __init__(self, unet: nn.Module, max_graphs: int = 4):
        self.unet, self.max_graphs = unet, max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self._stream: torch.cuda.Stream | None = None

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The one stream its graphs are recorded on; sampling runs its other work there too (`on_stream`),
        so that the whole of a generate() call keeps one cuBLAS workspace, as an eager pipeline does.
        None off CUDA (the tests' CPU stand-in for recording)."""
        device = self.unet.conv_in.weight.device
        if self._stream is None and device.type == "cuda":
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def config(self):
        return self.unet.config

    def __call__(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, added_cond: dict | None = None):
        if torch.is_grad_enabled():
            return self.unet(x, t, ctx, added_cond)
        added = dict(sorted((added_cond or {}).items()))  # SDXL: text_embeds (B, P), time_ids (B, 6)
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        key = (tuple(x.shape), x.dtype, tuple(ctx.shape), ctx.dtype, t.dtype,
               tuple((k, tuple(v.shape), v.dtype) for k, v in added.items()),
               torch.is_autocast_enabled("cuda"), self.unet.training, lora_signature(self.unet))
        if key not in self.graphs:
            static = {"x": x.clone(), "t": t.to(x.device).clone(), "ctx": ctx.clone(),
                      **{"added." + k: v.to(x.device).clone() for k, v in added.items()}}
            static_added = {k: static["added." + k] for k in added} or None
            graph, out = capture(lambda: self.unet(static["x"], static["t"], static["ctx"], static_added),
                                 stream=self.stream)
            self.graphs[key] = (graph, static, out)
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph, static, out = self.graphs[key]
        static["x"].copy_(x)
        if t.device.type == "cpu":  # the samplers' timestep: a host number, written without waiting
            tv = t.reshape(-1)
            if bool((tv == tv[0]).all()):
                static["t"].fill_(tv[0].item())
            else:
                static["t"].copy_(tv.pin_memory() if static["t"].is_cuda else tv, non_blocking=True)
        else:
            static["t"].copy_(t)
        static["ctx"].copy_(ctx)
        for k, v in added.items():
            static["added." + k].copy_(v)
        graph.replay()
        return out.clone()


def graphed_unet(unet: nn.Module) -> GraphedUNet:
    """The module's own GraphedUNet (kept on it, so graphs are reused across calls)."""
    g = unet.__dict__.get("_graphed")
    if g is None:
        g = unet.__dict__["_graphed"] = GraphedUNet(unet)
    return g
