"""Where sampling's peak GPU memory is reached, ours against diffusers+peft, phase by phase.

    python -m experiments.bench.memory_phases [ours|diffusers] [ROOT]
    (the diffusers side runs tests/diffusers_baseline.py sampling_memory: diffusers is imported only under tests/)

Prints allocated GiB after loading (weights), the peak of the denoising loop (50 DDIM steps, CFG, r32
LoRA unmerged, read at the last step's callback) and the peak of the VAE decode alone, for the same
SD1.5-size random model at 512x512 in fp16 as the sampling benchmark. Run each side in its own process.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from experiments.bench.configs import CONFIGS, reset_peak, world
from experiments.bench.world import CAPTIONS

ROOT = Path(__file__).resolve().parents[2]
GIB = 2 ** 30
NEG = "blurry, distorted face"


def peak_gib() -> float:
    """Peak allocated GiB since the last reset (0 without CUDA)."""
    if not torch.cuda.is_available():  # --tiny on a CPU: runs the code, measures nothing
        return 0.0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def trace_peaks(module: torch.nn.Module, run) -> list[str]:
    """Run `run()` with a hook after every submodule's forward; -> one line for each module that raised the
    peak: its name, the new peak and the allocated memory after it (MiB), its output's layout (cl/nchw)."""
    lines, last = [], [0.0]

    def hook(name):
        def after(m, args, out):
            if not torch.cuda.is_available():
                return
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
            if peak > last[0] + 1:
                t = out if torch.is_tensor(out) else None
                lay = "" if t is None or t.ndim != 4 else (" nchw" if t.is_contiguous() else
                                                           " cl" if t.is_contiguous(memory_format=torch.channels_last)
                                                           else " strided")
                lines.append(f"{name or '<top>'}: peak {peak:.0f} alloc {torch.cuda.memory_allocated() / 2 ** 20:.0f}"
                             f"{lay}")
                last[0] = peak
        return after
    hooks = [m.register_forward_hook(hook(n)) for n, m in module.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return lines


def ours(w: dict) -> dict:
    from lora.inject import inject_lora
    from models.load import load_model
    from models.pipeline import generate
    c, dev, size = CONFIGS["report"], w["device"], w["resolution"]
    sd = load_model(w["model"], dtype=w["sample_dtype"], device=dev)
    inject_lora(sd.unet, c["targets"], rank=c["rank"], alpha=c["alpha"], dtype=sd.unet.dtype)
    sd.unet.eval()
    out = {"loaded": torch.cuda.memory_allocated() / GIB if dev == "cuda" else 0.0}
    for run in range(2):  # the first run records the UNet's graph
        reset_peak(dev)
        loop = {}
        latents = {}

        def cb(i, t, x, x0_hat):
            loop["peak"] = peak_gib()
            latents["x"] = x

        generate(sd, CAPTIONS[0], NEG, steps=50, seed=run, height=size, width=size, callback=cb)
        out[f"run{run}_loop"], out[f"run{run}_total"] = loop["peak"], peak_gib()
    reset_peak(dev)
    with torch.no_grad():
        sd.vae.decode_latents(latents["x"].to(sd.vae.dtype))
    out["decode_only"] = peak_gib()
    reset_peak(dev)
    print("\n".join(trace_peaks(sd.vae, lambda: sd.vae.decode_latents(latents["x"].to(sd.vae.dtype)))))
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    side = args[0] if args else "ours"
    root = args[1] if len(args) > 1 else "/tmp/bench"
    if side == "ours":
        res = ours(world(root, "--tiny" in sys.argv))
        print(side, " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    else:  # diffusers is imported only under tests/
        subprocess.run([sys.executable, str(ROOT / "tests" / "diffusers_baseline.py"), "sampling_memory", "-", "-",
                        root, *[a for a in sys.argv[1:] if a == "--tiny"]], check=True)
