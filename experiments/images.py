"""Writing generated images: PNGs that carry their settings (AUTOMATIC1111's `parameters` text chunk) and grids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB PIL image."""
    arr = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict) -> str:
    """The text A1111 writes (and its PNG Info tab reads): prompt, 'Negative prompt: ...', 'Key: value, ...'."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items() if v is not None and v != ""))
    return "\n".join(lines)


def save_png(image: torch.Tensor | Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    img = to_pil(image) if isinstance(image, torch.Tensor) else image
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, pnginfo=info)
    return path


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Images of one size in rows of `cols`."""
    if not images:
        raise ValueError("no images for the grid")
    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
