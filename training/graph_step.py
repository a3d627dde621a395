"""The whole optimizer step (forward, backward, unscale, clip, AdamW, EMA, loss-scale update) recorded
as one CUDA graph per input shape, then replayed: one launch per step instead of thousands.

Recording needs warm-up runs, and those change the LoRA weights, the optimizer's moments and the loss
scale; `GraphedStep` snapshots all of them first and puts them back, so the graphed run computes the
same numbers as the eager one (tests/test_fast_paths.py: a CPU stand-in recorder, and CUDA cases).
All graphs share one memory pool: everything that outlives a replay (gradients, optimizer state, the
returned statistics) is allocated outside the graphs or copied out right after the replay.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from models import cuda_graph


class GraphedStep:
    def __init__(self, step_fn: Callable[[dict], torch.Tensor], state_tensors: Callable[[], list[torch.Tensor]],
                 optimizer: torch.optim.Optimizer, max_graphs: int = 8, device: str = "cuda"):
        self.step_fn, self.state_tensors, self.opt = step_fn, state_tensors, optimizer
        self.rng = (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if device == "cuda" else \
            (torch.get_rng_state, torch.set_rng_state)   # (a CPU stand-in for capture, in the tests)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.device, self.stream = device, None  # the one stream every recording runs on (made at the first)
        self.failed: str | None = None   # why recording failed (then every step runs eagerly)

    @staticmethod
    def key(inputs: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype, v.data_ptr()) if torch.is_tensor(v) else (k, v)
                     for k, v in sorted(inputs.items()))

    def _record(self, inputs: dict):
        saved = [t.detach().clone() for t in self.state_tensors()]
        opt_saved = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                     for p, st in self.opt.state.items()}
        rng = self.rng[0]()

        def restore():
            with torch.no_grad():
                for t, s in zip(self.state_tensors(), saved):
                    t.copy_(s)
                for p, st in self.opt.state.items():
                    for k, v in st.items():
                        if torch.is_tensor(v):  # moments born in the warm-up start from zero, as in a fresh AdamW
                            v.copy_(opt_saved[p][k]) if p in opt_saved else v.zero_()
            self.rng[1](rng)           # LoRA dropout draws the same masks as without the warm-up
        try:
            if self.stream is None and self.device == "cuda":  # cuBLAS keeps a workspace per stream it runs on
                self.stream = torch.cuda.Stream()
            graph, out = cuda_graph.capture(lambda: self.step_fn(inputs), warmup=2, restore=restore, pool=self.pool,
                                            stream=self.stream)
        except RuntimeError:
            restore()  # a failed warm-up or recording leaves the run as it found it (the caller goes on eagerly)
            raise
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    def __call__(self, inputs: dict) -> torch.Tensor:
        """Replay the graph recorded for these (static) inputs; -> a copy of the step's statistics."""
        k = self.key(inputs)
        if self.failed:
            return self.step_fn(inputs)
        if k not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                warnings.warn(f"more than {self.max_graphs} input shapes: this step runs without a CUDA graph")
                return self.step_fn(inputs)
            try:
                self.graphs[k] = self._record(inputs)
            except RuntimeError as e:  # an op that cannot be recorded: keep training, eagerly, and say so
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(f"recording the training step as a CUDA graph failed; continuing without one "
                              f"(set train.cuda_graph=false to skip the attempt): {self.failed[:500]}")
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                return self.step_fn(inputs)
        graph, out = self.graphs[k]
        graph.replay()
        return out.clone()
