"""The training state that makes a resume exact, written atomically.

One file, `<run>/state/last.pt`: LoRA (and EMA) weights, optimizer, loss scaler, step, epoch and
position in the epoch's batch order, every RNG state, the NaN streak. Written to a temporary file
and renamed, so a kill during the write leaves the previous state intact. Read back with
`torch.load(weights_only=True)`: plain tensors and containers, never arbitrary objects.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

STATE_FILE = Path("state") / "last.pt"


def rng_state(gen: torch.Generator) -> dict:
    out = {"torch": torch.get_rng_state(), "gen": gen.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(d: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(d["torch"])
    gen.set_state(d["gen"])
    v, internal, gauss = d["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in d and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda"])


def save_state(run_dir: str | Path, state: dict) -> Path:
    path = Path(run_dir) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_state(run_dir: str | Path) -> dict:
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}: resume=<run folder> must name a folder of a run "
                                f"that saved its state (train.save_every_steps)")
    return torch.load(path, map_location="cpu", weights_only=True)
