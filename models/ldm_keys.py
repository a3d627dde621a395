"""Key maps between our (diffusers) parameter names and single-file LDM checkpoint names.

Derived from the model config rather than written out, so any layers_per_block or block count maps.
The independent oracle in the tests is diffusers' loaders/single_file_utils.py
(convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint). ANCHORS.md lists the rules:

UNet (`model.diffusion_model.`): input_blocks.{i*(L+1)+j+1}.0 <- down_blocks.i.resnets.j, .1 <- attentions.j;
input_blocks.{(i+1)*(L+1)}.0.op <- down_blocks.i.downsamplers.0.conv; middle_block.{0,1,2};
output_blocks.{i*(L+1)+j}.{0,1}; the upsampler at output_blocks.{i*(L+1)+L}.{1 or 2}.conv; resnet parts
in_layers.{0,2} / emb_layers.1 / out_layers.{0,3} / skip_connection.
VAE (`first_stage_model.`): down.i.block.j, down.i.downsample; decoder up.{n-1-i} (reversed);
mid.block_{1,2}, mid.attn_1.{norm,q,k,v,proj_out} (1x1 convs there, Linear here); nin_shortcut.
Text (`cond_stage_model.transformer.`): the published `text_model.*` names.
"""
from __future__ import annotations

from models.unet import UNetConfig
from models.vae import VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(ours: str, ldm: str, parts: dict) -> dict:
    return {f"{ours}.{a}": f"{ldm}.{b}" for a, b in parts.items()}


def unet_prefix_map(cfg: UNetConfig) -> dict[str, str]:
    """Module prefix (ours) -> module prefix (LDM, without `model.diffusion_model.`)."""
    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if cfg.addition_embed_type == "text_time":
        m.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(L):
            k = i * (L + 1) + j + 1
            m.update(_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0", _UNET_RESNET))
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (L + 1)}.0.op"
    m.update(_resnet("mid_block.resnets.0", "middle_block.0", _UNET_RESNET))
    m["mid_block.attentions.0"] = "middle_block.1"
    m.update(_resnet("mid_block.resnets.1", "middle_block.2", _UNET_RESNET))
    for i, kind in enumerate(cfg.up_block_types):
        attn = kind.startswith("CrossAttn")
        for j in range(L + 1):
            k = i * (L + 1) + j
            m.update(_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0", _UNET_RESNET))
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < n - 1:
            m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (L + 1) + L}.{2 if attn else 1}.conv"
    return m


def vae_prefix_map(cfg: VAEConfig) -> dict[str, str]:
    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        m.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                  f"{side}.conv_norm_out": f"{side}.norm_out"})
        m.update(_resnet(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET))
        m.update(_resnet(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET))
        m.update({f"{side}.mid_block.attentions.0.{a}": f"{side}.mid.attn_1.{b}" for a, b in _VAE_ATTN.items()})
    for i in range(n):
        for j in range(L):
            m.update(_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(L + 1):
            m.update(_resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}", _VAE_RESNET))
        m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    return m


def map_keys(keys, prefix_map: dict[str, str], ldm_prefix: str, source: str = "model") -> dict[str, str]:
    """Our full parameter keys -> LDM keys, by the longest module prefix that matches."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in prefix_map:
                out[key] = ldm_prefix + prefix_map[head] + "." + ".".join(parts[cut:])
                break
        else:
            raise KeyError(f"{source}: no LDM name for parameter {key!r} (key map incomplete)")
    return out


def ema_key(ldm_unet_key: str) -> str:
    """`model.diffusion_model.a.b.weight` -> `model_ema.diffusion_modelabweight` (LitEma drops the dots)."""
    return EMA_PREFIX + ldm_unet_key.removeprefix("model.").replace(".", "")


def is_vae_attention_conv(ldm_key: str) -> bool:
    """LDM's VAE mid attention q/k/v/proj_out are 1x1 convs: weights (C, C, 1, 1) vs our Linear (C, C)."""
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and not ldm_key.endswith("norm.weight")
