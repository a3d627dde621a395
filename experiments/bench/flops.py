"""Model FLOPs of one training step and of one sampling step, counted on the meta device (no weights,
no time): the numerator of utilisation and, over the GPU's matmul rate, the floor of each time.

    python -m experiments.bench.flops          # SD1.5 at 512x512, every benchmark config
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.bench.configs import CONFIGS


def step_flops(batch: int, targets: list[str], rank: int, ckpt: bool = False, train: bool = True,
               size: int = 512, arch: str = "sd15") -> float:
    from lora.inject import inject_lora
    from models import sdxl_layout
    from models.unet import UNet2DConditionModel, UNetConfig
    sdxl = arch == "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(sdxl_layout.UNET) if sdxl else UNetConfig())
        unet = unet.to(torch.bfloat16).requires_grad_(False)
        inject_lora(unet, targets, rank=rank, alpha=rank, dtype=torch.float32)
        unet.set_gradient_checkpointing(ckpt)
        unet.train(train)
        x = torch.randn(batch, 4, size // 8, size // 8, dtype=torch.bfloat16)
        ctx = torch.randn(batch, 77, 2048 if sdxl else 768, dtype=torch.bfloat16)
        t = torch.zeros(batch, dtype=torch.long)
        added = {"text_embeds": torch.randn(batch, 1280, dtype=torch.bfloat16),
                 "time_ids": torch.zeros(batch, 6)} if sdxl else None
    with FlopCounterMode(display=False) as fc, torch.set_grad_enabled(train):
        out = unet(x, t, ctx, added)
        if train:
            out.float().square().mean().backward()
    return float(fc.get_total_flops())


def main():
    rate = 790e12  # H100/H200 bf16 dense matmul as measured here (KINDS.md: 769-798 TFLOP/s)
    print(f"| config | batch | TFLOP/step | floor at {rate / 1e12:.0f} TFLOP/s |")
    print("|---|---|---|---|")
    for name, c in CONFIGS.items():
        sdxl = c["arch"] == "sdxl"
        f = step_flops(c["batch"], c["targets"], c["rank"], c["ckpt"], size=1024 if sdxl else 512, arch=c["arch"])
        print(f"| {name} | {c['batch']} | {f / 1e12:.2f} | {f / rate * 1e3:.1f} ms |")
    f = step_flops(2, CONFIGS["report"]["targets"], 32, train=False)
    print(f"| sampling (one CFG step, batch 2, no grad) | 2 | {f / 1e12:.2f} | {f / rate * 1e3:.1f} ms "
          f"(x50 = {50 * f / rate * 1e3:.0f} ms) |")


if __name__ == "__main__":
    main()
