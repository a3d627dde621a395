"""Reading weight files safely and loading them strictly.

safetensors is the format; pickled `.ckpt`/`.bin`/`.pt` files go only through
`torch.load(weights_only=True)`, which refuses any object that is not a tensor or a plain
container, so a pickle that would run code is refused, never executed. Every error names the file
and, for a mismatch, the keys.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the model."""


def _list(keys, n: int = 12) -> str:
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickle through torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}). It may be truncated or "
                                  f"corrupt: download or copy it again.") from e
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refused to unpickle {path}: it holds objects other than tensors, and loading them could run "
                f"arbitrary code. Convert it to .safetensors with a tool you trust. ({str(e).splitlines()[0]})") from e
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable checkpoint ({e}); it may be truncated or corrupt") from e
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]  # LDM .ckpt files wrap the weights
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path}: unknown weight format {path.suffix!r}; use .safetensors "
                          f"(or a pickle: {', '.join(PICKLE_SUFFIXES)})")


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` header of a safetensors file, without reading the tensors."""
    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file (header size {n})")
        header = json.loads(f.read(n))
    return header.get("__metadata__", {}) or {}


def write_safetensors(sd: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write atomically: a temporary file then a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def no_init():
    """Build modules without drawing random initial weights (torch.nn.init is a no-op inside, and so is
    transformers' own initialisation, for the CLIP text encoder): for modules whose every parameter and buffer
    a strict load (load_strict) overwrites next. At SD1.5 size the random initialisation took 14 of the 19 s
    of a load on a 2-core CPU."""
    try:
        from transformers.initialization import no_init_weights          # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights          # 4.x
    saved = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS}
    try:
        for n in _INIT_FUNCTIONS:
            setattr(nn.init, n, lambda tensor, *a, **k: tensor)
        with no_init_weights():
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected and mis-shaped key in its error."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{source} does not fit the {type(module).__name__} it is loaded into:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_list(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_list(unexpected)}")
        if wrong:
            lines.append(f"  {len(wrong)} shape mismatches: {_list(wrong)}")
        lines.append("  Is this checkpoint for this model (SD1.x vs SD2.x vs SDXL), and does the config match it?")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(sd, strict=True)


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_hash(path: str | Path) -> str:
    """A1111's "AutoV2" hash: the first 10 hex digits of the file's sha256 (a diffusers folder: its UNet file)."""
    p = Path(path)
    if p.is_dir():
        files = sorted((p / "unet").glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            return ""
        p = files[0]
    return file_sha256(p)[:10] if p.is_file() else ""
