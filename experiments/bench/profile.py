"""Where the GPU time of one training step goes: CUDA kernel time by kind, from torch.profiler.

    python -m experiments.bench.profile CONFIG [MODE] [ROOT] [--rows N] [--part full]
    (MODE: an ours.MODES name, default eager; --part full: VAE encode and text encoder in the step)

Prints the step's wall time, the summed kernel time (busy) and its split into matmul, convolution,
attention, normalisation, elementwise/copy and optimizer kernels, the 40 (--rows) costliest kernels, then
as many operators (with input shapes) whose own kernels cost most.
The kernels are the same whether the step is replayed from a CUDA graph or launched eagerly; eager
shows the names.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from experiments.bench.ours import run_steps, warm_trainer

KINDS = [  # (kind, substrings of a kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    # cuDNN's convolutions are implicit GEMMs named sm90_xmma_{fprop,dgrad,wgrad}_implicit_gemm: before matmul
    ("conv", ("conv", "implicit", "winograd", "dgrad", "wgrad", "fprop", "nchwtonhwc", "nhwctonchw")),
    ("matmul", ("gemm", "sm90_xmma", "cutlass", "nvjet", "ampere_", "sm80_", "cublas", "splitk")),
    ("norm", ("norm", "welford")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("reduce", ("reduce",)),
]


def kind(name: str) -> str:
    n = name.lower()
    for k, keys in KINDS:
        if any(s in n for s in keys):
            return k
    return "elementwise/copy"


def main():
    args, opts = sys.argv[1:], {"--rows": "40", "--part": "unet"}
    for key in opts:
        if key in args:
            i = args.index(key)
            opts[key] = args[i + 1]
            del args[i:i + 2]
    rows = int(opts["--rows"])
    name, mode = args[0], args[1] if len(args) > 1 else "eager"
    steps = 3
    with warm_trainer(name, mode, 4, args[2] if len(args) > 2 else "/tmp/bench", opts["--part"]) as tr:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
            t = time.perf_counter()
            run_steps(tr, steps)
            wall = (time.perf_counter() - t) / steps
    by_kind, by_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in prof.events():
        # GPU-side user annotations (e.g. "Optimizer.step#AdamW.step") span kernels already counted: skipped
        # (up to session 6 the AdamW range, 0.6-0.9 ms, was counted on top of its kernels)
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0 \
                and not getattr(e, "is_user_annotation", False):
            us = e.device_time / steps
            by_kind[kind(e.name)] += us
            by_name[e.name[:160]] += us
            count[e.name[:160]] += 1
    busy = sum(by_kind.values())
    if not busy:  # this torch lists kernels differently: its own table
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
        return
    print(f"{name} {mode}: wall {wall * 1e3:.1f} ms/step, kernels {busy / 1e3:.1f} ms/step, "
          f"{sum(count.values()) // steps} kernels/step")
    for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:18s} {us / 1e3:7.2f} ms  {100 * us / busy:5.1f}%")
    for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"  {us / 1e3:7.3f} ms  x{count[n] // steps:<4d} {n}")
    print("operators by the kernel time they launch themselves (self), with their input shapes:")
    ops = [o for o in prof.key_averages(group_by_input_shape=True) if o.self_device_time_total > 0]
    for o in sorted(ops, key=lambda o: -o.self_device_time_total)[:rows]:
        print(f"  {o.self_device_time_total / steps / 1e3:7.3f} ms  x{o.count // steps:<4d} {o.key:32s} "
              f"{str(o.input_shapes)[:110]}")


if __name__ == "__main__":
    main()
