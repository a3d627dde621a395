"""Samplers as plain no-grad functions with one signature (k-diffusion's style):

    sampler(model, noise, schedule, steps, *, x0=None, strength=1.0, generator=None, callback=None, **options)

`model(x, t)` returns the network's prediction (epsilon or v, per `schedule.prediction_type`) for
variance-preserving latents x_t at integer (or, for Euler's linspace spacing, fractional)
timesteps t. `noise` is a unit Gaussian (B, 4, h, w) drawn by the caller; each sampler scales it
as diffusers' scheduler does, so that a seed gives diffusers' image. With `x0` (img2img) the run
starts from x0 noised to the timestep that `strength` picks (strength 1 = from pure noise).
`generator` draws the per-step noise of the stochastic samplers, in diffusers' order.
Timestep spacings ("leading", "trailing", "linspace") follow Lin et al. 2024 (arXiv:2305.08891),
table 2, with SD's `steps_offset`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from models.schedule import NoiseSchedule

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def discrete_timesteps(T: int, steps: int, spacing: str = "leading", steps_offset: int = 1) -> np.ndarray:
    """The N timesteps of DDIM/DDPM, descending (diffusers' DDIMScheduler.set_timesteps)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed the {T} training timesteps")
    if spacing == "leading":
        return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    raise ValueError(f"unknown timestep spacing {spacing!r}: use leading, trailing or linspace")


def _img2img_start(n: int, strength: float) -> int:
    """Index of the first timestep to run (diffusers' img2img get_timesteps)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return max(n - min(int(n * strength), n), 0)


def _x0_eps(schedule: NoiseSchedule, out: torch.Tensor, x: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output at abar = a -> (x0, eps) estimates (DDIM paper eq. 9; v: Salimans & Ho eq. 9)."""
    if schedule.prediction_type == "epsilon":
        return (x - math.sqrt(1 - a) * out) / math.sqrt(a), out
    return math.sqrt(a) * x - math.sqrt(1 - a) * out, math.sqrt(a) * out + math.sqrt(1 - a) * x


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator is None
                       else generator.device).to(x.device)


@torch.no_grad()
def ddim(model: Model, noise: torch.Tensor, schedule: NoiseSchedule, steps: int, *, x0=None, strength=1.0,
         generator=None, callback=None, eta: float = 0.0, spacing: str = "leading", steps_offset: int = 1,
         set_alpha_to_one: bool = False) -> torch.Tensor:
    """DDIM, Song et al. 2021 (arXiv:2010.02502), eq. 12; eta = 1 is DDPM-like ancestral sampling."""
    T, ac = schedule.num_train_timesteps, schedule.alphas_cumprod.tolist()
    ts = discrete_timesteps(T, steps, spacing, steps_offset)
    ts = ts[_img2img_start(len(ts), strength):]
    x = noise if x0 is None else schedule.add_noise(x0, noise, torch.full((noise.shape[0],), int(ts[0])))
    final = 1.0 if set_alpha_to_one else ac[0]
    for i, t in enumerate(ts):
        prev = int(t) - T // steps
        a, a_prev = ac[int(t)], (ac[prev] if prev >= 0 else final)
        out = model(x, torch.tensor(int(t)))
        x0_hat, eps = _x0_eps(schedule, out, x, a)
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)                      # sigma_t^2 / eta^2, eq. 16
        std = eta * math.sqrt(var)
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - std ** 2) * eps
        if eta > 0:
            x = x + std * _noise_like(x, generator)
        if callback:
            callback(i, int(t), x, x0_hat)
    return x


@torch.no_grad()
def ddpm(model: Model, noise: torch.Tensor, schedule: NoiseSchedule, steps: int, *, x0=None, strength=1.0,
         generator=None, callback=None, spacing: str = "leading", steps_offset: int = 1) -> torch.Tensor:
    """Ancestral DDPM, Ho et al. 2020, eq. 6-7, over a strided subsequence ("fixed_small" variance)."""
    T, ac = schedule.num_train_timesteps, schedule.alphas_cumprod.tolist()
    ts = discrete_timesteps(T, steps, spacing, steps_offset)
    ts = ts[_img2img_start(len(ts), strength):]
    x = noise if x0 is None else schedule.add_noise(x0, noise, torch.full((noise.shape[0],), int(ts[0])))
    for i, t in enumerate(ts):
        t = int(t)
        prev = t - T // steps
        a, a_prev = ac[t], (ac[prev] if prev >= 0 else 1.0)
        beta_t = 1 - a / a_prev                                              # the strided step's beta
        out = model(x, torch.tensor(t))
        x0_hat, _ = _x0_eps(schedule, out, x, a)
        mean = (math.sqrt(a_prev) * beta_t / (1 - a)) * x0_hat + (math.sqrt(1 - beta_t) * (1 - a_prev) / (1 - a)) * x
        if t > 0:
            var = max((1 - a_prev) / (1 - a) * beta_t, 1e-20)               # beta tilde, eq. 7
            mean = mean + math.sqrt(var) * _noise_like(x, generator)
        x = mean
        if callback:
            callback(i, t, x, x0_hat)
    return x


def _sigmas(schedule: NoiseSchedule) -> np.ndarray:
    ac = schedule.alphas_cumprod.numpy().copy()
    ac[-1] = max(ac[-1], 2.0 ** -24)  # zero-terminal-SNR schedules: keep sigma_max finite, as diffusers does
    return ((1 - ac) / ac) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364), eq. 5."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional timestep whose sigma is `sigma`, by interpolating log sigma."""
    ls = np.log(max(sigma, 1e-10))
    low = int(np.clip(np.cumsum(ls - log_sigmas >= 0).argmax(), 0, len(log_sigmas) - 2))
    w = np.clip((log_sigmas[low] - ls) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


@torch.no_grad()
def euler_ancestral(model: Model, noise: torch.Tensor, schedule: NoiseSchedule, steps: int, *, x0=None,
                    strength=1.0, generator=None, callback=None, spacing: str = "linspace",
                    steps_offset: int = 1) -> torch.Tensor:
    """Euler ancestral (k-diffusion sample_euler_ancestral; A1111's "Euler a"; diffusers'
    EulerAncestralDiscreteScheduler)."""
    return _euler(model, noise, schedule, steps, x0, strength, generator, callback, spacing, steps_offset, True)


@torch.no_grad()
def euler(model: Model, noise: torch.Tensor, schedule: NoiseSchedule, steps: int, *, x0=None, strength=1.0,
          generator=None, callback=None, spacing: str = "linspace", steps_offset: int = 1) -> torch.Tensor:
    """Euler (Karras et al. 2022, arXiv:2206.00364, alg. 2 with S_churn = 0; A1111's "Euler"; diffusers'
    EulerDiscreteScheduler, SDXL base's scheduler): x <- x + (sigma_next - sigma) * (x - x0_hat) / sigma."""
    return _euler(model, noise, schedule, steps, x0, strength, generator, callback, spacing, steps_offset, False)


def _euler(model, noise, schedule, steps, x0, strength, generator, callback, spacing, steps_offset,
           ancestral: bool) -> torch.Tensor:
    """Works on x_sigma = x_vp * sqrt(1 + sigma^2) (Karras et al. 2022, sec. 4); the model sees x_vp."""
    T = schedule.num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].copy()
    else:
        ts = discrete_timesteps(T, steps, spacing, steps_offset).astype(np.float32)
    sig = np.interp(ts, np.arange(T), _sigmas(schedule))
    sig = np.concatenate([sig, [0.0]]).astype(np.float32).tolist()
    start = _img2img_start(len(ts), strength)
    ts, sig = ts[start:], sig[start:]
    if x0 is not None:
        x = x0 + noise * sig[0]
    else:  # diffusers' init_noise_sigma: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading
        x = noise * (max(sig) if spacing in ("linspace", "trailing") else (max(sig) ** 2 + 1) ** 0.5)
    for i, t in enumerate(ts):
        s, s_next = sig[i], sig[i + 1]
        out = model(x / (s ** 2 + 1) ** 0.5, torch.tensor(float(t)))
        if schedule.prediction_type == "epsilon":
            x0_hat = x - s * out
        else:
            x0_hat = out * (-s / (s ** 2 + 1) ** 0.5) + x / (s ** 2 + 1)
        if ancestral:  # step down to s_down, then add noise back up to s_next (k-diffusion get_ancestral_step)
            s_up = (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5
            s_down = (s_next ** 2 - s_up ** 2) ** 0.5
            x = x + (x - x0_hat) / s * (s_down - s)
            x = x + _noise_like(x, generator) * s_up
        else:
            x = x + (x - x0_hat) / s * (s_next - s)
        if callback:
            callback(i, float(t), x, x0_hat)
    return x


@torch.no_grad()
def dpmpp_2m(model: Model, noise: torch.Tensor, schedule: NoiseSchedule, steps: int, *, x0=None, strength=1.0,
             generator=None, callback=None, spacing: str = "linspace", steps_offset: int = 1,
             karras: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095), algorithm 2, midpoint form; the last step first order.

    Works on VP latents x_t = alpha_t x0 + sigma_t eps, alpha_t = 1/sqrt(1+s^2), sigma_t = s alpha_t.
    """
    T = schedule.num_train_timesteps
    base = _sigmas(schedule)
    if karras:
        sig = karras_sigmas(float(base[0]), float(base[-1]), steps)
        ts = np.array([_sigma_to_t(s, np.log(base)) for s in sig]).round().astype(np.int64)
    else:
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
        else:
            ts = discrete_timesteps(T, steps, spacing, steps_offset)
        sig = np.interp(ts, np.arange(T), base)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    start = _img2img_start(len(ts), strength)
    ts, sig = ts[start:], torch.from_numpy(sig[start:]).double()
    alpha = 1 / (sig ** 2 + 1).sqrt()
    sigma_t = sig * alpha
    lam = alpha.log() - sigma_t.log()                                     # log-SNR / 2; -inf... +inf at sigma 0
    x = noise if x0 is None else schedule.add_noise(x0, noise, torch.full((noise.shape[0],), int(ts[0])))
    prev_d = None
    for i, t in enumerate(ts):
        out = model(x, torch.tensor(int(t)))
        if schedule.prediction_type == "epsilon":
            d = (x - sigma_t[i].item() * out) / alpha[i].item()            # data prediction x0
        else:
            d = alpha[i].item() * x - sigma_t[i].item() * out
        h = (lam[i + 1] - lam[i]).item()
        ratio = (sigma_t[i + 1] / sigma_t[i]).item()
        coef = alpha[i + 1].item() * math.expm1(-h)                        # alpha_t (e^{-h} - 1)
        last = i == len(ts) - 1
        if prev_d is None or last:
            x = ratio * x - coef * d                                           # first order (DPM-Solver++ 1)
        else:
            r = (lam[i] - lam[i - 1]).item() / h
            x = ratio * x - coef * d - 0.5 * coef * (d - prev_d) / r
        prev_d = d
        if callback:
            callback(i, int(t), x, d)
    return x


SAMPLERS = {"ddim": ddim, "ddpm": ddpm, "euler": euler, "euler_a": euler_ancestral, "dpmpp_2m": dpmpp_2m}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: use one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def guided(unet, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, rescale: float = 0.0,
           added_cond: dict | None = None, added_uncond: dict | None = None) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598, eq. 6) as a model(x, t).

    out = uncond + scale * (cond - uncond), one batched UNet call; `uncond` is the negative prompt's
    embedding. `rescale` > 0 mixes in the std-matched output (Lin et al. 2024, eq. 15-16).
    scale <= 1 or no uncond: the conditional output alone (diffusers does the same).
    added_cond / added_uncond: SDXL's pooled text and time ids for the prompt and the negative prompt.
    """
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    use_cfg = uncond is not None and scale > 1.0
    ctx = torch.cat([uncond, cond]) if use_cfg else cond
    if added_cond is not None and use_cfg:
        added_cond = {k: torch.cat([added_uncond[k], v]) for k, v in added_cond.items()}

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xin = torch.cat([x, x]) if use_cfg else x
        out = unet(xin.to(unet.dtype), t, ctx, added_cond).to(x.dtype)  # t: the UNet moves it
        if not use_cfg:
            return out
        out_u, out_c = out.chunk(2)
        g = out_u + scale * (out_c - out_u)
        if rescale > 0:
            dims = list(range(1, g.ndim))
            g_rescaled = g * (out_c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
            g = rescale * g_rescaled + (1 - rescale) * g
        return g
    return model
