"""LoRA files: kohya/A1111 (the default), peft and legacy diffusers formats; reading detects the format.

kohya / AUTOMATIC1111 / ComfyUI (kohya-ss networks/lora.py):
    lora_unet_<module path, "." -> "_">.lora_down.weight   (r, in) or (r, in, kh, kw)
    lora_unet_<...>.lora_up.weight                          (out, r) or (out, r, 1, 1)
    lora_unet_<...>.alpha                                   scalar; scale = alpha / r
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.*  (text encoder, published names)
  plus `ss_*` metadata. SD1.x UNet paths are diffusers names; files with LDM names
  (`lora_unet_input_blocks_1_1_proj_in`) are read too.
  SDXL (kohya's sdxl_train_network, what A1111, ComfyUI and CivitAI files use): LDM names for the UNet
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), `lora_te1_` and `lora_te2_` for the two
  text encoders.
peft (diffusers >= 0.22 `save_lora_weights`): unet.<path>.lora_A.weight / lora_B.weight, no alpha.
legacy diffusers (the old example scripts): unet.<path>.lora.down.weight / lora.up.weight,
  text_encoder.<path>.lora_linear_layer.down.weight / up.weight, no alpha.
Formats without alpha imply alpha = rank, so writing them folds our scale alpha/r into B: every
reader then computes our delta exactly.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora.inject import add_adapter_at, lora_layers
from lora.layers import LoRALayer
from models import ldm_keys
from models.checkpoint import CheckpointError, read_safetensors_metadata, read_state_dict, write_safetensors

FORMATS = ("kohya", "peft", "diffusers_legacy")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_PARTS_FROM_PREFIX = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                      "lora_te2": "text_encoder_2"}
# module-key suffixes per format: (down, up)
_SUFFIXES = {
    "kohya": [(".lora_down.weight", ".lora_up.weight")],
    "peft": [(".lora_A.weight", ".lora_B.weight")],
    "diffusers_legacy": [(".lora.down.weight", ".lora.up.weight"),
                         (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")],
}


class LoRAFileError(CheckpointError):
    """A LoRA file that cannot be read or that does not fit the model."""


# ---------------------------------------------------------------- names

def _is_text(model: nn.Module) -> bool:
    return type(model).__name__.startswith("CLIPText")


def published_name(model: nn.Module, name: str) -> str:
    """Our module name -> the name published files use (text encoders: the `text_model.` level)."""
    if _is_text(model) and not hasattr(model, "text_model"):
        return "text_model." + name
    return name


def _targets(parts: dict[str, nn.Module]):
    """(part, our module name, published name, module) for every Linear/Conv2d a LoRA could sit on."""
    for part, model in parts.items():
        for name, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, LoRALayer)) and ".lora." not in f".{name}." \
                    and not name.endswith(".base_layer") and ".base_layer." not in name:
                yield part, name, published_name(model, name), m


def _ldm_module_names(unet: nn.Module) -> dict[str, str]:
    """Our UNet module names -> LDM module names (for kohya files written with LDM paths)."""
    if not hasattr(unet, "config") or not hasattr(unet.config, "layers_per_block"):
        return {}
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, LoRALayer))
             and ".lora." not in f".{n}." and "base_layer" not in n]
    try:
        mapped = ldm_keys.map_keys([n + ".weight" for n in names], ldm_keys.unet_prefix_map(unet.config), "")
    except KeyError:
        return {}
    return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in mapped.items()}


def is_sdxl(parts: dict[str, nn.Module]) -> bool:
    """An SDXL model's parts: a second text encoder, or a UNet with SDXL's pooled-text + size conditioning."""
    cfg = getattr(parts.get("unet"), "config", None)
    return "text_encoder_2" in parts or getattr(cfg, "addition_embed_type", None) == "text_time"


def _lookup(parts: dict[str, nn.Module], fmt: str) -> dict[str, tuple[str, str]]:
    """File module key -> (part, our module name)."""
    table = {}
    for part, name, pub, _ in _targets(parts):
        if fmt == "kohya":
            prefixes = [KOHYA_PREFIX[part]] + (["lora_te1"] if part == "text_encoder" else [])
            for p in prefixes:
                table[f"{p}_{pub.replace('.', '_')}"] = (part, name)
        else:
            table[f"{part}.{pub}"] = (part, name)
            # diffusers on transformers >= 5.6 writes the flattened text-encoder names (no `text_model.`)
            table.setdefault(f"{part}.{pub.removeprefix('text_model.')}", (part, name))
    if fmt == "kohya" and "unet" in parts:
        for ours, ldm in _ldm_module_names(parts["unet"]).items():
            table.setdefault(f"lora_unet_{ldm.replace('.', '_')}", ("unet", ours))
    return table


# ---------------------------------------------------------------- saving

def save_lora(parts: dict[str, nn.Module], path: str | Path, adapter: str = "default", fmt: str = "kohya",
              metadata: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write one adapter of each part ({"unet": unet, "text_encoder": te}) as a LoRA file."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}: use one of {FORMATS}")
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    sdxl = is_sdxl(parts)
    ldm_unet = _ldm_module_names(parts["unet"]) if sdxl and fmt == "kohya" and "unet" in parts else {}
    for part, model in parts.items():
        for name, layer in lora_layers(model):
            if adapter not in layer.lora:
                continue
            a = layer.lora[adapter]
            pub = published_name(model, name)
            down, up = a.down.weight.detach(), a.up.weight.detach()
            ranks.add(a.rank), alphas.add(a.alpha)
            if fmt == "kohya":
                prefix = "lora_te1" if sdxl and part == "text_encoder" else KOHYA_PREFIX[part]
                module_path = ldm_unet.get(name, pub) if part == "unet" else pub
                key = f"{prefix}_{module_path.replace('.', '_')}"
                out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
                out[f"{key}.alpha"] = torch.tensor(a.alpha)
            else:
                up = up * a.scale  # these formats imply alpha = rank: fold the scale into B
                if fmt == "peft":
                    d, u = _SUFFIXES["peft"][0]
                else:
                    d, u = _SUFFIXES["diffusers_legacy"][1 if part.startswith("text") else 0]
                out[f"{part}.{pub}{d}"], out[f"{part}.{pub}{u}"] = down, up
    if not out:
        raise ValueError(f"no adapter {adapter!r} in {list(parts)}: nothing to save")
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    meta = {"loralab_format": fmt, "loralab_adapter": adapter}
    if fmt == "kohya":
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
                     "ss_network_alpha": str(max(alphas)),
                     "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
                     "ss_v2": "False"})
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()})
    write_safetensors(out, path, meta)
    return Path(path)


# ---------------------------------------------------------------- loading

def detect_format(keys) -> str:
    found = {fmt for fmt, pairs in _SUFFIXES.items() for k in keys for d, u in pairs
             if k.endswith(d) or k.endswith(u)}
    if len(found) == 1:
        return found.pop()
    if not found:
        raise LoRAFileError(f"no LoRA keys found (expected .lora_down/.lora_up, .lora_A/.lora_B or .lora.down/.lora.up); "
                            f"first keys: {', '.join(sorted(keys)[:5])}")
    raise LoRAFileError(f"keys of several LoRA formats in one file: {sorted(found)}")


def _group(sd: dict[str, torch.Tensor], fmt: str, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """File keys -> {module key: {"down", "up", "alpha"?}}; any key that fits nowhere raises."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for k, v in sd.items():
        for d, u in _SUFFIXES[fmt]:
            if k.endswith(d):
                groups[k[: -len(d)]]["down"] = v
                break
            if k.endswith(u):
                groups[k[: -len(u)]]["up"] = v
                break
        else:
            if fmt == "kohya" and k.endswith(".alpha"):
                groups[k[: -len(".alpha")]]["alpha"] = v
            else:
                unknown.append(k)
    if unknown:
        raise LoRAFileError(f"{source}: {len(unknown)} keys that are not LoRA weights of format {fmt}: "
                            f"{', '.join(sorted(unknown)[:10])} (loralab never drops keys silently)")
    half = [m for m, g in groups.items() if "down" not in g or "up" not in g]
    if half:
        raise LoRAFileError(f"{source}: modules with only one of down/up: {', '.join(sorted(half)[:10])}")
    return groups


def _fit(t: torch.Tensor, base: nn.Module, which: str) -> torch.Tensor | None:
    """Reshape between Linear (2D) and 1x1 conv (4D) layouts where that is the same map; None if it does not fit."""
    if isinstance(base, nn.Linear):
        want_in = base.in_features if which == "down" else None
        if t.ndim == 4 and t.shape[2:] == (1, 1):
            t = t[:, :, 0, 0]
        if t.ndim != 2:
            return None
        if which == "down" and t.shape[1] != want_in or which == "up" and t.shape[0] != base.out_features:
            return None
        return t
    if which == "down":
        if t.ndim == 2 and base.kernel_size == (1, 1):
            t = t[:, :, None, None]
        ok = t.ndim == 4 and t.shape[1] == base.in_channels and tuple(t.shape[2:]) == tuple(base.kernel_size)
    else:
        if t.ndim == 2:
            t = t[:, :, None, None]
        ok = t.ndim == 4 and t.shape[0] == base.out_channels and t.shape[2:] == (1, 1)
    return t if ok else None


@dataclass
class LoadedLoRA:
    adapter: str
    path: str
    fmt: str
    modules: dict[str, list[str]] = field(default_factory=dict)  # part -> module names
    metadata: dict = field(default_factory=dict)

    def __str__(self):
        n = {p: len(m) for p, m in self.modules.items()}
        return f"LoRA {self.path} ({self.fmt}) as adapter '{self.adapter}': {n}"


def load_lora(parts: dict[str, nn.Module], path: str | Path, adapter: str | None = None,
              multiplier: float = 1.0, trainable: bool = False) -> LoadedLoRA:
    """Read a LoRA file of any supported format and add it as adapter `adapter` (default: the file stem).

    Refuses (LoRAFileError, naming keys) files with non-finite values, keys of modules the model
    lacks (an SDXL or SD2 LoRA given to SD1.5), shapes that do not fit, and unknown keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    sd = read_state_dict(path)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise LoRAFileError(f"{path}: NaN or inf values in {', '.join(bad[:10])}: the LoRA is broken "
                            f"(a diverged training run?)")
    fmt = detect_format(sd.keys())
    groups = _group(sd, fmt, str(path))
    table = _lookup(parts, fmt)
    missing = sorted(k for k in groups if k not in table)
    if missing:
        hint = ""
        if any(k.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for k in missing):
            hint = " It looks like an SDXL LoRA."
        elif any(k.startswith(("lora_te_", "text_encoder.")) for k in missing) and "text_encoder" not in parts:
            hint = " It has text-encoder modules: pass the text encoder too."
        raise LoRAFileError(f"{path}: {len(missing)} LoRA modules that this model lacks: {', '.join(missing[:10])}."
                            f"{hint} Is the LoRA for this base architecture?")
    # Check every shape before touching the model, so a bad file changes nothing.
    plan, wrong = [], []
    for key, g in sorted(groups.items()):
        part, name = table[key]
        module = parts[part].get_submodule(name)
        base = module.base_layer if isinstance(module, LoRALayer) else module
        down, up = _fit(g["down"], base, "down"), _fit(g["up"], base, "up")
        if down is None or up is None or down.shape[0] != up.shape[1]:
            wrong.append(f"{key} down {tuple(g['down'].shape)} up {tuple(g['up'].shape)} vs "
                         f"{type(base).__name__} {tuple(base.weight.shape)}")
            continue
        alpha = float(g["alpha"]) if "alpha" in g else float(down.shape[0])  # A1111: no alpha -> scale 1
        plan.append((part, name, down, up, alpha))
    if wrong:
        raise LoRAFileError(f"{path}: {len(wrong)} LoRA modules whose shapes do not fit the model: "
                            f"{'; '.join(wrong[:6])}. Is the LoRA for this base architecture?")
    if adapter is None:  # the file stem, made a usable name ("my-lora v2" -> "my_lora_v2", "eval" -> "lora_eval")
        adapter = re.sub(r"\W", "_", path.stem)
        if not adapter.isidentifier() or hasattr(nn.ModuleDict(), adapter):
            adapter = "lora_" + adapter
    taken = {n for m in parts.values() for _, layer in lora_layers(m) for n in layer.lora}
    if adapter in taken:
        raise ValueError(f"adapter name {adapter!r} is already in use: pass another adapter=")
    result = LoadedLoRA(adapter, str(path), fmt, defaultdict(list),
                        read_safetensors_metadata(path) if path.suffix == ".safetensors" else {})
    for part, name, down, up, alpha in plan:
        _, ad = add_adapter_at(parts[part], name, adapter, rank=down.shape[0], alpha=alpha)
        with torch.no_grad():
            ad.down.weight.copy_(down)
            ad.up.weight.copy_(up)
        ad.multiplier = float(multiplier)
        ad.requires_grad_(trainable)
        result.modules[part].append(name)
    result.modules = dict(result.modules)
    return result
