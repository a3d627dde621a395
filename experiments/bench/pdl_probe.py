"""What Hopper's programmatic dependent launch (PDL) saves per kernel boundary inside a CUDA graph.

    python -m experiments.bench.pdl_probe

A chain of N dependent elementwise Triton kernels (y <- y * a + b, each reading the previous one's output) is
captured in a CUDA graph and replayed, launched plainly and with PDL (`launch_pdl=True`: the next kernel's
programs may be scheduled while the previous one drains, and wait in `gdc_wait` until its memory is flushed).
Per kernel: the replay time / N against the bytes / the copy bandwidth, at the sizes of the UNet's
activations at batch 8 (64x64 level: 8 x 4096 x 320 bf16 = 21 MB; 16x16 level: 8 x 256 x 1280 = 5 MB)
and a small one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from experiments.bench.graph_ab import replay_ms


@triton.jit
def _step(x_ptr, y_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    if PDL:
        tl.extra.cuda.gdc_wait()              # the previous kernel's writes are visible after this
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may be scheduled now
    x = tl.load(x_ptr + i, mask=m).to(tl.float32)
    tl.store(y_ptr + i, (x * 0.999 + 0.001).to(y_ptr.dtype.element_ty), mask=m)


def chain(bufs, n_kernels: int, pdl: bool):
    n = bufs[0].numel()
    grid = (triton.cdiv(n, 2048),)
    for k in range(n_kernels):
        x, y = bufs[k % 2], bufs[(k + 1) % 2]
        if pdl:
            _step[grid](x, y, n, PDL=True, BLOCK=2048, num_warps=8, launch_pdl=True)
        else:
            _step[grid](x, y, n, PDL=False, BLOCK=2048, num_warps=8)


def time_graph(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    return replay_ms(g, reps)


def main():
    n_kernels = 200
    print(f"triton {triton.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    print("| elements (bf16) | MB moved per kernel | plain us/kernel | PDL us/kernel | saved us/kernel |")
    print("|---|---|---|---|---|")
    for n in (8 * 4096 * 320, 8 * 256 * 1280, 8 * 64 * 1280, 4096):
        bufs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        ref = bufs[0].clone()
        chain(bufs, 3, False)
        plain_out = bufs[1].clone()
        bufs[0].copy_(ref)
        chain(bufs, 3, True)
        assert torch.equal(plain_out, bufs[1]), "PDL changed the result"
        plain = time_graph(lambda b=bufs: chain(b, n_kernels, False)) * 1e3 / n_kernels
        pdl = time_graph(lambda b=bufs: chain(b, n_kernels, True)) * 1e3 / n_kernels
        print(f"| {n} | {4 * n / 1e6:.2f} | {plain:.2f} | {pdl:.2f} | {plain - pdl:.2f} |", flush=True)


if __name__ == "__main__":
    main()
