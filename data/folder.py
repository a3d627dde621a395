"""Index a data set folder: images and their captions, with every problem reported by file name.

    items, report = scan_folder("data/jennie", caption_version="v3", trigger="J3NN13")

verify: "header" (default) opens each image's header, which catches zero-byte files, text files
named .png and unknown formats in a few seconds for 50,000 files; "full" decodes every image
(also truncated files); "none" trusts the names. Bad files raise, listing them, unless
skip_bad=True, which drops them and lists them in the report: never silently.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from data.captions import CaptionError, caption_path, read_caption
from data.images import IMAGE_EXTENSIONS, BadImageError, image_size, load_rgb


@dataclass
class Item:
    path: Path
    caption: str
    size: tuple[int, int] | None = None  # (width, height) when the header was read


@dataclass
class ScanReport:
    root: str
    images: int = 0
    captioned: int = 0
    missing_captions: list[str] = field(default_factory=list)
    bad_files: dict[str, str] = field(default_factory=dict)  # file -> why

    def __str__(self):
        s = f"{self.root}: {self.images} images, {self.captioned} with captions"
        if self.missing_captions:
            s += f", {len(self.missing_captions)} without (trigger word alone)"
        if self.bad_files:
            s += f", {len(self.bad_files)} bad files skipped: " + ", ".join(list(self.bad_files)[:5])
        return s


def list_images(root: Path) -> list[Path]:
    """Image files directly in `root`, sorted by name (os.scandir: fast on large folders)."""
    with os.scandir(root) as it:
        files = [Path(e.path) for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
                 and not e.name.startswith(".")]
    return sorted(files)


def _check(path: Path, verify: str) -> tuple[int, int] | None:
    if verify == "none":
        return None
    if verify == "full":
        return load_rgb(path).size
    return image_size(path)


def scan_folder(root: str | Path, caption_version: str | None = None, caption_ext: str = ".txt",
                missing_caption: str = "error", trigger: str | None = None, verify: str = "header",
                skip_bad: bool = False) -> tuple[list[Item], ScanReport]:
    """missing_caption: "error" (list them and stop) or "trigger" (the trigger word alone, counted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if missing_caption not in ("error", "trigger"):
        raise ValueError(f"unknown missing_caption policy {missing_caption!r}: use error or trigger")
    if caption_version and not (root / "captions" / caption_version).is_dir():
        have = sorted(p.name for p in (root / "captions").iterdir()) if (root / "captions").is_dir() else []
        raise FileNotFoundError(f"caption version {caption_version!r}: {root / 'captions' / caption_version} "
                                f"does not exist (versions here: {have or 'none'})")
    files = list_images(root)
    if not files:
        raise ValueError(f"data folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    report = ScanReport(str(root), images=len(files))
    items, bad_captions = [], []
    for f in files:
        try:
            size = _check(f, verify)
        except BadImageError as e:
            report.bad_files[str(f)] = str(e)
            continue
        cp = caption_path(f, root, caption_version, caption_ext)
        if cp.is_file():
            try:
                caption = read_caption(cp)
            except CaptionError as e:
                bad_captions.append(str(e))
                continue
            report.captioned += 1
        else:
            report.missing_captions.append(str(cp))
            caption = ""
        items.append(Item(f, caption, size))
    if report.bad_files and not skip_bad:
        raise BadImageError(f"{len(report.bad_files)} bad image files in {root} (set data.skip_bad=true to skip "
                            f"them):\n  " + "\n  ".join(list(report.bad_files.values())[:20]))
    if bad_captions:
        raise CaptionError(f"{len(bad_captions)} unreadable captions:\n  " + "\n  ".join(bad_captions[:20]))
    if report.missing_captions and missing_caption == "error":
        raise CaptionError(f"{len(report.missing_captions)} images in {root} have no caption, e.g. "
                           f"{', '.join(report.missing_captions[:5])}. Write them, or set "
                           f"data.missing_caption=trigger to train those on the trigger word alone.")
    if report.missing_captions and not trigger:
        raise CaptionError(f"missing_caption=trigger needs data.trigger (a trigger word) for "
                           f"{len(report.missing_captions)} images without captions")
    if not items:
        raise ValueError(f"no usable images in {root}")
    return items, report
