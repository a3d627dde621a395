"""The baseline: diffusers + peft as diffusers' train_text_to_image_lora.py trains (fp16/bf16 weights,
LoRA parameters cast to fp32, autocast, GradScaler for fp16, AdamW, clip 1.0, the loss read every step
for logging), and StableDiffusionPipeline for sampling. Measurement code only: the framework itself
never imports diffusers or peft. `python -m experiments.bench.baseline_diffusers CONFIG PART MODE`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.bench.configs import CONFIGS, DROPOUT, LR
from experiments.bench.world import CAPTIONS, sd15_folder

DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load(folder: Path, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).cuda()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).cuda()
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).cuda()
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    for m in (unet, vae, te):
        m.requires_grad_(False)
    return unet, vae, te, tok


def add_lora(unet, c: dict, dropout: float, fp32: bool = True):
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=c["rank"], lora_alpha=c["alpha"], lora_dropout=dropout,
                                init_lora_weights="gaussian", target_modules=c["targets"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params if fp32 else []:  # diffusers' cast_training_params(unet, dtype=torch.float32)
        p.data = p.data.float()
    return params


def measure(name: str, part: str, mode: str, root: Path, warm: int = 4, steps: int = 30) -> dict:
    from diffusers import DDPMScheduler
    c = CONFIGS[name]
    dtype, b = DT[c["precision"]], c["batch"]
    folder = sd15_folder(root)
    unet, vae, te, tok = load(folder, dtype)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    params = add_lora(unet, c, DROPOUT)
    if c["ckpt"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    model = torch.compile(unet) if mode == "compile" else unet
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=c["precision"] == "fp16")
    g = torch.Generator("cuda").manual_seed(0)
    pixels = torch.rand((b, 3, 512, 512), generator=g, device="cuda").mul(2).sub(1).to(dtype)
    ids = tok([CAPTIONS[i % len(CAPTIONS)] for i in range(b)], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        lat_cached = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        enc_cached = te(ids, return_dict=False)[0]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    def step():
        if part == "full":
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                enc = te(ids, return_dict=False)[0]
        else:
            latents, enc = lat_cached, enc_cached
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device="cuda").long()
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast("cuda", dtype=dtype):
            pred = model(noisy, t, enc, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()   # the script logs the gathered loss every step
    t_first = time.perf_counter()
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"impl": "diffusers+peft", "config": name, "part": part, "mode": mode, "s_per_step": dt,
            "images_per_s": b / dt, "warmup_s": t0 - t_first,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30, "last_loss": loss,
            "lora_params": sum(p.numel() for p in params)}


def sample(root: Path, steps: int = 50, guidance: float = 7.5, repeats: int = 3) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    folder = sd15_folder(root)
    unet, vae, te, tok = load(folder, torch.float16)
    add_lora(unet, CONFIGS["report"], 0.0, fp32=False)  # as load_lora_weights leaves it: fp16, not fused
    unet.eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.reset_peak_memory_stats()

    def one(seed):
        return pipe(CAPTIONS[0], negative_prompt="blurry, distorted face", num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    one(0)
    times = []
    for r in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        one(r + 1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"impl": "diffusers+peft", "config": "sampling", "part": f"ddim{steps}_cfg{guidance}_512",
            "mode": "eager", "s_per_image": times[len(times) // 2],
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


if __name__ == "__main__":
    root = Path(sys.argv[4]) if len(sys.argv) > 4 else Path("/tmp/bench")
    if sys.argv[1] == "sampling":
        res = sample(root)
    else:
        res = measure(sys.argv[1], sys.argv[2], sys.argv[3], root)
    print("RESULT " + json.dumps(res), flush=True)
