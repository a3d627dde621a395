"""Tiled VAE decoding: a large latent decoded as overlapping tiles whose seams are blended linearly.

The decoder's memory grows with the image (SDXL's VAE at 1024x1024 in fp32, as its fp16 overflow requires,
peaks at several GB); tiles bound it by the tile size. The same tiles, order and blending as diffusers'
AutoencoderKL.tiled_decode (models/autoencoders/autoencoder_kl.py), so `enable_vae_tiling` images match:
    latent tiles of t = sample_size / f pixels (f the VAE's factor), stepped by t * (1 - 1/4);
    each decoded tile (T = sample_size pixels) blended in place with the tile above and the tile to its left
    over T / 4 rows / columns, weight y / extent for the new tile (linear ramp), then cropped to T - T/4.
A tile's GroupNorm sees only that tile, so the result differs slightly from decoding the whole latent at once,
as in diffusers.
"""
from __future__ import annotations

import torch

OVERLAP = 0.25  # diffusers' tile_overlap_factor


def _blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """b's first `extent` rows become a ramp from a's last rows to b's own (in place, as diffusers)."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def _blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


@torch.no_grad()
def tiled_decode(vae, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> images (B, 3, h*f, w*f), decoded in tiles of `tile` image pixels
    (default: the VAE's sample_size, diffusers' tile_sample_min_size). A latent that fits one tile is decoded
    whole."""
    f = vae.scale_factor
    sample_tile = tile or vae.config.sample_size
    latent_tile = sample_tile // f
    if z.shape[2] <= latent_tile and z.shape[3] <= latent_tile:
        return vae.decode(z)
    step = int(latent_tile * (1 - OVERLAP))
    extent = int(sample_tile * OVERLAP)
    keep = sample_tile - extent
    rows = []
    for i in range(0, z.shape[2], step):
        rows.append([vae.decode(z[:, :, i:i + latent_tile, j:j + latent_tile]) for j in range(0, z.shape[3], step)])
    out_rows = []
    for i, row in enumerate(rows):
        out = []
        for j, t in enumerate(row):
            if i > 0:
                t = _blend_v(rows[i - 1][j], t, extent)
            if j > 0:
                t = _blend_h(row[j - 1], t, extent)
            out.append(t[:, :, :keep, :keep])
        out_rows.append(torch.cat(out, dim=3))
    return torch.cat(out_rows, dim=2)
