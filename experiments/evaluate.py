"""Score a training run's samples as the Hieu report does (sec. 4.5), or compare two image folders.

    python -m experiments.evaluate RUN_DIR                 # samples/cfg_*/ vs the run's training images
    python -m experiments.evaluate RUN_DIR --by-step       # + PSNR/SSIM of each checkpoint's samples
    python -m experiments.evaluate --fid DIR_A DIR_B       # FID between any two folders (seed 001)

Per guidance folder: LPIPS (AlexNet) of each generated image against a training image drawn at
random (seeded), averaged; FID between the generated images and all training images (Inception
pool3); PSNR and SSIM against the same drawn references. Metrics whose backbone weights are not on
disk are reported as null with the reason: no number is made up. Results merge into
RUN_DIR/metrics.json (the subject score the run wrote stays).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

from data.folder import list_images
from data.images import load_rgb, to_tensor
from experiments import metrics as M


def load_images(paths, size: int | None = None) -> torch.Tensor:
    """Image files -> (N, 3, S, S) in [0, 1] (resized to `size` when given)."""
    out = []
    for p in paths:
        img = load_rgb(p)
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out.append(to_tensor(img) / 2 + 0.5)
    return torch.stack(out)


class Scorer:
    """Loads the backbones once; each metric is None (with a reason) when its weights are missing."""

    def __init__(self, inception: str | None = None, lpips_backbone: str | None = None):
        self.notes = {}
        try:
            from experiments.inception import load_fid_inception
            self.inception = load_fid_inception(inception)
        except FileNotFoundError as e:
            self.inception, self.notes["fid"] = None, str(e)
        try:
            self.lpips = M.load_lpips(lpips_backbone)
        except FileNotFoundError as e:
            self.lpips, self.notes["lpips"] = None, str(e)

    def fid(self, a: torch.Tensor, b: torch.Tensor) -> float | None:
        if self.inception is None:
            return None
        return M.fid_from_features(M.inception_features(a, self.inception), M.inception_features(b, self.inception))

    def score(self, generated: torch.Tensor, refs: torch.Tensor, seed: int = 0) -> dict:
        rng = random.Random(seed)
        paired = refs[[rng.randrange(len(refs)) for _ in range(len(generated))]]
        out = {"n_generated": len(generated), "n_references": len(refs),
               "psnr": float(M.psnr(generated, paired).mean()), "ssim": float(M.ssim(generated, paired).mean()),
               "lpips": float(M.lpips_distance(self.lpips, generated, paired).mean()) if self.lpips else None,
               "fid": self.fid(generated, refs)}
        return out


def evaluate_run(run_dir: str | Path, scorer: Scorer, references: str | Path | None = None, seed: int = 0,
                 by_step: bool = False) -> dict:
    run = Path(run_dir)
    cfg = OmegaConf.load(run / "config.yaml")
    ref_dir = Path(references or cfg.data.path)
    folders = sorted(p for p in (run / "samples").glob("cfg_*") if p.is_dir())
    if not folders:
        raise FileNotFoundError(f"{run}/samples/cfg_*/ has no samples: run with inference.enabled=true first")
    first = sorted(folders[0].glob("*.png"))[0]
    size = Image.open(first).size[0]
    refs = load_images(list_images(ref_dir), size)
    result = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    for f in folders:
        gen = load_images(sorted(f.glob("*.png")))
        result.setdefault(f.name, {}).update(scorer.score(gen, refs, seed))
    if scorer.notes:
        result["notes"] = scorer.notes
    if by_step:
        result["by_step"] = psnr_ssim_by_step(run, cfg, refs, seed)
    (run / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def psnr_ssim_by_step(run: Path, cfg, refs: torch.Tensor, seed: int = 0) -> dict:
    """Seed 003's tables: each checkpoint's LoRA samples the first evaluation prompt; PSNR/SSIM vs references.
    Step 0 is the inference model without a LoRA."""
    from lora.inject import remove_lora
    from lora.io import load_lora
    from models.load import load_model
    from models.pipeline import generate
    inf = cfg.inference
    m = inf.model
    sd = load_model(m.path, vae=m.get("vae"), config=m.get("config"))
    ckpts = {0: None}
    for f in sorted((run / "checkpoints").glob("step_*.safetensors")):
        ckpts[int(f.stem.split("_")[1])] = f
    if (run / "lora.safetensors").is_file():
        st = json.loads((run / "train_result.json").read_text())["step"] if (run / "train_result.json").is_file() else None
        ckpts[st or max(ckpts) + 1] = run / "lora.safetensors"
    out = {}
    g = float(inf.guidance_scales[len(inf.guidance_scales) // 2])
    for step, f in sorted(ckpts.items()):
        if f is not None:
            load_lora({"unet": sd.unet, "text_encoder": sd.text_encoder}, f, adapter="by_step")
        imgs = generate(sd, inf.prompts[0], inf.negative_prompt, steps=inf.steps, guidance_scale=g,
                        sampler=inf.sampler, seed=inf.seed, num_images=min(5, len(refs)), height=inf.size,
                        width=inf.size)
        paired = refs[: len(imgs)]
        out[str(step)] = {"psnr": [float(x) for x in M.psnr(imgs, paired)], "ssim": [float(x) for x in M.ssim(imgs, paired)]}
        if f is not None:
            remove_lora(sd.unet), remove_lora(sd.text_encoder)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help="a run folder (with samples/ and config.yaml)")
    ap.add_argument("--fid", nargs=2, metavar=("DIR_A", "DIR_B"), help="FID between two image folders")
    ap.add_argument("--references", help="reference images (default: the run's data.path)")
    ap.add_argument("--inception", help="path of the FID Inception weights")
    ap.add_argument("--lpips-backbone", help="path of torchvision's AlexNet weights")
    ap.add_argument("--by-step", action="store_true", help="PSNR/SSIM of each checkpoint (seed 003)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.fid:
        from experiments.inception import load_fid_inception
        net = load_fid_inception(a.inception)
        A, B = (load_images(list_images(Path(d)), 299) for d in a.fid)
        print(json.dumps({"fid": M.fid_from_features(M.inception_features(A, net), M.inception_features(B, net))}))
        return 0
    if not a.run:
        ap.error("give a run folder or --fid DIR_A DIR_B")
    r = evaluate_run(a.run, Scorer(a.inception, a.lpips_backbone), a.references, a.seed, a.by_step)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
