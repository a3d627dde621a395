"""The speed switches give the eager step's numbers: no host sync path, logging every k steps,
channels_last, torch.compile (CPU), and on a GPU the CUDA-graphed training step and sampler."""
import pytest
import torch
from test_train import lora_file, make_cfg

from training.loop import Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def _losses(folder, data, run, *extra, prepare=None):
    tr = Trainer(make_cfg(folder, data, run, *extra))
    if prepare:
        prepare(tr)
    out = [tr.optimizer_step() for _ in range(4)]
    return tr, [r["loss"] for r in out], [p.detach().clone() for p in tr.params]


def _close(a, b, tol, lr=1e-3):
    """LoRA weights after a few AdamW steps (lr 1e-3): Adam normalises each gradient, so a last-bit change of
    a near-zero gradient can move an element by up to lr (seen on an H100 in fp32: 1 element of 14,080 off by
    2.8e-5 between the graphed and the eager step, the rest within 5e-7). So: every element within lr/10, and
    all but 0.1% of them within tol."""
    over = sum(int((~torch.isclose(x, y, rtol=tol, atol=tol)).sum()) for x, y in zip(a, b))
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return worst <= lr / 10 and over <= sum(x.numel() for x in a) // 1000


def test_enqueued_steps_log_the_same_as_waited_steps(tiny_diffusers_folder, tiny_data, tmp_path):
    tr, losses, params = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "a")
    tr2 = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "b"))
    for _ in range(4):
        tr2.launch_step()
    recs = tr2.drain(keep_newest=True)   # as Trainer.run reads between checkpoints: the newest step stays enqueued
    assert [r["step"] for r in recs] == [1, 2, 3] and len(tr2._pending) == 1
    recs += tr2.drain()                   # then everything
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and tr2.drain() == []
    assert [r["loss"] for r in recs] == losses
    assert all(torch.equal(a, b) for a, b in zip(params, tr2.params))
    assert losses[0] != losses[-1] and tr2.nan_streak == 0


def test_the_step_never_reads_a_tensor_on_the_host(tiny_diffusers_folder, tiny_data, tmp_path, monkeypatch):
    """What makes the step capturable and keeps the GPU busy: no .item(), bool(), float() or tolist() in it.
    A NaN step is still skipped (inside the fused AdamW) and counted when the host reads the statistics."""
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "run", "train.precision=fp32",
                          "train.ema_decay=0.9", "train.grad_accum=2", "train.max_nan_steps=2"))
    assert tr.opt_skips_on_device
    host = {}
    for i in range(2):
        host.update({f"{i}.{k}": v for k, v in tr.host_inputs(tr._next_batch()).items()})

    def boom(*a, **k):
        raise AssertionError("the step read a tensor value on the host")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    stats = tr.device_step(host)
    before = [p.detach().clone() for p in tr.params]
    ema_before = [s.clone() for s in tr.ema.shadow]
    real = tr.micro_loss
    monkeypatch.setattr(tr, "micro_loss", lambda x: real(x) * float("nan"))
    bad = tr.device_step(host)
    monkeypatch.undo()
    assert stats[2] == 0 and bad[2] == 1 and torch.isnan(bad[0])
    assert all(torch.equal(a, p) for a, p in zip(before, tr.params))  # the NaN step changed nothing
    assert all(torch.equal(a, s) for a, s in zip(ema_before, tr.ema.shadow))  # and the EMA stayed put


def test_channels_last_gives_the_same_numbers(tiny_diffusers_folder, tiny_data, tmp_path):
    _, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "a")
    _, l2, p2 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "b", "train.channels_last=true")
    assert l1 == pytest.approx(l2, rel=1e-5) and _close(p1, p2, 1e-4)
    assert l1[0] != l1[-1]  # it trained


def test_channels_last_stays_channels_last_through_the_unets_blocks():
    """No layout flips inside a channels_last UNet (each costs a copy there and back on the GPU): the spatial
    transformer and the bf16 nearest upsampling return NHWC tensors, with the NCHW path's values."""
    from models.blocks import Upsample2D
    from models.unet import Transformer2DModel
    torch.manual_seed(0)
    t2d = Transformer2DModel(64, heads=2, layers=1, context_dim=32, groups=8, linear_proj=False, upcast=False,
                             dropout=0.0).eval()
    x, ctx = torch.randn(2, 64, 6, 5), torch.randn(2, 7, 32)
    y = t2d(x.to(memory_format=torch.channels_last), ctx)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert torch.allclose(y, t2d(x, ctx), atol=1e-5) and t2d(x, ctx).is_contiguous()
    up = Upsample2D(8).bfloat16()
    xb = torch.randn(1, 8, 4, 4).bfloat16().to(memory_format=torch.channels_last)
    yb = up(xb)
    assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(yb, up.conv(torch.nn.functional.interpolate(xb.float(), scale_factor=2.0).bfloat16()))


def test_compiled_unet_gives_the_same_numbers(tiny_diffusers_folder, tiny_data, tmp_path):
    # LoRA dropout off: compiled code draws its dropout masks from its own random stream.
    _, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "a", "lora.dropout=0")
    try:
        _, l2, p2 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "b", "lora.dropout=0", "train.compile=true")
    except Exception as e:  # inductor needs a C++ compiler on the CPU
        if "compiler" in str(e).lower() or "InvalidCxxCompiler" in type(e).__name__:
            pytest.skip(f"torch.compile unavailable here: {e}")
        raise
    assert l1 == pytest.approx(l2, rel=1e-4) and _close(p1, p2, 2e-4)


def test_ema_skips_with_the_step():
    from training.optim import EMA
    p = torch.nn.Parameter(torch.ones(3))
    ema = EMA([p], 0.5)
    with torch.no_grad():
        p.fill_(3.0)
    ema.update(weight=torch.tensor(0.0))
    assert torch.equal(ema.shadow[0], torch.ones(3))
    ema.update(weight=torch.tensor(1.0))
    assert torch.equal(ema.shadow[0], torch.full((3,), 2.0))


def test_loss_scaler_update_on_the_device_matches_the_rules():
    from training.precision import LossScaler
    s = LossScaler(True, init_scale=8.0, growth_interval=3, min_scale=2.0)
    seq = [0, 0, 0, 1, 1, 1, 0, 0, 0]   # found_inf per step
    want = [8, 8, 16, 8, 4, 2, 2, 2, 4]
    got = []
    for f in seq:
        s.update_(torch.tensor(float(f)))
        got.append(s.scale)
    assert got == want


@cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graph_step_equals_eager(tiny_diffusers_folder, tiny_data, tmp_path, precision, monkeypatch):
    # fp32 convolutions default to TF32 in cuDNN, whose algorithm may differ between a recorded and an eager
    # call (4e-5 relative after one update, H100): full fp32 makes 1e-5 a check of the step, not of TF32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    common = ["device=cuda", f"train.precision={precision}", "train.cudnn_benchmark=false", "train.grad_accum=2",
              "lora.dropout=0",
              "train.ema_decay=0.9", "optim.schedule=cosine", "optim.warmup_steps=2", "train.min_snr_gamma=5.0"]
    _, le, pe = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "e", *common, "train.cuda_graph=false")
    tr, lg, pg = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "g", *common, "train.cuda_graph=true")
    assert tr.graphed is not None and len(tr.graphed.graphs) >= 1
    assert le == pytest.approx(lg, rel=1e-5), (le, lg)
    assert _close(pe, pg, 1e-5)


@cuda
@pytest.mark.parametrize("precision,rank_dropout", [("fp32", 0.1), ("bf16", 0.0)])
def test_cuda_graph_with_checkpointing_and_lora_dropout_equals_eager(tiny_diffusers_folder, tiny_data, tmp_path,
                                                                     monkeypatch, precision, rank_dropout):
    """Gradient checkpointing + LoRA dropout recorded in a graph (masks kept and replayed, no RNG state saved)
    trains like the eager step given the same mask replay (eager keeps only the RNG state by default). fp32 with
    rank dropout: torch's dropout masks; bf16: the LoRA function with the dropout in Triton kernels, whose
    kept "masks" are seeds."""
    from lora import dropout_down, mask_replay
    calls = []
    real_down = dropout_down.down
    monkeypatch.setattr(dropout_down, "down", lambda *a: (calls.append(1), real_down(*a))[1])
    monkeypatch.setattr(dropout_down, "min_elements", 0)       # the tiny UNet's inputs are small

    def replay(tr):
        tr.sd.unet.set_gradient_checkpointing(True, preserve_rng_state=True, context_fn=mask_replay.context_fn)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    common = ["device=cuda", f"train.precision={precision}", "train.cudnn_benchmark=false",
              "train.grad_checkpointing=true", "lora.dropout=0.2", f"lora.rank_dropout={rank_dropout}"]
    _, le, pe = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "e", *common, "train.cuda_graph=false",
                        prepare=replay)
    tr, lg, pg = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "g", *common, "train.cuda_graph=true")
    assert tr.graphed is not None and not tr.graphed.failed
    assert bool(calls) == (precision == "bf16")
    assert le == pytest.approx(lg, rel=1e-5), (le, lg)
    assert _close(pe, pg, 1e-5)


@cuda
def test_cuda_enqueued_steps_read_behind_the_newest(tiny_diffusers_folder, tiny_data, tmp_path, monkeypatch):
    """On CUDA each step's statistics are copied to pinned memory behind it: drain(keep_newest=True) reads all but
    the newest step (the GPU keeps computing it) with the numbers that waited steps give."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # (as above: the same convolution arithmetic)
    common = ["device=cuda", "train.precision=fp32", "train.cuda_graph=true", "lora.dropout=0",
              "train.cudnn_benchmark=false"]
    _, losses, _ = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "a", *common)
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "b", *common))
    for _ in range(4):
        tr.launch_step()
    recs = tr.drain(keep_newest=True)
    assert [r["step"] for r in recs] == [1, 2, 3] and len(tr._pending) == 1
    recs += tr.drain()
    assert [r["loss"] for r in recs] == pytest.approx(losses, rel=1e-5)


@cuda
def test_cuda_graph_uncached_and_resume_exact(tiny_diffusers_folder, tiny_data, tmp_path):
    common = ["device=cuda", "train.precision=fp16", "lora.dropout=0.1", "train.max_steps=6",
              "train.cache_latents=false", "train.cache_text=false", "train.num_workers=0", "train.cuda_graph=true"]
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "full", *common)).run()
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "part", *common, "train.stop_after_steps=3")).run()
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "part", *common, f"resume={tmp_path / 'part'}")).run()
    a, b = lora_file(tmp_path / "full"), lora_file(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


@cuda
def test_graphed_sampling_equals_eager(tiny_diffusers_folder):
    from models.load import load_model
    from models.pipeline import generate
    sd = load_model(tiny_diffusers_folder, device="cuda")
    kw = dict(steps=6, guidance_scale=5.0, seed=3, num_images=2, height=32, width=32)
    a = generate(sd, "a photo", "blurry", cuda_graph=False, **kw)
    b = generate(sd, "a photo", "blurry", cuda_graph=True, **kw)
    c = generate(sd, "a photo", "blurry", cuda_graph=True, **kw)  # replayed from the kept graph
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(b, c)
    sd = load_model(tiny_diffusers_folder, device="cuda")   # (a new graph: the kept one keys on shape and LoRAs)
    sd.unet.set_ahead(True)   # a trainer's previews: k/v and the timestep projections on the side stream (models/ahead.py)
    d = generate(sd, "a photo", "blurry", cuda_graph=False, **kw)
    e = generate(sd, "a photo", "blurry", cuda_graph=True, **kw)
    assert torch.equal(a, d) and torch.allclose(d, e, atol=1e-5)


@cuda
def test_sampling_with_triton_kernels_on_cuda_tracks_fp32(tiny_diffusers_folder):
    """sample.py's triton_kernels (channels_last, NHWC GroupNorm + SiLU, fused GEGLU) in fp16, graphed: the
    images are no further from the fp32 model's than fp16 with torch's kernels (1.5x, plus 1/255), graph
    replay equals the eager call with the same kernels, and the kernels ran."""
    pytest.importorskip("triton")
    from models import nhwc_group_norm as ng
    from models.load import load_model
    from models.pipeline import generate
    kw = dict(steps=6, guidance_scale=5.0, seed=3, num_images=2, height=32, width=32)
    ref = generate(load_model(tiny_diffusers_folder, device="cuda"), "a photo", "blurry", **kw)
    sd = load_model(tiny_diffusers_folder, dtype="fp16", device="cuda")
    plain = generate(sd, "a photo", "blurry", cuda_graph=False, **kw)
    sd.unet.set_triton_kernels(True)
    calls = {"n": 0}
    orig = ng.group_norm_nhwc

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)
    ng.group_norm_nhwc = counted
    try:
        eager = generate(sd, "a photo", "blurry", cuda_graph=False, **kw)
        graphed = generate(sd, "a photo", "blurry", cuda_graph=True, **kw)
    finally:
        ng.group_norm_nhwc = orig
    assert calls["n"] > 0
    assert (eager - ref).abs().max() <= 1.5 * (plain - ref).abs().max() + 1 / 255
    assert torch.allclose(eager, graphed, atol=1e-3)


class _FakeGraph:
    """A CPU stand-in for a recorded CUDA graph: replay() runs the recorded function again on the same static
    inputs. It checks what the wrappers add around a recording: warm-up, state restore, keys, static inputs."""
    recorded = 0

    def __init__(self, fn):
        self.fn = fn
        _FakeGraph.recorded += 1

    def replay(self):
        out = self.fn()
        self.out.copy_(out) if torch.is_tensor(out) else None

    def pool(self):
        return None


def _fake_capture(fn, warmup=2, restore=None, pool=None, stream=None):
    for _ in range(warmup):
        fn()
    if restore is not None:
        restore()
    g = _FakeGraph(fn)
    g.out = torch.empty_like(fn())   # what the recording returns; this extra run is undone like the warm-up
    if restore is not None:
        restore()
    return g, g.out


def test_graph_wrapper_warm_up_leaves_the_run_unchanged(tiny_diffusers_folder, tiny_data, tmp_path, monkeypatch):
    """Warm-up runs change weights, AdamW moments, loss scale, EMA and the RNG; GraphedStep must undo all of it,
    so the recorded run trains exactly like the eager one (here with LoRA dropout on: the RNG matters)."""
    from models import cuda_graph
    from training.graph_step import GraphedStep
    calls = {"n": 0}

    def capture(*a, **k):
        calls["n"] += 1
        return _fake_capture(*a, **k)
    monkeypatch.setattr(cuda_graph, "capture", capture)
    common = ["train.precision=fp32", "train.ema_decay=0.9", "train.grad_accum=2", "optim.warmup_steps=2",
              "lora.dropout=0.1"]
    eager, le, pe = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "e", *common)
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "g", *common))
    tr.graphed = GraphedStep(tr.device_step, tr._graph_state, tr.opt, device="cpu")
    lg = [tr.optimizer_step()["loss"] for _ in range(4)]
    assert calls["n"] == 1 and len(tr.graphed.graphs) == 1  # recorded once, replayed four times
    assert le == lg
    assert all(torch.equal(a, b) for a, b in zip(pe, tr.params))
    assert all(torch.equal(a, b) for a, b in zip(eager.ema.shadow, tr.ema.shadow))
    assert eager.scaler.state_dict() == tr.scaler.state_dict()
    assert all(torch.equal(eager.opt.state[a]["exp_avg_sq"], tr.opt.state[b]["exp_avg_sq"])
               for a, b in zip(eager.params, tr.params))


def test_a_failed_recording_leaves_the_run_as_eager(tiny_diffusers_folder, tiny_data, tmp_path, monkeypatch):
    """Recording fails after its warm-up changed weights, moments and RNG: the run goes on eagerly, and its
    numbers are those of a run that never tried."""
    from models import cuda_graph
    from training.graph_step import GraphedStep

    def failing(fn, warmup=2, restore=None, pool=None, stream=None):
        for _ in range(warmup):
            fn()
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(cuda_graph, "capture", failing)
    common = ["train.precision=fp32", "train.ema_decay=0.9", "lora.dropout=0.1"]
    eager, le, pe = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "e", *common)
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "g", *common))
    tr.graphed = GraphedStep(tr.device_step, tr._graph_state, tr.opt, device="cpu")
    with pytest.warns(UserWarning, match="continuing without one"):
        lg = [tr.optimizer_step()["loss"] for _ in range(4)]
    assert tr.graphed.failed and lg == le
    assert all(torch.equal(a, b) for a, b in zip(pe, tr.params))
    assert all(torch.equal(a, b) for a, b in zip(eager.ema.shadow, tr.ema.shadow))


def test_graphed_unet_keys_on_shape_and_lora_state(tiny_diffusers_folder, monkeypatch):
    from lora.inject import inject_lora, set_multiplier
    from models import cuda_graph
    from models.load import load_model
    monkeypatch.setattr(cuda_graph, "capture", _fake_capture)
    sd = load_model(tiny_diffusers_folder)
    inject_lora(sd.unet, "attention", rank=4)
    sd.unet.eval()
    g = cuda_graph.GraphedUNet(sd.unet)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        for t in (torch.tensor(10), torch.tensor(500)):
            assert torch.equal(g(x, t, ctx), sd.unet(x, t, ctx))
        assert len(g.graphs) == 1                       # a new timestep is a new input, not a new graph
        g(torch.randn(1, 4, 8, 8), torch.tensor(3), ctx[:1])
        set_multiplier(sd.unet, "default", 0.5)
        g(x, torch.tensor(10), ctx)
        assert len(g.graphs) == 3                       # another shape, another LoRA multiplier
        y = g(x, torch.tensor([7, 9]), ctx)             # per-sample timesteps through the static buffer
        assert torch.equal(y, sd.unet(x, torch.tensor([7, 9]), ctx))


def test_bucketed_training_runs_one_shape_per_batch(tiny_diffusers_folder, tmp_path, monkeypatch):
    """Two aspect ratios -> two buckets -> two batch shapes; eager and (CPU stand-in) graphed runs agree,
    with one recording per shape."""
    import numpy as np
    from PIL import Image

    from models import cuda_graph
    from training.graph_step import GraphedStep
    data = tmp_path / "data"
    (data / "captions" / "v1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        w, h = (16, 16) if i < 4 else (32, 16)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / "captions" / "v1" / f"{i}.txt").write_text(f"J3NN13, photo {i}")
    opts = ["data.caption_version=v1", "data.bucketing=true", "data.bucket_step=8", "lora.dropout=0"]
    for cached in ("true", "false"):
        eager = Trainer(make_cfg(tiny_diffusers_folder, data, tmp_path / f"e{cached}", *opts,
                                 f"train.cache_latents={cached}", "train.num_workers=0"))
        le = [eager.optimizer_step()["loss"] for _ in range(6)]
        shapes = {k[1] for k in eager.stager.dev if k[0].endswith(("z0", "pixels"))}
        assert len(shapes) == 2, shapes            # square and wide batches, never mixed
        monkeypatch.setattr(cuda_graph, "capture", _fake_capture)
        tr = Trainer(make_cfg(tiny_diffusers_folder, data, tmp_path / f"g{cached}", *opts,
                              f"train.cache_latents={cached}", "train.num_workers=0"))
        tr.graphed = GraphedStep(tr.device_step, tr._graph_state, tr.opt, device="cpu")
        lg = [tr.optimizer_step()["loss"] for _ in range(6)]
        monkeypatch.undo()
        assert le == lg and len(tr.graphed.graphs) == 2
        assert all(np.isfinite(le))


def test_graph_mode_takes_checkpointing_with_lora_dropout_not_unet_dropout(tiny_diffusers_folder, tiny_data,
                                                                            tmp_path):
    """LoRA dropout in checkpointed blocks replays its kept masks, so the graph is allowed; the UNet's own
    dropout would re-draw from a saved RNG state, which a CUDA graph cannot record: auto turns the graph
    off (with a warning), true refuses."""
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "a", "train.grad_checkpointing=true",
                          "lora.dropout=0.1", "lora.rank_dropout=0.1"))
    assert tr._graph_wanted() is True
    tr.sd.unet.config.dropout = 0.1
    with pytest.warns(UserWarning, match="UNet's own dropout"):
        assert tr._graph_wanted() is False
    tr.cfg.train.cuda_graph = True
    with pytest.raises(ValueError, match="UNet's own dropout"):
        tr._graph_wanted()


def _unet_grads(folder, ckpt: bool, context_fn=None):
    """One forward/backward of the tiny UNet with LoRA dropout 0.3 and rank dropout 0.2 (B non-zero). The
    whole forward records, so adapters outside checkpointed blocks draw their masks the same way too."""
    from lora import mask_replay
    from lora.inject import inject_lora, lora_parameters
    from models.load import load_model
    unet = load_model(folder).unet
    torch.manual_seed(1)
    inject_lora(unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"], rank=4, alpha=4, dropout=0.3,
                rank_dropout=0.2)
    for n, p in unet.named_parameters():
        if "lora.default.up" in n:
            p.data.normal_(0, 0.1)
    unet.train()
    if ckpt:
        unet.set_gradient_checkpointing(True, preserve_rng_state=False, context_fn=context_fn)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 500])
    torch.manual_seed(2)
    mask_replay.clear()
    with mask_replay.recording():
        out = unet(x, t, ctx)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in lora_parameters(unet)]


def test_checkpointed_lora_dropout_replays_its_masks(tiny_diffusers_folder):
    """Checkpointing without a saved RNG state (as in a CUDA graph) with LoRA and rank dropout: the
    recomputation takes the forward's kept masks, so output and LoRA gradients equal the plain forward's
    with the same masks. Drawing fresh masks in the recomputation instead gives other gradients."""
    from lora import mask_replay
    out_a, ga = _unet_grads(tiny_diffusers_folder, ckpt=False)
    out_b, gb = _unet_grads(tiny_diffusers_folder, ckpt=True, context_fn=mask_replay.context_fn)
    assert torch.equal(out_a, out_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(ga, gb))
    _, gc = _unet_grads(tiny_diffusers_folder, ckpt=True,
                        context_fn=lambda: (mask_replay.recording(), mask_replay.recording()))
    assert not all(torch.allclose(a, c, rtol=1e-3, atol=1e-6) for a, c in zip(ga, gc))
    mask_replay.clear()


def test_half_norms_match_autocast_within_half_rounding(tiny_diffusers_folder, tiny_data, tmp_path):
    from models.load import load_model
    sd = load_model(tiny_diffusers_folder, dtype="bf16")
    x, t, ctx = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = sd.unet(x, t, ctx.bfloat16()).float()
        sd.unet.set_norms_in_weight_dtype(True)
        got = sd.unet(x, t, ctx.bfloat16()).float()
        sd.unet.set_norms_in_weight_dtype(False)
        back = sd.unet(x, t, ctx.bfloat16()).float()
    err = (got - ref).norm() / ref.norm()
    assert err < 2e-2, err   # at most a bf16-size rounding difference (CPU autocast keeps norms in bf16: 0 here)
    assert torch.equal(back, ref)        # switched off: the autocast path again
    # A switched norm computes in its weights' dtype whatever autocast and its input say: equal to group_norm
    # worked out on the input cast to bf16, with autocast off.
    norm = sd.unet.conv_norm_out
    sd.unet.set_norms_in_weight_dtype(True)
    h = torch.randn(2, norm.num_channels, 4, 4)                      # fp32 input
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = norm(h)
    want = torch.nn.functional.group_norm(h.bfloat16(), norm.num_groups, norm.weight, norm.bias, norm.eps)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    sd.unet.set_norms_in_weight_dtype(False)
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "r", "train.precision=bf16",
                          "train.half_norms=true"))
    assert "forward" in tr.sd.unet.conv_norm_out.__dict__ and all(r["loss"] < 10 for r in [tr.optimizer_step()])


@cuda
def test_half_norms_on_cuda_differ_only_by_rounding(tiny_diffusers_folder):
    """CUDA autocast runs norms in fp32; the switch keeps them in fp16: a rounding-size difference, not zero."""
    from models.load import load_model
    sd = load_model(tiny_diffusers_folder, dtype="fp16", device="cuda")
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.float16)
    t, ctx = torch.tensor([10, 700], device="cuda"), torch.randn(2, 77, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        ref = sd.unet(x, t, ctx).float()
        sd.unet.set_norms_in_weight_dtype(True)
        got = sd.unet(x, t, ctx).float()
    err = (got - ref).norm() / ref.norm()
    assert 0 < err < 5e-3, err


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernels_on_cuda_round_no_worse_than_torch(dtype):
    """The NHWC GroupNorm (+SiLU) and fused GEGLU kernels at SD1.5's largest shapes, against an fp32
    reference computed from the same half-precision inputs: their error (forward and input gradient) is
    within 1.5x of torch's own half-precision kernels' (both only round; a wrong index would be O(1))."""
    pytest.importorskip("triton")
    import torch.nn.functional as F

    from models.fused_geglu import geglu
    from models.nhwc_group_norm import group_norm_nhwc
    torch.manual_seed(0)
    x = (torch.randn(8, 320, 64, 64, device="cuda") * 2 + 1).to(dtype).to(memory_format=torch.channels_last)
    w, b = torch.randn(320, device="cuda").to(dtype), torch.randn(320, device="cuda").to(dtype)
    dy = torch.randn_like(x)
    for silu in (False, True):
        def run(fn, xin):
            xin = xin.detach().requires_grad_()
            y = fn(xin)
            return y, torch.autograd.grad(y, xin, dy.to(y.dtype))[0]

        def torch_gn(xin):
            y = F.group_norm(xin, 32, w.to(xin.dtype), b.to(xin.dtype), 1e-5)
            return F.silu(y) if silu else y
        ref = run(torch_gn, x.float())
        ours = run(lambda xin: group_norm_nhwc(xin, 32, w, b, 1e-5, silu=silu), x)
        theirs = run(torch_gn, x)
        for o, t, r in zip(ours, theirs, ref):
            assert _err(o, r) <= 1.5 * _err(t, r) + 1e-7, (silu, _err(o, r), _err(t, r))
    p = torch.randn(8, 4096, 2560, device="cuda").to(dtype)
    dout = torch.randn(8, 4096, 1280, device="cuda").to(dtype)

    def eager(q):
        h, g = q.chunk(2, -1)
        return h * F.gelu(g)
    results = []
    for fn, q in ((eager, p.float()), (geglu, p), (eager, p)):
        q = q.detach().requires_grad_()
        y = fn(q)
        results.append((y, torch.autograd.grad(y, q, dout.to(y.dtype))[0]))
    ref, ours, theirs = results
    for o, t, r in zip(ours, theirs, ref):
        assert _err(o, r) <= 1.5 * _err(t, r) + 1e-7, (_err(o, r), _err(t, r))


@cuda
def test_nhwc_norms_and_fused_geglu_on_cuda_track_fp32(tiny_diffusers_folder, monkeypatch):
    """A channels_last fp16 UNet with the Triton kernels (train.nhwc_norms, train.fused_geglu, train.fold_biases)
    against the same UNet in fp32: its output and input gradient are no further from fp32 than torch's half norms and
    eager GEGLU are (a deep random UNet amplifies rounding, so the yardstick is torch's own error), and the
    kernels did run."""
    pytest.importorskip("triton")
    from models import fused_geglu as fg
    from models import nhwc_group_norm as ng
    from models.load import load_model
    calls = {"gn": 0, "geglu": 0}
    orig_gn, orig_geglu = ng.group_norm_nhwc, fg.geglu

    def gn(*a, **k):
        calls["gn"] += 1
        return orig_gn(*a, **k)

    def gg(*a, **k):
        calls["geglu"] += 1
        return orig_geglu(*a, **k)
    monkeypatch.setattr(ng, "group_norm_nhwc", gn)
    monkeypatch.setattr(fg, "geglu", gg)
    x = torch.randn(2, 4, 8, 8, device="cuda").to(memory_format=torch.channels_last)
    t, ctx = torch.tensor([10, 700], device="cuda"), torch.randn(2, 77, 32, device="cuda")

    def run(unet, dtype):
        xi = x.to(dtype).requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16, enabled=dtype != torch.float32):
            y = unet(xi, t, ctx.to(dtype)).float()
        return y, torch.autograd.grad(y.square().sum(), xi)[0].float()
    ref = run(load_model(tiny_diffusers_folder, dtype="fp32", device="cuda").unet.requires_grad_(False)
              .to(memory_format=torch.channels_last), torch.float32)
    unet = load_model(tiny_diffusers_folder, dtype="fp16", device="cuda").unet
    unet = unet.to(memory_format=torch.channels_last).requires_grad_(False)
    outs = []
    for fast in (False, True):
        unet.set_norms_in_weight_dtype(True, nhwc=fast)
        unet.set_fused_geglu(fast)
        unet.set_bias_folding(fast)
        outs.append(run(unet, torch.float16))
    assert calls["gn"] == sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules()) and calls["geglu"] > 0
    for torch_half, triton_half, r in zip(*outs, ref):
        assert _err(triton_half, r) <= 1.5 * _err(torch_half, r), (_err(triton_half, r), _err(torch_half, r))


@cuda
def test_nhwc_vae_on_cuda_tracks_fp32(tiny_diffusers_folder, monkeypatch):
    """The fp16 VAE channels_last with the NHWC GroupNorm kernels (train.nhwc_vae) against the same VAE in fp32:
    encode and decode no further from fp32 than the NCHW fp16 VAE with torch's GroupNorm, and the kernels ran."""
    pytest.importorskip("triton")
    from models import nhwc_group_norm as ng
    from models.load import load_model
    calls = []
    orig = ng.group_norm_nhwc
    monkeypatch.setattr(ng, "group_norm_nhwc", lambda *a, **k: calls.append(1) or orig(*a, **k))
    img, z = torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1, torch.randn(2, 4, 8, 8, device="cuda")

    def run(vae, dtype):
        with torch.no_grad():
            return vae.encode(img.to(dtype)).mean.float(), vae.decode(z.to(dtype)).float()
    ref = run(load_model(tiny_diffusers_folder, dtype="fp32", device="cuda").vae, torch.float32)
    vae = load_model(tiny_diffusers_folder, dtype="fp16", device="cuda").vae
    nchw = run(vae, torch.float16)
    vae.set_triton_kernels(True)
    nhwc = run(vae, torch.float16)
    assert len(calls) == sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules()) - 2  # not the attentions'
    vae.search_convs = True                   # train.vae_conv_search: cuDNN's timed algorithms
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    searched = run(vae, torch.float16)
    for torch_half, triton_half, s, r in zip(nchw, nhwc, searched, ref):
        assert _err(triton_half, r) <= 1.5 * _err(torch_half, r) + 1e-4, (_err(triton_half, r), _err(torch_half, r))
        assert _err(s, r) <= 1.5 * _err(torch_half, r) + 1e-4, (_err(s, r), _err(torch_half, r))


def test_vae_conv_search_follows_the_config(tiny_diffusers_folder, tiny_data, tmp_path):
    """train.vae_conv_search: auto by default, which searches only where the VAE runs NHWC (train.nhwc_vae); true
    and false as written."""
    want = {(None, "true"): True, ("auto", "true"): True, ("auto", "false"): False, ("true", "false"): True,
            ("false", "true"): False}
    for (search, nhwc), on in want.items():
        extra = [f"train.vae_conv_search={search}"] if search else []
        tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / f"{search}{nhwc}", *extra,
                              f"train.nhwc_vae={nhwc}"))
        assert tr.sd.vae.search_convs is on, (search, nhwc)


def test_fused_projections_give_the_same_numbers(tiny_diffusers_folder, tiny_data, tmp_path):
    """One matmul for q/k/v (k/v on the text) with the LoRA branches added after: the UNet output, with LoRA
    dropout drawing the same masks in training mode, and a short run equal the unfused ones."""
    from lora.inject import inject_lora
    from models.load import load_model
    sd = load_model(tiny_diffusers_folder)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():                     # plain projections (no LoRA) first
        plain = sd.unet(x, t, ctx)
        sd.unet.set_fused_projections(True)
        assert torch.allclose(sd.unet(x, t, ctx), plain, atol=1e-5, rtol=1e-5)
        sd.unet.set_fused_projections(False)
    inject_lora(sd.unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, dropout=0.1)
    for p in sd.unet.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)   # B non-zero: the LoRA branches count
    sd.unet.train()
    torch.manual_seed(1)
    ref = sd.unet(x, t, ctx)
    sd.unet.set_fused_projections(True)
    torch.manual_seed(1)
    got = sd.unet(x, t, ctx)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5) and not torch.equal(ref, sd.unet(x, t, ctx))
    _, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "a")
    _, l2, p2 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "b", "train.fused_projections=true")
    assert l1 == pytest.approx(l2, rel=1e-5) and _close(p1, p2, 1e-4)


@pytest.mark.parametrize("extra", [
    ("lora=attention_proj_conv", "lora.dropout=0.1", "train.grad_accum=2"),
    ("+lora.text_encoder={targets: text, rank: 2, alpha: 2, lr: 1e-4}", "train.cache_text=false"),
])
def test_lora_weights_cast_once_per_step_give_autocasts_numbers(tiny_diffusers_folder, tiny_data, tmp_path, extra):
    """bf16 autocast casts each LoRA weight where it is used; lora/half_weights.py casts them all at once and
    accumulates the gradients with multi-tensor ops: the same roundings, so the same bits (CPU autocast)."""
    import lora.half_weights as hw
    calls = []
    real = hw._CastAll.forward
    hw_forward = staticmethod(lambda ctx, dtype, *p: (calls.append(len(p)), real(ctx, dtype, *p))[1])
    _, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "a", "train.precision=bf16", *extra,
                        "train.cast_lora_once=false")
    try:
        hw._CastAll.forward = hw_forward
        tr, l2, p2 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "b", "train.precision=bf16", *extra,
                             "train.cast_lora_once=true")
    finally:
        hw._CastAll.forward = staticmethod(real)
    assert calls and calls[0] == len(tr.params) and tr.half_lora[1] == torch.bfloat16
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert l1[0] != l1[-1]
    assert all(a.cast_weights is None for a in tr.half_lora[0])   # nothing cast outlives the step


@cuda
@pytest.mark.parametrize("graph,seeded", [(False, True), (True, True), (True, False)])
def test_cuda_lora_weight_gradients_on_a_side_stream_give_the_same_bits(tiny_diffusers_folder, tiny_data,
                                                                        tmp_path, monkeypatch, graph, seeded):
    """lora/grad_stream.py (train.lora_grad_stream): the LoRA weight gradients computed on a second stream, eagerly
    and recorded in a CUDA graph, give the main stream's run bit for bit (same kernels, same inputs), with the
    dropout in Triton kernels (seeded) and torch's dropout masks; the side stream is used, and at most `window`
    launches' inputs are held at a time."""
    from lora import dropout_down, grad_stream
    if seeded:
        monkeypatch.setattr(dropout_down, "min_elements", 0)       # the tiny UNet's inputs are small
    used, held = [], []
    real = grad_stream.launch

    def counted(fn, device, reads):
        used.append(bool(grad_stream._active) and device is not None)
        out = real(fn, device, reads)
        held.append(len(grad_stream._pending))
        return out
    monkeypatch.setattr(grad_stream, "launch", counted)
    common = ["device=cuda", "train.precision=bf16", "lora.dropout=0.1", "train.grad_accum=2",
              "train.cudnn_benchmark=false", f"train.cuda_graph={str(graph).lower()}",
              "train.ahead_stream=false"]   # (k/v's backward would run on the side stream: no release from there)
    _, l0, p0 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "main", *common, "train.lora_grad_stream=false")
    assert not grad_stream.enabled
    tr, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "side", *common, "train.lora_grad_stream=true")
    assert grad_stream.enabled and any(used) and (tr.graphed is not None) == graph
    assert max(held) == grad_stream.window   # older launches' inputs released, not held to the end of the backward
    assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert l0[0] != l0[-1] and not grad_stream._pending and not grad_stream._forked


@cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_projections_ahead_on_a_side_stream_give_the_same_bits(tiny_diffusers_folder, tiny_data, tmp_path,
                                                                   monkeypatch, graph):
    """models/ahead.py (train.ahead_stream): k/v and the timestep projections on a second stream, eagerly and in a
    CUDA graph, give the inline run bit for bit (no LoRA dropout: with it, k's and v's masks are drawn first)."""
    from models import ahead
    calls = []
    real = ahead.compute
    monkeypatch.setattr(ahead, "compute", lambda *a: (calls.append(1), real(*a))[1])
    common = ["device=cuda", "train.precision=fp16", "lora.dropout=0", "train.cudnn_benchmark=false",
              f"train.cuda_graph={str(graph).lower()}"]
    _, l0, p0 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "inline", *common, "train.ahead_stream=false")
    assert not calls
    tr, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "ahead", *common, "train.ahead_stream=true")
    assert calls and (tr.graphed is not None) == graph
    assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(p0, p1)) and l0[0] != l0[-1]


@cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_programmatic_dependent_launch_gives_the_same_bits(tiny_diffusers_folder, tiny_data, tmp_path,
                                                               monkeypatch, graph):
    """models/pdl.py (train.pdl): our Triton kernels launched with programmatic dependent launch, eagerly and in a
    CUDA graph, give the plain launches' run bit for bit, with the LoRA dropout in Triton kernels and the side
    streams on; on a device before Hopper nothing is launched with PDL."""
    from lora import dropout_down
    from models import pdl
    monkeypatch.setattr(dropout_down, "min_elements", 0)       # the tiny UNet's inputs are small
    launched = []
    real = pdl.kw
    monkeypatch.setattr(pdl, "kw", lambda t: (lambda kw: (launched.append(bool(kw)), kw)[1])(real(t)))
    common = ["device=cuda", "train.precision=bf16", "lora.dropout=0.1", "train.grad_accum=2",
              "train.cudnn_benchmark=false", f"train.cuda_graph={str(graph).lower()}"]
    _, l0, p0 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "plain", *common, "train.pdl=false")
    assert launched and not any(launched)
    launched.clear()
    tr, l1, p1 = _losses(tiny_diffusers_folder, tiny_data, tmp_path / "pdl", *common, "train.pdl=true")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert launched and all(launched) == hopper and (tr.graphed is not None) == graph
    assert l0 == l1 and all(torch.equal(a, b) for a, b in zip(p0, p1)) and l0[0] != l0[-1]


def test_sampling_kernels_leave_an_upcast_vae_alone(tiny_diffusers_folder):
    """StableDiffusion.set_triton_kernels (sample.py's triton_kernels): the UNet and an fp16-capable VAE go
    channels_last with the NHWC norms; a VAE whose config asks for fp32 (force_upcast, SDXL's) stays as it was."""
    from models.load import load_model
    cl = torch.channels_last
    for upcast in (False, True):
        sd = load_model(tiny_diffusers_folder)
        sd.vae.config.extra["force_upcast"] = upcast
        sd.set_triton_kernels(True)
        assert sd.unet.conv_in.weight.is_contiguous(memory_format=cl)
        assert sd.vae.decoder.conv_in.weight.is_contiguous(memory_format=cl) is not upcast
        assert bool(sd.vae.decoder.conv_norm_out.__dict__.get("nhwc")) is not upcast
        sd.set_triton_kernels(False)
        assert not sd.vae.decoder.conv_norm_out.__dict__.get("nhwc") and sd.vae.decoder.conv_in.weight.is_contiguous()
