"""AdamW and learning-rate schedules (constant, linear, cosine; each with linear warmup).

Cosine: Loshchilov & Hutter 2017 (SGDR, arXiv:1608.03983) eq. 5 without restarts, decaying to
min_lr_ratio * lr. AdamW: Loshchilov & Hutter 2019 (arXiv:1711.05101).
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `total`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: use one of {SCHEDULES}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(groups: list[dict], cfg, capturable: bool = False) -> torch.optim.Optimizer:
    """groups: [{"params": [...], "lr": ...}, ...]; cfg: optim config (betas, eps, weight_decay, fused).

    With `fused` (CUDA or CPU), one kernel updates every parameter and a step whose gradients are not
    finite is skipped inside it (`optimizer.found_inf`), so the host never reads the gradients.
    `capturable` (for CUDA graphs) keeps the step counts and the learning rates in device tensors;
    set_capturable() restores that after load_state_dict."""
    kw = dict(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.get("fused") and all(p.device.type in ("cuda", "cpu") for g in groups for p in g["params"]):
        kw["fused"] = True
    elif not capturable:
        kw["foreach"] = True  # one C++ loop over the tensors (also on a CPU)
    else:
        raise ValueError("CUDA graphs need the fused AdamW on CUDA: set optim.fused=true or train.cuda_graph=false")
    opt = torch.optim.AdamW(groups, **kw)
    set_capturable(opt, capturable)
    return opt


def set_capturable(opt: torch.optim.Optimizer, on: bool) -> None:
    for g in opt.param_groups:
        g["capturable"] = on
        if on and not torch.is_tensor(g["lr"]):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=g["params"][0].device)
        elif not on and torch.is_tensor(g["lr"]):
            g["lr"] = float(g["lr"])


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """opt.state_dict() with plain-number learning rates (a saved state loads into eager or graphed runs)."""
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["lr"] = float(g["lr"])
    return sd


class EMA:
    """Exponential moving average of parameters: ema = decay * ema + (1 - decay) * p after each step."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, weight: torch.Tensor | float = 1.0) -> None:
        """weight: 1.0, or a device tensor that is 0.0 for a skipped step (then the average stays put)."""
        diff = torch._foreach_sub([p.detach().float() for p in self.params], self.shadow)
        torch._foreach_mul_(diff, weight * (1.0 - self.decay))
        torch._foreach_add_(self.shadow, diff)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to swap back)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, d: dict) -> None:
        for s, v in zip(self.shadow, d["shadow"]):
            s.copy_(v)
