"""The module-replacement walker: find target modules, wrap them in LoRALayer, report what it did.

Targets follow peft's rules: a list of names matches a module whose name equals an entry or ends
with "." + entry (`to_q`, `to_out.0`, `proj_in`, `conv1`; `q_proj`, `fc1` in the text encoder); a
single string is a regex matched against the whole dotted name. Exclusions use the same rules.
`overrides` maps a regex (searched in the name) to rank/alpha for the modules it matches (kohya's
block-wise ranks); the first matching pattern wins.

    report = inject_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=32, alpha=16, dropout=0.1)
    print(report)             # modules, parameters
    remove_lora(unet)         # the original modules, exactly
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lora.layers import LoRALayer


# Named target sets (a config may give a name instead of a list).
PRESETS: dict[str, list[str] | str] = {
    # the Hieu report and most SD LoRAs
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    # seed 000: attention, projections and resnet convs
    "attention_proj_conv": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                            "conv1", "conv2", "conv_shortcut"],
    # kohya networks/lora.py defaults: every Linear / 1x1 conv of the spatial transformers (192 on SD1.5)
    "kohya": r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
             r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))",
    # the CLIP text encoder's attention and MLP (72 on SD1.x)
    "text": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


def resolve_targets(targets: list[str] | str) -> list[str] | str:
    """A preset name -> its targets; a list or a regex passes through."""
    if isinstance(targets, str) and targets in PRESETS:
        return PRESETS[targets]
    return list(targets) if not isinstance(targets, str) else targets


@dataclass
class InjectionReport:
    adapter: str
    modules: dict[str, tuple[str, int, float]] = field(default_factory=dict)  # name -> (kind, rank, alpha)
    num_parameters: int = 0

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for kind, _, _ in self.modules.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"LoRA '{self.adapter}': {len(self.modules)} modules ({what}), {self.num_parameters:,} parameters"


def matches(name: str, targets: list[str] | tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _candidates(model: nn.Module):
    """(name, module) pairs outside LoRA internals; a LoRALayer is reported under its own name."""
    for name, module in model.named_modules():
        if ".lora." in f".{name}." or ".base_layer" in f".{name}":
            continue
        yield name, module


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)  # nn.Module.__setattr__ also replaces ModuleList items ("to_out.0")


def add_adapter_at(model: nn.Module, name: str, adapter: str, rank: int, alpha: float | None = None,
                   **adapter_kw):
    """Wrap the module called `name` (if not yet wrapped) and add one adapter to it."""
    module = model.get_submodule(name)
    layer = module if isinstance(module, LoRALayer) else LoRALayer(module)
    ad = layer.add_adapter(adapter, rank=rank, alpha=alpha, **adapter_kw)
    if layer is not module:
        _set_submodule(model, name, layer)
    return layer, ad


def inject_lora(model: nn.Module, targets: list[str] | str, rank: int = 4, alpha: float | None = None,
                adapter: str = "default", exclude: list[str] | str | None = None,
                overrides: dict[str, dict] | None = None, freeze_base: bool = True, **adapter_kw) -> InjectionReport:
    """Wrap every matching Linear/Conv2d in a LoRALayer (or add `adapter` to one already wrapped).

    adapter_kw: dropout, rank_dropout, module_dropout, init ("kaiming"|"gaussian"), rslora, dtype.
    Raises when nothing matches, naming the targets, or when a match is neither Linear nor Conv2d.
    """
    if not targets:
        raise ValueError("no LoRA targets given")
    targets = resolve_targets(targets)
    if freeze_base:
        model.requires_grad_(False)
    report = InjectionReport(adapter)
    chosen = [(n, m) for n, m in _candidates(model) if n and matches(n, targets)
              and not (exclude and matches(n, exclude))]
    if not chosen:
        some = [n for n, m in _candidates(model) if isinstance(m, (nn.Linear, nn.Conv2d))][:8]
        raise ValueError(f"LoRA targets {targets!r} matched no module of {type(model).__name__}; "
                         f"Linear/Conv2d names look like: {', '.join(some)}")
    wrong = [f"{n} ({type(m).__name__})" for n, m in chosen if not isinstance(m, (nn.Linear, nn.Conv2d, LoRALayer))]
    if wrong:
        raise ValueError(f"LoRA targets {targets!r} matched modules that are neither Linear nor Conv2d: "
                         f"{', '.join(wrong[:8])} (name the Linear inside, e.g. 'to_out.0')")
    for name, module in chosen:
        r, a = rank, alpha
        for pattern, o in (overrides or {}).items():
            if re.search(pattern, name):
                r, a = o.get("rank", r), o.get("alpha", a)
                break
        layer, ad = add_adapter_at(model, name, adapter, r, a, **adapter_kw)
        report.modules[name] = (type(layer.base_layer).__name__ + _kernel(layer.base_layer), r, ad.alpha)
        report.num_parameters += sum(p.numel() for p in ad.parameters())
    return report


def _kernel(m: nn.Module) -> str:
    return f"{m.kernel_size[0]}x{m.kernel_size[1]}" if isinstance(m, nn.Conv2d) else ""


def lora_layers(model: nn.Module):
    """(name, LoRALayer) for each wrapped module; names are the original module names."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            yield name, m


def lora_parameters(model: nn.Module, adapter: str | None = None):
    for _, layer in lora_layers(model):
        for name, a in layer.lora.items():
            if adapter is None or name == adapter:
                yield from a.parameters()


def lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """{module name: {down, up, alpha}} flattened as `<module>.lora_down.weight` etc. (kohya's parts)."""
    out = {}
    for name, layer in lora_layers(model):
        for an, a in layer.lora.items():
            if adapter is None and len(layer.lora) > 1:
                raise ValueError(f"{name} has adapters {list(layer.lora)}: name the one to take")
            if adapter is not None and an != adapter:
                continue
            out[f"{name}.lora_down.weight"] = a.down.weight
            out[f"{name}.lora_up.weight"] = a.up.weight
            out[f"{name}.alpha"] = torch.tensor(a.alpha)
    return out


def set_multiplier(model: nn.Module, adapter: str, weight: float) -> None:
    found = False
    for _, layer in lora_layers(model):
        if adapter in layer.lora:
            layer.lora[adapter].multiplier = float(weight)
            found = True
    if not found:
        raise KeyError(f"no adapter {adapter!r} in {type(model).__name__}")


def set_fused_lora_backward(model: nn.Module, enabled: bool = True) -> None:
    """LoRA on frozen Linear layers as one autograd function each (lora/linear_fn.py): the adapter's input
    gradient is added inside the base layer's backward GEMM instead of in a separate elementwise sum."""
    for _, layer in lora_layers(model):
        layer.fused_backward = enabled


def set_enabled(model: nn.Module, enabled: bool, adapter: str | None = None) -> None:
    for _, layer in lora_layers(model):
        for name, a in layer.lora.items():
            if adapter is None or name == adapter:
                a.enabled = enabled


def merge_lora(model: nn.Module, adapters: list[str] | None = None) -> None:
    for _, layer in lora_layers(model):
        layer.merge(adapters)


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> None:
    """Put the base modules back. merge=True keeps the adapters' effect in the weights (merge and unload)."""
    for name, layer in list(lora_layers(model)):
        layer.merge() if merge else layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
