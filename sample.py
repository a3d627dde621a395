"""Sample images from a base model with any number of LoRAs (Hydra entry point).

    python sample.py model=sd15 'prompts=["J3NN13, close-up selfie"]' \
        'loras=[{path: runs/exp4/lora.safetensors, weight: 1.0}]'
    python sample.py model.path=/models/rv51.safetensors model.vae=/models/vae-ft-mse.safetensors ...
    python sample.py -m guidance_scale=4.0,6.0,7.5      # the report's guidance sweep

Writes into the run folder: one PNG per image carrying A1111's `parameters` text (prompt, negative
prompt, steps, sampler, CFG scale, seed, size, model hash, LoRAs and weights), grid.png and
manifest.json. Every setting is checked, and every file found, before the model is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data.images import load_rgb, resize_crop, to_tensor
from experiments.images import a1111_parameters, make_grid, save_png, to_pil
from lora.io import load_lora
from models.checkpoint import file_sha256, model_hash
from models import nhwc_group_norm, sdpa_backend
from models.load import as_dtype, load_model, pick_device, resolve
from models.pipeline import generate
from models.samplers import SAMPLERS
import training.config  # noqa: F401  (registers ${root:})

A1111_SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}


def sdxl_size_conditioning(cfg: DictConfig) -> dict:
    """original_size / crop_top_left / target_size as (h, w) tuples, for SDXL (ignored by SD1.x/2.x)."""
    out = {k: tuple(cfg[k]) for k in ("original_size", "target_size") if cfg.get(k)}
    if cfg.get("crop_top_left"):
        out["crop_top_left"] = tuple(cfg.crop_top_left)
    return out


def check_settings(cfg: DictConfig) -> list[str]:
    """Fail before any loading: bad numbers, unknown sampler, missing files. Returns the prompts."""
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {cfg.guidance_scale}")
    if cfg.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {cfg.sampler!r}: use one of {sorted(SAMPLERS)}")
    if (cfg.height or 0) % 8 or (cfg.width or 0) % 8:
        raise ValueError(f"height and width must be divisible by 8, got {cfg.height}x{cfg.width}")
    if cfg.images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {cfg.images_per_prompt}")
    as_dtype(cfg.dtype)
    for lora in cfg.loras:
        if not Path(to_absolute_path(lora.path)).is_file():
            raise FileNotFoundError(f"LoRA file {lora.path} does not exist")
    if cfg.init_image and not Path(to_absolute_path(cfg.init_image)).is_file():
        raise FileNotFoundError(f"init_image {cfg.init_image} does not exist")
    if cfg.prompts_file:
        f = Path(to_absolute_path(cfg.prompts_file))
        if not f.is_file():
            raise FileNotFoundError(f"prompts_file {f} does not exist")
        prompts = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = list(cfg.prompts)
    if not prompts:
        raise ValueError("no prompts given (prompts=[...] or prompts_file=...)")
    return prompts


def load_init_image(path: str, width: int, height: int) -> torch.Tensor:
    """img2img input through the training data's loader: EXIF, colour modes and bad files handled alike."""
    img, _ = resize_crop(load_rgb(path), width, height)
    return to_tensor(img)[None]                                       # (1, 3, H, W) in [-1, 1]


def triton_kernels_wanted(switch, device: torch.device, dtype: torch.dtype) -> bool:
    """auto: on CUDA with half-precision weights and Triton installed (measured in experiments/bench)."""
    if switch == "auto":
        return device.type == "cuda" and dtype != torch.float32 and nhwc_group_norm.available()
    return bool(switch)


def run(cfg: DictConfig) -> list[dict]:
    prompts = check_settings(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    m = cfg.model
    model_path = resolve(to_absolute_path(m.path) if Path(to_absolute_path(m.path)).exists() else m.path)
    offload = device if cfg.get("offload", False) else None   # the model in host memory, a part at a time on the GPU
    sd = load_model(model_path, dtype=cfg.dtype, device="cpu" if offload else device,
                    vae=m.vae and to_absolute_path(m.vae), config=m.config and to_absolute_path(m.config))
    sd.unet.eval(), sd.vae.eval(), sd.text_encoder.eval()
    lora_info = []
    for lora in cfg.loras:
        path = Path(to_absolute_path(lora.path))
        loaded = load_lora(sd.parts, path, multiplier=float(lora.get("weight", 1.0)))
        lora_info.append({"name": loaded.adapter, "path": str(path), "weight": float(lora.get("weight", 1.0)),
                          "hash": file_sha256(path)[:10], "format": loaded.fmt})
    sdpa_backend.set_policy(cfg.get("sdpa_backend", "auto"))
    if triton_kernels_wanted(cfg.triton_kernels, device, sd.unet.conv_in.weight.dtype):
        sd.set_triton_kernels(True)  # after the LoRAs: their conv weights go channels_last too
    if cfg.get("subpixel_upsample", "auto") is True or (cfg.get("subpixel_upsample", "auto") == "auto"
                                                       and device.type == "cuda"):
        sd.unet.set_subpixel_upsampling(True)   # models/subpixel_upsample.py: the same images, 4/9 of the MACs
        sd.vae.set_subpixel_upsampling(True)
    native = sd.unet.config.sample_size * sd.vae.scale_factor  # what the model was trained at: SD1.5 512, SDXL 1024
    height, width = cfg.height or native, cfg.width or native
    init = load_init_image(to_absolute_path(cfg.init_image), width, height) if cfg.init_image else None
    mhash = model_hash(model_path)
    sampler_name = A1111_SAMPLER_NAMES[cfg.sampler] + (" Karras" if cfg.sampler_options.get("karras") else "")
    lora_tags = "".join(f" <lora:{x['name']}:{x['weight']:g}>" for x in lora_info)

    manifest, tiles = [], []
    bar = tqdm(total=len(prompts) * cfg.steps, desc="sampling", unit="step")
    for i, prompt in enumerate(prompts):
        images = generate(sd, prompt, cfg.negative_prompt, steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                          guidance_rescale=cfg.guidance_rescale, sampler=cfg.sampler,
                          sampler_options=OmegaConf.to_container(cfg.sampler_options), seed=cfg.seed,
                          num_images=cfg.images_per_prompt, height=height, width=width,
                          clip_skip=cfg.clip_skip, long_prompt=cfg.long_prompt, init_image=init,
                          strength=cfg.strength if init is not None else 1.0,
                          callback=lambda *_: bar.update(1), cuda_graph=cfg.get("cuda_graph", True),
                          vae_tiling=cfg.get("vae_tiling", False), offload=offload, decode_slice=1 if offload else None,
                          **sdxl_size_conditioning(cfg))
        for j, image in enumerate(images):
            settings = {"Steps": cfg.steps, "Sampler": sampler_name, "CFG scale": cfg.guidance_scale,
                        "Seed": cfg.seed, "Batch index": j, "Size": f"{width}x{height}",
                        "Model hash": mhash, "Model": Path(str(model_path)).stem,
                        "Clip skip": cfg.clip_skip if cfg.clip_skip > 1 else None,
                        "Denoising strength": cfg.strength if init is not None else None,
                        "Lora hashes": ('"' + ", ".join(f"{x['name']}: {x['hash']}" for x in lora_info) + '"')
                        if lora_info else None}
            name = f"{i:03d}_{j:02d}.png"
            save_png(image, out_dir / name, a1111_parameters(prompt + lora_tags, cfg.negative_prompt, settings))
            tiles.append(to_pil(image))
            manifest.append({"file": name, "prompt": prompt, "negative_prompt": cfg.negative_prompt,
                             "seed": cfg.seed, "batch_index": j, "steps": cfg.steps, "sampler": cfg.sampler,
                             "guidance_scale": cfg.guidance_scale, "width": width, "height": height,
                             "model": str(model_path), "model_hash": mhash, "loras": lora_info})
    bar.close()
    make_grid(tiles, cfg.images_per_prompt).save(out_dir / "grid.png")
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@hydra.main(version_base=None, config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    manifest = run(cfg)
    print(f"wrote {len(manifest)} images to {cfg.out_dir}")


if __name__ == "__main__":
    main()
