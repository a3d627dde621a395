"""Our side of the training benchmark: the real Trainer (data, staging, step, logging) on the random
SD1.5 folder. `python -m experiments.bench.ours CONFIG PART MODE` prints one JSON line."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from experiments.bench.configs import CONFIGS, DROPOUT, LR
from experiments.bench.world import image_folder, sd15_folder

MODES = {  # name -> train.* overrides
    "eager": ["train.cuda_graph=false"],
    "graph": ["train.cuda_graph=true"],
    "graph_cl": ["train.cuda_graph=true", "train.channels_last=true"],
    "graph_compile": ["train.cuda_graph=true", "train.compile=true"],
}


def trainer(name: str, part: str, mode: str, root: Path, run_dir: Path):
    from hydra import compose, initialize_config_dir

    import training.config  # noqa: F401  (the ${root:} resolver)
    from training.config import CONF_DIR
    from training.loop import Trainer
    c = CONFIGS[name]
    cached = part == "unet"
    ov = [f"model.path={sd15_folder(root)}", f"data.path={image_folder(root)}", "data.resolution=512",
          "device=cuda", f"run_dir={run_dir}", f"lora={c['lora_conf']}", f"lora.rank={c['rank']}",
          f"lora.alpha={c['alpha']}", f"lora.dropout={DROPOUT}", f"train.batch_size={c['batch']}",
          f"train.precision={c['precision']}", f"train.grad_checkpointing={c['ckpt']}", "train.max_steps=100000",
          "train.save_every_steps=0", "preview.every_steps=0", f"optim.lr={LR}", "train.num_workers=6",
          f"train.cache_latents={cached}", f"train.cache_text={cached}", *MODES[mode]]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return Trainer(compose("config", overrides=ov))


def measure(name: str, part: str, mode: str, root: Path, warm: int = 4, steps: int = 30) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tr = trainer(name, part, mode, root, Path(tmp))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t_first = time.perf_counter()
        for _ in range(warm):
            tr.launch_step()
            tr.drain()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            tr.launch_step()
            if (i + 1) % 10 == 0:
                tr.drain()
        recs = tr.drain()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        out = {"impl": "ours", "config": name, "part": part, "mode": mode, "s_per_step": dt,
               "images_per_s": CONFIGS[name]["batch"] / dt, "warmup_s": t0 - t_first,
               "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
               "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30,
               "last_loss": recs[-1]["loss"] if recs else None,
               "skipped": sum(r["skipped"] for r in recs) if recs else None,
               "lora_params": tr.report.num_parameters}
        if mode == "eager" and part == "unet":
            out["flops_per_step"] = count_flops(tr)
        return out


def count_flops(tr) -> float:
    """Model FLOPs of one training step (UNet forward + backward, matmuls, convolutions, attention),
    counted by torch.utils.flop_counter on one eager step."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        tr.launch_step()
        tr.drain()
    return float(fc.get_total_flops())


def sample(root: Path, mode: str, steps: int = 50, guidance: float = 7.5, repeats: int = 3) -> dict:
    """50 DDIM steps with CFG (negative prompt) at 512x512 in fp16, a r32 LoRA applied (not merged), VAE decode."""
    from experiments.bench.world import CAPTIONS
    from lora.inject import inject_lora
    from models.load import load_model
    from models.pipeline import generate
    sd = load_model(sd15_folder(root), dtype="fp16", device="cuda")
    c = CONFIGS["report"]
    inject_lora(sd.unet, c["targets"], rank=c["rank"], alpha=c["alpha"], dtype=torch.float16)
    sd.unet.eval()
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats()

    def one(seed):
        return generate(sd, CAPTIONS[0], "blurry, distorted face", steps=steps, guidance_scale=guidance,
                        sampler="ddim", seed=seed, num_images=1, height=512, width=512,
                        cuda_graph=mode == "graph")
    t_first = time.perf_counter()
    one(0)
    warm = time.perf_counter() - t_first
    times = []
    for r in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        one(r + 1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"impl": "ours", "config": "sampling", "part": f"ddim{steps}_cfg{guidance}_512", "mode": mode,
            "s_per_image": times[len(times) // 2], "first_call_s": warm,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


if __name__ == "__main__":
    name, part, mode = sys.argv[1:4]
    root = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("/tmp/bench")
    res = sample(root, mode) if name == "sampling" else measure(name, part, mode, root)
    print("RESULT " + json.dumps(res), flush=True)
