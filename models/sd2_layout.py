"""SD2.x's published layout: its single-file text prefix and SD2.1's component configs.

Single files (Stability's ldm `LatentDiffusion` with FrozenOpenCLIPEmbedder):
    model.diffusion_model.*       the UNet, LDM names (models/ldm_keys.py)
    first_stage_model.*           the VAE, LDM names
    cond_stage_model.model.*      OpenCLIP ViT-H/14's text tower, OpenCLIP names (models/openclip_keys.py: its
                                  last block and projection are left out, as SD2's text_encoder/ has neither)
The configs are stabilityai/stable-diffusion-2-1's (768x768, v-prediction), used when a single file comes without
`config=<diffusers folder>`: the weights cannot tell 2.1 from 2.1-base (512, epsilon), and diffusers assumes 2.1
as well. The tokenizer pads with "!".
"""
from __future__ import annotations

TEXT_PREFIX = "cond_stage_model.model."
PAD_TOKEN = "!"

UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True, sample_size=96,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512, bos_token_id=0,
            eos_token_id=2, pad_token_id=1)
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "set_alpha_to_one": False,
             "skip_prk_steps": True, "clip_sample": False, "prediction_type": "v_prediction", "trained_betas": None}

