"""AutoencoderKL: the KL-regularised VAE of latent diffusion (Rombach et al. 2022, sec. 3 and app. G).

Images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/8, W/8). Module names and config fields are
diffusers' (models/autoencoders/autoencoder_kl.py, vae.py). `scaling_factor` (0.18215 for SD1.x,
0.13025 for SDXL) brings the latents to about unit variance; `encode_latents` and `decode_latents`
apply it so that callers never forget it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, attention, norm_silu, set_norms_in_weight_dtype
from models.subpixel_upsample import set_subpixel_upsampling


SEARCH_MAX_PIXELS = 512 * 512  # AutoencoderKL.search_convs applies to images up to this size: where it was measured


@contextlib.contextmanager
def heuristic_convs(search: bool = False):
    """cuDNN's heuristic choice of convolution algorithm inside (no timed search where the trainer turned
    cudnn.benchmark on) unless `search` (AutoencoderKL.search_convs): the frozen VAE runs each shape a few times at
    most, and at 1024x1024 in fp32 the search allocated a 64.6 GiB workspace for an encoder convolution on an 80 GB
    H100, which the caching allocator then kept reserved (SDXL's full step with and without the search: 0.1806 /
    0.1809 s, 71.8 / 10.5 GiB peak; experiments/bench/RESULTS.md, session 12)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before and search
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "VAEConfig":
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"{source}: VAE act_fn={d['act_fn']!r} is not supported")
        for key in ("down_block_types", "up_block_types"):
            bad = [t for t in d.get(key, []) if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D")]
            if bad:
                raise ValueError(f"{source}: VAE block types {bad} are not supported")
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names})

    @property
    def force_upcast(self) -> bool:
        """The config says its fp16 activations overflow (SDXL's VAE): run it in fp32 (diffusers' flag)."""
        return bool(self.extra.get("force_upcast", False))

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "extra"})
        n = len(self.block_out_channels)
        d.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
        d.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
        d["_class_name"] = "AutoencoderKL"
        return d


class VAEAttention(nn.Module):
    """Single-head spatial self-attention with a residual (LDM's AttnBlock)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6, affine=True)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)           # (B, HW, C)
        y = attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1)  # (B, HW, C)
        y = self.to_out[0](y).transpose(1, 2).reshape(b, c, h, w)   # a (B, C, H, W) view, HW-major memory
        return y + x  # this order keeps y's memory layout, as diffusers does: the next convs then match it bit for bit


class VAEMidBlock(nn.Module):
    def __init__(self, c: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, None, groups, 1e-6) for _ in range(2)])
        if add_attention:
            self.attentions = nn.ModuleList([VAEAttention(c, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        if hasattr(self, "attentions"):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class CoderBlock(nn.Module):
    """DownEncoderBlock2D (downsample=True) or UpDecoderBlock2D (upsample=True)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, 1e-6)
                                     for i in range(layers))
        if down:
            self.downsamplers = nn.ModuleList([Downsample2D(cout, padding=0)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x):
        """x: (B, C, H, W), or a one-element list holding it, which is emptied: then, without grad, nothing
        outside keeps the block's input alive once its first resnet is done (see Encoder.forward)."""
        x = x.pop() if isinstance(x, list) else x
        for r in self.resnets:
            x = r(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        boc, g = list(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, boc[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            CoderBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, down=i < len(boc) - 1)
            for i in range(len(boc)))
        self.mid_block = VAEMidBlock(boc[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, boc[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(boc[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        # Each block takes its input out of a list: a plain argument stays referenced by this frame and by
        # Module.__call__ until the block returns, so without grad (the frozen VAE) the 1024x1024 fp32 encode
        # kept conv_in's 0.5 GiB output alive through the first block (SDXL's full step peaked there;
        # experiments/bench/RESULTS.md, session 13).
        x = [self.conv_in(x)]
        for blk in self.down_blocks:
            x = [blk(x)]
        x = self.mid_block(x.pop())
        return self.conv_out(norm_silu(self.conv_norm_out, x))  # (B, 2*latent, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rev, g = list(cfg.block_out_channels)[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rev[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            CoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, up=i < len(rev) - 1)
            for i in range(len(rev)))
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = [self.mid_block(self.conv_in(z))]
        for blk in self.up_blocks:           # each takes its input out of the list, as in Encoder.forward
            x = [blk(x)]
        return self.conv_out(norm_silu(self.conv_norm_out, x.pop()))  # (B, 3, H, W)


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); logvar clamped to [-30, 20] as LDM does."""
    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; the noise is given, or drawn (from a CPU generator: on the CPU)."""
        if noise is None:
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        cfg = self.config = config or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        lat = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if cfg.use_post_quant_conv else None
        self.search_convs = False  # True: cuDNN's timed search where cudnn.benchmark is on, for images of up to
        # SEARCH_MAX_PIXELS (heuristic_convs)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel: 2**(levels - 1), 8 for SD."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def set_subpixel_upsampling(self, enabled: bool = True) -> None:
        """The decoder's upsamplers in the sub-pixel form (models/subpixel_upsample.py): 4/9 of their
        multiply-adds, the same function."""
        set_subpixel_upsampling(self, enabled)

    def set_triton_kernels(self, enabled: bool = True) -> None:
        """For a frozen fp16/bf16 VAE on CUDA (the trainer's train.nhwc_vae, sample.py's triton_kernels): channels_last
        weights and activations, GroupNorms (+SiLU) on the NHWC kernels, the encoder's conv biases folded (H100,
        experiments/bench/RESULTS.md session 22: the report's full step 37.3 -> 26.7 ms; vae_probe: decode of 1 at
        512x512 23.5 -> 11.0-20.0 ms, by cuDNN's picks). Off: NCHW and torch's GroupNorm."""
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.set_nhwc_norms(enabled)
        self.set_bias_folding(enabled)

    def set_bias_folding(self, enabled: bool = True) -> None:
        """In the encoder's resnets whose norms run NHWC, conv1's bias as norm2's shift and conv2's bias in the
        residual sum or the 1x1 shortcut's GEMM (models/bias_folding.py, as UNet.set_bias_folding): torch adds each
        conv bias in a strided broadcast pass over the channels_last output (the full step's profile: 49 such adds,
        2.0 ms; folded, the step went 28.5 -> 26.7 ms). Not the decoder's: folded, its decode of 1 at 512x512 took
        11.2-11.3 ms against 10.8-11.0 and 0.41 GiB against 0.31 (H100, experiments/bench/RESULTS.md session 22)."""
        for m in self.encoder.modules():
            if isinstance(m, ResnetBlock2D):
                m.fold_biases = enabled

    def set_nhwc_norms(self, enabled: bool = True) -> None:
        """GroupNorms of channels_last CUDA inputs on models/nhwc_group_norm.py's kernels, SiLU fused, instead of
        torch's, which copy NCHW and back around each (as UNet.set_norms_in_weight_dtype's nhwc; the VAE runs in
        its weights' dtype outside autocast, so nothing else changes). For a VAE moved to channels_last."""
        set_norms_in_weight_dtype(self, enabled, nhwc=True)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, 4, H/8, W/8)."""
        with heuristic_convs(self.search_convs and x.shape[-2] * x.shape[-1] <= SEARCH_MAX_PIXELS):
            moments = self.encoder(x)
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
        """Unscaled latents -> images in about [-1, 1]. `slice_size` decodes that many at a time."""
        if slice_size and z.shape[0] > slice_size:
            return torch.cat([self.decode(c) for c in z.split(slice_size)], dim=0)
        pixels = z.shape[-2] * z.shape[-1] * self.scale_factor ** 2
        with heuristic_convs(self.search_convs and pixels <= SEARCH_MAX_PIXELS):
            if self.post_quant_conv is not None:
                z = self.post_quant_conv(z)
            return self.decoder(z)

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> latents on the diffusion model's scale: (z - shift) * scaling_factor.
        noise: the posterior's standard-normal draw, when the caller draws it (the training step does)."""
        dist = self.encode(x)
        z = dist.sample(generator, noise) if sample else dist.mode()
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor, slice_size: int | None = None, tiled: bool = False) -> torch.Tensor:
        """Latents on the diffusion model's scale -> images. tiled: in overlapping tiles of sample_size pixels
        (models/vae_tiling.py: bounded memory at any size; diffusers' enable_vae_tiling)."""
        z = latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        if tiled:
            from models.vae_tiling import tiled_decode
            return torch.cat([tiled_decode(self, c) for c in z.split(slice_size or z.shape[0])], dim=0)
        return self.decode(z, slice_size)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x).sample(generator))
