"""Which UNet modules return fp32 in the half-precision training step (one eager step, CONFIG's trainer).

    python -m experiments.bench.dtype_probe [CONFIG] [MODE]
"""
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.bench.configs import world
from experiments.bench.ours import trainer


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "b8_bf16"
    mode = sys.argv[2] if len(sys.argv) > 2 else "eager_default"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.randn(2, 8, 4, 4, device="cuda", dtype=torch.bfloat16)
        print("interpolate under autocast:", F.interpolate(x, scale_factor=2.0, mode="nearest").dtype)
    w = world("/tmp/bench", False)
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer(name, "unet", mode, w, Path(tmp))
        seen = {}

        def hook(name, args, out):
            if torch.is_tensor(out) and out.dtype == torch.float32 and name not in seen:
                seen[name] = ([a.dtype for a in args if torch.is_tensor(a)], tuple(out.shape))
        hs = [m.register_forward_hook(lambda mod, a, o, n=n: hook(n, a, o)) for n, m in tr.sd.unet.named_modules()]
        tr.launch_step()
        tr.drain()
        for h in hs:
            h.remove()
    for n, (ins, shape) in seen.items():
        print(f"fp32 out: {n or '(unet)'} inputs {ins} shape {shape}")


if __name__ == "__main__":
    main()
