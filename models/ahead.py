"""The UNet's projections of the text and of the timestep embedding, computed ahead on a side CUDA stream.

Cross-attention's keys and values depend only on the text, each resnet's timestep projection only on the
timestep embedding: none of them waits for the image path. Inline they are small kernels on the forward's
critical path (per cross-attention: the k and v GEMMs over 77 tokens, and with a LoRA its dropout, down and
up products; per resnet: a SiLU and a GEMM over the batch), each too small to fill the GPU. Here the UNet
enqueues all of them on a side stream (models/side_stream.py) at the start of its forward; each consumer
waits only for its own result's event, so the main stream goes on with conv_in and the first blocks
meanwhile, and a CUDA graph records the events as edges. The same kernels on the same inputs (SiLU of the
embedding computed once instead of per resnet): the same numbers, except that LoRA dropout draws the masks of
k and v before the others, so other draws from the same distribution.

Not under gradient checkpointing (a recomputed block would draw k's and v's dropout masks anew) nor on a CPU.
UNet.set_ahead; train.ahead_stream.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from models.side_stream import side


enabled = True   # with UNet.set_ahead; experiments/bench/graph_ab.py toggles it
on_cpu = False   # tests only: the same values computed in place on a CPU (no stream, nothing to overlap)


class Ready:
    """A value computed on the side stream and the event after it (a CPU: the value alone)."""

    def __init__(self, value, stream: torch.cuda.Stream | None, main: torch.cuda.Stream | None):
        self.value, self.main, self.event = value, main, None
        if stream is not None:
            self.event = torch.cuda.Event()
            self.event.record(stream)
            for t in value if isinstance(value, tuple) else (value,):
                t.record_stream(main)  # read on the main stream: its memory is not reused before that is done

    def take(self):
        if self.event is not None:
            self.main.wait_event(self.event)
        return self.value


def compute(resnets: list, cross_attentions: list, emb: torch.Tensor, context: torch.Tensor) -> list:
    """Enqueue each resnet's time_emb_proj(silu(emb)) and each cross-attention's (to_k(context), to_v(context))
    on the side stream, as `module.ahead`. -> the modules given a value (for `finish`)."""
    cuda = emb.is_cuda
    main = torch.cuda.current_stream(emb.device) if cuda else None
    s = side(emb.device) if cuda else None
    if cuda:
        s.wait_stream(main)
    given = []
    with torch.cuda.stream(s) if cuda else contextlib.nullcontext():
        act = F.silu(emb)                                          # (B, T), once for every resnet
        for m in resnets:
            m.ahead = Ready(m.time_emb_proj(act), s, main)         # (B, Cout)
            given.append(m)
        for a in cross_attentions:
            a.ahead = Ready((a.to_k(context), a.to_v(context)), s, main)   # (B, 77, inner) each
            given.append(a)
    return given


def take(module):
    """module.ahead's value once the main stream has waited for it (None where there is none); cleared."""
    ready = module.__dict__.get("ahead")
    if ready is None:
        return None
    module.ahead = None
    return ready.take()


def finish(modules: list, device: torch.device) -> None:
    """After the forward: values not taken are dropped, and the main stream waits for the side stream (a CUDA
    graph's capture must join every stream it forked)."""
    for m in modules:
        m.ahead = None
    if device.type == "cuda":
        torch.cuda.current_stream(device).wait_stream(side(device))
