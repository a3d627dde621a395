"""The LoRA training loop, written out: build -> steps -> checkpoints -> samples.

One optimizer step (Ho et al. 2020, algorithm 1, on VAE latents as in Rombach et al. 2022):
    z0 = VAE(x) * scaling_factor              (or the cached posterior, sampled afresh)
    t ~ U{0..T-1}, eps ~ N(0, I) (+ noise offset)
    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    loss = w(t) * || unet(z_t, t, text) - target ||^2    target = eps or v; w = min-SNR-gamma or 1
accumulated over `grad_accum` micro-batches, scaled (fp16), unscaled, clipped, then AdamW.
A non-finite loss or gradient skips the step (logged); `max_nan_steps` in a row stop the run.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from data.cache import LatentCache, TextCache, attach_latent_cache
from data.dataset import ImageCaptionDataset, collate
from data.folder import scan_folder
from lora import mask_replay
from lora.half_weights import half_weights
from lora.inject import inject_lora, lora_layers, lora_parameters, set_enabled, set_fused_lora_backward
from lora.io import save_lora
from models import conditioning, sdpa_backend
from models.load import load_model, pick_device
from models.pipeline import generate, parts_on
from models.schedule import NoiseSchedule, offset_noise
from training.graph_step import GraphedStep
from training.optim import EMA, build_optimizer, lr_factor, optimizer_state, set_capturable
from training.precision import LossScaler, autocast, precision_dtype
from training.staging import Stager
from training.state import load_state, rng_state, save_state, set_rng_state


class NaNLossError(RuntimeError):
    pass


def plain(x):
    """An OmegaConf node -> plain Python; anything else unchanged (a target preset is a string)."""
    return OmegaConf.to_object(x) if OmegaConf.is_config(x) else x


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


class Trainer:
    """Holds what a run needs between steps; `run()` does the work."""

    def __init__(self, cfg: DictConfig):
        self.cfg, tc = cfg, cfg.train
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps, VAE samples: CPU, saveable
        self.precision = tc.precision
        # The frozen base is stored in the training precision (fp16 on a CPU would be slow: kept fp32 there).
        base_dtype = precision_dtype(tc.precision)
        if self.device.type == "cpu" and base_dtype == torch.float16:
            base_dtype = torch.float32

        m = cfg.model
        # Staged loading: when the VAE and text encoders will be parked (_build_data), the model is read into
        # host memory and each part comes to the GPU only when used (the frozen ones to fill the caches, the
        # UNet after), so their weights never sit on the GPU together: SDXL's 6.6 GiB of fp16/fp32 weights and
        # a 1024-pixel VAE encode at once did not fit seed 004's 8 GB card; the UNet alone, 4.8 GiB, does.
        # (self.parked: the same condition, true from the caches on.)
        self.staged = self._parking_wanted(cfg)
        self.parked, self._frozen_nested = False, False
        self.sd = load_model(m.path, dtype=base_dtype, device="cpu" if self.staged else self.device,
                             vae=m.get("vae"), config=m.get("config"))
        if base_dtype == torch.float16 and self.sd.vae.config.force_upcast:
            self.sd.vae.float()  # SDXL's VAE overflows in fp16 (its config says so): encode in fp32, as diffusers does
        for mod in (self.sd.unet, self.sd.vae, *self.sd.text_encoders.values()):
            mod.requires_grad_(False).eval()
        d = cfg.data
        if d.get("class_dir") and d.get("num_class_images"):  # before any LoRA: the base's own prior
            from data.class_images import ensure_class_images
            # staged: the parts come to the GPU one stage at a time, the images decoded one by one
            staged = dict(offload=self.device, decode_slice=1) if self.staged else {}
            ensure_class_images(self.sd, d.class_dir, d.class_prompt, d.num_class_images, d.resolution, cfg.seed,
                                **staged)
        L = cfg.lora
        lkw = dict(dropout=L.dropout, rank_dropout=L.get("rank_dropout", 0.0),
                   module_dropout=L.get("module_dropout", 0.0), init=L.get("init", "kaiming"),
                   rslora=L.get("rslora", False), dtype=torch.float32)
        self.report = inject_lora(self.sd.unet, plain(L.targets), rank=L.rank, alpha=L.alpha,
                                  overrides=plain(L.overrides) if L.get("overrides") else None, **lkw)
        self.train_te = bool(L.get("text_encoder"))
        if self.train_te:  # SDXL: both text encoders, as kohya's sdxl_train_network does
            T = L.text_encoder
            self.te_report = [inject_lora(te, plain(T.targets), rank=T.rank, alpha=T.alpha, **lkw)
                              for te in self.sd.text_encoders.values()]
        cuda = self.device.type == "cuda"

        def on(switch):  # auto: on where experiments/bench/RESULTS.md measured a win (CUDA)
            v = tc.get(switch, False)
            return cuda if v == "auto" else bool(v)
        self.channels_last = on("channels_last")
        if self.channels_last:
            self.sd.unet.to(memory_format=torch.channels_last)
        if tc.get("fused_projections"):
            self.sd.unet.set_fused_projections(True)
        # our Triton kernels (each falls back to torch's where Triton or CUDA is missing), unless torch.compile
        # does its own fusion
        ours = not tc.get("compile")
        if on("half_norms") and base_dtype != torch.float32:
            self.sd.unet.set_norms_in_weight_dtype(True, nhwc=self.channels_last and ours and on("nhwc_norms"))
            if ours and on("fused_layer_norms"):
                self.sd.unet.set_fused_layer_norms(True)
        if ours and on("fused_geglu"):
            self.sd.unet.set_fused_geglu(True)
        if ours and self.channels_last and on("fold_biases"):
            self.sd.unet.set_bias_folding(True)
        if ours and self.channels_last and on("nhwc_upsample"):
            self.sd.unet.set_nhwc_upsampling(True)
        if on("subpixel_upsample"):
            self.sd.unet.set_subpixel_upsampling(True)
            self.sd.vae.set_subpixel_upsampling(True)
        nv = tc.get("nhwc_vae", False)  # the frozen VAE's encodes (the full step's, the latent cache's) NHWC;
        nhwc_vae = ours and (nv is True or nv == "auto" and cuda and self.sd.vae.dtype != torch.float32)
        if nhwc_vae:  # (auto: timed in half precision)
            self.sd.vae.set_triton_kernels(True)
        vs = tc.get("vae_conv_search", False)  # cuDNN's timed search inside the VAE's encodes too (auto: NHWC VAE;
        # images of up to models.vae.SEARCH_MAX_PIXELS; experiments/bench/RESULTS.md session 22)
        self.sd.vae.search_convs = bool(vs is True or vs == "auto" and nhwc_vae)
        if ours and self.channels_last and on("thin_convs"):
            self.sd.unet.set_thin_convs(True)
        if ours and on("short_attention"):
            self.sd.unet.set_short_attention(True)
        if ours and on("ahead_stream"):
            self.sd.unet.set_ahead(True)
        from lora import dropout_down, grad_stream, lora_mm  # (here: they import Triton where installed)
        from models import pdl
        dropout_down.enabled = ours and on("triton_lora_dropout")
        lora_mm.enabled = ours and on("triton_lora_gemm")
        grad_stream.enabled = on("lora_grad_stream")
        pdl.enabled = on("pdl")
        if ours and on("fused_lora_backward"):   # (a custom autograd function: left out of torch.compile's graphs)
            set_fused_lora_backward(self.sd.unet)
            if on("fused_qkv_lora"):
                self.sd.unet.set_fused_qkv_lora(True)
            for te in self.sd.text_encoders.values() if self.train_te else ():
                set_fused_lora_backward(te)
        sdpa_backend.set_policy(tc.get("sdpa_backend", "torch"))
        if cuda:
            torch.backends.cudnn.benchmark = bool(tc.get("cudnn_benchmark", True))
            torch.backends.cudnn.benchmark_limit = int(tc.get("cudnn_benchmark_limit", 10))
        if tc.get("compile"):  # in place: module names (and LoRA file keys) stay as they are
            self.sd.unet.compile(dynamic=False)

        sched_cfg = dict(self.sd.scheduler_config)
        if tc.get("prediction_type"):
            sched_cfg["prediction_type"] = tc.prediction_type
        if tc.get("zero_terminal_snr"):
            sched_cfg["rescale_betas_zero_snr"] = True
        self.schedule = NoiseSchedule.from_config(sched_cfg)

        self._build_data()
        groups = [{"params": list(lora_parameters(self.sd.unet)), "lr": cfg.optim.lr}]
        if self.train_te:
            groups.append({"params": [p for te in self.sd.text_encoders.values() for p in lora_parameters(te)],
                           "lr": L.text_encoder.get("lr") or cfg.optim.lr})
        self.params = [p for g in groups for p in g["params"]]
        # LoRA weights cast to the autocast dtype once per micro-batch (lora/half_weights.py), not per use
        self.half_lora = None
        if on("cast_lora_once") and base_dtype != torch.float32:
            trained = [self.sd.unet] + (list(self.sd.text_encoders.values()) if self.train_te else [])
            self.half_lora = ([a for m in trained for _, layer in lora_layers(m) for a in layer.lora.values()],
                              base_dtype)
        self.base_lrs = [g["lr"] for g in groups]
        self.graph_mode = cuda and self._graph_wanted()
        if tc.grad_checkpointing:
            # In a graph the RNG state cannot be saved: the LoRA dropout masks are kept for the recomputation
            # instead (1 byte per adapter input element, so only there).
            self.sd.unet.set_gradient_checkpointing(True, preserve_rng_state=not self.graph_mode,
                                                    context_fn=mask_replay.context_fn if self.graph_mode else None)
        self.opt = build_optimizer(groups, cfg.optim, capturable=self.graph_mode)
        self.opt_skips_on_device = bool(self.opt.defaults.get("fused"))
        for p in self.params:  # gradients live in fixed memory: zeroed and accumulated in place every step
            p.grad = torch.zeros_like(p)
        self.scaler = LossScaler(tc.precision == "fp16", device=self.device)
        self.ema = EMA(self.params, tc.ema_decay) if tc.get("ema_decay") else None
        self.stager = Stager(self.device)
        self._pending: list = []
        self._last_drain = None
        self.graphed = None
        if self.graph_mode:
            self.graphed = GraphedStep(self.device_step, self._graph_state, self.opt)
        self.step = self.epoch = self.batch_in_epoch = self.nan_streak = 0
        self.smooth = None
        self.stop_requested = False
        self.writer = None
        self.metrics: dict = {}

    def _graph_wanted(self) -> bool:
        """train.cuda_graph: auto (on where it can be), true (refuse what it cannot do), false."""
        tc, L = self.cfg.train, self.cfg.lora
        want = tc.get("cuda_graph", "auto")
        if want in (False, "false", None):
            return False
        why = []
        if L.get("module_dropout", 0.0):
            why.append("lora.module_dropout skips whole modules at random from the host")
        if not self.cfg.optim.get("fused"):
            why.append("optim.fused=false")
        # LoRA dropout in a checkpointed block replays its kept masks (lora/mask_replay.py); the UNet's own
        # dropout would need the saved RNG state, which a graph cannot record.
        if tc.grad_checkpointing and self.sd.unet.config.dropout:
            why.append("gradient checkpointing with the UNet's own dropout re-draws its masks from a saved RNG "
                       "state, which a graph cannot record")
        if why and want == "auto":
            warnings.warn("training without a CUDA graph: " + "; ".join(why))
            return False
        if why:
            raise ValueError("train.cuda_graph=true cannot be used here: " + "; ".join(why))
        return True

    def _graph_state(self) -> list[torch.Tensor]:
        """Everything a step changes besides the optimizer's moments (snapshotted around the graph's warm-up)."""
        return [*self.params, *self.scaler.tensors(), *(self.ema.shadow if self.ema else []),
                *[g["lr"] for g in self.opt.param_groups if torch.is_tensor(g["lr"])]]

    # ------------------------------------------------------------------ data
    def _build_data(self):
        d, tc = self.cfg.data, self.cfg.train
        items, self.scan_report = scan_folder(d.path, d.get("caption_version"), d.get("caption_ext", ".txt"),
                                              d.get("missing_caption", "error"), d.get("trigger"),
                                              d.get("verify", "header"), d.get("skip_bad", False))
        kw = dict(resolution=d.resolution, bucketing=d.get("bucketing", False), bucket_step=d.get("bucket_step", 64),
                  crop=d.get("crop", "center"), flip_p=d.get("flip_p", 0.0), seed=self.cfg.seed,
                  size_conditioning=conditioning.is_sdxl(self.sd))
        self.ds = ImageCaptionDataset(items, trigger=d.get("trigger"), shuffle_tags=d.get("shuffle_tags", False),
                                      keep_tokens=d.get("keep_tokens", 1),
                                      caption_dropout=d.get("caption_dropout", 0.0), **kw)
        self.prior = None
        if d.get("class_dir"):  # DreamBooth prior preservation (Ruiz et al. 2023, arXiv:2208.12242, eq. 2)
            citems, _ = scan_folder(d.class_dir, missing_caption="trigger", trigger=d.class_prompt)
            self.prior = ImageCaptionDataset(citems, fixed_caption=d.class_prompt, **kw)
        self.text_cache = None
        # With latents and every caption's embedding cached, a step needs neither the VAE nor the text encoder:
        # they wait in host memory (0.4 GB at SD1.5 size, as kohya's cache options do) and come to the GPU only to
        # fill their cache, one at a time, and for previews and samples (_frozen_on_device); the UNet comes after.
        self.parked = self.staged
        with self._frozen_on_device([self.sd.vae]):
            self._fill_latents(d, tc)
        with self._frozen_on_device(list(self.sd.text_encoders.values())):
            self._fill_text(d, tc)
        if self.staged:
            self.sd.unet.to(self.device)
        self.plan = self.ds.batch_plan(tc.batch_size, drop_last=False)
        self.batches_per_epoch = len(self.plan)
        self.steps_per_epoch = max(1, self.batches_per_epoch // tc.grad_accum)
        self.total_steps = tc.max_steps or self.steps_per_epoch * tc.epochs

    def _fill_latents(self, d, tc):
        if tc.cache_latents:
            cache = LatentCache(self.sd.vae, d.get("cache_dir"), self.device)
            attach_latent_cache(self.ds, cache)
            if self.prior is not None:
                attach_latent_cache(self.prior, cache)

    def _fill_text(self, d, tc):
        if tc.cache_text and not self.train_te:
            self.text_cache = TextCache(lambda caps: {k: v.cpu() for k, v in self._encode_text(caps).items()})
            if not d.get("shuffle_tags", False) and not d.get("caption_dropout", 0.0):  # captions fixed up front
                known = [self.ds.caption_for(i) for i in range(len(self.ds))]
                if self.prior is not None:
                    known.append(d.class_prompt)
                with torch.no_grad():
                    self.text_cache.fill(known)

    def _parking_wanted(self, cfg) -> bool:
        """Both caches full before training with captions fixed up front (no tag shuffling, no caption dropout),
        the text encoders not trained, and park_frozen on (auto: on CUDA)."""
        tc, d = cfg.train, cfg.data
        park = tc.get("park_frozen", "auto")
        return bool((park is True or (park == "auto" and self.device.type == "cuda")) and tc.cache_latents
                    and tc.cache_text and not cfg.lora.get("text_encoder")
                    and not d.get("shuffle_tags", False) and not d.get("caption_dropout", 0.0))

    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """-> {"ctx"[, "pooled" (SDXL)]} (models/conditioning.py)."""
        tc = self.cfg.train
        with self._frozen_on_device():
            return conditioning.encode(self.sd, captions, tc.get("clip_skip", 1), tc.get("long_prompt", "truncate"))

    @contextlib.contextmanager
    def _frozen_on_device(self, modules=None):
        """The VAE and the text encoder (or the given ones of them) on the training device for the duration
        (they are parked in host memory between previews when the caches make them idle). Inside another, a
        no-op: the outer one chose."""
        if not self.parked or self._frozen_nested:
            yield
            return
        self._frozen_nested = True
        try:
            with parts_on(self.device, *(modules or (self.sd.vae, *self.sd.text_encoders.values()))):
                yield
        finally:
            self._frozen_nested = False

    def _loader(self):
        """Batches from the current position on, through every later epoch, loaded by DataLoader workers
        that live for the whole run (none when latents are cached: then a batch is a memory lookup).
        Augmentation is seeded per (seed, epoch, index), and each index travels with its epoch, so the
        workers change nothing and a resumed loader yields the same batches."""
        from torch.utils.data import DataLoader
        workers = 0 if self.ds.latent_cache is not None else self.cfg.train.get("num_workers", 0)
        plan, epoch, start = self.plan, self.epoch, self.batch_in_epoch

        class Batches:  # an endless batch sampler: [(epoch, index), ...] in the (seed, epoch) order
            def __iter__(self):
                e, s = epoch, start
                while True:
                    for b in plan.batches(e)[s:]:
                        yield [(e, i) for i in b]
                    e, s = e + 1, 0
        # Its own generator: the loader draws worker seeds from it, not from the global RNG that LoRA dropout
        # uses (which would shift the dropout masks of a resumed run).
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
        # No pin_memory: training/staging.py copies each batch into its own pinned buffers.
        return iter(DataLoader(self.ds, batch_sampler=Batches(), collate_fn=collate, num_workers=workers,
                               generator=g, prefetch_factor=4 if workers else None))

    def _next_batch(self) -> dict:
        """The next micro-batch in the (seed, epoch) order; runs on into the next epoch."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if getattr(self, "_iter", None) is None:
            self._iter = self._loader()
        batch = next(self._iter)
        self.batch_in_epoch += 1
        n = len(batch["caption"])
        if self.prior is not None:
            self.prior.set_epoch(self.epoch * 100_003 + self.batch_in_epoch)
            g = torch.Generator().manual_seed(self.cfg.seed + self.step * 7919 + self.batch_in_epoch)
            pidx = torch.randint(0, len(self.prior), (n,), generator=g).tolist()
            pb = collate([self.prior[i] for i in pidx])
            batch = {k: (v + pb[k] if isinstance(v, list) else torch.cat([v, pb[k]])) for k, v in batch.items()}
            batch["n_instance"] = n
        return batch

    # ------------------------------------------------------------------ one step
    def host_inputs(self, batch: dict) -> dict:
        """What one micro-batch needs, drawn on the host from the run's generator in a fixed order (so
        eager, graphed and resumed runs see the same numbers): the latents (or pixels and the posterior's
        noise), the noise (+ offset), the timesteps and the text (embeddings, or token ids to encode)."""
        tc = self.cfg.train
        x = {}
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            x["z0"] = (mean + std * torch.randn(mean.shape, generator=self.gen)) * self.sd.vae.config.scaling_factor
            shape = tuple(mean.shape)
        else:
            px, f = batch["pixels"], self.sd.vae.scale_factor
            if px.shape[2] % f or px.shape[3] % f:
                raise ValueError(f"image size {tuple(px.shape[2:])} is not divisible by the VAE's factor {f}")
            shape = (px.shape[0], self.sd.vae.config.latent_channels, px.shape[2] // f, px.shape[3] // f)
            x["pixels"], x["vae_eps"] = px, torch.randn(shape, generator=self.gen)
        x["noise"] = offset_noise(torch.randn(shape, generator=self.gen), tc.noise_offset, self.gen)
        x["t"] = self.schedule.sample_timesteps(shape[0], self.gen)
        if self.text_cache is not None:
            x.update(self.text_cache(batch["caption"]))                    # ctx[, pooled]
        else:
            ids = conditioning.tokenize_prompts(self.sd, batch["caption"], tc.get("long_prompt", "truncate"))
            x.update({f"ids_{i}": t for i, t in enumerate(ids)})
        if "time_ids" in batch:                                            # SDXL: (B, 6) size conditioning
            x["time_ids"] = batch["time_ids"]
        if "n_instance" in batch:
            x["n_instance"] = batch["n_instance"]
        return x

    def micro_loss(self, x: dict) -> torch.Tensor:
        """Device tensors of one micro-batch -> its loss; device work only (no host sync, no branch on values)."""
        tc = self.cfg.train
        if "z0" in x:
            z0 = x["z0"]                                                   # (B, 4, h, w) fp32
        else:
            # In the VAE's own dtype, not under autocast: as the latent cache encodes (so cached and uncached runs
            # see the same latents) and as diffusers' script does; autocast would run every GroupNorm of the
            # 512x512 encoder in fp32 (the full step was 30 ms over the UNet-only one on the H100, theirs 16).
            with torch.no_grad():
                z0 = self.sd.vae.encode_latents(x["pixels"].to(self.sd.vae.dtype), noise=x["vae_eps"]).float()
        noise, t = x["noise"], x["t"]
        zt = self.schedule.add_noise(z0, noise, t)
        target = self.schedule.target(z0, noise, t)
        if "ctx" in x:
            text = {k: x[k] for k in ("ctx", "pooled") if k in x}
        else:
            ids = [x[k] for k in sorted(x) if k.startswith("ids_")]
            with torch.set_grad_enabled(self.train_te), autocast(self.device, self.precision):
                text = conditioning.encode_ids(self.sd, ids, tc.get("clip_skip", 1))
        unet = self.sd.unet
        added = conditioning.added_cond(text, x.get("time_ids"), unet.dtype)  # SDXL's pooled text + size; else None
        mask_replay.clear()  # the previous micro-batch's backward is done with its kept masks
        with autocast(self.device, self.precision):
            zin = zt.to(unet.dtype)
            if self.channels_last:
                zin = zin.contiguous(memory_format=torch.channels_last)
            pred = unet(zin, t, text["ctx"].to(unet.dtype), added)
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if tc.get("min_snr_gamma"):
            per = per * self.schedule.min_snr_weights(t, tc.min_snr_gamma)
        if "n_instance" in x:
            n = x["n_instance"]
            return per[:n].mean() + self.cfg.data.prior_loss_weight * per[n:].mean()
        return per.mean()

    def device_step(self, inputs: dict) -> torch.Tensor:
        """One optimizer step on the device: grad_accum micro-batches ("<i>.<name>" inputs), unscale, clip,
        AdamW (skipped on device when a gradient is not finite), EMA, loss-scale update.
        -> (4,) float tensor: mean loss, gradient norm, 1.0 if the step was skipped, the loss scale.
        Never waits for the host, so the same function runs eagerly or recorded in a CUDA graph
        (training/graph_step.py)."""
        tc = self.cfg.train
        accum = tc.grad_accum
        grads = [p.grad for p in self.params]
        torch._foreach_zero_(grads)
        losses = []
        for i in range(accum):
            x = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(f"{i}.")}
            with half_weights(*self.half_lora) if self.half_lora else contextlib.nullcontext():
                loss = self.micro_loss(x)
                losses.append(loss.detach().float())
                self.scaler.scale_loss(loss / accum).backward()
        loss = torch.stack(losses).mean()
        self.scaler.unscale_grads(grads)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm or float("inf"), foreach=True)
        found_inf = (~torch.isfinite(gnorm) | ~torch.isfinite(loss)).float()
        if self.opt_skips_on_device:
            self.opt.found_inf = found_inf
            self.opt.step()
            self.opt.found_inf = None  # nothing recorded in a graph may stay referenced from outside it
        elif not bool(found_inf):                     # CPU / non-fused AdamW: decided on the host
            self.opt.step()
        if self.ema:
            self.ema.update(weight=1.0 - found_inf)
        self.scaler.update_(found_inf)
        return torch.stack([loss, gnorm.float(), found_inf, self.scaler.scale_t.to(loss.device)])

    def _set_lr(self) -> float:
        o = self.cfg.optim
        f = lr_factor(self.step, self.total_steps, o.schedule, o.warmup_steps, o.get("min_lr_ratio", 0.0))
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            if torch.is_tensor(g["lr"]):
                g["lr"].fill_(base * f)               # a device write: the graph reads it
            else:
                g["lr"] = base * f
        return self.base_lrs[0] * f

    def launch_step(self) -> torch.Tensor:
        """Prepare and enqueue one optimizer step without waiting for it. -> its statistics (device tensor)."""
        lr = self._set_lr()
        if not self.sd.unet.training:  # (a preview switched it to eval; train() walks every module)
            self.sd.unet.train()
        for te in self.sd.text_encoders.values() if self.train_te else ():
            if not te.training:
                te.train()
        host = {}
        for i in range(self.cfg.train.grad_accum):
            host.update({f"{i}.{k}": v for k, v in self.host_inputs(self._next_batch()).items()})
        static = {k: v for k, v in host.items() if not torch.is_tensor(v)}
        inputs = {**self.stager({k: v for k, v in host.items() if torch.is_tensor(v)}), **static}
        stats = self.graphed(inputs) if self.graphed is not None else self.device_step(inputs)
        out, done = stats, None
        if stats.is_cuda:   # copied out behind the step, so that reading it waits for this step and no later one
            out = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True).copy_(stats, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        self._pending.append((self.step, lr, out, done))
        self.step += 1
        return stats

    def drain(self, keep_newest: bool = False) -> list[dict]:
        """Read the statistics of the enqueued steps (one wait for the device), apply the NaN rules, log.
        keep_newest: leave the newest step unread, so the wait ends when the one before it is done and the GPU
        goes on computing while the host logs and prepares the next step (a full read every log_every steps
        left it idle for that long; H100, batch 8 0.0500 -> 0.0494-0.0504 s/step, batch 2 0.0207 -> 0.0203,
        experiments/bench/RESULTS.md, session 8)."""
        n = len(self._pending) - (1 if keep_newest else 0)
        if n <= 0:
            return []
        ready, self._pending = self._pending[:n], self._pending[n:]
        if ready[-1][3] is not None:
            ready[-1][3].synchronize()            # (stream order: every earlier step's copy is done too)
        vals = [s.tolist() for _, _, s, _ in ready]
        now = time.perf_counter()
        dt = (now - self._last_drain) / len(vals) if self._last_drain is not None else float("nan")
        self._last_drain = now
        records = []
        for (step, lr, _, _), (loss, gnorm, skipped, scale) in zip(ready, vals):
            records.append({"step": step + 1, "loss": loss, "grad_norm": gnorm, "skipped": bool(skipped), "lr": lr,
                            "loss_scale": scale, "dt": dt})
        for rec in records:
            self._log(rec)
            if rec["skipped"]:
                self.nan_streak += 1
                if self.nan_streak >= self.cfg.train.max_nan_steps:
                    raise NaNLossError(
                        f"{self.nan_streak} steps in a row had a NaN/inf loss or gradient (last at step "
                        f"{rec['step'] - 1}); stopping. Lower the learning rate, use bf16 instead of fp16, or "
                        f"check the data. The last good state is in {self.run_dir / 'state'}.")
            else:
                self.nan_streak = 0
        return records

    def optimizer_step(self) -> dict:
        """One step, waited for: -> {"loss", "grad_norm", "skipped", "lr", "step"}."""
        self.launch_step()
        return self.drain()[-1]

    # ------------------------------------------------------------------ state
    def lora_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for part, mod in self.sd.parts.items():
            for n, p in mod.named_parameters():
                if p.requires_grad:
                    out[f"{part}.{n}"] = p.detach().cpu().clone()
        return out

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "nan_streak": self.nan_streak, "smooth": self.smooth if self.smooth is not None else float("nan"),
                "lora": self.lora_tensors(), "optimizer": optimizer_state(self.opt), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema else {}, "rng": rng_state(self.gen),
                "config": OmegaConf.to_yaml(self.cfg)}

    def load(self, st: dict) -> None:
        named = {f"{part}.{n}": p for part, mod in self.sd.parts.items()
                 for n, p in mod.named_parameters() if p.requires_grad}
        if set(named) != set(st["lora"]) or any(p.shape != st["lora"][k].shape for k, p in named.items()):
            raise ValueError("the saved state's LoRA modules differ from this config's (targets, rank or text "
                             "encoder changed?): resume with the run's own config")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(st["lora"][k])
        self.opt.load_state_dict(st["optimizer"])
        set_capturable(self.opt, self.graph_mode)
        self.scaler.load_state_dict(st["scaler"])
        if self.ema and st["ema"]:
            self.ema.load_state_dict(st["ema"])
        self.step, self.epoch, self.batch_in_epoch = st["step"], st["epoch"], st["batch_in_epoch"]
        self._iter = None  # the loader restarts at the saved position
        self.nan_streak = st["nan_streak"]
        self.smooth = None if math.isnan(st["smooth"]) else st["smooth"]
        set_rng_state(st["rng"], self.gen)

    def save_lora(self, path: Path, ema: bool = False) -> Path:
        parts = self.sd.parts if self.train_te else {"unet": self.sd.unet}
        meta = {"ss_output_name": path.stem, "ss_steps": str(self.step), "ss_epoch": str(self.epoch),
                "ss_learning_rate": str(self.cfg.optim.lr), "ss_sd_model_name": str(self.cfg.model.path),
                "ss_sd_model_hash": self._base_hash(),
                "ss_base_model_version": "sdxl_base_v1-0" if conditioning.is_sdxl(self.sd) else "sd_v1",
                "ss_network_dropout": str(self.cfg.lora.dropout), "loralab_targets": json.dumps(
                    plain(self.cfg.lora.targets)), "loralab_commit": git_commit(),
                "loralab_caption_version": str(self.cfg.data.get("caption_version")),
                "ss_training_comment": f"loralab {self.cfg.get('name', '')}"}
        if ema and self.ema:
            self.ema.swap()
        try:
            return save_lora(parts, path, metadata=meta)
        finally:
            if ema and self.ema:
                self.ema.swap()

    def _base_hash(self) -> str:
        if not hasattr(self, "_hash"):
            from models.checkpoint import model_hash
            self._hash = model_hash(self.cfg.model.path) if Path(str(self.cfg.model.path)).exists() else ""
        return self._hash

    def checkpoint(self) -> None:
        self.save_lora(self.run_dir / "checkpoints" / f"step_{self.step:06d}.safetensors")
        save_state(self.run_dir, self.state())

    # ------------------------------------------------------------------ the run
    def _log(self, rec: dict) -> None:
        tc = self.cfg.train
        if not rec["skipped"]:
            self.smooth = rec["loss"] if self.smooth is None else 0.98 * self.smooth + 0.02 * rec["loss"]
        if self.writer is None:
            return
        w, s, dt = self.writer, rec["step"], rec["dt"]
        w.add_scalar("train/loss", rec["loss"], s)
        if self.smooth is not None:
            w.add_scalar("train/loss_smooth", self.smooth, s)
        w.add_scalar("train/lr", rec["lr"], s)
        w.add_scalar("train/grad_norm", rec["grad_norm"], s)
        w.add_scalar("train/loss_scale", rec["loss_scale"], s)
        w.add_scalar("train/skipped_steps", float(rec["skipped"]), s)
        w.add_scalar("perf/s_per_step", dt, s)
        w.add_scalar("perf/images_per_s", tc.batch_size * tc.grad_accum / max(dt, 1e-9), s)
        if self.device.type == "cuda":
            w.add_scalar("perf/gpu_mem_gib", torch.cuda.max_memory_allocated() / 2 ** 30, s)

    def preview(self) -> None:
        """Images from fixed prompts and seeds, into TensorBoard and <run>/previews/."""
        from experiments.images import make_grid, save_png, to_pil
        p = self.cfg.preview
        for m in self.sd.parts.values():
            m.eval()
        tiles = []
        with self._frozen_on_device(), autocast(self.device, self.precision):
            for i, prompt in enumerate(p.prompts):
                imgs = generate(self.sd, prompt, p.get("negative_prompt", ""), steps=p.steps,
                                guidance_scale=p.guidance_scale, sampler=p.sampler, seed=p.seed + i,
                                num_images=1, height=p.size, width=p.size)
                tiles.append(to_pil(imgs[0]))
        grid = make_grid(tiles, len(tiles))
        save_png(grid, self.run_dir / "previews" / f"step_{self.step:06d}.png", f"previews at step {self.step}")
        if self.writer is not None:
            import numpy as np
            self.writer.add_image("preview", np.asarray(grid), self.step, dataformats="HWC")

    def final_samples(self, lora_file: Path) -> list[dict]:
        """The evaluation images: the experiment's prompts on its inference model with the trained LoRA,
        one folder per guidance scale (samples/cfg_4.0/...), each PNG with its A1111 parameters."""
        from experiments.images import a1111_parameters, save_png
        from lora.io import load_lora
        inf = self.cfg.inference
        m = inf.model
        same = str(m.path) == str(self.cfg.model.path) and m.get("vae") == self.cfg.model.get("vae")
        if same:
            sd = self.sd
        else:  # experiment 4: the LoRA trained here, applied to another base
            sd = load_model(m.path, dtype=self.sd.unet.dtype, device=self.device, vae=m.get("vae"),
                            config=m.get("config"))
            load_lora(sd.parts, lora_file)
        for mod in sd.parts.values():
            mod.eval()
        manifest, metrics = [], {}
        score = inf.get("subject_score", False)  # the tiny world's identity classifier (no downloads)
        if score:
            from experiments.tiny_world.identity import subject_score

        def run_prompts(g):
            out = []
            for i, prompt in enumerate(inf.prompts):
                with autocast(self.device, self.precision):
                    out.append(generate(sd, prompt, inf.negative_prompt, steps=inf.steps, guidance_scale=float(g),
                                        sampler=inf.sampler, seed=inf.seed + i, num_images=inf.images_per_prompt,
                                        height=inf.size, width=inf.size))
            return out
        for g in inf.guidance_scales:
            folder = self.run_dir / "samples" / f"cfg_{float(g)}"
            with self._frozen_on_device() if same else contextlib.nullcontext():
                batches = run_prompts(g)
            if score:
                metrics[f"cfg_{float(g)}"] = {"subject_score": subject_score(torch.cat(batches))}
                if inf.get("compare_base"):  # the same prompts and seeds without the LoRA
                    for mod in sd.parts.values():
                        set_enabled(mod, False)
                    with self._frozen_on_device() if same else contextlib.nullcontext():
                        base = run_prompts(g)
                    metrics[f"cfg_{float(g)}"]["base_subject_score"] = subject_score(torch.cat(base))
                    for mod in sd.parts.values():
                        set_enabled(mod, True)
            for i, (prompt, imgs) in enumerate(zip(inf.prompts, batches)):
                for j, img in enumerate(imgs):
                    name = f"{i:02d}_{j:02d}.png"
                    params = a1111_parameters(prompt, inf.negative_prompt, {
                        "Steps": inf.steps, "Sampler": inf.sampler, "CFG scale": float(g), "Seed": inf.seed + i,
                        "Batch index": j, "Size": f"{inf.size}x{inf.size}", "Model": m.name})
                    save_png(img, folder / name, params)
                    manifest.append({"file": str((folder / name).relative_to(self.run_dir)), "prompt": prompt,
                                     "guidance_scale": float(g), "seed": inf.seed + i, "batch_index": j,
                                     "inference_model": str(m.name), "base_model": str(self.cfg.model.name)})
        (self.run_dir / "samples" / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if metrics:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            self.metrics = metrics
        return manifest

    def _on_signal(self, signum, frame):
        self.stop_requested = True

    def run(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm
        cfg, tc = self.cfg, self.cfg.train
        if cfg.get("resume"):
            self.load(load_state(cfg.resume))
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (self.run_dir / "run_info.json").write_text(json.dumps({
            "commit": git_commit(), "lora": str(self.report), "data": str(self.scan_report),
            "total_steps": self.total_steps, "device": str(self.device),
            "attention": sdpa_backend.describe()}, indent=2))
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step if self.step else None)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        status = "finished"
        log_every = max(1, int(tc.get("log_every", 10)))
        self._last_drain = time.perf_counter()
        try:
            while self.step < self.total_steps:
                self.launch_step()    # enqueued; the host reads results only every log_every steps
                save = bool(tc.save_every_steps and self.step % tc.save_every_steps == 0
                            and self.step < self.total_steps)
                show = bool(cfg.preview.every_steps and self.step % cfg.preview.every_steps == 0)
                halt = "interrupted" if self.stop_requested else \
                    "stopped" if tc.get("stop_after_steps") and self.step >= tc.stop_after_steps else None  # (tests)
                last = save or show or halt or self.step >= self.total_steps   # these need every step read
                if len(self._pending) >= log_every or last:
                    for rec in self.drain(keep_newest=not last):
                        bar.update(1)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", skipped=rec["skipped"])
                if save:
                    self.checkpoint()
                if show:
                    self.preview()
                if halt:  # decided once, before the read above: a signal arriving now waits for the next step
                    status = halt
                    break
        finally:
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        if status == "finished":
            save_state(self.run_dir, self.state())
        else:  # interrupted: the LoRA so far and the state to resume from
            self.checkpoint()
        result = {"status": status, "step": self.step, "epoch": self.epoch, "loss_smooth": self.smooth}
        if status == "finished":
            lora = self.save_lora(self.run_dir / "lora.safetensors")
            result["lora"] = str(lora)
            if self.ema:
                result["lora_ema"] = str(self.save_lora(self.run_dir / "lora_ema.safetensors", ema=True))
            if cfg.preview.every_steps:
                self.preview()
            if cfg.inference.enabled:
                result["samples"] = len(self.final_samples(lora))
                if cfg.inference.get("evaluate"):  # LPIPS/FID (null without their weights), PSNR, SSIM
                    from experiments.evaluate import Scorer, evaluate_run
                    self.metrics = evaluate_run(self.run_dir, Scorer(cfg.inference.get("inception_weights"),
                                                                     cfg.inference.get("lpips_backbone")))
                    self.metrics = {k: v for k, v in self.metrics.items() if k.startswith("cfg_")}
        (self.run_dir / "train_result.json").write_text(json.dumps(result, indent=2))
        hp = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "lr": cfg.optim.lr, "batch": tc.batch_size,
              "caption_version": str(cfg.data.get("caption_version")), "targets": str(cfg.lora.targets)}
        final = {"hparam/loss_smooth": self.smooth or float("nan")}
        for k, v in self.metrics.items():
            final.update({f"hparam/{k}/{m}": x for m, x in v.items() if isinstance(x, (int, float))})
        result["metrics"] = self.metrics
        (self.run_dir / "train_result.json").write_text(json.dumps(result, indent=2))
        self.writer.add_hparams(hp, final, run_name=".")
        self.writer.close()
        return result


def train(cfg: DictConfig) -> dict:
    return Trainer(cfg).run()
