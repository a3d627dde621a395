"""The training loop on a tiny model: outputs, learning, only-LoRA updates, exact resume, NaN handling, kills."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import training.config  # noqa: F401
from training.config import CONF_DIR, ROOT
from training.loop import NaNLossError, Trainer


def make_cfg(folder, data, run_dir, *extra):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose("config", overrides=[
            f"model.path={folder}", f"data.path={data}", "data.resolution=16", f"run_dir={run_dir}", "device=cpu",
            "lora.rank=4", "lora.alpha=4", "train.batch_size=2", "train.max_steps=6", "train.save_every_steps=3",
            "optim.lr=1e-3", *extra])


def lora_file(run):
    return load_file(str(Path(run) / "lora.safetensors"))


def test_short_run_writes_everything_and_only_lora_changes(tiny_diffusers_folder, tiny_data, tmp_path):
    from models.load import load_model
    cfg = make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "run", "train.ema_decay=0.9",
                   "preview.every_steps=3", "preview.size=16", "preview.steps=2")
    tr = Trainer(cfg)
    base = {k: v.clone() for k, v in load_model(tiny_diffusers_folder).unet.state_dict().items()}
    result = tr.run()
    run = tmp_path / "run"
    assert result["status"] == "finished" and result["step"] == 6
    for f in ["lora.safetensors", "lora_ema.safetensors", "state/last.pt", "config.yaml", "train_result.json",
              "checkpoints/step_000003.safetensors", "previews/step_000003.png", "previews/step_000006.png"]:
        assert (run / f).exists(), f
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run / "run_info.json").read_text())["attention"] == "torch"   # sdpa_backend=auto on a CPU
    sd = lora_file(run)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in sd)
    assert all(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))  # B learned
    # Base weights are untouched: every non-LoRA parameter equals the checkpoint's.
    now = {k.replace(".base_layer", ""): v for k, v in tr.sd.unet.state_dict().items() if ".lora." not in k}
    assert set(now) == set(base) and all(torch.equal(now[k], base[k]) for k in base)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    for tag in ["train/loss", "train/loss_smooth", "train/lr", "train/grad_norm", "perf/s_per_step", "perf/images_per_s"]:
        assert len(ea.Scalars(tag)) == 6, tag


def test_idle_vae_and_text_encoder_are_parked_and_come_back_for_previews(tiny_diffusers_folder, tiny_data,
                                                                         tmp_path, monkeypatch):
    """train.park_frozen: with latents and captions cached the step never touches the VAE or the text encoder;
    they go to host memory after the caches are filled and come to the device only around previews. The model
    is then loaded into host memory (staged): the VAE and text encoder come to the device for the caches and
    go back before the UNet comes. (On a CPU both places are the same memory: this checks when they move,
    the GPU bench measures the saving.)"""
    moves = []
    real_to = torch.nn.Module.to

    def spy(self, *a, **k):
        name = getattr(self, "_spy_name", None)
        if name:
            moves.append((name, str(a[0]) if a else str(k)))
        return real_to(self, *a, **k)
    monkeypatch.setattr(torch.nn.Module, "to", spy)
    import contextlib

    import training.loop as loop_mod
    real_parts_on = loop_mod.parts_on

    @contextlib.contextmanager
    def parts_spy(device, *modules):    # parts_on points the weights at copies, then back at the host tensors
        moves.extend((getattr(m, "_spy_name", "?"), str(device)) for m in modules)
        with real_parts_on(device, *modules):
            yield
        moves.extend((getattr(m, "_spy_name", "?"), "cpu") for m in modules)
    monkeypatch.setattr(loop_mod, "parts_on", parts_spy)
    from models import load as load_mod
    real_load = load_mod.load_model

    loaded_to = []

    def tagged(*a, **k):
        loaded_to.append(str(k["device"]))
        sd = real_load(*a, **k)
        sd.vae._spy_name, sd.text_encoder._spy_name, sd.unet._spy_name = "vae", "te", "unet"
        return sd
    monkeypatch.setattr("training.loop.load_model", tagged)
    common = ["preview.every_steps=3", "preview.size=16", "preview.steps=2", "train.max_steps=6"]
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "p", *common, "train.park_frozen=true"))
    assert tr.parked and tr.staged and loaded_to == ["cpu"]
    unet_moves = [i for i, m in enumerate(moves) if m[0] == "unet"]
    # the VAE in (latents) and out; the text encoder in (captions) and out; then the UNet
    assert moves[:4] == [("vae", "cpu"), ("vae", "cpu"), ("te", "cpu"), ("te", "cpu")] and unet_moves == [4], moves
    moves.clear()
    for _ in range(2):
        tr.optimizer_step()
    assert moves == []                                      # steps run without them
    tr.preview()
    assert moves == [("vae", "cpu"), ("te", "cpu")] * 2     # to the run's device (cpu here) and back
    # not parked when a caption changes every epoch (the text encoder is needed in the step)
    moves.clear()
    tr2 = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "q", *common, "train.park_frozen=true",
                           "data.shuffle_tags=true"))
    assert not tr2.parked and not tr2.staged and not any(m[0] in ("vae", "te") for m in moves)
    # staged with DreamBooth class images to generate: the pipeline offloads (each part on the device only for
    # its stage) and decodes one image at a time
    import data.class_images as ci
    seen, real_ensure = [], ci.ensure_class_images
    monkeypatch.setattr(ci, "ensure_class_images", lambda *a, **k: (seen.append(k), real_ensure(*a, **k))[1])
    tr3 = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "r", *common, "train.park_frozen=true",
                           f"data.class_dir={tmp_path / 'class'}", "data.class_prompt=a dog",
                           "data.num_class_images=2"))
    assert tr3.staged and seen == [{"offload": tr3.device, "decode_slice": 1}]
    assert len(list((tmp_path / "class").glob("*.png"))) == 2


def test_the_step_encodes_images_in_the_vaes_dtype_like_the_cache(tiny_diffusers_folder, tiny_data, tmp_path,
                                                                   monkeypatch):
    """Uncached latents are encoded as the latent cache encodes them: in the VAE's dtype, outside autocast."""
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "u", "train.cache_latents=false",
                          "train.num_workers=0", "train.precision=bf16"))
    seen = []
    real = tr.sd.vae.encode

    def spy(x):
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return real(x)
    monkeypatch.setattr(tr.sd.vae, "encode", spy)
    tr.optimizer_step()
    assert seen and all(s == (False, tr.sd.vae.dtype) for s in seen), seen


def _fixed_loss(tr, n=8):
    """Mean loss over the training set at fixed noise and timesteps (no dropout)."""
    g = torch.Generator().manual_seed(123)
    tr.sd.unet.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(tr.ds), 4):
            from data.dataset import collate
            b = collate([tr.ds[j] for j in range(i, min(i + 4, len(tr.ds)))])
            z0 = b["latent_mean"] * tr.sd.vae.config.scaling_factor
            noise = torch.randn(z0.shape, generator=g)
            t = torch.randint(100, 900, (z0.shape[0],), generator=g)
            ctx = tr.text_cache(b["caption"])["ctx"]
            pred = tr.sd.unet(tr.schedule.add_noise(z0, noise, t), t, ctx)
            total += torch.nn.functional.mse_loss(pred, noise, reduction="sum").item()
    return total


def test_loss_falls_when_overfitting(tiny_diffusers_folder, tiny_data, tmp_path):
    cfg = make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "run", "train.max_steps=40", "lora.dropout=0.0",
                   "optim.lr=3e-3", "lora.rank=8", "train.save_every_steps=0")
    tr = Trainer(cfg)
    before = _fixed_loss(tr)
    tr.run()
    after = _fixed_loss(tr)
    assert after < 0.8 * before, (before, after)


def test_resume_continues_exactly(tiny_diffusers_folder, tiny_data, tmp_path):
    common = ["lora.dropout=0.1", "data.shuffle_tags=true", "train.max_steps=6", "train.grad_accum=2"]
    full = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "full", *common)).run()
    assert full["status"] == "finished"
    part = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "part", *common,
                            "train.stop_after_steps=4")).run()
    assert part["status"] == "stopped" and part["step"] == 4
    assert (tmp_path / "part" / "checkpoints" / "step_000004.safetensors").exists()
    resumed = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "part", *common,
                               f"resume={tmp_path / 'part'}")).run()
    assert resumed["status"] == "finished" and resumed["step"] == 6
    a, b = lora_file(tmp_path / "full"), lora_file(tmp_path / "part")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # and it is not trivially equal: a different seed ends elsewhere
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "other", *common, "seed=7")).run()
    c = lora_file(tmp_path / "other")
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("up.weight"))
    # Uncached latents through 2 DataLoader workers, resumed: equal to the same uncached run in one go.
    un = ["train.cache_latents=false", "train.num_workers=2"]
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "u_full", *common, *un)).run()
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "u_part", *common, *un,
                     "train.stop_after_steps=3")).run()
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "u_part", *common, *un,
                     f"resume={tmp_path / 'u_part'}")).run()
    d, e = lora_file(tmp_path / "u_full"), lora_file(tmp_path / "u_part")
    assert all(torch.equal(d[k], e[k]) for k in d)
    # Staged loading (park_frozen: the model read into host memory, the parts brought over one at a time),
    # resumed: equal to the same staged run in one go.
    st = ["lora.dropout=0.1", "train.max_steps=6", "train.park_frozen=true"]
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "s_full", *st)).run()
    Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "s_part", *st, "train.stop_after_steps=3")).run()
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "s_part", *st, f"resume={tmp_path / 's_part'}"))
    assert tr.staged and tr.run()["step"] == 6
    f, g = lora_file(tmp_path / "s_full"), lora_file(tmp_path / "s_part")
    assert set(f) == set(g) and all(torch.equal(f[k], g[k]) for k in f)
    with pytest.raises(ValueError, match="LoRA modules differ"):
        Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "part", *common, "lora.rank=2",
                         f"resume={tmp_path / 'part'}")).run()


def test_one_loader_spans_epochs_with_each_epochs_augmentation(tiny_diffusers_folder, tiny_data, tmp_path):
    """The DataLoader's workers live for the whole run (not restarted each epoch); each index travels with its
    epoch, so the flips, random crops and shuffled tags of epoch e are epoch e's, as read in the main process."""
    aug = ["train.cache_latents=false", "train.num_workers=2", "data.flip_p=0.5", "data.crop=random",
           "data.shuffle_tags=true", "data.resolution=12"]
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "run", *aug))
    n = 3 * tr.batches_per_epoch + 1                       # into a fourth epoch
    got = [tr._next_batch() for _ in range(n)]
    loader = tr._iter
    assert tr._iter is loader and tr.epoch == 3
    ds, want = tr.ds, []
    for e in range(4):
        ds.set_epoch(e)
        want += [[ds[i] for i in b] for b in tr.plan.batches(e)]
    for g, w in zip(got, want):
        assert g["caption"] == [s["caption"] for s in w]
        assert torch.equal(g["pixels"], torch.stack([s["pixels"] for s in w]))
    flips = {e: [ds.flip_for(i) for i in range(len(ds))] for e in range(3) if ds.set_epoch(e) is None}
    assert flips[0] != flips[1] or flips[1] != flips[2]    # the epochs do differ: the check above can fail


def test_nan_steps_are_skipped_then_stop(tiny_diffusers_folder, tiny_data, tmp_path, monkeypatch):
    tr = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "run", "train.max_nan_steps=3"))
    real = tr.micro_loss
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        loss = real(batch)
        return loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss
    monkeypatch.setattr(tr, "micro_loss", flaky)
    tr.optimizer_step()
    before = [p.detach().clone() for p in tr.params]
    out = tr.optimizer_step()
    assert out["skipped"] and tr.nan_streak == 1
    assert all(torch.equal(a, p) for a, p in zip(before, tr.params))  # nothing was applied
    tr.optimizer_step()
    assert tr.nan_streak == 0
    tr.optimizer_step(), tr.optimizer_step()
    with pytest.raises(NaNLossError, match="3 steps in a row had a NaN"):
        tr.optimizer_step()


def test_bf16_text_encoder_lora_and_prior_preservation(tiny_diffusers_folder, tiny_data, tmp_path):
    cfg = make_cfg(tiny_diffusers_folder, tiny_data, tmp_path / "run", "train.precision=bf16", "train.max_steps=2",
                   "+lora.text_encoder={targets: text, rank: 4, alpha: 4, lr: 1e-4}",
                   f"data.class_dir={tiny_data}", "data.class_prompt='a person'", "data.prior_loss_weight=0.5",
                   "train.min_snr_gamma=5.0", "train.noise_offset=0.05")
    tr = Trainer(cfg)
    assert tr.sd.unet.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in tr.params)
    assert tr.text_cache is None  # the text encoder trains: no text cache
    batch = tr._next_batch()
    assert len(batch["caption"]) == 4 and batch["caption"][2:] == ["a person", "a person"]
    res = tr.run()
    assert res["status"] == "finished"
    keys = lora_file(tmp_path / "run")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)


def test_killed_subprocess_resumes_and_finishes(tiny_diffusers_folder, tiny_data, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "train.py", f"model.path={tiny_diffusers_folder}", f"data.path={tiny_data}",
            "data.resolution=16", f"run_dir={run}", "device=cpu", "lora.rank=4", "train.batch_size=2",
            "train.max_steps=400", "train.save_every_steps=2", f"hydra.run.dir={tmp_path / 'hydra'}"]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "state" / "last.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)  # no chance to clean up
    p.wait()
    assert (run / "state" / "last.pt").exists(), p.stderr.read().decode()[-2000:]
    step = torch.load(run / "state" / "last.pt", weights_only=True)["step"]
    assert 2 <= step < 400
    out = subprocess.run(args[:-3] + ["train.max_steps=" + str(step + 4), f"resume={run}",
                                      f"hydra.run.dir={tmp_path / 'hydra2'}"] + args[-2:-1],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run / "train_result.json").read_text())
    assert result["status"] == "finished" and result["step"] == step + 4
    # SIGTERM: saves and exits cleanly with the state.
    p = subprocess.Popen(args[:-4] + ["train.max_steps=400", "train.save_every_steps=0",
                                      f"run_dir={tmp_path / 'term'}", f"hydra.run.dir={tmp_path / 'hydra3'}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not list((tmp_path / "term" / "tb").glob("events*")) if (tmp_path / "term" / "tb").exists() else True:
        time.sleep(0.2)
        if p.poll() is not None:
            break
    time.sleep(2)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    term = json.loads((tmp_path / "term" / "train_result.json").read_text())
    assert term["status"] == "interrupted" and (tmp_path / "term" / "state" / "last.pt").exists()


def test_loss_scaler_skips_overflow_and_grows():
    from training.precision import LossScaler
    s = LossScaler(True, init_scale=1024.0, growth_interval=2)

    def unscale(g):  # what the training step does: unscale in place, found_inf from the (clipped) norm
        s.unscale_grads([g])
        return (~torch.isfinite(torch.linalg.vector_norm(g))).float()
    g = torch.tensor([2048.0, 1024.0, float("inf")])
    found = unscale(g)
    assert found == 1.0
    s.update_(found)
    assert s.scale == 512.0
    g = torch.tensor([512.0, 256.0, 0.0])
    found = unscale(g)
    assert found == 0.0 and torch.equal(g, torch.tensor([1.0, 0.5, 0.0]))
    s.update_(found), s.update_(found)
    assert s.scale == 1024.0  # doubled after growth_interval clean steps
    off = LossScaler(False)
    assert off.scale == 1.0 and off.scale_loss(torch.tensor(3.0)) == 3.0


def test_phased_training_continues_on_the_next_subset(tiny_diffusers_folder, tiny_data, tmp_path):
    """Seed 000: train on one subset, then resume the same run on the next subset of the data."""
    import shutil
    phase2 = tmp_path / "phase2"
    shutil.copytree(tiny_data, phase2)
    for p in sorted(phase2.glob("*.png"))[:4]:
        p.unlink()
        for v in ("v1", "v4"):
            (phase2 / "captions" / v / (p.stem + ".txt")).unlink()
    run = tmp_path / "run"
    first = Trainer(make_cfg(tiny_diffusers_folder, tiny_data, run, "train.max_steps=3")).run()
    a = lora_file(run)
    second = Trainer(make_cfg(tiny_diffusers_folder, phase2, run, "train.max_steps=6", f"resume={run}")).run()
    assert first["step"] == 3 and second["status"] == "finished" and second["step"] == 6
    b = lora_file(run)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # it went on learning
    meta = __import__("models.checkpoint", fromlist=["x"]).read_safetensors_metadata(run / "lora.safetensors")
    assert meta["ss_steps"] == "6" and len(meta["ss_sd_model_hash"]) == 10 and meta["ss_network_dim"] == "4"


def test_tiny_world_sweep_gives_the_report_table(tmp_path):
    """The ablation grid on the tiny world with one multirun command, then the Table-4 report."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "+experiment=exp3_rv_v4", "+world=tiny", "data.caption_version=v1,v4",
           "train.max_steps=3", "train.save_every_steps=2", "inference.steps=3", "inference.images_per_prompt=1", "inference.guidance_scales=[4.0,7.5]",
           "inference.prompts=[\"J3NN13, close-up\",\"J3NN13, wink\"]", f"hydra.sweep.dir={sweep}", "device=cpu"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    from experiments.report import write_report
    rows = write_report(sweep)
    assert [(r["caption"], r["guidance"]) for r in rows] == [("v1", 4.0), ("v1", 7.5), ("v4", 4.0), ("v4", 7.5)]
    assert all(r["inference_model"] == "realistic_vision_v51" and r["psnr"] is not None for r in rows)
    assert (sweep / "report.md").is_file() and (sweep / "figure5.png").is_file()
    # Seed 003's PSNR/SSIM by checkpoint step (no LoRA, step 2, the final LoRA at step 3).
    from experiments.evaluate import Scorer, evaluate_run
    run = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())[0]
    r = evaluate_run(run, Scorer(), by_step=True)
    assert sorted(r["by_step"], key=int) == ["0", "2", "3"] and len(r["by_step"]["2"]["psnr"]) == 5
    write_report(sweep)
    steps = (sweep / "steps.md").read_text()
    assert "PSNR by step" in steps and "| 2 |" in steps
