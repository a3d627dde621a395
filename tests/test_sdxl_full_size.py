"""SDXL base at full size, on the meta device (shapes and names, no memory): our architecture and our single-file
names against diffusers' and transformers' own, for the real configs (models/sdxl_layout.py)."""
import torch

from models import ldm_keys, openclip_keys, sdxl_layout, text
from models.unet import UNet2DConditionModel, UNetConfig


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_sdxl_unet_and_its_ldm_names_match_diffusers():
    from diffusers import UNet2DConditionModel as Ref
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        ref = Ref(**sdxl_layout.UNET)
        ours = UNet2DConditionModel(UNetConfig.from_dict(sdxl_layout.UNET))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 2_567_463_684
    assert _shapes(ours) == _shapes(ref)
    # our LDM names for every parameter; diffusers' converter maps them back to the same diffusers names
    usd = ours.state_dict()
    to_ldm = ldm_keys.map_keys(usd, ldm_keys.unet_prefix_map(ours.config), ldm_keys.UNET_PREFIX)
    assert len(to_ldm) == len(usd) and "model.diffusion_model.label_emb.0.0.weight" in to_ldm.values()
    ckpt = {ldm: usd[ours_name] for ours_name, ldm in to_ldm.items()}
    back = convert_ldm_unet_checkpoint(ckpt, dict(ref.config))
    assert set(back) == set(usd)
    assert all(tuple(back[k].shape) == tuple(usd[k].shape) for k in usd)


def test_sdxl_text_encoders_and_openclip_names_match():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    with torch.device("meta"):
        te1 = text.build_text_encoder(sdxl_layout.TEXT1)
        te2 = text.build_text_encoder(sdxl_layout.TEXT2)
        ref2 = CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in sdxl_layout.TEXT2.items()
                                                              if k != "architectures"}))
    assert sum(p.numel() for p in te1.parameters()) == 123_060_480
    assert sum(p.numel() for p in te2.parameters()) == sum(p.numel() for p in ref2.parameters()) == 694_659_840
    pub = text.to_published(te2.state_dict(), te2)
    oc = {sdxl_layout.TEXT2_PREFIX + k: v for k, v in openclip_keys.from_hf(pub).items()}  # meta tensors
    assert oc[sdxl_layout.TEXT2_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    theirs = convert_open_clip_checkpoint(ref2, oc, prefix=sdxl_layout.TEXT2_PREFIX)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {k: tuple(v.shape) for k, v in pub.items()}
