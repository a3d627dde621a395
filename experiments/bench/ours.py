"""Our side of the benchmark: the real Trainer (data, staging, step, logging) and the real sampler.

    python -m experiments.bench.ours CONFIG PART MODE [ROOT] [--tiny] [--gpu-gib N]   -> one line `RESULT {json}`
CONFIG: configs.CONFIGS or "sampling"; PART: unet (latents and text cached) | full (VAE and text encoder
every step); MODE: see MODES. --gpu-gib N: the caching allocator may hold at most N GiB, as on a smaller GPU
(an 8 GB card leaves about 7 GiB after the CUDA context).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path


from experiments.bench.configs import (CONFIGS, DROPOUT, LR, SAMPLING, cap_gpu_memory, median_seconds, peak_memory,
                                      reset_peak, split_peak, sync, world)

_OFF = {"train.cuda_graph": "false", "train.channels_last": "false", "train.half_norms": "false",
        "train.nhwc_norms": "false", "train.fused_geglu": "false", "train.cast_lora_once": "false",
        "train.fold_biases": "false", "train.fused_lora_backward": "false",
        "train.triton_lora_dropout": "false", "train.fused_layer_norms": "false", "train.nhwc_upsample": "false",
        "train.triton_lora_gemm": "false", "train.short_attention": "false",
        "train.lora_grad_stream": "false", "train.ahead_stream": "false", "train.pdl": "false",
        "train.subpixel_upsample": "false", "train.fused_qkv_lora": "false", "train.thin_convs": "false"}


def _mode(**on) -> list[str]:
    """train.* overrides: the named switches on, the other speed switches off (not the config's auto)."""
    return [f"{k}={v}" for k, v in {**_OFF, **{f"train.{n}": "true" for n in on}}.items()]


MODES = {  # name -> train.* overrides
    "default": [],  # the config as shipped (on CUDA: graph, channels_last, half norms, NHWC norms, fused GEGLU)
    "eager": _mode(),
    "graph": _mode(cuda_graph=1),
    "graph_cl": _mode(cuda_graph=1, channels_last=1),
    "graph_hn": _mode(cuda_graph=1, half_norms=1),
    "graph_cl_hn": _mode(cuda_graph=1, channels_last=1, half_norms=1),
    "cl_hn": _mode(channels_last=1, half_norms=1),  # session 4's default, launched eagerly (for the profiler)
    "cl_hn_triton": _mode(channels_last=1, half_norms=1, nhwc_norms=1, fused_geglu=1),  # session 5's default, eagerly
    "eager_default": _mode(channels_last=1, half_norms=1, nhwc_norms=1, fused_geglu=1, cast_lora_once=1,
                           fold_biases=1, fused_lora_backward=1, triton_lora_dropout=1,
                           fused_layer_norms=1, nhwc_upsample=1, triton_lora_gemm=1,
                           short_attention=1, lora_grad_stream=1, ahead_stream=1, pdl=1,
                           subpixel_upsample=1, fused_qkv_lora=1, thin_convs=1),  # the default, eagerly
    "graph_fq": _mode(cuda_graph=1, fused_projections=1),
    "graph_compile": _mode(cuda_graph=1, compile=1),
    "compile": _mode(compile=1),
    "default_compile": ["train.compile=true"],  # the shipped config plus torch.compile
    "default_no_triton": ["train.nhwc_norms=false", "train.fused_geglu=false"],  # session 4's default: no NHWC GroupNorm, no fused GEGLU
    "default_no_geglu": ["train.fused_geglu=false"],
    "default_no_cast": ["train.cast_lora_once=false"],  # autocast casts each LoRA weight where it is used
    "default_no_fold": ["train.fold_biases=false"],     # torch adds each conv bias after cuDNN's kernel
    "default_no_lora_fn": ["train.fused_lora_backward=false"],  # autograd sums the LoRA's input gradient
    "default_torch_dropout": ["train.triton_lora_dropout=false"],  # the LoRA function with torch's dropout kernel
    "default_no_fused_ln": ["train.fused_layer_norms=false"],  # torch's LayerNorm and residual adds
    "default_no_upsample": ["train.nhwc_upsample=false"],      # torch's nearest upsampling kernel
    "default_no_lora_gemm": ["train.triton_lora_gemm=false"],  # cuBLAS + a second GEMM / masked add for the LoRA term
    "default_no_qkv": ["train.fused_qkv_lora=false"],  # q, k, v each through lora/linear_fn.py
    "default_no_short_attention": ["train.short_attention=false"],  # cuDNN's SDPA for cross-attention too
    "default_no_grad_stream": ["train.lora_grad_stream=false"],  # LoRA weight gradients on the main stream
    "default_no_ahead": ["train.ahead_stream=false"],  # text/timestep projections inline on the main stream
    "default_no_pdl": ["train.pdl=false"],             # our Triton kernels launched plainly (no programmatic dependent launch)
    "default_no_subpixel": ["train.subpixel_upsample=false"],  # the upsamplers' conv on the upsampled image
    "default_no_cudnn_benchmark": ["train.cudnn_benchmark=false"],  # cuDNN's heuristic choice: no timed search
    "default_no_graph": ["train.cuda_graph=false"],            # the step launched eagerly (no graph pool)
    "default_all_algos": ["train.cudnn_benchmark_limit=0"],    # cuDNN times every convolution algorithm
    "session6": ["train.fused_layer_norms=false", "train.nhwc_upsample=false"],  # session 6's default (+ bf16 upsampling)
    "session5": ["train.cast_lora_once=false", "train.fold_biases=false", "train.fused_lora_backward=false",
                 "train.triton_lora_dropout=false", "train.fused_layer_norms=false", "train.nhwc_upsample=false"],
    "default_flash": ["train.sdpa_backend=flash"],  # FlashAttention-2 first instead of torch's order
    "default_fa4": ["train.sdpa_backend=fa4"],      # FlashAttention-4's Hopper kernels (flash-attn-4 installed)
    "default_torch_sdpa": ["train.sdpa_backend=torch"],  # torch's order even where flash-attn-4 is installed
    "default_nchw_vae": ["train.nhwc_vae=false"],   # the VAE NCHW with torch's GroupNorm (the full step's encode)
    "default_vae_heuristic": ["train.vae_conv_search=false"],  # cuDNN's heuristic algorithms inside the VAE
    "eager_vae_heuristic": ["train.cuda_graph=false", "train.vae_conv_search=false"],  # the same, launched eagerly
    "eager_vae_search": ["train.cuda_graph=false", "train.vae_conv_search=true"],
}


def trainer(name: str, part: str, mode: str, w: dict, run_dir: Path):
    from hydra import compose, initialize_config_dir

    import training.config  # noqa: F401  (the ${root:} resolver)
    from training.config import CONF_DIR
    from training.loop import Trainer
    c = CONFIGS[name]
    cached = part == "unet"
    ov = [f"model.path={w['model']}", f"data.path={w['data']}", f"data.resolution={w['resolution']}",
          f"device={w['device']}", f"run_dir={run_dir}", f"lora={c['lora_conf']}", f"lora.rank={c['rank']}",
          f"lora.alpha={c['alpha']}", f"lora.dropout={DROPOUT}", f"train.batch_size={c['batch']}",
          f"train.precision={w['precision'] or c['precision']}", f"train.grad_checkpointing={c['ckpt']}",
          "train.max_steps=100000", "train.save_every_steps=0", "preview.every_steps=0", f"optim.lr={LR}",
          f"train.num_workers={6 if w['device'] == 'cuda' else 0}", f"train.cache_latents={cached}",
          f"train.cache_text={cached}", *MODES[mode]]   # no CUDA graph on a CPU
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return Trainer(compose("config", overrides=ov))


def run_steps(tr, n: int) -> None:
    """n optimizer steps launched back to back, their records drained, the GPU waited for."""
    import torch
    for _ in range(n):
        tr.launch_step()
    tr.drain()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def warm_trainer(name: str, mode: str, warm: int, root: str = "/tmp/bench", part: str = "unet"):
    """The Trainer of config `name` and `part` (unet: cached latents and text; full) on the SD1.5-size GPU world,
    after `warm` steps (cuDNN's algorithm search, the CUDA graph's recording), in a run directory that lives as
    long as the context."""
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer(name, part, mode, world(root, False), Path(tmp))
        run_steps(tr, warm)
        yield tr


def measure(name: str, part: str, mode: str, w: dict) -> dict:
    dev = w["device"]
    with tempfile.TemporaryDirectory() as tmp:
        reset_peak(dev)
        tr = trainer(name, part, mode, w, Path(tmp))
        build = peak_memory(dev).get("peak_alloc_gib")   # loading the model, filling the caches
        flops = count_flops(tr) if mode == "eager" and part == "unet" else None
        reset_peak(dev)
        t_first = time.perf_counter()
        for _ in range(w["warm"]):
            tr.launch_step()
            tr.drain()
        sync(dev)
        warm_peak = peak_memory(dev)
        reset_peak(dev)
        t0 = time.perf_counter()
        recs = []
        for i in range(w["steps"]):
            tr.launch_step()
            if (i + 1) % 10 == 0:   # as Trainer.run reads them (BENCH_FULL_DRAIN=1: as it did before session 8)
                recs += tr.drain(keep_newest=not os.environ.get("BENCH_FULL_DRAIN"))
        recs += tr.drain()
        sync(dev)
        dt = (time.perf_counter() - t0) / w["steps"]
        return {"impl": "ours", "config": name, "part": part, "mode": mode, "device": dev, "s_per_step": dt,
                "images_per_s": CONFIGS[name]["batch"] / dt, "warmup_s": t0 - t_first, **split_peak(dev, warm_peak),
                "last_loss": recs[-1]["loss"], "skipped": sum(r["skipped"] for r in recs),
                "lora_params": tr.report.num_parameters, "flops_per_step": flops, "build_alloc_gib": build,
                "graph_failed": tr.graphed.failed if tr.graphed is not None else None}


def count_flops(tr) -> float:
    """Model FLOPs of one optimizer step (UNet forward + backward: matmuls, convolutions, attention),
    counted by torch.utils.flop_counter on one eager step (not timed)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        tr.launch_step()
        tr.drain()
    return float(fc.get_total_flops())


def sample(mode: str, w: dict, steps: int = 50, guidance: float = 7.5, repeats: int = 3,
           name: str = "sampling") -> dict:
    """50 DDIM steps with CFG (a negative prompt), the LoRA of SAMPLING[name] applied (not merged; the report's
    r32, or seed 004's r4 on SDXL), VAE decode: s/image.
    mode: graph (CUDA graph, Triton kernels, torch's attention: sample.py's default without flash-attn-4),
    graph_fa4 (the same with sdpa_backend=fa4: sample.py's default, auto, where flash-attn-4 is installed),
    graph_torch_kernels, eager, offload (sample.py's
    offload=true: the model in host memory, each part on the GPU only for its stage, the UNet's graph recorded for
    each prompt), offload_eager (the same without the graph)."""
    dev = w["device"]
    one = sampler(mode, w, steps, guidance, name)
    reset_peak(dev)  # cuDNN benchmarking stays off, as in sample.py
    peaks = []
    median, first = median_seconds(one, dev, repeats, lambda: (peaks.append(peak_memory(dev)), reset_peak(dev)))
    return {"impl": "ours", "config": name, "part": f"ddim{steps}_cfg{guidance}_{w['resolution']}", "mode": mode,
            "device": dev, "s_per_image": median, "first_call_s": first, **split_peak(dev, peaks[0])}


def sampler(mode: str, w: dict, steps: int = 50, guidance: float = 7.5, name: str = "sampling"):
    """The model of `sample`'s job loaded, its LoRA applied: -> one(seed), generating one image."""
    from experiments.bench.world import CAPTIONS
    from lora.inject import inject_lora
    from models.load import as_dtype, load_model
    from models.pipeline import generate
    from models import sdpa_backend
    dev = w["device"]
    offload = dev if mode.startswith("offload") else None
    sd = load_model(w["model"], dtype=w["sample_dtype"], device="cpu" if offload else dev)
    c = CONFIGS[SAMPLING[name]]
    inject_lora(sd.unet, c["targets"], rank=c["rank"], alpha=c["alpha"], dtype=as_dtype(w["sample_dtype"]))
    sd.unet.eval()
    sdpa_backend.set_policy("fa4" if mode == "graph_fa4" else "torch")  # sample.py's sdpa_backend (default auto)
    if dev == "cuda" and mode != "graph_torch_kernels":  # as sample.py's triton_kernels=auto
        sd.set_triton_kernels(True)
    if dev == "cuda":                                   # as sample.py's subpixel_upsample=auto
        sd.unet.set_subpixel_upsampling(True)
        sd.vae.set_subpixel_upsampling(True)
    size = w["resolution"]

    def one(seed):
        return generate(sd, CAPTIONS[0], "blurry, distorted face", steps=steps, guidance_scale=guidance,
                        sampler="ddim", seed=seed, num_images=1, height=size, width=size,
                        cuda_graph=mode in ("graph", "graph_fa4", "graph_torch_kernels", "offload"),
                        offload=offload,
                        decode_slice=1 if offload else None)
    return one


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    cap_gpu_memory(sys.argv, args)
    name, part, mode = args[:3]
    w = world(args[3] if len(args) > 3 else "/tmp/bench", "--tiny" in sys.argv, name)
    res = sample(mode, w, name=name) if name in SAMPLING else measure(name, part, mode, w)
    print("RESULT " + json.dumps(res), flush=True)
