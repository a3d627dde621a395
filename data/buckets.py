"""Aspect-ratio bucketing (NovelAI 2022, "Improvements to Stable Diffusion"; kohya's and OneTrainer's scheme).

Buckets are (width, height) pairs, multiples of `step`, of about the same area as resolution^2;
each image goes to the bucket nearest its aspect ratio (in log space), and every batch comes from a
single bucket. The batch order is a pure function of (seed, epoch), so a resumed run sees the same
batches: `batches(epoch)[k:]` is what is left of epoch `epoch` after k steps.
"""
from __future__ import annotations

import math

import torch


def make_buckets(resolution: int = 512, min_size: int = 256, max_size: int = 1024, step: int = 64) -> list[tuple[int, int]]:
    area = resolution * resolution
    out = set()
    for w in range(min_size, max_size + 1, step):
        h = min(max_size, (area // w) // step * step)
        if h >= min_size:
            out.add((w, h))
            out.add((h, w))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


class BucketBatches:
    """Batches of item indices, each from one bucket, shuffled per (seed, epoch)."""

    def __init__(self, bucket_of: list[tuple[int, int]], batch_size: int, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bucket_of, self.batch_size, self.seed, self.drop_last = bucket_of, batch_size, seed, drop_last
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(bucket_of):
            self.groups.setdefault(b, []).append(i)

    def batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_cached", (None,))[0] == epoch:  # asked once per micro-batch by the loop
            return self._cached[1]
        self._cached = (epoch, self._make(epoch))
        return self._cached[1]

    def _make(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        out = []
        for b in sorted(self.groups):
            idx = self.groups[b]
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for k in range(0, len(perm), self.batch_size):
                chunk = perm[k:k + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    out.append(chunk)
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[j] for j in order]

    def __len__(self) -> int:
        return len(self.batches(0))
