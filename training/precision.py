"""Mixed precision by hand: a dynamic loss scaler and the autocast context.

fp16 (Micikevicius et al. 2018, arXiv:1710.03740, sec. 3.2): the loss is multiplied by a scale S
before backward so that small gradients survive in fp16; gradients are divided by S before the
step; a step whose gradients hold inf/NaN is skipped and S halves; after `growth_interval` clean
steps S doubles. bf16 and fp32 need no scaling (scale 1). The frozen base runs in half precision
under autocast; the trained LoRA parameters stay fp32, so the optimizer never sees fp16 values
(no "Attempting to unscale FP16 gradients").
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(name: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: use fp32, fp16 or bf16")
    return PRECISIONS[name]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision_dtype(precision))


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 factor: float = 2.0, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval, self.factor, self.min_scale = growth_interval, factor, min_scale
        self.clean_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, params: list[torch.Tensor]) -> bool:
        """Divide the gradients by the scale in place; True when all of them are finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        if self.enabled:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / self.factor, self.min_scale)
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps % self.growth_interval == 0:
                self.scale *= self.factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.clean_steps = float(d["scale"]), int(d["clean_steps"])
