"""Reading training images safely and turning them into tensors.

Every failure names the file: a truncated or corrupt image, a zero-byte file, a text file named
.png, an image over the decompression-bomb limit. Colour modes (RGBA, LA, P, CMYK, 16-bit, greyscale)
become RGB (transparency composited on white); EXIF orientation is applied.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_PIXELS = 178_956_970  # PIL's own default bomb limit (about 13k x 13k)


class BadImageError(ValueError):
    """An image file that cannot be used; the message names it."""


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not in a worker later
                img = ImageOps.exif_transpose(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{path}: larger than the {max_pixels:,}-pixel limit (a decompression bomb?): "
                            f"downscale it, or raise data.max_pixels") from e
    except UnidentifiedImageError as e:
        raise BadImageError(f"{path}: not an image (unrecognised content; a misnamed file?)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{path}: unreadable image ({e}); truncated or corrupt?") from e
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return to_rgb(img)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as load_rgb will return it, from the header: EXIF orientations 5-8 (a phone held
    upright) swap the stored width and height."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            raw = im.info.get("exif")  # what the header carried (im.getexif() would decode a PNG whole)
            exif = Image.Exif()
            if raw:
                exif.load(raw)
            turned = exif.get(0x0112, 1) in (5, 6, 7, 8)  # 0x0112: Orientation
    except Exception as e:
        raise BadImageError(f"{path}: not an image ({type(e).__name__}: {e})") from e
    return (h, w) if turned else (w, h)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, CMYK, YCbCr, 1, F...


def crop_box(size: tuple[int, int], width: int, height: int, crop: str = "center",
             rng: np.random.Generator | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """An image of `size` (w, h) scaled to cover (width, height), keeping its aspect ratio, then cropped:
    -> ((scaled w, scaled h), (top, left) of the crop in the scaled image)."""
    w, h = size
    scale = max(width / w, height / h)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    if crop == "center":
        top, left = (nh - height) // 2, (nw - width) // 2
    elif crop == "random":
        rng = rng or np.random.default_rng()
        top, left = int(rng.integers(0, nh - height + 1)), int(rng.integers(0, nw - width + 1))
    else:
        raise ValueError(f"unknown crop {crop!r}: use center or random")
    return (nw, nh), (top, left)


def resize_crop(img: Image.Image, width: int, height: int, crop: str = "center",
                rng: np.random.Generator | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Scale to cover (width, height) keeping the aspect ratio, then crop. Returns (image, (top, left))."""
    w, h = img.size
    scale = max(width / w, height / h)
    if scale > 1:
        warnings.warn(f"image {getattr(img, 'filename', '') or ''} ({w}x{h}) upscaled x{scale:.2f} to "
                      f"cover {width}x{height}: it will look soft", stacklevel=2)
    (nw, nh), (top, left) = crop_box((w, h), width, height, crop, rng)
    img = img.resize((nw, nh), Image.LANCZOS if scale < 1 else Image.BICUBIC)
    return img.crop((left, top, left + width, top + height)), (top, left)


def to_tensor(img: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
