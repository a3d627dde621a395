"""Our AutoencoderKL equals diffusers' on the same random weights: encode (mean, logvar, sample) and decode."""
import torch

from conftest import diffusers_vae
from models.checkpoint import load_strict
from models.vae import AutoencoderKL, VAEConfig

TOL = 1e-5


def ours_from(ref):
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    load_strict(ours, ref.state_dict(), "diffusers VAE")
    return ours.eval()


def test_encode_matches_diffusers():
    ref = diffusers_vae()
    ours = ours_from(ref)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode(x)
        assert want.mean.abs().max() > 0.1
        assert (got.mean - want.mean).abs().max() <= TOL
        assert (got.logvar - want.logvar).abs().max() <= TOL
        s_want = want.sample(generator=torch.Generator().manual_seed(3))
        s_got = got.sample(generator=torch.Generator().manual_seed(3))
        assert (s_got - s_want).abs().max() <= TOL
        assert got.mean.shape == (2, 4, 16, 16)


def test_decode_matches_diffusers_and_slicing():
    ref = diffusers_vae()
    ours = ours_from(ref)
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours.decode(z)
        assert want.abs().max() > 0.1
        assert (got - want).abs().max() <= TOL
        # one image at a time: the same maths, other conv kernels (batch 1), so a float tolerance
        assert (ours.decode(z, slice_size=1) - got).abs().max() <= 1e-4


def test_decode_with_subpixel_upsampling_matches_diffusers(monkeypatch):
    """models/subpixel_upsample.py: the decoder's upsamplers as 2x2 convs on their inputs, the same images."""
    from models import subpixel_upsample as sp
    from triton_helpers import count_calls
    monkeypatch.setattr(sp, "MIN_PIXELS", 1)
    monkeypatch.setattr(sp, "upsample_conv", sp.upsample_conv)   # restored after count_calls' wrapper
    ref = diffusers_vae()
    ours = ours_from(ref)
    ours.set_subpixel_upsampling(True)
    calls = count_calls(sp, "upsample_conv")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref.decode(z).sample, ours.decode(z)
    assert calls.get("n", 0) == sum(len(b.upsamplers or []) for b in ref.decoder.up_blocks) > 0
    assert (got - want).abs().max() <= TOL * 10


def test_scaling_factor_applied_both_ways():
    ref = diffusers_vae()
    ours = ours_from(ref)
    assert ours.config.scaling_factor == 0.18215
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        lat = ours.encode_latents(x, sample=False)
        assert torch.allclose(lat, ref.encode(x).latent_dist.mean * 0.18215, atol=1e-6)
        assert torch.allclose(ours.decode_latents(lat), ref.decode(lat / 0.18215).sample, atol=TOL)


def test_tiled_decode_equals_diffusers_tiling():
    """Tiles of sample_size (32 px = 16 latents here), stepped by 3/4, seams blended over 1/4: diffusers'
    enable_tiling() images exactly, and close to (not equal to) one whole decode."""
    from conftest import diffusers_vae

    from models.vae import AutoencoderKL, VAEConfig
    from models.vae_tiling import tiled_decode
    ref = diffusers_vae()
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    z = torch.randn(2, 4, 40, 28, generator=torch.Generator().manual_seed(0))  # 3 x 2 tiles, ragged edges
    ref.enable_tiling()
    with torch.no_grad():
        want = ref.decode(z).sample
        whole = ours.decode(z)
    got = tiled_decode(ours, z)
    assert got.shape == want.shape == (2, 3, 80, 56)
    assert (got - want).abs().max() <= 1e-5
    assert 1e-4 < (got - whole).abs().max()          # the tiles' GroupNorms differ from the whole image's ...
    assert (got - whole).abs().mean() < 0.5 * whole.abs().mean()  # ... but it is the same picture
    small = z[:, :, :16, :16]                          # one tile: decoded whole
    assert torch.equal(tiled_decode(ours, small), ours.decode(small))
    scaled = ours.decode_latents(z * ours.config.scaling_factor, slice_size=1, tiled=True)
    assert (scaled - want).abs().max() <= 1e-5 * want.abs().max()  # (z * s / s: float rounding, |image| ~ 12)


def test_vae_convolutions_take_cudnns_heuristic_choice_and_restore_the_flag(monkeypatch):
    """models/vae.heuristic_convs: no timed algorithm search inside encode and decode (it once allocated 64.6 GiB of
    workspace for one fp32 convolution at 1024x1024), and the trainer's cudnn.benchmark setting is back after."""
    ours = ours_from(diffusers_vae())
    seen = []
    for m in ours.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args: seen.append(torch.backends.cudnn.benchmark))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with torch.no_grad():
        z = ours.encode(torch.rand(1, 3, 32, 32) * 2 - 1).mode()
        assert torch.backends.cudnn.benchmark
        ours.decode(z)
    n = sum(isinstance(m, torch.nn.Conv2d) for m in ours.modules())
    assert len(seen) == n and not any(seen) and torch.backends.cudnn.benchmark
    from models import vae as vae_mod
    ours.search_convs = True                  # train.vae_conv_search: the trainer's flag stands inside, for images
    pixels = 32 * 32                          # of up to SEARCH_MAX_PIXELS (z decodes to 32x32)
    for limit, searched in ((pixels, True), (pixels - 1, False)):
        monkeypatch.setattr(vae_mod, "SEARCH_MAX_PIXELS", limit)
        seen.clear()
        with torch.no_grad():
            ours.decode(z)
        assert len(seen) == n - sum(isinstance(m, torch.nn.Conv2d) for m in ours.encoder.modules()) - 1  # no quant
        assert all(s is searched for s in seen) and torch.backends.cudnn.benchmark
    monkeypatch.setattr(vae_mod, "SEARCH_MAX_PIXELS", pixels)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # and it never turns the search on by itself
    seen.clear()
    with torch.no_grad():
        ours.decode(z)
    assert seen and not any(seen)


def test_encoder_and_decoder_blocks_free_their_inputs_without_grad():
    """Without grad nothing outside a VAE block keeps its input alive once its first resnet has run (each
    block takes it out of a list; a plain argument stayed referenced by the caller and Module.__call__):
    at SDXL's 1024x1024 in fp32 that held 0.5 GiB through the encoder's first block."""
    import weakref
    ref = diffusers_vae()
    ours = ours_from(ref)
    inputs, dead = {}, {}
    for blk in [*ours.encoder.down_blocks, *ours.decoder.up_blocks]:
        after_first = [*blk.resnets[1:], *getattr(blk, "downsamplers", []), *getattr(blk, "upsamplers", [])]
        if not after_first:
            continue
        blk.register_forward_pre_hook(lambda m, args: inputs.__setitem__(
            id(m), weakref.ref(args[0][0] if isinstance(args[0], list) else args[0])))
        after_first[0].register_forward_pre_hook(
            lambda m, args, b=blk: dead.__setitem__(id(b), inputs[id(b)]() is None))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x).mean
        got, want = ours.decode(z), ref.decode(z).sample
    assert (got - want).abs().max() <= TOL
    assert len(dead) == len(inputs) >= 3 and all(dead.values()), dead
