"""Our UNet equals diffusers' UNet2DConditionModel on the same random weights (fp32, max |diff| <= 1e-5)."""
import pytest
import torch

from conftest import TEXT_DIM, UNET_CONFIGS, diffusers_unet
from models.checkpoint import load_strict
from models.unet import UNet2DConditionModel, UNetConfig, timestep_embedding

TOL = 1e-5


def ours_from(ref):
    ours = UNet2DConditionModel(UNetConfig.from_dict(dict(ref.config)))
    load_strict(ours, ref.state_dict(), "diffusers UNet")
    return ours.eval()


def inputs(kind, size=8, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 77, TEXT_DIM, generator=g)
    t = torch.tensor([10, 980])[:batch]
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(batch, TEXT_DIM, generator=g),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return x, t, ctx, added


def run_ref(ref, x, t, ctx, added):
    kw = {"added_cond_kwargs": added} if added else {}
    return ref(x, t, encoder_hidden_states=ctx, **kw).sample


@pytest.mark.parametrize("kind", list(UNET_CONFIGS))
def test_unet_matches_diffusers(kind):
    ref = diffusers_unet(kind)
    ours = ours_from(ref)
    x, t, ctx, added = inputs(kind)
    with torch.no_grad():
        want = run_ref(ref, x, t, ctx, added)
        got = ours(x, t, ctx, added)
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert (got - want).abs().max() <= TOL


def test_unet_odd_latent_size_matches_diffusers():
    """Latents not divisible by 2**levels: each upsampler is told its output size."""
    ref = diffusers_unet("sd2")
    ours = ours_from(ref)
    x, t, ctx, added = inputs("sd2", size=9)
    with torch.no_grad():
        assert (ours(x, t, ctx) - run_ref(ref, x, t, ctx, None)).abs().max() <= TOL


def test_unet_scalar_timestep_broadcasts():
    ref = diffusers_unet("sd15")
    ours = ours_from(ref)
    x, _, ctx, _ = inputs("sd15")
    with torch.no_grad():
        assert torch.allclose(ours(x, 500, ctx), ours(x, torch.tensor([500, 500]), ctx))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_gradient_checkpointing_same_output_and_grads(kind, monkeypatch):
    """Also what is recomputed as one unit: each resnet; a transformer of one block whole, and each block of a
    transformer of several (the tiny SDXL's second level has two), never both."""
    import models.unet as U
    ref = diffusers_unet(kind)
    ours, ckpt = ours_from(ref), ours_from(ref)
    ckpt.set_gradient_checkpointing(True)
    units = []
    monkeypatch.setattr(U, "checkpoint", lambda fn, *a, **kw: (units.append(fn), torch.utils.checkpoint.checkpoint(
        fn, *a, **kw))[1])
    transformers = [m for m in ckpt.modules() if isinstance(m, U.Transformer2DModel)]
    ours.train(), ckpt.train()
    ref.train(), ref.enable_gradient_checkpointing()
    x, t, ctx, added = inputs(kind)
    outs, grads = [], []
    for m in (ours, ckpt):
        m.zero_grad()
        y = m(x, t, ctx, added)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for _, p in sorted(m.named_parameters())]))
    ref_y = run_ref(ref, x, t, ctx, added)
    ref_y.square().mean().backward()
    ref_g = torch.cat([p.grad.flatten() for _, p in sorted(ref.named_parameters())])
    assert (outs[1] - outs[0]).abs().max() <= TOL
    assert (outs[1] - ref_y.detach()).abs().max() <= TOL
    assert (grads[1] - grads[0]).abs().max() <= 1e-5
    assert (grads[1] - ref_g).abs().max() <= 1e-5
    assert grads[0].abs().max() > 0
    resnets = [m for m in ckpt.modules() if isinstance(m, U.ResnetBlock2D)]
    whole = [t for t in transformers if len(t.transformer_blocks) == 1]
    blocks = [b for t in transformers if len(t.transformer_blocks) > 1 for b in t.transformer_blocks]
    assert sorted(map(id, units)) == sorted(map(id, resnets + whole + blocks))
    assert bool(blocks) == (kind == "sdxl")


def test_checkpointed_transformer_blocks_replay_kept_lora_dropout_masks():
    """SDXL's two-block transformer recomputed block by block, with the LoRA dropout masks kept from the forward
    (as a checkpointed step inside a CUDA graph keeps them, lora/mask_replay.py): the same output and LoRA
    gradients as without checkpointing; a mask replayed out of order would change both."""
    from lora import mask_replay
    from lora.inject import inject_lora, lora_parameters
    ref = diffusers_unet("sdxl")
    x, t, ctx, added = inputs("sdxl")
    runs = []
    for ckpt in (False, True):
        unet = ours_from(ref)
        torch.manual_seed(1)
        inject_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=4, dropout=0.3)
        for n, p in unet.named_parameters():
            if "lora.default.up" in n:
                p.data.normal_(0, 0.1)
        unet.train()
        if ckpt:
            unet.set_gradient_checkpointing(True, preserve_rng_state=False, context_fn=mask_replay.context_fn)
        torch.manual_seed(2)
        mask_replay.clear()
        with mask_replay.recording():
            y = unet(x, t, ctx, added)
        y.square().mean().backward()
        assert not ckpt or mask_replay.pending() == 0      # every kept mask taken back by the recomputation
        mask_replay.clear()
        runs.append((y.detach(), [p.grad.clone() for p in lora_parameters(unet)]))
    (y0, g0), (y1, g1) = runs
    assert torch.allclose(y0, y1, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(g0, g1))
    assert max(float(g.abs().max()) for g in g0) > 0


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 250.5, 999])
    for flip, shift, dim in [(True, 0, 320), (False, 1, 33)]:
        want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.allclose(timestep_embedding(t, dim, flip, shift), want, atol=1e-6)


def test_unsupported_config_option_is_named():
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_dict({"class_embed_type": "timestep"}, "x/unet/config.json")
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_dict({"down_block_types": ["SimpleCrossAttnDownBlock2D"]})


def test_module_names_are_diffusers_names():
    ours = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS["sd15"]))
    names = dict(ours.named_modules())
    for n in ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
              "down_blocks.0.attentions.0.proj_in", "up_blocks.1.resnets.0.conv_shortcut",
              "down_blocks.0.downsamplers.0.conv", "mid_block.attentions.0.proj_out"]:
        assert n in names, n



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU autocast leaves interpolate alone)")
def test_upsampling_stays_in_half_precision_under_cuda_autocast():
    """Nearest upsampling copies values: under CUDA autocast (which runs it in fp32) it must not turn a bf16
    activation into fp32 for the conv after it (fp32 kernels and copies in the batch-8 profile), and the
    result is the one without autocast."""
    from models.blocks import Upsample2D
    torch.manual_seed(0)
    up = Upsample2D(8).to("cuda", torch.bfloat16)
    seen = []
    up.conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    x = torch.randn(2, 8, 4, 4, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.nn.functional.interpolate(x, scale_factor=2.0).dtype == torch.float32  # what autocast does
        y = up(x)
    assert seen == [torch.bfloat16] and torch.equal(y, up(x))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_projections_computed_ahead_give_the_same_output_and_grads(kind, monkeypatch):
    """models/ahead.py (UNet.set_ahead): the cross-attentions' k/v (with LoRA on to_k/to_v) and the resnets' timestep
    projections computed before the blocks and taken by them give the inline UNet's output and gradients; every
    value is taken, none outlives the forward; gradient checkpointing turns it off. On a CPU, computed in place
    (`on_cpu`); tests/test_fast_paths.py runs the side stream on CUDA."""
    from lora.inject import inject_lora
    from models import ahead
    monkeypatch.setattr(ahead, "on_cpu", True)
    ref = diffusers_unet(kind)
    ours = ours_from(ref).train()
    inject_lora(ours, ["to_k", "to_v"], rank=2, alpha=2)
    for name, p in ours.named_parameters():
        p.requires_grad_("lora" in name)
        if "up" in name:
            torch.nn.init.normal_(p, std=0.1)   # B non-zero: the LoRA term counts
    taken = []
    real = ahead.take
    monkeypatch.setattr(ahead, "take", lambda m: (lambda v: (taken.append(v is not None), v)[1])(real(m)))
    x, t, ctx, added = inputs(kind)
    outs = []
    for on in (False, True):
        ours.set_ahead(on)
        ours.zero_grad()
        y = ours(x, t, ctx, added)
        y.square().mean().backward()
        outs.append((y.detach(), [p.grad.clone() for p in ours.parameters() if p.requires_grad]))
    resnets, attns = ours._ahead_modules
    assert sum(taken) == len(resnets) + len(attns) > 0 and len(attns) > 0
    assert all(m.__dict__.get("ahead") is None for m in resnets + attns)
    assert (outs[0][0] - outs[1][0]).abs().max() <= 1e-6
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(outs[0][1], outs[1][1])) and outs[1][1][0].abs().max() > 0
    taken.clear()
    ours.set_gradient_checkpointing(True)
    ours(x, t, ctx, added)
    assert not any(taken)
