"""LoRA layers for nn.Linear and nn.Conv2d (Hu et al. 2021, arXiv:2106.09685, eq. 3).

    y = base(x) + sum_a  multiplier_a * scale_a * up_a(down_a(dropout_a(x)))
    scale = alpha / r              (Hu et al.; kohya's `alpha`)
          = alpha / sqrt(r)        (rank-stabilised, Kalajdzievski 2023, arXiv:2312.03732)

`down` (A) is (r, in) for Linear and a conv with the base kernel, stride, padding and dilation for
Conv2d (r, in, kh, kw); `up` (B) is (out, r) or a 1x1 conv (out, r, 1, 1): exactly kohya's
`lora_down`/`lora_up` shapes. A is kaiming-uniform and B zero at the start (peft's default), so an
injected model computes the base model's function until B learns. Several named adapters live in
one layer, each with its own multiplier (the weight a user gives a LoRA file at inference).
Merging is explicit (`merge`, `unmerge`), never hidden in train()/eval(), and refuses non-finite
deltas. LoRA parameters stay in their own dtype (fp32) when the base is fp16/bf16.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora import mask_replay


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, used to count FLOPs)
        return False


class LoRAAdapter(nn.Module):
    """One adapter: down (A), up (B), its scale, dropouts and multiplier."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, init: str = "kaiming",
                 rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        device = base.weight.device
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
            self.up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError("LoRA on grouped convolutions is not supported")
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False, device=device, dtype=dtype)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device, dtype=dtype)
        else:
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.rslora = rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.multiplier = 1.0
        self.enabled = True
        self.cast_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # lora/half_weights.py sets it
        self.reset_parameters(init)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def reset_parameters(self, init: str = "kaiming") -> None:
        if init == "kaiming":   # peft's default; nn.Linear's own init
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.down.weight, std=1.0 / self.rank)
        else:
            raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming' or 'gaussian'")
        nn.init.zeros_(self.up.weight)

    def delta_weight(self) -> torch.Tensor:
        """scale * multiplier * B @ A, in the base weight's layout: (out, in) or (out, in, kh, kw)."""
        up, down = self.up.weight.float(), self.down.weight.float()
        if down.ndim == 2:
            delta = up @ down                                           # (out, r) @ (r, in)
        else:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # (out, in, kh, kw)
        return delta * (self.scale * self.multiplier)

    @property
    def dropout_p(self) -> float:
        """The LoRA dropout probability in effect: 0 outside training."""
        return self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as the forward uses them: the parameters, or their once-per-step casts (half_weights)."""
        return self.cast_weights or (self.down.weight, self.up.weight)

    def _down(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if isinstance(self.down, nn.Linear):
            return F.linear(x, w)
        d = self.down
        return F.conv2d(x, w, None, d.stride, d.padding, d.dilation)

    def _up(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(h, w) if isinstance(self.up, nn.Linear) else F.conv2d(h, w)

    def scaled_down(self, x: torch.Tensor) -> torch.Tensor:
        """scale * multiplier * down(dropout(x)), rank dropout applied: (..., r) or (B, r, H', W').
        The scale multiplies this rank-sized tensor, not the layer-sized output (same product, r/out of the
        elementwise work)."""
        w_down = self.weights()[0]
        if not _autocast_on(x.device.type):  # under autocast the matmul picks its dtype itself
            x = x.to(w_down.dtype)
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        if self.training and p > 0 and mask_replay.active():  # inside a checkpointed block: a kept mask
            keep = mask_replay.dropout_keep(self, x, p)
            x = x * keep * (1.0 / (1.0 - p))                            # nn.Dropout's scaling
        else:
            x = self.dropout(x)
        h = self._down(x, w_down)                                       # (..., r) or (B, r, H', W')
        scale = self.scale * self.multiplier
        if self.training and self.rank_dropout > 0:  # kohya's rank dropout: drop rank channels per sample
            b, r = h.shape[0], self.rank
            shape = (b, r, 1, 1) if isinstance(self.down, nn.Conv2d) else (b,) + (1,) * (h.ndim - 2) + (r,)
            keep = mask_replay.mask(self, "rank", lambda: torch.rand(shape, device=h.device) > self.rank_dropout)
            return h * (keep.to(h.dtype) * (scale / (1.0 - self.rank_dropout)))
        return h * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This adapter's contribution, scale * multiplier * up(down(dropout(x)))."""
        return self._up(self.scaled_down(x), self.weights()[1])

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + forward(x). Where the up projection is a plain matrix product over y's channels (Linear; a
        1x1 conv on channels_last tensors) it runs as one addmm, y + h @ B^T, which cuBLAS adds into y in
        its epilogue: no layer-sized elementwise add forward, none backward (the gradient to y passes
        through). Elsewhere (dtypes that differ outside autocast, NCHW convs) the plain sum."""
        h = self.scaled_down(x)
        w = self.weights()[1]                                           # (out, r) or (out, r, 1, 1)
        dev = y.device.type
        if (_autocast_on(dev) and y.dtype == torch.get_autocast_dtype(dev)) or h.dtype == y.dtype == w.dtype:
            if isinstance(self.up, nn.Linear):
                out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), w.t())
                return out.view(y.shape).to(y.dtype)
            cl = torch.channels_last
            if y.ndim == 4 and y.is_contiguous(memory_format=cl) and h.is_contiguous(memory_format=cl):
                b, c, hh, ww = y.shape                                  # NHWC in memory: (B*H*W, C) views
                out = torch.addmm(y.permute(0, 2, 3, 1).reshape(-1, c), h.permute(0, 2, 3, 1).reshape(-1, self.rank),
                                  w[:, :, 0, 0].t())
                return out.view(b, hh, ww, c).permute(0, 3, 1, 2).to(y.dtype)
        return y + self._up(h, w).to(y.dtype)


class LoRALayer(nn.Module):
    """Wraps a frozen nn.Linear or nn.Conv2d (`base_layer`) with named adapters (`lora[name]`)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        self.base_layer = base
        self.lora = nn.ModuleDict()
        self.merged: dict[str, torch.Tensor] = {}  # adapter -> the delta that was added to the base
        self.original: torch.Tensor | None = None  # the base weight before the first merge

    def add_adapter(self, name: str, **kw) -> LoRAAdapter:
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if not name.isidentifier() or hasattr(nn.ModuleDict(), name):
            raise ValueError(f"adapter name {name!r} cannot be used: it must be an identifier and not an "
                             f"nn.ModuleDict attribute (such as 'eval', 'train', 'to')")
        self.lora[name] = LoRAAdapter(self.base_layer, **kw)
        return self.lora[name]

    fused_backward = False  # lora.inject.set_fused_lora_backward: lora/linear_fn.py where it applies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_backward and torch.is_grad_enabled():
            a = self._single_adapter()
            if a is not None:
                from lora.linear_fn import lora_linear
                return lora_linear(x, self.base_layer, a)
        return self.add_lora(x, self.base_layer(x))

    def _single_adapter(self) -> LoRAAdapter | None:
        """The one adapter lora_linear can run: a frozen Linear base, one active unmerged adapter without rank or
        module dropout (kohya's, rarely used: add_lora handles them); None otherwise."""
        base = self.base_layer
        if not isinstance(base, nn.Linear) or base.weight.requires_grad or \
                (base.bias is not None and base.bias.requires_grad):
            return None
        active = [(n, a) for n, a in self.lora.items() if a.enabled and n not in self.merged]
        if len(active) != 1:
            return None
        a = active[0][1]
        return None if a.training and (a.rank_dropout > 0 or a.module_dropout > 0) else a

    def add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base layer's output for x) plus every active adapter's contribution."""
        for name, a in self.lora.items():
            if not a.enabled or name in self.merged:
                continue
            if self.training and a.module_dropout > 0 and torch.rand(()) < a.module_dropout:
                continue  # kohya's module dropout: skip this LoRA for the whole step
            y = a.add_to(x, y)
        return y

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Add the adapters' deltas into the base weight; their forward path is then skipped. The weight
        before the first merge is kept, so that unmerge() restores it bit for bit (as A1111 keeps its
        backups): subtracting the delta again would leave rounding residue, large in fp16."""
        w = self.base_layer.weight
        for name in names or list(self.lora):
            if name in self.merged or not self.lora[name].enabled:
                continue
            delta = self.lora[name].delta_weight()
            if not torch.isfinite(delta).all():
                raise ValueError(f"refusing to merge adapter {name!r}: its delta has NaN or inf values")
            if not self.merged:
                self.original = w.detach().clone()
            w += delta.to(w.dtype)
            self.merged[name] = delta

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.copy_(self.original)
            self.merged.clear()
            self.original = None
