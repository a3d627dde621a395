"""The DDPM noise schedule and what training needs from it.

q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)       Ho et al. 2020 (arXiv:2006.11239), eq. 4
abar_t = prod_{s<=t} (1 - beta_s), computed in float64 and kept as float64 buffers.

Beta schedules: "scaled_linear" (SD: linspace(sqrt(0.00085), sqrt(0.012), 1000)**2), "linear"
(Ho et al.), "squaredcos_cap_v2" (Nichol & Dhariwal 2021, arXiv:2102.09672, eq. 17, beta <= 0.999).
Zero terminal SNR: Lin et al. 2024 (arXiv:2305.08891), algorithm 1. Targets: epsilon, or
v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, arXiv:2202.00512, sec. 4). Min-SNR-gamma
weights: Hang et al. 2023 (arXiv:2303.09556), eq. 8-9. Noise offset: Guttenberg 2023,
"Diffusion with offset noise" (crosslabs.org/blog/diffusion-with-offset-noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_betas(schedule: str, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    if schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {schedule!r}: use scaled_linear, linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(abar) so that abar_T = 0 while abar_0 is unchanged (Lin et al., alg. 1)."""
    s = torch.cumprod(1 - betas, 0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    abar = s ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass
class NoiseSchedule:
    """betas and alphas_cumprod (float64, shape (T,)) with the prediction type of the model."""
    betas: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}: use one of {PREDICTION_TYPES}")
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas.double(), dim=0)   # (T,)

    @classmethod
    def from_config(cls, cfg: dict) -> "NoiseSchedule":
        """From a diffusers scheduler_config.json (the fields any SD scheduler has)."""
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        else:
            betas = make_betas(cfg.get("beta_schedule", "scaled_linear"), cfg.get("num_train_timesteps", 1000),
                               cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012))
        if cfg.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, cfg.get("prediction_type", "epsilon"))

    def abar_on(self, device) -> torch.Tensor:
        """alphas_cumprod (float64) on `device`, copied once: gathers by device timesteps never wait for the host."""
        cache = self.__dict__.setdefault("_abar", {})
        key = str(torch.device(device))
        if key not in cache:
            cache[key] = self.alphas_cumprod.to(device)
        return cache[key]

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) for timesteps (B,): computed in float64, then shaped (B, 1, 1, 1)
        in x's dtype, so the training step multiplies latents in their own precision (no float64 tensors)."""
        a = self.abar_on(t.device)[t.long()]
        shape = (-1, *([1] * (like.ndim - 1)))
        return (a.sqrt().to(like.device, like.dtype).reshape(shape),
                (1 - a).sqrt().to(like.device, like.dtype).reshape(shape))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        s, s1 = self._coefs(t, x0)
        return s * x0 + s1 * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, s1 = self._coefs(t, x0)
        return s * noise - s1 * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict: the noise, or v."""
        return noise if self.prediction_type == "epsilon" else self.velocity(x0, noise, t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), (B,) float64."""
        a = self.abar_on(t.device)[t.long()]
        return a / (1 - a)

    def min_snr_weights(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Per-sample loss weights min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v (float32)."""
        snr = self.snr(t)
        w = snr.clamp(max=gamma) / (snr if self.prediction_type == "epsilon" else snr + 1)
        return w.float()

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator).to(device)


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """noise + offset * N(0, 1) per (sample, channel): lets the model learn overall brightness."""
    if offset == 0:
        return noise
    b, c = noise.shape[:2]
    extra = torch.randn((b, c, 1, 1), generator=generator, dtype=noise.dtype).to(noise.device)
    return noise + offset * extra
