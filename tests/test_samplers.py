"""Each sampler equals its diffusers scheduler, step by step, on the same model outputs and noise."""
import pytest
import torch

from models.samplers import ddim, ddpm, dpmpp_2m, euler, euler_ancestral, get_sampler, guided
from models.schedule import NoiseSchedule

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
          steps_offset=1)


def fake_model(x, t):
    """Deterministic, depends on x and t: the same 'network' for both loops."""
    return 0.5 * torch.tanh(x) + 0.1 * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 150.0)


def run_diffusers(sched, noise, steps, step_kw=None, x0=None, strength=1.0, seed=7):
    g = torch.Generator().manual_seed(seed)
    sched.set_timesteps(steps)
    ts = sched.timesteps
    if x0 is not None:  # diffusers' img2img: skip the first steps, noise x0 to the first kept timestep
        t_start = max(steps - min(int(steps * strength), steps), 0)
        ts = ts[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        x = sched.add_noise(x0, noise, ts[:1].repeat(noise.shape[0]))
    else:
        x = noise * sched.init_noise_sigma
    xs = []
    for t in ts:
        out = fake_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=g, **(step_kw or {})).prev_sample
        xs.append(x)
    return xs


def run_ours(fn, noise, schedule, steps, seed=7, **kw):
    xs = []
    fn(fake_model, noise, schedule, steps, generator=torch.Generator().manual_seed(seed),
       callback=lambda i, t, x, x0: xs.append(x.clone()), **kw)
    return xs


def close(ours, ref, tol=2e-5):
    assert len(ours) == len(ref) and len(ref) > 0
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), f"step {i}: {(a - b).abs().max()}"


NOISE = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
X0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim(spacing, eta, pred):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing,
                          prediction_type=pred)
    ours = NoiseSchedule.from_config({**SD, "prediction_type": pred})
    close(run_ours(ddim, NOISE, ours, 12, eta=eta, spacing=spacing),
          run_diffusers(sched, NOISE, 12, {"eta": eta}))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm(pred):
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(**SD, clip_sample=False, prediction_type=pred)
    ours = NoiseSchedule.from_config({**SD, "prediction_type": pred})
    close(run_ours(ddpm, NOISE, ours, 10), run_diffusers(sched, NOISE, 10))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler_ancestral(spacing, pred):
    from diffusers import EulerAncestralDiscreteScheduler
    sched = EulerAncestralDiscreteScheduler(**SD, timestep_spacing=spacing, prediction_type=pred)
    ours = NoiseSchedule.from_config({**SD, "prediction_type": pred})
    close(run_ours(euler_ancestral, NOISE, ours, 10, spacing=spacing), run_diffusers(sched, NOISE, 10))


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler(spacing, pred):
    """SDXL base's scheduler (EulerDiscreteScheduler, leading spacing)."""
    from diffusers import EulerDiscreteScheduler
    sched = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, prediction_type=pred)
    ours = NoiseSchedule.from_config({**SD, "prediction_type": pred})
    got = run_ours(euler, NOISE, ours, 10, spacing=spacing)
    close(got, run_diffusers(sched, NOISE, 10))
    assert (got[-1] - run_ours(euler_ancestral, NOISE, ours, 10, spacing=spacing)[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("spacing,karras", [("linspace", False), ("leading", False), ("trailing", False),
                                            ("linspace", True)])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_dpmpp_2m(spacing, karras, pred):
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, use_karras_sigmas=karras,
                                        prediction_type=pred, algorithm_type="dpmsolver++", solver_order=2)
    ours = NoiseSchedule.from_config({**SD, "prediction_type": pred})
    close(run_ours(dpmpp_2m, NOISE, ours, 20, spacing=spacing, karras=karras), run_diffusers(sched, NOISE, 20))


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_img2img_strength(name):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler}
    extra = {"clip_sample": False, "set_alpha_to_one": False, "timestep_spacing": "leading"} if name == "ddim" else {}
    sched = cls[name](**SD, **extra)
    ours = NoiseSchedule.from_config(SD)
    kw = {"spacing": "leading"} if name == "ddim" else {}
    got = run_ours(get_sampler(name), NOISE, ours, 10, x0=X0, strength=0.6, **kw)
    assert len(got) == 6
    close(got, run_diffusers(sched, NOISE, 10, x0=X0, strength=0.6))


def test_guidance_combines_and_rescales():
    calls = []

    def unet(x, t, ctx, added=None):
        calls.append(x.shape[0])
        return x * ctx.mean(dim=(1, 2))[:, None, None, None]
    unet.dtype = torch.float32
    cond, uncond = torch.full((1, 77, 8), 2.0), torch.full((1, 77, 8), 0.5)
    x = torch.randn(1, 4, 8, 8)
    out = guided(unet, cond, uncond, 7.5)(x, torch.tensor(10))
    assert calls == [2]  # one batched call for uncond + cond
    assert torch.allclose(out, x * 0.5 + 7.5 * (x * 2.0 - x * 0.5))
    # guidance rescale (Lin et al. eq. 15-16): phi=1 gives std of the cond output
    r = guided(unet, cond, uncond, 7.5, rescale=1.0)(x, torch.tensor(10))
    assert torch.allclose(r.std(), (x * 2.0).std(), rtol=1e-5)
    assert torch.allclose(guided(unet, cond, uncond, 1.0)(x, torch.tensor(10)), x * 2.0)  # scale 1: no CFG
    with pytest.raises(ValueError, match="guidance scale"):
        guided(unet, cond, uncond, -1.0)


def test_bad_sampler_settings():
    s = NoiseSchedule.from_config(SD)
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("heun")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ddim(fake_model, NOISE, s, 0)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        ddim(fake_model, NOISE, s, 5, spacing="cosine")
    with pytest.raises(ValueError, match="strength"):
        ddim(fake_model, NOISE, s, 5, x0=X0, strength=0.0)
