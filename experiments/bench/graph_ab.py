"""One switch on and off within one process: the default training step recorded as a CUDA graph, then recorded
again with a module-level setting changed (default: to False, e.g. lora.lora_mm.enabled; or to a given
value, e.g. lora.dropout_down.min_elements=0), the two graphs replayed in alternating rounds. Separate
benchmark processes differ by up to 3-7% in s/step at batch 8, while the graphed step itself replays within
0.5% from process to process (experiments/bench/RESULTS.md, session 8): replays in one process show a switch
worth 0.5%.

    python -m experiments.bench.graph_ab [CONFIG] [MODULE.ATTR[=VALUE]] [ROUNDS] [--base MODULE.ATTR=VALUE ...]
    (b8_bf16 lora.lora_mm.enabled 5)

--base settings apply to both graphs, e.g. FA4's default backward fix against pull request 2896's:
    graph_ab b8_bf16 "models.fa4_attention.BACKWARD_FIX='tile32'" 5 --base "models.sdpa_backend._policy='fa4'"
"""
import ast
import importlib
import sys
import tempfile
from pathlib import Path

import torch

from experiments.bench.configs import world
from experiments.bench.ours import run_steps, trainer


def replay_ms(graph, n: int = 20) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def _setting(arg: str):
    """MODULE.ATTR[=VALUE] -> (module, attr, value or None)."""
    switch, _, value = arg.partition("=")
    module, attr = switch.rsplit(".", 1)
    return importlib.import_module(module), attr, ast.literal_eval(value) if value else None


def main():
    args, base = sys.argv[1:], []
    while "--base" in args:
        i = args.index("--base")
        base.append(_setting(args[i + 1]))
        del args[i:i + 2]
    name = args[0] if args else "b8_bf16"
    switch = args[1] if len(args) > 1 else "lora.lora_mm.enabled"
    rounds = int(args[2]) if len(args) > 2 else 5
    mod, attr, changed = _setting(switch)
    changed = False if changed is None else changed
    w = world("/tmp/bench", False)
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer(name, "unet", "default", w, Path(tmp))
        for m, a, v in base:                   # after the trainer, whose setup applies its config (e.g. the policy)
            setattr(m, a, v)
        run_steps(tr, 3)                       # optimizer state, cuDNN's search: outside both recordings' peaks
        graphs, extra = {}, {}
        for key, v in (("default", getattr(mod, attr)), ("changed", changed)):
            setattr(mod, attr, v)
            tr.graphed.graphs.clear()          # the next step records a new graph with the setting as it is now
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run_steps(tr, 3)
            extra[key] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30   # the recording's pool and workspaces
            (graphs[key], _), = tr.graphed.graphs.values()
        times = {key: [] for key in graphs}
        for _ in range(rounds):
            for key, g in graphs.items():
                times[key].append(replay_ms(g))
    med = {key: sorted(t)[len(t) // 2] for key, t in times.items()}
    d, c = med["default"], med["changed"]
    print(f"{name}, {switch.partition('=')[0]}: default {d:.2f} ms/step, ={changed!r} {c:.2f} ms/step (medians of "
          f"{rounds} rounds of 20 replays; default {', '.join(f'{t:.2f}' for t in times['default'])}; changed "
          f"{', '.join(f'{t:.2f}' for t in times['changed'])}): the default is {100 * (c - d) / c:+.1f}% faster")
    print(f"  peak allocated above the trainer's while recording: default {extra['default']:.2f} GiB, changed "
          f"{extra['changed']:.2f} GiB")


if __name__ == "__main__":
    main()
