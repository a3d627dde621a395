"""cuBLAS's rate on the UNet's GEMM shapes at batch 8 (bf16), forward and input-gradient, and on the
LoRA's rank-r GEMMs: which matmuls run far from the 8192^3 rate, and whether they are bound by memory.

    python -m experiments.bench.gemm_probe [BATCH]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from experiments.bench.attention import time_ms


def timed(fn, reps: int = 50) -> float:
    """Seconds per call (CUDA events; experiments/bench/attention.py's timer)."""
    return time_ms(fn, reps) * 1e-3


def main():
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    dt = torch.bfloat16
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dt)
    peak = 2 * n ** 3 / timed(lambda: a @ a, 20)
    print(f"bf16 {n}^3: {peak / 1e12:.0f} TFLOP/s")
    print("| M | K | N | what | us | TFLOP/s | % peak | GB/s |")
    for tokens, c in ((4096, 320), (1024, 640), (256, 1280)):
        m = batch * tokens
        shapes = [(c, 3 * c, "qkv"), (c, c, "q/out/proj"), (c, 8 * c, "geglu proj"), (4 * c, c, "ff out"),
                  (c, 32, "lora down r32"), (32, c, "lora up r32")]
        for k, nn_, what in shapes:
            x = torch.randn(m, k, device="cuda", dtype=dt)
            w = torch.randn(nn_, k, device="cuda", dtype=dt)
            g = torch.randn(m, nn_, device="cuda", dtype=dt)
            for kind, fn, fl, by in (
                    ("fwd", lambda: F.linear(x, w), 2 * m * k * nn_, 2 * (m * k + m * nn_ + k * nn_)),
                    ("dgrad", lambda: g @ w, 2 * m * k * nn_, 2 * (m * k + m * nn_ + k * nn_)),
                    ("wgrad", lambda: g.t() @ x, 2 * m * k * nn_, 2 * (m * k + m * nn_ + k * nn_))):
                if kind == "wgrad" and what not in ("lora down r32", "lora up r32"):
                    continue
                s = timed(fn)
                print(f"| {m} | {k} | {nn_} | {what} {kind} | {s * 1e6:.1f} | {fl / s / 1e12:.0f} | "
                      f"{100 * fl / s / peak:.0f} | {by / s / 1e9:.0f} |")


if __name__ == "__main__":
    main()
