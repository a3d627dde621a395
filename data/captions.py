"""Captions: the folder conventions, caption versions, trigger word, tag shuffle and dropout.

Layout of a data set folder (kohya's convention plus versions for ablations):

    DIR/img001.png
    DIR/img001.txt                      the default caption (caption_ext configurable)
    DIR/captions/v1/img001.txt          caption version "v1" (the Hieu report's v1, v3, v4)
    DIR/captions/v3/img001.txt

`data.caption_version: v3` reads `captions/v3/`; null reads the file beside the image.
Processing per sample (kohya's order): dropout -> trigger -> shuffle after keep_tokens.
"""
from __future__ import annotations

import random
from pathlib import Path


class CaptionError(ValueError):
    """A caption that is missing or unreadable; the message names the file."""


def caption_path(image: Path, root: Path, version: str | None, ext: str = ".txt") -> Path:
    if version:
        return root / "captions" / version / (image.stem + ext)
    return image.with_suffix(ext)


def read_caption(path: Path) -> str:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError(f"{path}: not valid UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    return " ".join(text.split())  # one line, single spaces


def add_trigger(caption: str, trigger: str | None) -> str:
    """Put the trigger word first unless the caption already has it as a tag."""
    if not trigger:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if trigger in tags or caption.strip() == trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def process_caption(caption: str, rng: random.Random, trigger: str | None = None, shuffle: bool = False,
                    keep_tokens: int = 1, dropout: float = 0.0) -> str:
    """Caption dropout (-> ""), trigger word, then shuffle the tags after the first `keep_tokens`."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    caption = add_trigger(caption, trigger)
    if shuffle:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption
