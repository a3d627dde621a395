"""The SD1.5 VAE's encode (the full step: batch 2, 512x512) and decode (sampling: batch 1) on the GPU, fp16, in
each memory layout and convolution-algorithm choice: ms, peak memory allocated above what was before the call, and
the error against the NCHW path with cuDNN's heuristic algorithms (the trainer's before session 21).

    python -m experiments.bench.vae_probe [REPS]

Why: the report's full step (VAE encode + text encoder in every step) took 36.2 ms against 17.5 ms for the
UNet-only step (H100, session 21), though the encode is 2.23 TFLOP (torch.utils.flop_counter), 2.8 ms at the
card's matmul rate. Variants: "cl" = the VAE's weights and input channels_last; "nhwc norms" = its GroupNorms
on models/nhwc_group_norm.py's kernels (SiLU fused, no NCHW copies), as the UNet's; "folded" = the resnets' conv
biases folded into norm2 and the residual sum (set_bias_folding, which set_triton_kernels calls: the encoder's
since session 22, when this probe's decode was slower folded); "benchmark" = cuDNN's timed search
(AutoencoderKL.search_convs; the trainer's train.vae_conv_search) instead of the heuristic choice (the VAE's
default elsewhere, against a 64 GiB workspace at 1024x1024 fp32, session 12).
"""
from __future__ import annotations

import sys

import torch

from models.vae import AutoencoderKL


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    torch.manual_seed(0)
    vae = AutoencoderKL().to("cuda", torch.float16).requires_grad_(False)
    for name, p in vae.named_parameters():  # a spread like trained weights' (norm scales 1, biases 0)
        p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    x = torch.rand(2, 3, 512, 512, device="cuda", dtype=torch.float16) * 2 - 1
    z = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    ref = {}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median of {reps}")
    print("| variant | encode b2 ms | peak GiB | err | decode b1 ms | peak GiB | err |\n|---|---|---|---|---|---|---|")
    for name in ("nchw", "nchw benchmark", "cl", "cl benchmark", "cl nhwc norms", "cl nhwc norms benchmark",
                 "cl nhwc norms again", "cl nhwc norms folded", "cl nhwc norms folded benchmark"):
        # (again: after the search, does its plan cache change the heuristic's kernels? folded: set_bias_folding)
        cl, bench = name.startswith("cl"), name.endswith("benchmark")
        vae.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        vae.set_nhwc_norms("nhwc norms" in name)
        vae.set_bias_folding("folded" in name)
        vae.search_convs = bench
        torch.backends.cudnn.benchmark = bench
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x
        zin = z.contiguous(memory_format=torch.channels_last) if cl else z
        row = [name]
        for what, fn in (("enc", lambda: vae.encode(xin).mean), ("dec", lambda: vae.decode(zin))):
            with torch.no_grad():
                out = fn().float()
                ms = time_ms(fn, reps)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            ref.setdefault(what, out)
            err = ((out - ref[what]).abs().max() / ref[what].abs().max()).item()
            row += [f"{ms:.2f}", f"{peak:.2f}", f"{err:.1e}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
