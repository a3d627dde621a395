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


def _peak() -> float:
    if not torch.cuda.is_available():  # --tiny on a CPU: runs the code, measures nothing
        return 0.0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


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
            loop["peak"] = _peak()
            latents["x"] = x

        generate(sd, CAPTIONS[0], NEG, steps=50, seed=run, height=size, width=size, callback=cb)
        out[f"run{run}_loop"], out[f"run{run}_total"] = loop["peak"], _peak()
    reset_peak(dev)
    with torch.no_grad():
        sd.vae.decode_latents(latents["x"].to(sd.vae.dtype))
    out["decode_only"] = _peak()
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
