"""What is alive at a training job's peak GPU memory: torch's allocator history over the warm-up steps and one
steady step, replayed to the moment the allocated bytes peak, with the live blocks grouped by where they were
allocated (the innermost frame in this repository).

    python -m experiments.bench.memory_trace [CONFIG] [MODE] [--full] [--steps N]   (default sdxl_seed004 default)

--full: the full step (VAE and text encoders in every step) instead of the UNet on cached latents and text. A
sampling config (sampling, sampling_sdxl; MODE graph) traces `--steps` images (default 2) of ours.py's sampling job.

Prints the allocated GiB after building and after each step, the peak and in which step it was reached, then the
largest groups of blocks alive at the peak that were allocated after building (file:line function, GiB, count).
"""
from __future__ import annotations

import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from experiments.bench.configs import CONFIGS, SAMPLING, world
from experiments.bench.ours import sampler, trainer

GIB = 2 ** 30
ROOT = str(Path(__file__).resolve().parents[2])


def site(frames: list) -> str:
    """The innermost frame in this repository (else the innermost frame): 'path:line function'."""
    ours = [f for f in frames if f["filename"].startswith(ROOT) and "/experiments/" not in f["filename"]]
    f = (ours or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{f['filename'].replace(ROOT + '/', '')}:{f['line']} {f['name']}"


def _replay(events: list, stop: int | None = None):
    """Allocated bytes after each alloc / free_completed event (as the allocator counts them), from 0."""
    live, cur = {}, 0
    for i, e in enumerate(events[:stop]):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
        yield i, cur, live


def peak_at(events: list) -> tuple[int, int, dict]:
    """-> (peak bytes above the start, index of the event that reached it, the blocks alive then)."""
    best, best_i = max(((cur, i) for i, cur, _ in _replay(events)), default=(0, -1))
    live = {}
    for _, _, live in _replay(events, best_i + 1):
        pass
    return best, best_i, dict(live)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else None
    name = args[0] if args else "sdxl_seed004"
    mode = args[1] if len(args) > 1 else "default"
    w = world("/tmp/bench", False, name)
    steps = steps or w["warm"] + 1
    with tempfile.TemporaryDirectory() as tmp:
        if name in SAMPLING:
            one = sampler(mode, w, name=name)
            steps = steps if "--steps" in sys.argv else 2
        else:
            tr = trainer(name, "full" if "--full" in sys.argv else "unet", mode, w, Path(tmp))

            def one(_):
                tr.launch_step()
                tr.drain()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        print(f"{name} {mode}: after building {base / GIB:.2f} GiB allocated")
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, context="alloc", stacks="python")
        marks = []
        for s in range(steps):
            one(s)
            torch.cuda.synchronize()
            marks.append(len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]))
            print(f"  step {s + 1}: {torch.cuda.memory_allocated() / GIB:.2f} GiB allocated, peak so far "
                  f"{torch.cuda.max_memory_allocated() / GIB:.2f}", flush=True)
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    peak, i, live = peak_at(events)
    step = next((s + 1 for s, m in enumerate(marks) if i < m), "?")
    print(f"peak {(base + peak) / GIB:.2f} GiB = {base / GIB:.2f} built + {peak / GIB:.2f} in step {step} "
          f"(event {i} of {len(events)}; {CONFIGS.get(SAMPLING.get(name, name))})")
    groups = defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[site(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    print("alive at the peak, allocated since building (GiB, blocks):")
    for k, (b, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"  {b / GIB:6.3f}  x{n:<5d} {k}")
    e = events[i]
    print("the block that set the peak:", f"{e['size'] / GIB:.3f} GiB at", site(e.get("frames", [])))
    for f in e.get("frames", [])[:14]:
        print(f"    {f['filename'].replace(ROOT + '/', '')}:{f['line']} {f['name']}")


if __name__ == "__main__":
    main()
