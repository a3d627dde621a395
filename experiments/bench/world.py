"""The benchmark's inputs: an SD1.5-size model with random weights (speed does not depend on the
values) written as a diffusers folder, and a folder of 512x512 images with captions.

Both sides of every comparison load this one folder: ours through models.load, the baseline through
diffusers' from_pretrained.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTIONS = ["J3NN13, close-up, smile, photo of a woman", "J3NN13, wide shot, outdoors, glasses",
            "J3NN13, portrait, studio light", "J3NN13, three-quarter view, long hair"]


def sd15_folder(root: Path, dtype=torch.float16) -> Path:
    """SD1.5's architecture (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text 123M parameters), random weights."""
    folder = root / "sd15-random"
    if (folder / "model_index.json").exists():
        return folder
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.load import StableDiffusion, save_diffusers_folder
    from models.text import load_tokenizer
    from models.unet import UNet2DConditionModel
    from models.vae import AutoencoderKL
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        unet, vae = UNet2DConditionModel(), AutoencoderKL()
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                          hidden_act="quick_gelu", projection_dim=768))
    with torch.no_grad():  # keep fp16 activations finite: a trained UNet's output is about unit scale
        unet.conv_out.weight.mul_(0.1)
    sd = StableDiffusion(unet, vae, te, load_tokenizer())
    sd.scheduler_config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                           "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1,
                           "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon"}
    save_diffusers_folder(sd, folder, dtype=dtype)
    return folder


def sdxl_folder(root: Path, tiny: bool = False, dtype=torch.float16) -> Path:
    """SDXL base's architecture (UNet 2,567M, VAE 83.7M, CLIP-L 123M and OpenCLIP bigG 695M parameters; or, tiny,
    the test suite's shapes), random weights, as a diffusers folder."""
    folder = root / ("sdxl-tiny-random" if tiny else "sdxl-random")
    if (folder / "model_index.json").exists():
        return folder
    from models import sdxl_layout, text
    from models.load import StableDiffusion, save_diffusers_folder
    from models.unet import UNet2DConditionModel, UNetConfig
    from models.vae import AutoencoderKL, VAEConfig
    ucfg, vcfg = dict(sdxl_layout.UNET), dict(sdxl_layout.VAE)
    t1, t2 = dict(sdxl_layout.TEXT1), dict(sdxl_layout.TEXT2)
    if tiny:  # as tests/conftest.py's tiny SDXL
        ucfg.update(block_out_channels=[32, 64], cross_attention_dim=32, attention_head_dim=[2, 4],
                    transformer_layers_per_block=[1, 2], addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=8,
                    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
        vcfg.update(block_out_channels=[32, 64], layers_per_block=1, sample_size=32)
        t1.update(hidden_size=12, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2, projection_dim=12)
        t2.update(hidden_size=20, intermediate_size=37, num_hidden_layers=4, num_attention_heads=2, projection_dim=32)
        dtype = torch.float32
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    with torch.device(dev):
        unet, vae = UNet2DConditionModel(UNetConfig.from_dict(ucfg)), AutoencoderKL(VAEConfig.from_dict(vcfg))
        te1, te2 = text.build_text_encoder(t1), text.build_text_encoder(t2)
    with torch.no_grad():  # keep fp16 activations finite: a trained UNet's output is about unit scale
        unet.conv_out.weight.mul_(0.1)
    sd = StableDiffusion(unet, vae, te1, text.load_tokenizer(), text_encoder_2=te2,
                         tokenizer_2=text.load_tokenizer(pad_token=text.SDXL_PAD_TOKEN_2),
                         force_zeros_for_empty_prompt=True)
    sd.scheduler_config = dict(sdxl_layout.SCHEDULER)
    save_diffusers_folder(sd, folder, dtype=dtype)
    return folder


def image_folder(root: Path, n: int = 16, size: int = 512) -> Path:
    folder = root / f"images{size}"
    if folder.exists() and len(list(folder.glob("*.png"))) == n:
        return folder
    (folder / "captions" / "v4").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(a).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
        (folder / "captions" / "v4" / f"{i:03d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    (folder / "info.json").write_text(json.dumps({"n": n, "size": size}))
    return folder
