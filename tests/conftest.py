"""Shared fixtures: tiny random Stable Diffusion parts built with diffusers and transformers (oracles).

Only tests import diffusers and peft. Each fixture builds small configs of the real architectures
and fills every parameter with random values, so no comparison can pass on zero-initialised layers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

TEXT_DIM = 32

UNET_CONFIGS = {
    # SD1.x layout: conv proj_in/out, one head count for all blocks, 2 resnets per block.
    "sd15": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=TEXT_DIM,
                 attention_head_dim=8, norm_num_groups=32, sample_size=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD2.x options: linear projections, per-block head counts, upcast attention, 1 resnet per block.
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=TEXT_DIM,
                attention_head_dim=(2, 4, 8), use_linear_projection=True, upcast_attention=True,
                norm_num_groups=32, sample_size=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL options: deeper transformers per block, pooled-text + size conditioning (text_time).
    # cross_attention_dim = the two text encoders' widths together (12 + 20, as 768 + 1280 = 2048);
    # the added embedding takes the pooled text (32) and six 8-wide time-id embeddings.
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=TEXT_DIM,
                 attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8, norm_num_groups=32, sample_size=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}
VAE_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                  sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=TEXT_DIM)

SDXL_TEXT_CONFIGS = (  # CLIP-L's and OpenCLIP bigG's shapes, small: their widths (12 + 20) add up to TEXT_DIM and
    # differ, as 768 and 1280 do (diffusers' single-file reader tells the two encoders apart by width)
    dict(TEXT_CONFIG, hidden_size=12, num_attention_heads=2, projection_dim=12),
    dict(TEXT_CONFIG, hidden_size=20, num_attention_heads=2, projection_dim=TEXT_DIM, hidden_act="gelu",
         num_hidden_layers=4))


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (GroupNorm/LayerNorm weights near 1), deterministic by seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)
    return module


def diffusers_unet(kind: str = "sd15", seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**UNET_CONFIGS[kind]), seed).eval()


def diffusers_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return randomize(AutoencoderKL(**VAE_CONFIG), seed).eval()


def hf_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return randomize(CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)), seed, scale=0.05).eval()


@pytest.fixture(scope="session")
def tiny_diffusers_folder(tmp_path_factory):
    """A tiny SD1.x pipeline written by diffusers' own save_pretrained."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from models.text import load_tokenizer
    folder = tmp_path_factory.mktemp("tiny_sd") / "model"
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=diffusers_unet("sd15"), vae=diffusers_vae(), text_encoder=hf_text_encoder(),
                                   tokenizer=load_tokenizer(), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def hf_sdxl_text_encoders(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    one = randomize(CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_CONFIGS[0])), seed, scale=0.05).eval()
    two = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_CONFIGS[1])), seed + 1, scale=0.05)
    return one, two.eval()


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """A tiny SDXL pipeline written by diffusers' own save_pretrained (force_zeros_for_empty_prompt, as SDXL base)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from models.text import SDXL_PAD_TOKEN_2, load_tokenizer
    folder = tmp_path_factory.mktemp("tiny_sdxl") / "model"
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    te1, te2 = hf_sdxl_text_encoders()
    vae = diffusers_vae()
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(unet=diffusers_unet("sdxl"), vae=vae, text_encoder=te1, text_encoder_2=te2,
                                     tokenizer=load_tokenizer(), tokenizer_2=load_tokenizer(pad_token=SDXL_PAD_TOKEN_2),
                                     scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """8 images 16x16: a red square at a fixed place for the subject; captions in v1/v4."""
    root = tmp_path_factory.mktemp("data") / "subject"
    for v in ("v1", "v4"):
        (root / "captions" / v).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        a = (rng.random((16, 16, 3)) * 60 + 40).astype(np.uint8)
        a[4:12, 4:12] = (220, 30, 30)
        Image.fromarray(a).save(root / f"{i:02d}.png")
        (root / "captions" / "v1" / f"{i:02d}.txt").write_text("J3NN13")
        (root / "captions" / "v4" / f"{i:02d}.txt").write_text(f"J3NN13, close-up, tag{i % 3}")
    return root
