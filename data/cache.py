"""Caches that take the frozen VAE and text encoder out of the training step.

Latents: the VAE posterior's mean and std for each (image, size, flip), computed once, kept in
memory or written as safetensors under `cache_dir`. A key is the image file's content hash, the
VAE's identity (a hash of its config and weights), the bucket size, the crop and the flip; any
change gives a new key, so a stale latent is never used. Each training step samples
mean + std * noise afresh, as the uncached step would. Random crops cannot be cached (refused).

Text: the encoder outputs (SDXL: both encoders' hidden states and the pooled embedding) for each
distinct caption string, computed on first use, valid while the text encoder is frozen (no
text-encoder LoRA).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from models.checkpoint import write_safetensors


def module_fingerprint(module: torch.nn.Module, config: dict | None = None) -> str:
    """A short hash of a module's weights (and config): two VAEs share it only if they compute the same."""
    h = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]


class LatentCache:
    def __init__(self, vae, cache_dir: str | Path | None = None, device=None, batch_size: int = 8,
                 batch_pixels: int = 8 * 512 * 512):
        """batch_size images per VAE call, fewer where they hold more than batch_pixels half-precision pixels
        together (fp32 counts twice): 1024x1024 in fp32 (SDXL's VAE) goes one at a time, where a batch of 8 asked
        for a 4 GiB activation."""
        self.vae, self.device, self.batch_size = vae, device or vae.encoder.conv_in.weight.device, batch_size
        self.batch_pixels = batch_pixels
        self.vae_id = module_fingerprint(vae, vae.config.to_dict())
        self.dir = Path(cache_dir) if cache_dir else None
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._file_hashes: dict[int, str] = {}
        self.computed = 0

    def key(self, ds, index: int, flip: bool) -> str:
        if index not in self._file_hashes:
            self._file_hashes[index] = file_hash(ds.items[index].path)
        w, h = ds.bucket_of[index]
        return f"{self._file_hashes[index]}_{self.vae_id}_{w}x{h}_{ds.crop}_{int(flip)}"

    def _load(self, key: str):
        if key in self.memory:
            return self.memory[key]
        if self.dir is not None and (self.dir / f"{key}.safetensors").is_file():
            t = load_file(str(self.dir / f"{key}.safetensors"))
            self.memory[key] = (t["mean"], t["std"])
            return self.memory[key]
        return None

    @torch.no_grad()
    def fill(self, ds, progress=None) -> int:
        """Encode every (image, flip) the data set can produce that is not cached yet. Returns how many."""
        if ds.crop == "random":
            raise ValueError("latent caching needs data.crop=center (a random crop differs every epoch)")
        flips = [False, True] if ds.flip_p > 0 else [False]
        todo = [(i, f) for i in range(len(ds)) for f in flips if self._load(self.key(ds, i, f)) is None]
        for k in range(0, len(todo), self.batch_size):
            chunk = todo[k:k + self.batch_size]
            by_size: dict[tuple, list] = {}
            for i, f in chunk:
                by_size.setdefault(ds.bucket_of[i], []).append((i, f))
            for (w, h), whole in by_size.items():
                n = max(1, self.batch_pixels * 2 // (w * h * self.vae.dtype.itemsize))
                for group in (whole[g:g + n] for g in range(0, len(whole), n)):
                    self._encode(ds, group)
            self.computed += len(chunk)
            if progress:
                progress(len(chunk))
        return len(todo)

    def _encode(self, ds, group: list[tuple[int, bool]]) -> None:
        x = torch.stack([ds.pixels(i, f) for i, f in group]).to(self.device, self.vae.dtype)
        dist = self.vae.encode(x)
        std = torch.exp(0.5 * dist.logvar)
        for j, (i, f) in enumerate(group):
            key = self.key(ds, i, f)
            entry = (dist.mean[j].float().cpu(), std[j].float().cpu())
            self.memory[key] = entry
            if self.dir is not None:
                write_safetensors({"mean": entry[0], "std": entry[1]}, self.dir / f"{key}.safetensors")

    def get(self, ds, index: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._load(self.key(ds, index, flip))
        if entry is None:
            raise KeyError(f"no cached latent for {ds.items[index].path} (flip={flip}): call fill() first")
        return entry


def attach_latent_cache(ds, cache: LatentCache) -> None:
    cache.fill(ds)
    ds.latent_cache = cache


class TextCache:
    """caption -> encoder outputs ({"ctx": (77*k, D)[, "pooled": (P,)]}) on the CPU, computed on first use.

    A caption met during training is encoded alone: a batched encode differs in the last bits with
    the batch's make-up, which would make a resumed run (whose batches fill the cache in another
    order) drift from an uninterrupted one. `fill` encodes the captions known up front in batches,
    in a fixed order at start-up, which is the same for a resumed run.
    encode: captions -> {name: (B, ...) tensor}.
    """

    def __init__(self, encode):
        self.encode, self.memory = encode, {}

    def _store(self, captions: list[str], out: dict[str, torch.Tensor]) -> None:
        for i, c in enumerate(captions):
            self.memory[c] = {k: v[i].clone() for k, v in out.items()}

    def fill(self, captions, batch_size: int = 32) -> int:
        """Encode the captions known before training, in batches (run at start-up, always in the same order, so
        a resumed run gets the same embeddings); -> how many were encoded. The step then never waits for them."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.memory]
        for k in range(0, len(todo), batch_size):
            chunk = todo[k:k + batch_size]
            self._store(chunk, self.encode(chunk))
        return len(todo)

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        for c in dict.fromkeys(captions):
            if c not in self.memory:
                self._store([c], self.encode([c]))
        return {k: torch.stack([self.memory[c][k] for c in captions]) for k in self.memory[captions[0]]}
