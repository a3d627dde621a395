"""The training data set: indexed items -> (pixels or cached latents, caption) per sample.

Augmentation (flip, random crop, caption shuffle and dropout) draws from a generator seeded by
(seed, epoch, index), so a sample is the same whichever worker loads it and after a resume.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from data.buckets import BucketBatches, make_buckets, nearest_bucket
from data.captions import process_caption
from data.folder import Item
from data.images import crop_box, image_size, load_rgb, resize_crop, to_tensor


class ImageCaptionDataset(Dataset):
    def __init__(self, items: list[Item], resolution: int = 512, bucketing: bool = False, crop: str = "center",
                 flip_p: float = 0.0, trigger: str | None = None, shuffle_tags: bool = False, keep_tokens: int = 1,
                 caption_dropout: float = 0.0, seed: int = 0, bucket_step: int = 64, fixed_caption: str | None = None,
                 max_pixels: int | None = None, size_conditioning: bool = False):
        self.items, self.resolution, self.crop, self.flip_p = items, resolution, crop, flip_p
        self.trigger, self.shuffle_tags, self.keep_tokens = trigger, shuffle_tags, keep_tokens
        self.caption_dropout, self.seed, self.fixed_caption = caption_dropout, seed, fixed_caption
        self.max_pixels, self.size_conditioning = max_pixels, size_conditioning
        self.epoch = 0
        if bucketing:
            if any(it.size is None for it in items):
                raise ValueError("aspect-ratio bucketing needs image sizes: scan the folder with verify=header")
            buckets = make_buckets(resolution, step=bucket_step, min_size=max(bucket_step, resolution // 2),
                                   max_size=resolution * 2)
            self.bucket_of = [nearest_bucket(it.size, buckets) for it in items]
        else:
            self.bucket_of = [(resolution, resolution)] * len(items)
        self.latent_cache = None  # set by data.cache.attach_latent_cache

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rngs(self, index: int) -> tuple[np.random.Generator, random.Random]:
        key = (self.seed, self.epoch, index)
        return np.random.default_rng(key), random.Random(hash(key))

    def flip_for(self, index: int) -> bool:
        return self.flip_p > 0 and bool(self.rngs(index)[0].random() < self.flip_p)

    def caption_for(self, index: int) -> str:
        if self.fixed_caption is not None:
            return self.fixed_caption
        return process_caption(self.items[index].caption, self.rngs(index)[1], self.trigger, self.shuffle_tags,
                               self.keep_tokens, self.caption_dropout)

    def pixels(self, index: int, flip: bool) -> torch.Tensor:
        """(3, H, W) in [-1, 1] at the item's bucket size."""
        w, h = self.bucket_of[index]
        img = load_rgb(self.items[index].path, **({"max_pixels": self.max_pixels} if self.max_pixels else {}))
        rng = self.rngs(index)[0]
        rng.random()  # the flip draw comes first (flip_for)
        img, _ = resize_crop(img, w, h, self.crop, rng)
        return to_tensor(img, flip)

    def time_ids(self, index: int, flip: bool) -> torch.Tensor:
        """SDXL's size conditioning for this sample (Podell et al. 2023, arXiv:2307.01952, sec. 2.2):
        (original h, original w, crop top, crop left, target h, target w) -> (6,) float32. The crop is the one
        pixels() takes (the same draws); flipped, its left edge is measured from the other side, as
        diffusers' SDXL script does."""
        from models.conditioning import time_ids
        w, h = self.bucket_of[index]
        size = self.items[index].size or image_size(self.items[index].path)
        rng = self.rngs(index)[0]
        rng.random()  # the flip draw comes first (flip_for)
        (nw, _), (top, left) = crop_box(size, w, h, self.crop, rng)
        if flip:
            left = nw - left - w
        return time_ids((size[1], size[0]), (top, left), (h, w))

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """key: an index (in the epoch set by set_epoch), or (epoch, index), as a loader that spans
        epochs asks for it: in a worker process set_epoch from the main process is not seen."""
        if isinstance(key, tuple):
            self.epoch, index = key
        else:
            index = key
        flip = self.flip_for(index)
        out = {"index": index, "caption": self.caption_for(index), "flip": flip}
        if self.latent_cache is not None:
            out["latent_mean"], out["latent_std"] = self.latent_cache.get(self, index, flip)
        else:
            out["pixels"] = self.pixels(index, flip)
        if self.size_conditioning:
            out["time_ids"] = self.time_ids(index, flip)
        return out

    def batch_plan(self, batch_size: int, drop_last: bool = False) -> BucketBatches:
        return BucketBatches(self.bucket_of, batch_size, self.seed, drop_last)


def collate(samples: list[dict]) -> dict:
    out = {"index": torch.tensor([s["index"] for s in samples]), "caption": [s["caption"] for s in samples]}
    for key in ("pixels", "latent_mean", "latent_std", "time_ids"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    return out
