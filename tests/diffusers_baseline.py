"""The benchmark's baseline: diffusers + peft as diffusers' train_text_to_image_lora.py trains (fp16/bf16
weights, LoRA parameters cast to fp32, autocast, GradScaler for fp16, AdamW, clip 1.0, the loss read
every step for logging), and StableDiffusionPipeline for sampling. SDXL configs as
train_dreambooth_lora_sdxl.py: both text encoders (penultimate layers concatenated, bigG's pooled
projection) and the size conditioning as added_cond_kwargs; the full step (no caching) with the fp32 VAE.

It lives in tests/ because diffusers and peft are oracles here: nothing outside tests/ imports them.
experiments/bench/run_all.py runs it as `python tests/diffusers_baseline.py CONFIG PART MODE [ROOT] [--tiny]`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from experiments.bench.configs import (CONFIGS, DROPOUT, LR, SAMPLING, cap_gpu_memory, median_seconds,  # noqa: E402
                                       peak_memory, reset_peak, split_peak, sync, world)
from experiments.bench.world import CAPTIONS  # noqa: E402

DT = {"fp16": torch.float16, "bf16": torch.bfloat16}
NEG = "blurry, distorted face"


def load(folder: Path, dtype, device):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).to(device)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device)
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    for m in (unet, vae, te):
        m.requires_grad_(False)
    return unet, vae, te, tok


def sdxl_encoders(folder: Path, dtype, device) -> list:
    """SDXL's two text encoders with their tokenizers, frozen, on the device."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    return [(cls.from_pretrained(folder, subfolder=sub, torch_dtype=dtype).to(device).requires_grad_(False),
             CLIPTokenizer.from_pretrained(folder, subfolder=sub.replace("text_encoder", "tokenizer")))
            for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))]


def sdxl_encode(encoders: list, captions: list[str], device):
    """train_dreambooth_lora_sdxl.py's encode_prompt: -> (prompt_embeds (B, 77, 2048), pooled (B, 1280))."""
    embeds, pooled = [], None
    for te, tok in encoders:
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = te(ids.to(device), output_hidden_states=True)
        pooled = out[0]                     # the last encoder's: CLIPTextModelWithProjection's text_embeds
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def add_lora(unet, c: dict, dropout: float, fp32: bool = True):
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=c["rank"], lora_alpha=c["alpha"], lora_dropout=dropout,
                                init_lora_weights="gaussian", target_modules=c["targets"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params if fp32 else []:  # diffusers' cast_training_params(unet, dtype=torch.float32)
        p.data = p.data.float()
    return params


def measure(name: str, part: str, mode: str, w: dict) -> dict:
    from diffusers import DDPMScheduler
    c = CONFIGS[name]
    dev, precision, b = w["device"], w["precision"] or c["precision"], c["batch"]
    dtype = DT.get(precision, torch.float32)
    folder, res = w["model"], w["resolution"]
    unet, vae, te, tok = load(folder, dtype, dev)
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    sdxl = c.get("arch") == "sdxl"
    params = add_lora(unet, c, DROPOUT)
    if c["ckpt"]:
        unet.enable_gradient_checkpointing()
    unet.train()
    model = torch.compile(unet) if mode == "compile" else unet
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(dev, enabled=precision == "fp16")
    g = torch.Generator(dev).manual_seed(0)
    pixels = torch.rand((b, 3, res, res), generator=g, device=dev).mul(2).sub(1).to(dtype)
    ids = tok([CAPTIONS[i % len(CAPTIONS)] for i in range(b)], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids.to(dev)
    added = None
    with torch.no_grad():
        lat_cached = vae.float().encode(pixels.float()).latent_dist.sample() * vae.config.scaling_factor \
            if sdxl else vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        if sdxl:  # cached as the script's --cache_latents and fixed instance prompt do; the encoders leave the GPU
            captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
            encoders = sdxl_encoders(folder, dtype, dev)
            enc_cached, pooled = sdxl_encode(encoders, captions, dev)
            time_ids = torch.tensor([[res, res, 0, 0, res, res]] * b, device=dev, dtype=dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids}
            del te
            if part != "full":   # the full step keeps the fp32 VAE and both encoders, as the script without caching
                del vae, encoders
            torch.cuda.empty_cache() if dev == "cuda" else None
        else:
            enc_cached = te(ids, return_dict=False)[0]
    lat_cached = lat_cached.to(dtype)
    reset_peak(dev)

    def step():
        if part == "full" and sdxl:   # the script's fp32 VAE (no --pretrained_vae_model_name_or_path)
            with torch.no_grad():
                latents = (vae.encode(pixels.float()).latent_dist.sample() * vae.config.scaling_factor).to(dtype)
                enc, pooled = sdxl_encode(encoders, captions, dev)
            added.update(text_embeds=pooled)
        elif part == "full":
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                enc = te(ids, return_dict=False)[0]
        else:
            latents, enc = lat_cached, enc_cached
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), device=dev).long()
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(dev, dtype=dtype, enabled=precision != "fp32"):
            pred = model(noisy, t, enc, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()   # the script logs the gathered loss every step
    t_first = time.perf_counter()
    for _ in range(w["warm"]):
        step()
    sync(dev)
    warm_peak = peak_memory(dev)
    reset_peak(dev)
    t0 = time.perf_counter()
    for _ in range(w["steps"]):
        loss = step()
    sync(dev)
    dt = (time.perf_counter() - t0) / w["steps"]
    return {"impl": "diffusers+peft", "config": name, "part": part, "mode": mode, "device": dev, "s_per_step": dt,
            "images_per_s": b / dt, "warmup_s": t0 - t_first, **split_peak(dev, warm_peak), "last_loss": loss,
            "lora_params": sum(p.numel() for p in params)}


def sample(w: dict, steps: int = 50, guidance: float = 7.5, repeats: int = 3, name: str = "sampling",
           mode: str = "eager") -> dict:
    """StableDiffusion(XL)Pipeline, s/image. mode: eager (the pipeline on the GPU), offload
    (enable_model_cpu_offload: each model moved to the GPU for its stage, as our offload=true)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    folder, dev = w["model"], w["device"]
    c = CONFIGS[SAMPLING[name]]
    dtype = DT.get(w["sample_dtype"], torch.float32)
    if c.get("arch") == "sdxl":  # as load_lora_weights leaves it: the LoRA unmerged, in the model's dtype
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=dtype)
        pipe = pipe if mode == "offload" else pipe.to(dev)
        pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        add_lora(pipe.unet, c, 0.0, fp32=False)
        pipe.unet.eval()
    else:
        unet, vae, te, tok = load(folder, dtype, "cpu" if mode == "offload" else dev)
        add_lora(unet, c, 0.0, fp32=False)  # as load_lora_weights leaves it: fp16, not fused
        unet.eval()
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if mode == "offload":
        pipe.enable_model_cpu_offload(device=dev)
    pipe.set_progress_bar_config(disable=True)
    reset_peak(dev)
    size = w["resolution"]

    def one(seed):
        return pipe(CAPTIONS[0], negative_prompt=NEG, num_inference_steps=steps,
                    guidance_scale=guidance, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    peaks = []
    median, first = median_seconds(one, dev, repeats, lambda: (peaks.append(peak_memory(dev)), reset_peak(dev)))
    return {"impl": "diffusers+peft", "config": name, "part": f"ddim{steps}_cfg{guidance}_{size}",
            "mode": mode, "device": dev, "s_per_image": median, "first_call_s": first, **split_peak(dev, peaks[0])}


def sampling_memory(w: dict) -> dict:
    """experiments/bench/memory_phases.py's diffusers side: allocated GiB after loading, the denoising loop's
    peak, the VAE decode's peak."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from experiments.bench.memory_phases import peak_gib, trace_peaks
    dev, size = w["device"], w["resolution"]
    unet, vae, te, tok = load(w["model"], DT.get(w["sample_dtype"], torch.float32), dev)
    add_lora(unet, CONFIGS["report"], 0.0, fp32=False)
    unet.eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler.from_pretrained(w["model"], subfolder="scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = {"loaded": torch.cuda.memory_allocated() / 2 ** 30 if dev == "cuda" else 0.0}
    loop = {}

    def cb(p, i, t, kw):
        loop["peak"] = peak_gib()
        return kw
    for run in range(2):
        reset_peak(dev)
        lat = pipe(CAPTIONS[0], negative_prompt=NEG, num_inference_steps=50, guidance_scale=7.5, height=size,
                   width=size, generator=torch.Generator("cpu").manual_seed(run), output_type="latent",
                   callback_on_step_end=cb).images
        out[f"run{run}_loop"] = loop["peak"]
    reset_peak(dev)
    with torch.no_grad():
        vae.decode(lat / vae.config.scaling_factor, return_dict=False)
    out["decode_only"] = peak_gib()
    reset_peak(dev)
    print("\n".join(trace_peaks(vae, lambda: vae.decode(lat / vae.config.scaling_factor, return_dict=False))))
    return out


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    cap_gpu_memory(sys.argv, args)
    w = world(args[3] if len(args) > 3 else "/tmp/bench", "--tiny" in sys.argv, args[0])
    if args[0] == "sampling_memory":
        print("diffusers", " ".join(f"{k}={v:.3f}" for k, v in sampling_memory(w).items()), flush=True)
        sys.exit(0)
    res = (sample(w, name=args[0], mode="offload" if args[2] == "offload" else "eager") if args[0] in SAMPLING
           else measure(args[0], args[1], args[2], w))
    print("RESULT " + json.dumps(res), flush=True)
