"""The Hieu report's Tables 4-5 and Figure 5 from a sweep folder: `python -m experiments.report MULTIRUN_DIR`.

Reads every run folder below MULTIRUN_DIR that has config.yaml and metrics.json, and writes into
--out (default MULTIRUN_DIR): report.md and report.csv (run, base model, inference model, caption
type, guidance, LPIPS, FID, subject score, PSNR, SSIM), figure5.png (LPIPS and FID bars per run and
guidance, drawn with Pillow), and steps.md with PSNR/SSIM by checkpoint step where runs have them.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image, ImageDraw

COLUMNS = ["run", "base_model", "inference_model", "caption", "guidance", "lpips", "fid", "subject_score",
           "psnr", "ssim"]


def collect(root: str | Path) -> list[dict]:
    rows = []
    for mfile in sorted(Path(root).rglob("metrics.json")):
        run = mfile.parent
        if not (run / "config.yaml").is_file():
            continue
        cfg = OmegaConf.load(run / "config.yaml")
        metrics = json.loads(mfile.read_text())
        inf_model = OmegaConf.select(cfg, "inference.model.name", default=None) or cfg.model.name
        for key, m in sorted(metrics.items()):
            if not key.startswith("cfg_"):
                continue
            rows.append({"run": f"{cfg.get('name', run.name)} ({run.name})", "base_model": cfg.model.name,
                         "inference_model": inf_model, "caption": str(cfg.data.get("caption_version")),
                         "guidance": float(key[4:]), **{c: m.get(c) for c in COLUMNS[5:]}})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v))


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def bar_chart(rows: list[dict], path: Path, metrics=("lpips", "fid")) -> Path:
    """One panel per metric, one bar per (run, guidance), value printed above each bar."""
    w_bar, gap, h, pad = 36, 10, 220, 40
    width = pad * 2 + len(rows) * (w_bar + gap)
    img = Image.new("RGB", (max(width, 300), (h + pad * 2) * len(metrics)), "white")
    d = ImageDraw.Draw(img)
    colours = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88)]
    runs = sorted({r["run"] for r in rows})
    for p, metric in enumerate(metrics):
        top = p * (h + pad * 2) + pad
        vals = [r[metric] for r in rows if r[metric] is not None]
        d.text((pad, top - 30), f"{metric.upper()} by run and guidance", fill="black")
        d.line([pad, top + h, width - pad, top + h], fill="black")
        if not vals:
            d.text((pad, top + h // 2), "n/a (weights missing)", fill="black")
            continue
        vmax = max(vals) or 1.0
        for i, r in enumerate(rows):
            x = pad + i * (w_bar + gap)
            if r[metric] is None:
                continue
            bh = int(h * r[metric] / vmax)
            d.rectangle([x, top + h - bh, x + w_bar, top + h], fill=colours[runs.index(r["run"]) % len(colours)])
            d.text((x, top + h - bh - 12), _fmt(r[metric]), fill="black")
            d.text((x, top + h + 4), f"g{r['guidance']:g}", fill="black")
    img.save(path)
    return path


def steps_table(root: Path) -> str:
    out = []
    for mfile in sorted(root.rglob("metrics.json")):
        by = json.loads(mfile.read_text()).get("by_step")
        if not by:
            continue
        n = max(len(v["psnr"]) for v in by.values())
        head = "| step | " + " | ".join(f"image{i + 1}" for i in range(n)) + " | mean |\n|" + "---|" * (n + 2) + "\n"
        for metric in ("psnr", "ssim"):
            out.append(f"### {mfile.parent.name}: {metric.upper()} by step\n\n" + head + "".join(
                f"| {s} | " + " | ".join(f"{x:.3f}" for x in v[metric]) + f" | {sum(v[metric]) / len(v[metric]):.3f} |\n"
                for s, v in sorted(by.items(), key=lambda kv: int(kv[0]))))
    return "\n".join(out)


def write_report(root: str | Path, out: str | Path | None = None) -> list[dict]:
    root = Path(root)
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no run folders with config.yaml and metrics.json under {root}")
    (out / "report.md").write_text("# Summary of all runs (Table 4 layout)\n\n" + markdown(rows))
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    bar_chart(rows, out / "figure5.png")
    steps = steps_table(root)
    if steps:
        (out / "steps.md").write_text(steps)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    rows = write_report(a.root, a.out)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
