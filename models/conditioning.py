"""Prompts -> what the UNet is conditioned on, for SD1.x/2.x (one text encoder) and SDXL (two).

SD1.x: ctx = CLIP-L's hidden states (B, 77*k, 768) (models/text.py: clip_skip, long prompts).

SDXL (Podell et al. 2023, arXiv:2307.01952, sec. 2.1-2.2; diffusers' StableDiffusionXLPipeline.encode_prompt):
    ctx    = cat(CLIP-L hidden[-(s+1)], bigG hidden[-(s+1)], dim=-1)   (B, 77*k, 768 + 1280 = 2048)
    pooled = bigG's projected EOS embedding (text_embeds)              (B, 1280), of the first 77-token window
    time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)  (B, 6)
with s = clip_skip (1, the default, = the penultimate layer, which every SDXL tool uses, without the final
LayerNorm; diffusers' clip_skip is ours minus 1). The UNet embeds `pooled` and `time_ids` (models/unet.py,
`text_time`). An empty negative prompt is all zeros (ctx and pooled) when the model says
force_zeros_for_empty_prompt, as SDXL base does.
"""
from __future__ import annotations

import torch

from models.text import MAX_LEN, encode_text, tokenize


def is_sdxl(sd) -> bool:
    return sd.text_encoder_2 is not None


def tokenize_prompts(sd, prompts: list[str], long_prompt: str = "truncate") -> list[torch.Tensor]:
    """Prompts -> token ids (B, 77*k), one tensor per text encoder (SDXL's second pads with "!")."""
    toks = [sd.tokenizer] + ([sd.tokenizer_2] if is_sdxl(sd) else [])
    return [tokenize(t, prompts, long_prompt) for t in toks]


def encode_ids(sd, ids: list[torch.Tensor], clip_skip: int = 1) -> dict[str, torch.Tensor]:
    """Token ids (one per encoder) -> {"ctx": (B, 77*k, D)} and, for SDXL, "pooled": (B, P)."""
    if not is_sdxl(sd):
        return {"ctx": encode_text(sd.text_encoder, ids[0], clip_skip)}
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (1 = SDXL's penultimate layer), got {clip_skip}")
    device = next(sd.text_encoder.parameters()).device
    windows, pooled = [], None
    for w1, w2 in zip(ids[0].to(device).split(MAX_LEN, dim=1), ids[1].to(device).split(MAX_LEN, dim=1)):
        h1 = sd.text_encoder(w1, output_hidden_states=True).hidden_states[-(clip_skip + 1)]    # (B, 77, 768)
        out2 = sd.text_encoder_2(w2, output_hidden_states=True)
        h2 = out2.hidden_states[-(clip_skip + 1)]                                               # (B, 77, 1280)
        if pooled is None:
            pooled = out2.text_embeds                                                           # (B, 1280)
        windows.append(torch.cat([h1, h2.to(h1.dtype)], dim=-1))
    return {"ctx": torch.cat(windows, dim=1), "pooled": pooled}


def encode(sd, prompts: list[str], clip_skip: int = 1, long_prompt: str = "truncate") -> dict[str, torch.Tensor]:
    return encode_ids(sd, tokenize_prompts(sd, prompts, long_prompt), clip_skip)


def time_ids(original_hw, crop_top_left, target_hw) -> torch.Tensor:
    """SDXL's size and crop conditioning for one image -> (6,) float32."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)


def added_cond(text: dict[str, torch.Tensor], ids: torch.Tensor | None, dtype: torch.dtype | None = None
               ) -> dict | None:
    """The UNet's added_cond for SDXL ({"text_embeds" in `dtype`, "time_ids"}); None for SD1.x."""
    if "pooled" not in text:
        return None
    if ids is None:
        raise ValueError("SDXL needs time_ids (original size, crop, target size) for each image")
    pooled = text["pooled"] if dtype is None else text["pooled"].to(dtype)
    return {"text_embeds": pooled, "time_ids": ids.to(pooled.device)}
