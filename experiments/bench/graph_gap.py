"""Where the graphed training step's time goes beyond its kernels: the whole step as the benchmark runs it
(launch_step + drain), the recorded CUDA graph replayed back to back (no host work in between), and one
replay between CUDA events.

    python -m experiments.bench.graph_gap [CONFIG] [STEPS]
"""
import sys
import time

import torch

from experiments.bench.ours import warm_trainer


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "b8_bf16"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    with warm_trainer(name, "default", 4) as tr:
        t = time.perf_counter()
        for i in range(steps):
            tr.launch_step()
            if (i + 1) % 10 == 0:
                tr.drain(keep_newest=True)   # as Trainer.run reads them
        tr.drain()
        torch.cuda.synchronize()
        full = (time.perf_counter() - t) / steps
        (graph, _), = tr.graphed.graphs.values()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        replays = (time.perf_counter() - t) / steps
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        host = []
        for _ in range(20):
            t = time.perf_counter()
            tr.launch_step()
            host.append(time.perf_counter() - t)
        tr.drain()
    print(f"{name}: launch_step + drain {full * 1e3:.2f} ms/step; graph replays back to back {replays * 1e3:.2f} "
          f"ms; one replay (events) {a.elapsed_time(b):.2f} ms; host time of launch_step (median) "
          f"{sorted(host)[len(host) // 2] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
