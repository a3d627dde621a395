"""Our noise schedule equals diffusers' DDPMScheduler; training targets and weights against formulas."""
import math

import pytest
import torch

from models.schedule import NoiseSchedule, make_betas, offset_noise, rescale_zero_terminal_snr

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_cumprod_match_diffusers(kind):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(**{**SD, "beta_schedule": kind})
    s = NoiseSchedule.from_config({**SD, "beta_schedule": kind})
    assert s.alphas_cumprod.dtype == torch.float64
    assert torch.allclose(s.betas.float(), ref.betas, atol=1e-7, rtol=1e-5)
    assert torch.allclose(s.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_sd_numbers_worked_out_by_hand():
    s = NoiseSchedule.from_config(SD)
    assert math.isclose(s.betas[0].item(), 0.00085, rel_tol=1e-12)
    assert math.isclose(s.betas[-1].item(), 0.012, rel_tol=1e-12)
    assert math.isclose(s.alphas_cumprod[0].item(), 1 - 0.00085, rel_tol=1e-12)
    assert math.isclose(s.alphas_cumprod[-1].item(), 0.0046600, rel_tol=1e-3)  # SD's final abar, ~0.00466


def test_zero_terminal_snr_matches_diffusers():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(**SD, rescale_betas_zero_snr=True)
    s = NoiseSchedule.from_config({**SD, "rescale_betas_zero_snr": True})
    assert s.alphas_cumprod[-1].item() < 1e-12
    assert math.isclose(s.alphas_cumprod[0].item(), 1 - 0.00085, rel_tol=1e-9)
    assert torch.allclose(s.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6)
    b = rescale_zero_terminal_snr(make_betas("linear", 10, 1e-4, 0.02))
    assert b[-1].item() == pytest.approx(1.0) and (b[:-1] < 1).all()  # the last step removes all signal


def test_add_noise_velocity_and_snr_match_diffusers():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(**SD, prediction_type="v_prediction")
    s = NoiseSchedule.from_config({**SD, "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5)
    assert torch.allclose(s.velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.equal(s.target(x0, noise, t), s.velocity(x0, noise, t))
    a = s.alphas_cumprod[t]
    assert torch.allclose(s.snr(t), a / (1 - a))


def test_min_snr_weights_by_formula():
    s = NoiseSchedule.from_config(SD)
    t = torch.tensor([0, 100, 999])
    snr = s.snr(t)
    w = s.min_snr_weights(t, gamma=5.0)
    # t=0 has SNR ~ 1175 > 5: weight 5/SNR; t=999 has SNR ~ 0.0047 < 5: weight 1.
    assert math.isclose(w[0].item(), 5 / snr[0].item(), rel_tol=1e-6)
    assert math.isclose(w[2].item(), 1.0, rel_tol=1e-6)
    v = NoiseSchedule.from_config({**SD, "prediction_type": "v_prediction"}).min_snr_weights(t, 5.0)
    assert math.isclose(v[2].item(), snr[2].item() / (snr[2].item() + 1), rel_tol=1e-6)


def test_offset_noise_shifts_per_channel_mean():
    g = torch.Generator().manual_seed(0)
    n = torch.zeros(2, 4, 16, 16)
    out = offset_noise(n, 0.1, g)
    per_channel = out.mean(dim=(2, 3))
    assert torch.allclose(out, per_channel[:, :, None, None].expand_as(out))  # a constant per (sample, channel)
    assert torch.allclose(per_channel, 0.1 * torch.randn((2, 4), generator=torch.Generator().manual_seed(0)))
    assert offset_noise(n, 0.0) is n


def test_bad_schedule_settings():
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        NoiseSchedule.from_config({**SD, "beta_schedule": "quadratic"})
    with pytest.raises(ValueError, match="unknown prediction_type"):
        NoiseSchedule.from_config({**SD, "prediction_type": "sample"})
