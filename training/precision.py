"""Mixed precision by hand: a dynamic loss scaler and the autocast context.

fp16 (Micikevicius et al. 2018, arXiv:1710.03740, sec. 3.2): the loss is multiplied by a scale S
before backward so that small gradients survive in fp16; gradients are divided by S before the
step; a step whose gradients hold inf/NaN is skipped and S halves; after `growth_interval` clean
steps S doubles. bf16 and fp32 need no scaling (scale 1). The frozen base runs in half precision
under autocast; the trained LoRA parameters stay fp32, so the optimizer never sees fp16 values
(no "Attempting to unscale FP16 gradients").

The scaler's state lives in device tensors and every update is a device operation, so a training
step never waits for the GPU (and can be captured in a CUDA graph). `found_inf` is a float tensor,
1.0 when the step must be skipped.
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
    # No cast cache: each LoRA weight is used once per forward anyway, and a cache that outlives a
    # CUDA-graph capture would point into the graph's memory.
    return torch.autocast(device_type=device.type, dtype=precision_dtype(precision), cache_enabled=False)


class LossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000,
                 factor: float = 2.0, min_scale: float = 1.0, device=None):
        self.enabled = enabled
        self.growth_interval, self.factor, self.min_scale = growth_interval, factor, min_scale
        self.scale_t = torch.tensor(init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self.clean_t = torch.zeros((), dtype=torch.float32, device=device)

    @property
    def scale(self) -> float:
        return float(self.scale_t)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_t if self.enabled else loss

    @torch.no_grad()
    def unscale_grads(self, grads: list[torch.Tensor]) -> None:
        if self.enabled and grads:
            torch._foreach_mul_(grads, (1.0 / self.scale_t).to(grads[0].device))

    @torch.no_grad()
    def update_(self, found_inf: torch.Tensor) -> None:
        """Device-side update: halve on overflow (not below min_scale), double after growth_interval clean steps."""
        if not self.enabled:
            return
        found = found_inf.to(self.scale_t.device, torch.float32)
        self.clean_t.add_(1.0).mul_(1.0 - found)                  # clean steps in a row
        grow = (self.clean_t >= self.growth_interval).float()
        self.scale_t.mul_(found / self.factor + (1.0 - found) * (1.0 + grow * (self.factor - 1.0)))
        self.scale_t.clamp_(min=self.min_scale)
        self.clean_t.mul_(1.0 - grow)

    def tensors(self) -> list[torch.Tensor]:
        return [self.scale_t, self.clean_t]

    def state_dict(self) -> dict:
        return {"scale": float(self.scale_t), "clean_steps": int(self.clean_t)}

    def load_state_dict(self, d: dict) -> None:
        self.scale_t.fill_(float(d["scale"]))
        self.clean_t.fill_(float(d["clean_steps"]) % self.growth_interval)
