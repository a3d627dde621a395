"""OpenCLIP text-tower names (SDXL single files, `conditioner.embedders.1.model.*`) <-> transformers' CLIP names.

The rules, as diffusers' loaders/single_file_utils.py (convert_open_clip_checkpoint) and
DIFFUSERS_TO_LDM_MAPPING["openclip"] state them:
    token_embedding.weight                 <-> text_model.embeddings.token_embedding.weight
    positional_embedding                   <-> text_model.embeddings.position_embedding.weight
    transformer.resblocks.{i}.ln_1 / ln_2  <-> text_model.encoder.layers.{i}.layer_norm1 / layer_norm2
    ...attn.in_proj_weight (3D, D)         <-> ...self_attn.{q,k,v}_proj.weight, stacked q, k, v
    ...attn.in_proj_bias (3D,)             <-> ...self_attn.{q,k,v}_proj.bias
    ...attn.out_proj                       <-> ...self_attn.out_proj
    ...mlp.c_fc / mlp.c_proj               <-> ...mlp.fc1 / mlp.fc2
    ln_final                               <-> text_model.final_layer_norm
    text_projection (D, P)                 <-> text_projection.weight (P, D): transposed (x @ P vs Linear)
`logit_scale` (CLIP's contrastive temperature) has no part in the text model and is dropped.
"""
from __future__ import annotations

import re

import torch

_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
IGNORED = ("logit_scale",)


def to_hf(sd: dict[str, torch.Tensor], source: str = "checkpoint", num_layers: int | None = None,
          projection: bool = True) -> dict[str, torch.Tensor]:
    """OpenCLIP names (prefix removed) -> CLIPTextModelWithProjection's published names. Unknown keys raise.
    num_layers: keep the first n blocks only; projection=False: drop text_projection. SD2.x reads the penultimate
    layer, so its published text_encoder/ (a CLIPTextModel) has 23 of ViT-H's 24 blocks and no projection, as
    diffusers' SD_2_TEXT_ENCODER_KEYS_TO_IGNORE leaves them out."""
    out = {}
    for k, v in sd.items():
        if k in IGNORED:
            continue
        if k in _TOP:
            out[_TOP[k]] = v
        elif k == "text_projection":
            if projection:
                out["text_projection.weight"] = v.T.contiguous()
        elif (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)) and num_layers is not None \
                and int(m.group(1)) >= num_layers:
            continue
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", k):
            i, part, kind = m.groups()
            if part in _BLOCK:
                out[f"text_model.encoder.layers.{i}.{_BLOCK[part]}.{kind}"] = v
            else:
                raise KeyError(f"{source}: unknown OpenCLIP text key {k!r}")
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", k):
            i, kind = m.groups()
            for name, t in zip("qkv", v.chunk(3, dim=0)):                 # (3D, D) -> 3 x (D, D)
                out[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = t.contiguous()
        else:
            raise KeyError(f"{source}: unknown OpenCLIP text key {k!r}")
    return out


def from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection's published names -> OpenCLIP names (the inverse of to_hf)."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, qkv = {}, {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            i, name, kind = m.groups()
            qkv.setdefault((i, kind), {})[name] = v
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            i, part, kind = m.groups()
            out[f"transformer.resblocks.{i}.{block[part]}.{kind}"] = v
        elif k != "text_model.embeddings.position_ids":
            raise KeyError(f"no OpenCLIP name for {k!r}")
    for (i, kind), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[n] for n in "qkv"])
    return out
