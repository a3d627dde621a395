"""Full-size SD1.5 UNet (859,520,964 parameters, random weights): one forward equals diffusers'."""
import pytest
import torch

from models.checkpoint import load_strict
from models.unet import UNet2DConditionModel, UNetConfig

pytestmark = pytest.mark.slow


def test_sd15_unet_full_size_matches_diffusers():
    from diffusers import UNet2DConditionModel as Ref
    torch.manual_seed(0)
    ref = Ref(cross_attention_dim=768).eval()  # diffusers' defaults are SD1.5's but for the text width
    n = sum(p.numel() for p in ref.parameters())
    assert n == 859_520_964
    ours = UNet2DConditionModel(UNetConfig())
    assert sum(p.numel() for p in ours.parameters()) == n
    load_strict(ours, ref.state_dict(), "diffusers SD1.5 UNet")
    ours.eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        want = ref(x, 321, encoder_hidden_states=ctx).sample
        del ref
        got = ours(x, 321, ctx)
    assert want.abs().max() > 0.01
    assert (got - want).abs().max() <= 1e-4, (got - want).abs().max()
