"""Metrics against independent computations: FID, our Inception vs pytorch-fid's, PSNR/SSIM by hand, LPIPS."""
import math

import numpy as np
import pytest
import torch

from experiments.inception import FIDInception, load_fid_inception
from experiments.metrics import (fid_from_features, frechet_distance, load_lpips, lpips_distance, psnr, ssim)


def test_fid_of_a_set_with_itself_is_zero_and_order_free():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    assert abs(fid_from_features(a, a)) < 1e-6
    b = rng.normal(size=(150, 16)) * 1.5 + 0.3
    assert math.isclose(fid_from_features(a, b), fid_from_features(a[::-1], b[rng.permutation(150)]), rel_tol=1e-9)


def test_frechet_distance_equals_an_independent_numpy_computation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # (S1 S2)^1/2 through S1^1/2 S2 S1^1/2, which is symmetric: an eigen-decomposition, not sqrtm.
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    w2 = np.linalg.eigvalsh(r1 @ s2 @ r1)
    want = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w2, 0, None)).sum()
    assert math.isclose(fid_from_features(a, b), want, rel_tol=1e-6)
    # 1-D Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2
    assert math.isclose(frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([1.0]), np.array([[1.0]])), 2.0)


def _random_fid_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    net = FIDInception()
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("num_batches_tracked"):
            continue  # old files lack it
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (0.05 if v.ndim > 1 else 0.1)
    return sd


def test_our_inception_equals_pytorch_fid_on_the_same_weights(tmp_path, monkeypatch):
    import pytorch_fid.inception as pf
    sd = _random_fid_state()
    torch.save(sd, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: sd)
    ref = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours = load_fid_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(x)[0].flatten(1)
        got = ours(x)
    assert want.abs().max() > 1e-3
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_fid_inception()
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        load_lpips()


def test_psnr_and_ssim_by_hand():
    a = torch.full((1, 3, 16, 16), 0.5)
    b = a + 0.1
    assert math.isclose(psnr(a, b).item(), 20.0, rel_tol=1e-6)           # 10 log10(1 / 0.01); 0.6f - 0.5f
    assert math.isinf(psnr(a, a).item())
    assert math.isclose(ssim(a, a).item(), 1.0, rel_tol=1e-12)
    # Constant images: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1), the contrast term is 1.
    c1 = 0.01 ** 2
    mb = b[0, 0, 0, 0].double().item()  # 0.6 in float32
    want = (2 * 0.5 * mb + c1) / (0.25 + mb ** 2 + c1)
    assert math.isclose(ssim(a, b).item(), want, rel_tol=1e-9)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert ssim(a, noisy).item() < 0.5 < ssim(noisy, noisy).item()


def test_lpips_through_the_package_with_a_random_backbone():
    net = load_lpips(random_backbone=True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    d = lpips_distance(net, x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert lpips_distance(net, x, x).abs().max() < 1e-6
