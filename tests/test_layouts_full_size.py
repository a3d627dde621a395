"""SDXL base and SD2.1 at full size, on the meta device (shapes and names, no memory): our architectures and our
single-file names against diffusers' and transformers' own, for the real configs (models/sdxl_layout.py,
models/sd2_layout.py)."""
import torch

from models import ldm_keys, openclip_keys, sd2_layout, sdxl_layout, text
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


def test_sd21_unet_and_text_names_match_diffusers():
    """SD2.1: UNet 865,910,724 parameters; the 23-layer ViT-H text encoder (340,387,840) from a published file's
    24 layers, text_projection and logit_scale, as diffusers' converter reads it."""
    from diffusers import UNet2DConditionModel as Ref
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    with torch.device("meta"):
        ref = Ref(**sd2_layout.UNET)
        ours = UNet2DConditionModel(UNetConfig.from_dict(sd2_layout.UNET))
        te = text.build_text_encoder(sd2_layout.TEXT)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 865_910_724
    assert _shapes(ours) == _shapes(ref)
    usd = ours.state_dict()
    to_ldm = ldm_keys.map_keys(usd, ldm_keys.unet_prefix_map(ours.config), ldm_keys.UNET_PREFIX)
    back = convert_ldm_unet_checkpoint({ldm: usd[k] for k, ldm in to_ldm.items()}, dict(ref.config))
    assert set(back) == set(usd)
    assert sum(p.numel() for p in te.parameters()) == 340_387_840
    pub = text.to_published(te.state_dict(), te)
    oc = openclip_keys.from_hf(pub)
    last = {k.replace(".resblocks.0.", ".resblocks.23."): v for k, v in oc.items() if ".resblocks.0." in k}
    published = {sd2_layout.TEXT_PREFIX + k: v for k, v in {**oc, **last}.items()}
    published[sd2_layout.TEXT_PREFIX + "text_projection"] = torch.empty(1024, 1024, device="meta")
    published[sd2_layout.TEXT_PREFIX + "logit_scale"] = torch.empty((), device="meta")
    ours_read = openclip_keys.to_hf({k[len(sd2_layout.TEXT_PREFIX):]: v for k, v in published.items()}, "SD2.1",
                                    num_layers=23, projection=False)
    assert not any(".layers.23." in k for k in ours_read) and "text_projection.weight" not in ours_read
    theirs = convert_open_clip_checkpoint(te, published)  # drops the same keys (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    theirs.pop("text_projection.weight", None)         # (which CLIPTextModel has no place for)
    assert {k: tuple(v.shape) for k, v in ours_read.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert set(ours_read) == set(pub)
