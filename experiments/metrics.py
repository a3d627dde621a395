"""Image metrics: FID, PSNR, SSIM, LPIPS.

FID: Heusel et al. 2017 (arXiv:1706.08500), eq. 6, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with
the matrix square root by scipy.linalg.sqrtm; as pytorch-fid: an epsilon on the diagonals when the
product is singular, and the imaginary part (numerical noise) dropped.
PSNR: 10 log10(MAX^2 / MSE). SSIM: Wang et al. 2004, eq. 13, 11x11 Gaussian window sigma 1.5,
K1 = 0.01, K2 = 0.03, on each RGB channel, averaged.
LPIPS: Zhang et al. 2018 through the lpips package (AlexNet); its backbone weights must be on disk.
Images are (N, 3, H, W) float tensors in [0, 1].
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,), covariance (D, D) with N - 1 in the denominator (np.cov's default)."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_stats(a), *feature_stats(b))


@torch.no_grad()
def inception_features(images: torch.Tensor, net, batch: int = 50) -> np.ndarray:
    device = next(net.parameters()).device
    return torch.cat([net(images[i:i + batch].to(device)).cpu() for i in range(0, len(images), batch)]).double().numpy()


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, (N,)."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(max_val ** 2 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]                             # (1, 1, 11, 11)


def ssim(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (N,), mean over the valid windows and the channels."""
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    n, c = a.shape[:2]
    w = _gauss().to(a.device).expand(c, 1, 11, 11)
    a, b = a.double(), b.double()
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    s_aa = F.conv2d(a * a, w, groups=c) - mu_a ** 2
    s_bb = F.conv2d(b * b, w, groups=c) - mu_b ** 2
    s_ab = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return m.flatten(1).mean(1)


ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


def load_lpips(backbone: str | Path | None = None, random_backbone: bool = False):
    """lpips.LPIPS(net="alex") with its shipped linear heads and an AlexNet backbone read from disk.

    random_backbone=True gives a random AlexNet (for tests only: the number then means nothing)."""
    import lpips
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if random_backbone:
        return net.eval()
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    path = Path(backbone) if backbone else hub / ALEXNET_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS needs torchvision's AlexNet weights {ALEXNET_WEIGHTS}, which cannot be "
                                f"downloaded here: put the file at {hub / ALEXNET_WEIGHTS} or pass "
                                f"eval.lpips_backbone=<path>. No LPIPS is reported without it.")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    feats = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
    layers = [m for s in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5)
              for m in s.children()]
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    idx = sorted({int(k.split(".")[0]) for k in feats})
    if len(idx) != len(convs):
        raise ValueError(f"{path}: expected {len(convs)} AlexNet conv layers, found {len(idx)}")
    with torch.no_grad():
        for conv, i in zip(convs, idx):
            conv.weight.copy_(feats[f"{i}.weight"])
            conv.bias.copy_(feats[f"{i}.bias"])
    return net.eval()


@torch.no_grad()
def lpips_distance(net, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair LPIPS (N,) for images in [0, 1]."""
    return net(a * 2 - 1, b * 2 - 1, normalize=False).flatten()


def finite_or_none(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None
