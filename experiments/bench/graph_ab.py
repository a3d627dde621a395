"""One switch on and off within one process: the default training step recorded as a CUDA graph, then recorded
again with a module-level setting changed (default: to False, e.g. lora.lora_mm.enabled; or to a given
value, e.g. lora.dropout_down.min_elements=0), the two graphs replayed in alternating rounds. Separate
benchmark processes differ by up to 3-7% in s/step at batch 8, while the graphed step itself replays within
0.5% from process to process (experiments/bench/RESULTS.md, session 8): replays in one process show a switch
worth 0.5%.

    python -m experiments.bench.graph_ab [CONFIG] [MODULE.ATTR[=VALUE]] [ROUNDS]   (b8_bf16 lora.lora_mm.enabled 5)
"""
import ast
import importlib
import sys
import tempfile
from pathlib import Path

import torch

from experiments.bench.configs import world
from experiments.bench.ours import trainer


def replay_ms(graph, n: int = 20) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "b8_bf16"
    switch = sys.argv[2] if len(sys.argv) > 2 else "lora.lora_mm.enabled"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    switch, _, value = switch.partition("=")
    module, attr = switch.rsplit(".", 1)
    mod = importlib.import_module(module)
    changed = ast.literal_eval(value) if value else False
    w = world("/tmp/bench", False)
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer(name, "unet", "default", w, Path(tmp))
        graphs = {}
        for key, v in (("default", getattr(mod, attr)), ("changed", changed)):
            setattr(mod, attr, v)
            tr.graphed.graphs.clear()          # the next step records a new graph with the setting as it is now
            for _ in range(3):
                tr.launch_step()
            tr.drain()
            torch.cuda.synchronize()
            (graphs[key], _), = tr.graphed.graphs.values()
        times = {key: [] for key in graphs}
        for _ in range(rounds):
            for key, g in graphs.items():
                times[key].append(replay_ms(g))
    med = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
    d, c = med["default"], med["changed"]
    print(f"{name}, {switch}: default {d:.2f} ms/step, ={changed!r} {c:.2f} ms/step (medians of {rounds} rounds of "
          f"20 replays; default {', '.join(f'{t:.2f}' for t in times['default'])}; changed "
          f"{', '.join(f'{t:.2f}' for t in times['changed'])}): the default is {100 * (c - d) / c:+.1f}% faster")


if __name__ == "__main__":
    main()
