"""The frozen projection + its LoRA term on the Triton dropout path (lora/linear_fn.py) at SD1.5's batch-8
shapes (64x64 and 32x32 levels, bf16, r 32, dropout 0.1): cuBLAS, then a second GEMM adding h B^T (forward),
or gh = s g B, g W and dropout_down's masked add of gh A (input gradient), against one Triton GEMM each
(lora/lora_mm.py) over a few tile configurations. Each is timed as 20 calls replayed from a CUDA graph (no
launch overhead, as in the training step) with four copies of every operand cycled so that L2 (50 MB) does
not hold them between calls.

    python -m experiments.bench.lora_gemm_probe
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from experiments.bench.graph_ab import replay_ms
from lora import dropout_down as dd
from lora import lora_mm
from lora.linear_fn import _scaled_mm

# session 8 swept the first two axes' (64, 128) and warps (4, 8); session 14 widened the sweep (BLOCK_K 32, 2-4
# stages, GROUP_M 4 and 16) for the next device call: the forward took 31 us and the input gradient 43 us in the
# step against the 14 us their 42 MB need (RESULTS.md, session 13)
FWD = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
       for bm, bn, bk, nw, ns in itertools.product((64, 128), (64, 128), (32, 64), (4, 8), (2, 3, 4))]
FWD += [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, GROUP_M=gm) for gm in (4, 16)]
DGRAD = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
         for bm, bn, bk, nw, ns in itertools.product((64, 128), (32, 64), (64, 128), (4, 8), (2, 3, 4))]


def graph_us(fn, reps: int = 20) -> float:
    """Microseconds per call of fn, from a CUDA graph of `reps` calls replayed 5 times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    return replay_ms(g, 5) * 1e3 / reps


def cycled(make, n: int = 4):
    items, state = [make() for _ in range(n)], {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return items[state["i"]]
    return nxt


def main():
    dt, r, p, s = torch.bfloat16, 32, 0.1, 0.5
    print("| M | K=N | what | us |")
    for m, c in ((32768, 320), (8192, 640)):
        w = torch.randn(c, c, device="cuda", dtype=dt) * c ** -0.5
        b = torch.randn(c, device="cuda", dtype=dt)
        a = torch.randn(r, c, device="cuda", dtype=dt) * 0.1
        up = torch.randn(c, r, device="cuda", dtype=dt) * 0.1
        ops = cycled(lambda: (torch.randn(m, c, device="cuda", dtype=dt), torch.randn(m, r, device="cuda", dtype=dt),
                              torch.randn(m, c, device="cuda", dtype=dt)))
        seed = dd.new_seed("cuda")

        def cublas_dgrad():
            _, _, g = ops()
            gh = _scaled_mm(g, up, s)
            dx = g @ w
            dd.add_grad_input_(dx, gh, a, seed, p)

        rows = [("cuBLAS linear + addmm_ h B^T", graph_us(lambda: (lambda o: F.linear(o[0], w, b).addmm_(
                    o[1], up.t()))(ops()))),
                ("cuBLAS linear alone", graph_us(lambda: F.linear(ops()[0], w, b)))]
        rows += [(f"triton fwd {cfg}", graph_us(lambda: (lambda o: lora_mm.forward(o[0], w, b, o[1], up, cfg))(ops())))
                 for cfg in FWD]
        rows += [("cuBLAS gh = s g B, g W, masked add of gh A", graph_us(cublas_dgrad)),
                 ("cuBLAS g W alone", graph_us(lambda: ops()[2] @ w))]
        rows += [(f"triton dgrad {cfg}", graph_us(lambda: lora_mm.input_grad(ops()[2], w, up, a, seed, p, s, cfg)))
                 for cfg in DGRAD]
        rows += [("copy of x (the memory floor: read M x K, write M x N)", graph_us(lambda: ops()[0].clone()))]
        for what, us in rows:
            print(f"| {m} | {c} | {what} | {us:.1f} |", flush=True)
        for kind in ("triton fwd", "triton dgrad"):
            what, us = min(((wh, u) for wh, u in rows if wh.startswith(kind)), key=lambda t: t[1])
            print(f"best {kind} at {m} x {c}: {us:.1f} us, {what[len(kind) + 1:]}", flush=True)



if __name__ == "__main__":
    main()
