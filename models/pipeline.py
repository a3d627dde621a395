"""Text-to-image (and img2img) with a loaded StableDiffusion: prompts -> images in [0, 1].

Used by sample.py, by training previews and by the evaluation. Follows diffusers'
StableDiffusionPipeline step for step, so that the same weights, prompt, negative prompt, seed,
steps and guidance give the same image: latents = randn((n, 4, H/8, W/8)) from a CPU generator
seeded with `seed`, the same generator then feeds the sampler's per-step noise.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from models import conditioning
from models.cuda_graph import GraphedUNet, graphed_unet, on_stream
from models.load import StableDiffusion
from models.samplers import get_sampler, guided
from models.schedule import NoiseSchedule


@torch.no_grad()
def encode_prompts(sd: StableDiffusion, prompts: list[str], clip_skip: int = 1,
                   long_prompt: str = "truncate") -> dict[str, torch.Tensor]:
    """Prompts -> {"ctx": (B, 77*k, D)[, "pooled": (B, P) for SDXL]} in the UNet's dtype."""
    out = conditioning.encode(sd, prompts, clip_skip, long_prompt)
    return {k: v.to(sd.unet.dtype) for k, v in out.items()}


def _pad_to(a: torch.Tensor, n: int) -> torch.Tensor:
    """Chunked prompts of different lengths: pad the shorter embedding with its own last window."""
    while a.shape[1] < n:
        a = torch.cat([a, a[:, -77:]], dim=1)
    return a


def sampler_defaults(sd: StableDiffusion, sampler: str) -> dict:
    """Spacing options from the model's scheduler config, the way diffusers builds a scheduler from it."""
    cfg = sd.scheduler_config
    opts = {"steps_offset": cfg.get("steps_offset", 1)}
    if "timestep_spacing" in cfg:  # else each sampler's own default (leading for DDIM/DDPM, linspace otherwise)
        opts["spacing"] = cfg["timestep_spacing"]
    if sampler == "ddim":
        opts["set_alpha_to_one"] = cfg.get("set_alpha_to_one", False)
    return opts


@torch.no_grad()
def generate(sd: StableDiffusion, prompt: str, negative_prompt: str = "", *, steps: int = 50,
             guidance_scale: float = 7.5, guidance_rescale: float = 0.0, sampler: str = "ddim",
             sampler_options: dict | None = None, seed: int = 0, num_images: int = 1, height: int = 512,
             width: int = 512, clip_skip: int = 1, long_prompt: str = "truncate",
             init_image: torch.Tensor | None = None, strength: float = 1.0,
             callback: Callable | None = None, decode_slice: int | None = None, vae_tiling: bool = False,
             cuda_graph: bool = True, original_size: tuple[int, int] | None = None,
             crop_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
             offload: str | torch.device | None = None) -> torch.Tensor:
    """One prompt, `num_images` images (N, 3, H, W) in [0, 1], float32 on the CPU.

    init_image: (1 or N, 3, H, W) in [-1, 1] for img2img with `strength`.
    decode_slice / vae_tiling: decode that many images at a time / each in overlapping tiles (less memory).
    original_size, crop_top_left, target_size: SDXL's size and crop conditioning, (h, w) each (diffusers'
    arguments of the same names; default: the image's size, uncropped), for the prompt and the negative prompt.
    cuda_graph: on a CUDA device, replay the UNet from a CUDA graph (models/cuda_graph.py): the same
    numbers, without the per-kernel launch cost.
    offload: a device; the model waits in host memory and each part comes to it only for its stage (text
    encoders, UNet, VAE), as diffusers' enable_model_cpu_offload: SDXL's 6.6 GiB of weights never sit on an
    8 GB card together. The same numbers; with cuda_graph, the UNet's graph is recorded for each prompt's UNet stage
    and dropped after it (its weights come to other memory each time).
    """
    f = sd.vae.scale_factor
    if height % f or width % f:
        raise ValueError(f"height and width must be divisible by {f} (the VAE's factor), got {height}x{width}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    fn = get_sampler(sampler)
    schedule = NoiseSchedule.from_config(sd.scheduler_config)
    device = torch.device(offload) if offload is not None else sd.unet.conv_in.weight.device
    unet = graphed_unet(sd.unet) if cuda_graph and device.type == "cuda" else sd.unet
    # with a graph, all of the call runs on the graph's stream: one cuBLAS workspace, as eager sampling keeps
    with on_stream(unet.stream if isinstance(unet, GraphedUNet) else None):
        with parts_on(offload, *sd.text_encoders.values()):
            cond = encode_prompts(sd, [prompt], clip_skip, long_prompt)
            if not negative_prompt and sd.force_zeros_for_empty_prompt:  # SDXL base: no negative prompt = zeros
                uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
            else:
                uncond = encode_prompts(sd, [negative_prompt], clip_skip, long_prompt)
        n_tok = max(cond["ctx"].shape[1], uncond["ctx"].shape[1])
        for c in (cond, uncond):
            c["ctx"] = _pad_to(c["ctx"], n_tok)
            for k, v in c.items():
                c[k] = v.repeat(num_images, *[1] * (v.ndim - 1))
        added = added_un = None
        if "pooled" in cond:  # SDXL: the image's size, uncropped, for both halves (diffusers' defaults)
            ids = conditioning.time_ids(original_size or (height, width), crop_top_left,
                                        target_size or (height, width)).to(device, sd.unet.dtype)
            ids = ids.expand(num_images, -1)
            added = conditioning.added_cond(cond, ids)
            added_un = conditioning.added_cond(uncond, ids)
        model = guided(unet, cond["ctx"], uncond["ctx"], guidance_scale, guidance_rescale, added, added_un)

        g = torch.Generator("cpu").manual_seed(int(seed))
        shape = (num_images, sd.unet.config.in_channels, height // f, width // f)
        x0 = None
        if init_image is not None:
            with parts_on(offload, sd.vae), upcast_vae(sd.vae) as vae:
                x0 = vae.encode_latents(init_image.to(device, vae.dtype).expand(num_images, -1, -1, -1),
                                        generator=g).float()
        noise = torch.randn(shape, generator=g, dtype=torch.float32).to(device)
        opts = {**sampler_defaults(sd, sampler), **(sampler_options or {})}
        with parts_on(offload, sd.unet):
            latents = fn(model, noise, schedule, steps, x0=x0, strength=strength, generator=g, callback=callback,
                         **opts)
            if offload is not None and isinstance(unet, GraphedUNet):
                unet.graphs.clear()   # they read the weights where they are now; next time they are elsewhere
        with parts_on(offload, sd.vae), upcast_vae(sd.vae) as vae:
            images = vae.decode_latents(latents.to(vae.dtype), slice_size=decode_slice, tiled=vae_tiling)
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


@contextlib.contextmanager
def parts_on(device, *modules):
    """With a device: the modules' weights copied to it for the duration, then pointed back at the host tensors
    they had (None: as they are). Nothing here changes frozen weights, so nothing is copied back: SDXL's offloaded
    sampling moved 6.6 GiB each way per image (experiments/bench/RESULTS.md, session 12)."""
    if device is None:
        yield
        return
    params = [(p, p.data) for m in modules for p in m.parameters()]
    buffers = [(owner, name, b) for m in modules for owner in m.modules() for name, b in owner._buffers.items()
               if b is not None]                 # by owner and name: a module's .float() replaces its buffers
    for p, host in params:
        p.data = host.to(device)
    for owner, name, b in buffers:
        owner._buffers[name] = b.to(device)
    try:
        yield
    finally:
        for p, host in params:
            p.data = host
        for owner, name, b in buffers:
            owner._buffers[name] = b
        for m in modules:   # what was derived from the device copies (models/subpixel_upsample.py's kernels)
            for sub in m.modules():
                if hasattr(sub, "release_caches"):
                    sub.release_caches()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def upcast_vae(vae):
    """A VAE whose config says force_upcast (SDXL's: its fp16 activations overflow) runs in fp32 for the
    duration when it is stored in fp16, as diffusers does."""
    if vae.dtype != torch.float16 or not vae.config.force_upcast:
        yield vae
        return
    vae.float()
    try:
        yield vae
    finally:
        vae.half()
