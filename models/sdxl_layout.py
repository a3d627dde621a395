"""SDXL base 1.0's published layout: its single-file prefixes and its components' configs.

Single files (Stability's sgm `DiffusionEngine`, what A1111 and ComfyUI load):
    model.diffusion_model.*                 the UNet, LDM names (models/ldm_keys.py; label_emb = add_embedding)
    first_stage_model.*                     the VAE, LDM names
    conditioner.embedders.0.transformer.*   CLIP ViT-L/14 text tower, transformers' names (`text_model.*`)
    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG/14 text tower, OpenCLIP names (models/openclip_keys.py)
The configs are stabilityai/stable-diffusion-xl-base-1.0's unet/, vae/, text_encoder*/ and scheduler/ JSON files,
used when a single file comes without `config=<diffusers folder>`.
"""
from __future__ import annotations

import json
from pathlib import Path

from models import text
from models.unet import UNetConfig
from models.vae import VAEConfig

TEXT1_PREFIX = "conditioner.embedders.0.transformer."
TEXT2_PREFIX = "conditioner.embedders.1.model."

UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, sample_size=128, norm_num_groups=32,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
# The VAE's decoder overflows in fp16 (force_upcast: decode in fp32); latents are scaled by 0.13025.
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=1024,
           scaling_factor=0.13025, force_upcast=True)
TEXT1 = dict(text.SD15_TEXT_CONFIG)  # the same CLIP ViT-L/14 text tower as SD1.x
TEXT2 = dict(text.SDXL_TEXT2_CONFIG)
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
             "interpolation_type": "linear", "use_karras_sigmas": False, "set_alpha_to_one": False,
             "skip_prk_steps": True, "clip_sample": False, "prediction_type": "epsilon", "trained_betas": None}


def component_configs(config: str | Path | None, read_config) -> tuple[UNetConfig, VAEConfig, dict, dict]:
    """-> (UNet config, VAE config, {"text_encoder": .., "text_encoder_2": ..}, scheduler config): SDXL base's,
    or those of the diffusers folder `config` (a fine-tune with another architecture)."""
    if config is None:
        return (UNetConfig.from_dict(UNET, "SDXL base"), VAEConfig.from_dict(VAE, "SDXL base"),
                {"text_encoder": dict(TEXT1), "text_encoder_2": dict(TEXT2)}, dict(SCHEDULER))
    c = Path(config)
    sched = c / "scheduler" / "scheduler_config.json"
    return (UNetConfig.from_dict(read_config(c / "unet"), str(c / "unet")),
            VAEConfig.from_dict(read_config(c / "vae"), str(c / "vae")),
            {"text_encoder": read_config(c / "text_encoder"), "text_encoder_2": read_config(c / "text_encoder_2")},
            json.loads(sched.read_text()) if sched.is_file() else dict(SCHEDULER))
