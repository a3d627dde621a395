"""Caption a data set folder with a local BLIP or LLaVA model (seeds 000, 003 and 004 caption this way).

    python -m data.caption DIR model=/models/blip-image-captioning-base [version=blip] [prefix="J3NN13, "]
        [overwrite=false] [batch=8] [max_new_tokens=40]

Writes `<stem>.txt` beside each image, or `captions/<version>/<stem>.txt` with version=; existing
captions are kept unless overwrite=true. The model folder is read with local_files_only: nothing is
downloaded. The architecture comes from its config.json: "blip" (BlipForConditionalGeneration,
greedy decoding) or "llava" (LlavaForConditionalGeneration with a describe-the-image prompt;
only the generated answer is kept).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from data.folder import list_images
from data.images import load_rgb

LLAVA_PROMPT = "USER: <image>\nDescribe the person in this photo in one short sentence. ASSISTANT:"


def load_captioner(model: str | Path, device="cpu"):
    path = Path(model)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no captioning model at {path} (config.json missing): download e.g. "
                                f"Salesforce/blip-image-captioning-base elsewhere and copy the folder here")
    kind = json.loads(cfg_file.read_text()).get("model_type")
    if kind == "blip":
        from transformers import BlipForConditionalGeneration, BlipProcessor
        return kind, BlipProcessor.from_pretrained(path, local_files_only=True), \
            BlipForConditionalGeneration.from_pretrained(path, local_files_only=True).to(device).eval()
    if kind == "llava":
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        return kind, AutoProcessor.from_pretrained(path, local_files_only=True), \
            LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True).to(device).eval()
    raise ValueError(f"{cfg_file}: model_type {kind!r} is not a supported captioner (blip or llava)")


@torch.no_grad()
def caption_images(kind, processor, model, images, max_new_tokens: int = 40) -> list[str]:
    device = next(model.parameters()).device
    if kind == "blip":
        inputs = processor(images=images, return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]
    inputs = processor(images=images, text=[LLAVA_PROMPT] * len(images), return_tensors="pt", padding=True).to(device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]   # the answer only: the prompt (and image tokens) come first
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def caption_folder(folder: str | Path, model: str | Path, version: str | None = None, prefix: str = "",
                   overwrite: bool = False, batch: int = 8, max_new_tokens: int = 40, device="cpu") -> dict:
    folder = Path(folder)
    files = list_images(folder)
    if not files:
        raise ValueError(f"data folder {folder} has no images")
    out_dir = folder / "captions" / version if version else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [f for f in files if overwrite or not (out_dir / (f.stem + ".txt")).exists()]
    kind, processor, net = load_captioner(model, device)
    for k in range(0, len(todo), batch):
        chunk = todo[k:k + batch]
        texts = caption_images(kind, processor, net, [load_rgb(f) for f in chunk], max_new_tokens)
        for f, t in zip(chunk, texts):
            (out_dir / (f.stem + ".txt")).write_text(prefix + t + "\n", encoding="utf-8")
    return {"images": len(files), "written": len(todo), "kept": len(files) - len(todo), "folder": str(out_dir)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or "=" in argv[0]:
        print(__doc__)
        return 2
    opts = dict(a.split("=", 1) for a in argv[1:])
    unknown = set(opts) - {"model", "version", "prefix", "overwrite", "batch", "max_new_tokens", "device"}
    if unknown or "model" not in opts:
        print(f"model=<local path> is required; unknown options: {sorted(unknown)}", file=sys.stderr)
        return 2
    r = caption_folder(argv[0], opts["model"], opts.get("version"), opts.get("prefix", ""),
                       opts.get("overwrite", "false").lower() == "true", int(opts.get("batch", 8)),
                       int(opts.get("max_new_tokens", 40)), opts.get("device", "cpu"))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
