"""UNet2DConditionModel of Stable Diffusion (SD1.x, SD2.x, SDXL), written out by hand.

The architecture is LDM's (Rombach et al. 2022, arXiv:2112.10752; CompVis openaimodel.py); the
module names and the `config.json` fields are diffusers' (models/unets/unet_2d_condition.py), so a
diffusers `unet/` folder loads with one strict `load_state_dict` and LoRA names map 1:1.
Attention runs through `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import ahead, bias_folding
from models.blocks import (Downsample2D, ResnetBlock2D, Upsample2D, attention, norm_and_residual, norm_silu,
                           set_norms_in_weight_dtype)
from models.subpixel_upsample import set_subpixel_upsampling

# Config values we implement. Anything else raises, naming the field: a UNet that silently
# ignores `class_embed_type` would still make images, just wrong ones.
_SUPPORTED = {
    "center_input_sample": {False},
    "only_cross_attention": {False},
    "dual_cross_attention": {False},
    "class_embed_type": {None},
    "addition_embed_type": {None, "text_time"},
    "resnet_time_scale_shift": {"default"},
    "time_embedding_type": {"positional"},
    "act_fn": {"silu"},
    "conv_in_kernel": {3},
    "conv_out_kernel": {3},
    "encoder_hid_dim": {None},
    "time_cond_proj_dim": {None},
    "mid_block_type": {"UNetMidBlock2DCrossAttn"},
    "attention_type": {"default"},
    "timestep_post_act": {None},
    "time_embedding_act_fn": {None},
    "cross_attention_norm": {None},
    "resnet_skip_time_act": {False},
    "resnet_out_scale_factor": {1.0},
}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


@dataclass
class UNetConfig:
    """The fields of diffusers' unet/config.json that change the computation. Defaults: SD1.5."""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8     # diffusers' historical name: the number of *heads*
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    extra: dict = field(default_factory=dict)  # the other config.json fields, kept for saving

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "UNetConfig":
        for key, allowed in _SUPPORTED.items():
            if key in d and d[key] not in allowed:
                raise ValueError(f"{source}: UNet option {key}={d[key]!r} is not supported "
                                 f"(supported: {sorted(map(str, allowed))})")
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls(**kw, extra=extra)
        for t in cfg.down_block_types + cfg.up_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"{source}: unknown UNet block type {t!r}")
        if not isinstance(cfg.layers_per_block, int):
            raise ValueError(f"{source}: per-block layers_per_block is not supported")
        return cfg

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: _plain(getattr(self, f.name))
                  for f in fields(self) if f.name != "extra"})
        d["_class_name"] = "UNet2DConditionModel"
        return d

    def per_block(self, value) -> list:
        n = len(self.block_out_channels)
        return list(value) if isinstance(value, (tuple, list)) else [value] * n

    @property
    def heads(self) -> list[int]:
        return self.per_block(self.num_attention_heads or self.attention_head_dim)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017 sec. 3.5; DDPM's get_timestep_embedding): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - shift))                           # (half,)
    args = t[:, None].float() * freqs[None]                       # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)   # (B, 2*half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class Attention(nn.Module):
    """Self- (context=None) or cross-attention; q/k/v without bias, `to_out.0` with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    fused_projections = False   # set_fused_projections(): one matmul for q, k, v (self) or k, v (cross)
    short_kernel = False        # set_short_attention(): <= 128 keys in Triton kernels (models/short_attention.py)
    fused_qkv_lora = False      # set_fused_qkv_lora(): LoRA'd self-attention q, k, v in one function (lora/qkv_fn.py)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = ahead.take(self) if context is not None else None   # k, v computed ahead (models/ahead.py)
        qkv = self._lora_qkv(x) if self.fused_qkv_lora and context is None else None
        if kv is not None:
            q, (k, v) = self.to_q(x), kv
        elif qkv is not None:
            q, k, v = qkv
        elif self.fused_projections:
            q, k, v = self._fused_qkv(x, context)
        else:
            context = x if context is None else context           # (B, M, Dc)
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads, self.upcast, self.short_kernel)
        return self.to_out[1](self.to_out[0](out))                # (B, N, D)

    def _lora_qkv(self, x):
        from lora.qkv_fn import lora_qkv  # Triton: imported only where asked for
        return lora_qkv(x, self.to_q, self.to_k, self.to_v)   # None where it does not apply

    def _fused_qkv(self, x, context):
        """The frozen projections as one matmul over their concatenated weights (self-attention: q, k, v
        from x; cross-attention: k, v from the text), then each LoRA's own contribution, in the unfused
        order (so LoRA dropout draws the same masks)."""
        mods = [self.to_q, self.to_k, self.to_v]
        base = [getattr(m, "base_layer", m) for m in mods]
        groups = [(x, [0, 1, 2])] if context is None else [(x, [0]), (context, [1, 2])]
        outs = [None] * 3
        for inp, idx in groups:
            w = torch.cat([base[i].weight for i in idx]) if len(idx) > 1 else base[idx[0]].weight
            y = F.linear(inp, w)                                   # (B, N, len(idx) * inner)
            for i, part in zip(idx, y.split([base[i].out_features for i in idx], dim=-1)):
                outs[i] = mods[i].add_lora(inp, part) if hasattr(mods[i], "add_lora") else part
        return outs


class GEGLU(nn.Module):
    """Shazeer 2020, "GLU variants improve transformer", eq. 6."""
    fused = False  # set_fused_geglu: the gate in one Triton kernel each way (models/fused_geglu.py)

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        p = self.proj(x)                                           # (B, N, 2 * inner)
        if self.fused:
            from models.fused_geglu import geglu  # Triton: imported only where asked for
            return geglu(p)
        hidden, gate = p.chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, None, upcast, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    fused_norms = False  # UNet.set_fused_layer_norms: each residual sum and the LayerNorm after it in one kernel

    def forward(self, x, context):
        if self.fused_norms and (self.norm1.__dict__.get("in_weight_dtype")
                                 or not torch.is_autocast_enabled(x.device.type)):  # else autocast's fp32 norms
            from models.fused_layer_norm import add_layer_norm  # Triton: imported only where asked for
            x, h = add_layer_norm(self.attn1(add_layer_norm(None, x, self.norm1)), x, self.norm2)
            x, h = add_layer_norm(self.attn2(h, context), x, self.norm3)
            return self.ff(h) + x
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class _Checkpointed(nn.Module):
    """A module whose parts are recomputed in the backward pass under gradient checkpointing (`_run`)."""
    gradient_checkpointing = False
    preserve_rng_state = True
    checkpoint_context = None

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _run(self, fn, *args):
        if self._checkpointing():
            kw = {"context_fn": self.checkpoint_context} if self.checkpoint_context else {}
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=self.preserve_rng_state, **kw)
        return fn(*args)


class Transformer2DModel(_Checkpointed):
    """The spatial transformer: GroupNorm, proj_in (1x1 conv, or Linear in SD2), blocks, proj_out.

    Under gradient checkpointing a transformer of several blocks (SDXL: 2 and 10) recomputes one block at a
    time, as diffusers does: recomputed whole, its ten blocks' activations were alive together in the backward
    (with this and lora/mask_replay.py's kept seeds, SDXL's seed-004 step peaks at 5.67 GiB instead of 6.38 on
    an H100; experiments/bench/RESULTS.md, session 12). The norm and the projections then keep their inputs
    (three (B, HW, C) activations more than a whole recomputation); a single-block transformer (SD1.5, SD2) is
    still recomputed whole by its UNet block."""

    fold_biases = False  # UNet.set_bias_folding: 1x1 proj_in/proj_out as GEMMs on channels_last input

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int,
                 linear_proj: bool, upcast: bool, dropout: float):
        super().__init__()
        head_dim = channels // heads
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels) if linear_proj else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, head_dim, context_dim, upcast, dropout) for _ in range(layers))
        self.proj_out = nn.Linear(channels, channels) if linear_proj else nn.Conv2d(channels, channels, 1)

    def checkpoints_blocks(self) -> bool:
        return self._checkpointing() and len(self.transformer_blocks) > 1

    def forward(self, x, context):
        b, c, h, w = x.shape
        x, residual = norm_and_residual(self.norm, x)
        if not self.linear_proj:
            x = bias_folding.pointwise(self.proj_in, x) if self.fold_biases else self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)            # (B, HW, C)
        if self.linear_proj:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = self._run(block, x, context) if self.checkpoints_blocks() else block(x, context)
        if self.linear_proj:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)              # (B, C, H, W), NHWC in memory
        x = x.contiguous(memory_format=_layout(residual))           # a copy only for an NCHW UNet
        if not self.linear_proj:
            x = bias_folding.pointwise(self.proj_out, x) if self.fold_biases else self.proj_out(x)
        return x + residual


def _layout(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last (and not also NCHW-contiguous) 4-D tensor, else NCHW."""
    return torch.channels_last if bias_folding.is_channels_last(t) else torch.contiguous_format


class _Block(_Checkpointed):
    """Resnets (each optionally followed by a transformer) then an optional down/upsampler."""

    def _attend(self, attn: Transformer2DModel, x, context):
        """A transformer of several blocks checkpoints each of them itself; one of a single block is recomputed
        whole (its one saved input is the block's)."""
        return attn(x, context) if attn.checkpoints_blocks() else self._run(attn, x, context)


class DownBlock(_Block):
    def __init__(self, cin, cout, temb, layers, attn: dict | None, add_down: bool, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, temb, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)
            for i in range(layers))
        if attn is not None:
            self.attentions = nn.ModuleList(Transformer2DModel(cout, **attn) for _ in range(layers))
        if add_down:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, cfg.downsample_padding)])

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self._run(resnet, x, temb)
            if hasattr(self, "attentions"):
                x = self._attend(self.attentions[i], x, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(_Block):
    def __init__(self, cin, cprev, cout, temb, layers, attn: dict | None, add_up: bool, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((cprev if i == 0 else cout) + (cin if i == layers - 1 else cout), cout, temb,
                          cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)
            for i in range(layers))
        if attn is not None:
            self.attentions = nn.ModuleList(Transformer2DModel(cout, **attn) for _ in range(layers))
        if add_up:
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x, skips, temb, context, up_size=None):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)               # (B, C + Cskip, H, W)
            x = self._run(resnet, x, temb)
            if hasattr(self, "attentions"):
                x = self._attend(self.attentions[i], x, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, up_size)
        return x


class MidBlock(_Block):
    def __init__(self, c, temb, attn: dict, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, c, temb, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, cfg.mid_block_scale_factor)
            for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(c, **attn)])

    def forward(self, x, temb, context):
        x = self._run(self.resnets[0], x, temb)
        x = self._attend(self.attentions[0], x, context)
        return self._run(self.resnets[1], x, temb)


class UNet2DConditionModel(nn.Module):
    """eps- or v-prediction UNet: (noisy latents (B, 4, h, w), t (B,), text (B, 77, D)) -> (B, 4, h, w)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        cfg = self.config = config or UNetConfig()
        boc = list(cfg.block_out_channels)
        temb = boc[0] * 4
        heads, tlayers = cfg.heads, cfg.per_block(cfg.transformer_layers_per_block)
        ctx = cfg.per_block(cfg.cross_attention_dim)

        def attn_kw(i):
            return dict(heads=heads[i], layers=tlayers[i], context_dim=ctx[i], groups=cfg.norm_num_groups,
                        linear_proj=cfg.use_linear_projection, upcast=cfg.upcast_attention, dropout=cfg.dropout)

        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(boc[0], temb)
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop conditioning
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        cout = boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, boc[i]
            self.down_blocks.append(DownBlock(
                cin, cout, temb, cfg.layers_per_block, attn_kw(i) if kind.startswith("CrossAttn") else None,
                i < len(boc) - 1, cfg))

        self.mid_block = MidBlock(boc[-1], temb, attn_kw(len(boc) - 1), cfg)

        self.up_blocks = nn.ModuleList()
        rev = boc[::-1]
        cout = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            cprev, cout, cin = cout, rev[i], rev[min(i + 1, len(boc) - 1)]
            j = len(boc) - 1 - i  # the matching down level, for heads and transformer depth
            self.up_blocks.append(UpBlock(
                cin, cprev, cout, temb, cfg.layers_per_block + 1,
                attn_kw(j) if kind.startswith("CrossAttn") else None, i < len(boc) - 1, cfg))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, boc[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(boc[0], cfg.out_channels, 3, padding=1)

    _ahead_modules = None   # set_ahead: (resnets with a timestep projection, cross-attentions)

    def set_ahead(self, enabled: bool = True) -> None:
        """Compute the cross-attentions' keys and values and the resnets' timestep projections on a side CUDA
        stream at the start of each forward (models/ahead.py); not under gradient checkpointing."""
        self._ahead_modules = None if not enabled else (
            [m for m in self.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None],
            [m.attn2 for m in self.modules() if isinstance(m, BasicTransformerBlock)])

    def _ahead_wanted(self, sample: torch.Tensor) -> bool:
        if self._ahead_modules is None or not ahead.enabled or not (sample.is_cuda or ahead.on_cpu):
            return False
        blocks = [*self.down_blocks, self.mid_block, *self.up_blocks]
        return not (self.training and torch.is_grad_enabled() and any(b.gradient_checkpointing for b in blocks))

    def set_fused_projections(self, enabled: bool = True) -> None:
        """Compute each attention's frozen q/k/v projections with one matmul (k/v for cross-attention)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_projections = enabled

    def set_fused_qkv_lora(self, enabled: bool = True) -> None:
        """Each self-attention's LoRA'd q/k/v projections in one autograd function over fused Triton kernels
        where it applies (lora/qkv_fn.py; while gradients are recorded)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fused_qkv_lora = enabled

    def set_triton_kernels(self, enabled: bool = True) -> None:
        """For inference with fp16/bf16 weights on CUDA (sample.py): channels_last activations, GroupNorm
        (+SiLU) in the NHWC Triton kernels, the fused GEGLU and LayerNorms, the NHWC upsampling, the short-key
        attention kernels, as the training step uses them. Off: NCHW and torch's kernels."""
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.set_norms_in_weight_dtype(enabled, nhwc=enabled)
        self.set_fused_geglu(enabled)
        self.set_fused_layer_norms(enabled)
        self.set_nhwc_upsampling(enabled)
        self.set_bias_folding(enabled)
        self.set_short_attention(enabled)
        self.set_thin_convs(enabled)

    def set_thin_convs(self, enabled: bool = True) -> None:
        """conv_in and conv_out (3x3 convolutions with the 4 latent channels on one side) in models/thin_conv.py's
        Triton kernels where usable (CUDA fp16/bf16, frozen weights); cuDNN's 4-wide implicit GEMMs otherwise."""
        from models import thin_conv
        for m in (self.conv_in, self.conv_out):
            m = getattr(m, "base_layer", m)                             # under a LoRA layer: its frozen conv
            if enabled and thin_conv.thin(m):
                m.forward = thin_conv.forward.__get__(m)
            else:
                m.__dict__.pop("forward", None)

    def set_short_attention(self, enabled: bool = True) -> None:
        """Attention over at most 128 keys (cross-attention's text tokens) in one Triton kernel each way
        (models/short_attention.py) where usable (CUDA fp16/bf16, head dim <= 128); torch's SDPA otherwise."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.short_kernel = enabled

    def set_bias_folding(self, enabled: bool = True) -> None:
        """Convolution biases folded into the operations next to them (models/bias_folding.py): the spatial
        transformers' 1x1 proj_in/proj_out as GEMMs with the bias in the epilogue (channels_last inputs), and,
        in resnets whose norms run NHWC, conv1's bias and the timestep embedding as norm2's shift and conv2's
        bias in the residual sum."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock2D, Transformer2DModel)):
                m.fold_biases = enabled

    def set_fused_layer_norms(self, enabled: bool = True) -> None:
        """Each transformer block's LayerNorms in Triton kernels, norm2 and norm3 with the residual sum before
        them (models/fused_layer_norm.py): for norms in their weights' dtype (set_norms_in_weight_dtype), frozen
        or under no_grad; otherwise the block falls back to torch's add and norm."""
        for m in self.modules():
            if isinstance(m, BasicTransformerBlock):
                m.fused_norms = enabled

    def set_nhwc_upsampling(self, enabled: bool = True) -> None:
        """The upsamplers' nearest 2x in Triton kernels for channels_last inputs (models/nhwc_upsample.py)."""
        for m in self.modules():
            if isinstance(m, Upsample2D):
                m.nhwc_kernel = enabled

    def set_subpixel_upsampling(self, enabled: bool = True) -> None:
        """Each upsampler's nearest 2x + 3x3 conv as a 2x2 conv on its low-resolution input whose four output
        parities are interleaved (models/subpixel_upsample.py): 4/9 of the multiply-adds, the same function."""
        set_subpixel_upsampling(self, enabled)

    def set_fused_geglu(self, enabled: bool = True) -> None:
        """Each feed-forward's GEGLU gate in one Triton kernel forward and one backward (CUDA), instead of
        gelu, product and concatenation over strided halves."""
        for m in self.modules():
            if isinstance(m, GEGLU):
                m.fused = enabled

    def set_norms_in_weight_dtype(self, enabled: bool = True, nhwc: bool = False) -> None:
        """Run GroupNorm/LayerNorm in the weights' dtype (fp16/bf16) even under autocast, which would
        otherwise upcast each norm's input and output to fp32: the kernels still accumulate in fp32, the
        output is rounded to half precision one op earlier. Saves two fp32 round trips per norm.
        nhwc: GroupNorms of channels_last CUDA inputs run models/nhwc_group_norm.py's kernels instead of
        torch's, which copy to NCHW and back."""
        set_norms_in_weight_dtype(self, enabled, nhwc)

    def set_gradient_checkpointing(self, enabled: bool = True, preserve_rng_state: bool = True,
                                   context_fn=None) -> None:
        """Recompute each resnet and transformer (each transformer block, where a transformer has several) in the
        backward pass: about 1/2 the activation memory. The upsamplers' sub-pixel kernels are then not kept
        between calls either (SDXL: 65 MB).
        preserve_rng_state=False skips saving the RNG per block (needed inside a CUDA graph; correct only
        when nothing random runs in the blocks, or when the randomness is replayed: context_fn, e.g.
        lora.mask_replay.context_fn for LoRA dropout)."""
        for m in self.modules():
            if isinstance(m, _Checkpointed):
                m.gradient_checkpointing = enabled
                m.preserve_rng_state = preserve_rng_state
                m.checkpoint_context = context_fn
            if isinstance(m, Upsample2D):   # sub-pixel kernels computed per call, not kept (models/subpixel_upsample.py)
                m.keep_parity_kernels = not enabled
                m.release_caches()

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, added_cond: dict | None = None) -> torch.Tensor:
        cfg = self.config
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)  # (B,)
        t_emb = timestep_embedding(t, cfg.block_out_channels[0],
                                   cfg.flip_sin_to_cos, cfg.freq_shift).to(sample.dtype)
        emb = self.time_embedding(t_emb)                          # (B, 4*C0)
        if cfg.addition_embed_type == "text_time":
            if added_cond is None:
                raise ValueError("this UNet (SDXL) needs added_cond={'text_embeds', 'time_ids'}")
            time_ids = timestep_embedding(added_cond["time_ids"].flatten(), cfg.addition_time_embed_dim,
                                          cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)  # (B, 6*256)
            add = torch.cat([added_cond["text_embeds"], time_ids.to(emb.dtype)], dim=-1)
            emb = emb + self.add_embedding(add.to(emb.dtype))

        # the text's and the timestep's projections on a side stream, beside conv_in and the first blocks
        given = ahead.compute(*self._ahead_modules, emb, encoder_hidden_states) if self._ahead_wanted(sample) \
            else []
        try:
            return self._blocks(sample, emb, encoder_hidden_states)
        finally:
            if given:
                ahead.finish(given, sample.device)

    def _blocks(self, sample, emb, encoder_hidden_states):
        cfg = self.config
        # Latents not divisible by 2**n_up need each upsampler told its output size.
        n_up = len(cfg.block_out_channels) - 1
        odd = any(s % (2 ** n_up) for s in sample.shape[-2:])

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, encoder_hidden_states)
            skips.extend(s)
        x = self.mid_block(x, emb, encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            up_size = tuple(skips[-1].shape[-2:]) if (odd and skips) else None
            x = block(x, block_skips, emb, encoder_hidden_states, up_size)
        return self.conv_out(norm_silu(self.conv_norm_out, x))      # the SiLU in the norm's kernel where NHWC
