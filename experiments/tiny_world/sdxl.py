"""tiny-sdxl: a tiny base with SDXL's architecture for the tiny world, so seed 004's recipe
(`+experiment=sdxl_dreambooth +world=tiny`) runs on an SDXL model that has learnt something.

    python -m experiments.tiny_world.sdxl --out /tmp/b --budget 300                # one H100: 1,130 steps of 256
    python -m experiments.tiny_world.sdxl --continue-from /tmp/b/tiny-sdxl --budget 330   # + 2,129 steps

The shipped assets/tiny-sdxl is those two stages (build_info.json records them); loss 0.029 at the end. A CPU
build (`--budget 1500` on 2 cores: 1,045 steps of batch 96) draws blurrier faces; --continue-from improves it.

What makes it SDXL (Podell et al. 2023, arXiv:2307.01952, sec. 2.1): no attention at the highest resolution
and two transformer blocks at the lowest (SDXL base: 0, 2, 10), linear proj_in/proj_out, two text encoders
whose penultimate hidden states are concatenated (CLIP-L's shape: tiny-sd15's 32-wide encoder, kept frozen;
OpenCLIP bigG's: a 40-wide encoder with a text projection, trained here), the pooled text and the size/crop
time ids embedded into the timestep embedding (`text_time`), an empty prompt as zeros
(force_zeros_for_empty_prompt, as SDXL base). The VAE is tiny-sd15's. The UNet and the second encoder are
trained from scratch, as tiny-sd15 was, on the class images only (the subject never appears), at the time ids
(64, 64, 0, 0, 64, 64) of the tiny world's images.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from experiments.tiny_world.build import CLASS_SEED, ROOT, SCHEDULER, encode_all, render_many, train_unet

UNET = dict(block_out_channels=[32, 64, 128], layers_per_block=1, cross_attention_dim=32 + 40,
            attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=40 + 6 * 8, sample_size=16,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
TEXT_2 = dict(vocab_size=49408, hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=40, bos_token_id=0, eos_token_id=2,
              pad_token_id=1, architectures=["CLIPTextModelWithProjection"])
TIME_IDS = (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)      # original size, crop top-left, target size


class SDXLText:
    """What train_unet conditions on for an SDXL base (models/conditioning.py: the concatenated penultimate
    states and the pooled projection; time ids fixed); a dropped prompt is all zeros."""

    def __init__(self, sd):
        from models.conditioning import time_ids
        self.sd = sd
        self.tid = time_ids(TIME_IDS[:2], TIME_IDS[2:4], TIME_IDS[4:])    # (6,), the same for every image

    def ids(self, caps: list[str]) -> list[torch.Tensor]:
        from models.conditioning import tokenize_prompts
        return tokenize_prompts(self.sd, caps)                            # [(N, 77), (N, 77)]

    def encoders(self) -> list:
        return [self.sd.text_encoder, self.sd.text_encoder_2]

    def trained(self) -> list:
        return [self.sd.text_encoder_2]

    def __call__(self, ids: list[torch.Tensor], drop: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        from models.conditioning import encode_ids
        text = encode_ids(self.sd, ids)
        keep = (~drop).to(device).float()
        ctx = text["ctx"] * keep[:, None, None]                           # (B, 77, 72)
        pooled = text["pooled"] * keep[:, None]                           # (B, 40)
        return ctx, {"text_embeds": pooled, "time_ids": self.tid.to(device).expand(len(drop), 6)}


def build_sdxl(out: Path, device: torch.device, scale: float = 1.0, budget: float | None = None,
               base: Path = ROOT / "assets" / "tiny-sd15", continue_from: Path | None = None,
               steps: int = 3000, batch: int | None = None) -> dict:
    """out/tiny-sdxl from `base`'s VAE and text encoder (or `continue_from`, a tiny-sdxl folder, trained further at
    a lower learning rate); returns what build_info.json records. `batch` defaults to tiny-sd15's 256 on a GPU and
    96 on a CPU."""
    from models.load import StableDiffusion, load_model, save_diffusers_folder
    from models.text import SDXL_PAD_TOKEN_2, build_text_encoder, load_tokenizer
    from models.unet import UNet2DConditionModel, UNetConfig
    t0 = time.time()
    log = lambda m: print(f"[{time.time() - t0:7.1f}s] {m}", flush=True)  # noqa: E731
    n = lambda k: max(1, int(k * scale))  # noqa: E731
    if continue_from is not None:
        sd, lr, seed = load_model(continue_from, device=device), 3e-4, 6
    else:
        prev = load_model(base, device=device)
        torch.manual_seed(4)
        sd = StableDiffusion(UNet2DConditionModel(UNetConfig.from_dict(UNET)).to(device), prev.vae,
                             prev.text_encoder, prev.tokenizer, dict(SCHEDULER), "tiny-sdxl",
                             text_encoder_2=build_text_encoder(TEXT_2).to(device),
                             tokenizer_2=load_tokenizer(pad_token=SDXL_PAD_TOKEN_2), force_zeros_for_empty_prompt=True)
        lr, seed = 5e-4, 5
    images, caps = render_many(range(CLASS_SEED, CLASS_SEED + n(12000)), False, "plain")   # tiny-sd15's
    log(f"rendered {len(images)} class images")
    lat = encode_all(sd.vae, images, device)
    batch = batch or (256 if device.type == "cuda" else 96)
    steps = train_unet(sd.unet, SDXLText(sd), lat, sd.vae.config.scaling_factor, caps, device, n(steps), lr, log,
                       seed=seed, batch=max(8, int(batch * min(1.0, scale))), budget=budget)
    save_diffusers_folder(sd, out / "tiny-sdxl", dtype="fp16")
    info = {"seconds": round(time.time() - t0, 1), "device": str(device), "scale": scale, "unet_steps": steps,
            "batch": batch}
    if continue_from is not None and (continue_from / "build_info.json").is_file():
        prev = json.loads((continue_from / "build_info.json").read_text())
        info = {"stages": prev.get("stages", [prev]) + [info]}                # one flat list however many stages
    (out / "tiny-sdxl" / "build_info.json").write_text(json.dumps(info, indent=2))
    log(f"tiny-sdxl saved {info}")
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "assets"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step and image count (quick checks)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the training (fewer steps if slow)")
    ap.add_argument("--continue-from", default=None, help="a tiny-sdxl folder: continue its training")
    ap.add_argument("--steps", type=int, default=3000, help="most UNet steps (--budget may stop sooner)")
    ap.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU, 96 on a CPU")
    a = ap.parse_args()
    build_sdxl(Path(a.out), torch.device(a.device), a.scale, a.budget,
               continue_from=a.continue_from and Path(a.continue_from), steps=a.steps, batch=a.batch)


if __name__ == "__main__":
    main()
