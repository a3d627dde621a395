"""A small CNN that tells the subject J3NN13 from the generic class, trained on the generator's own labels.

It measures learning without downloaded weights: the mean P(subject) of images sampled for a
"J3NN13, ..." prompt is low on the base model and rises as a LoRA learns the subject.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.checkpoint import load_strict, read_state_dict, write_safetensors

WEIGHTS = Path(__file__).resolve().parents[2] / "assets" / "tiny-world" / "identity.safetensors"


class IdentityNet(nn.Module):
    """(B, 3, 64, 64) in [0, 1] -> logit of "this is the subject"."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(), nn.Conv2d(64, 64, 3, 2, 1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net((x - 0.5) / 0.25).squeeze(-1)


def load_identity(path: str | Path = WEIGHTS) -> IdentityNet:
    net = IdentityNet()
    load_strict(net, read_state_dict(path), str(path))
    return net.eval()


def save_identity(net: IdentityNet, path: str | Path = WEIGHTS) -> None:
    write_safetensors(net.state_dict(), path)


@torch.no_grad()
def subject_score(images: torch.Tensor, net: IdentityNet | None = None) -> float:
    """Mean P(subject) over images (N, 3, H, W) in [0, 1], resized to 64x64."""
    net = net or load_identity()
    if images.shape[-1] != 64:
        images = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
    return torch.sigmoid(net(images.float())).mean().item()
