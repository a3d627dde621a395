"""Check a data set folder before training: `python -m data.check DIR [--json]`.

Reports the number of images, a histogram of their sizes, caption coverage for the default
captions and every version under captions/, duplicate images (same content) and every file that
cannot be read, by name. Exit status 1 when something needs fixing (unreadable files, duplicates,
missing default captions).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from data.captions import CaptionError, caption_path, read_caption
from data.folder import list_images
from data.images import BadImageError, load_rgb


def check_folder(root: str | Path, caption_ext: str = ".txt") -> dict:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    files = list_images(root)
    versions = sorted(p.name for p in (root / "captions").iterdir() if p.is_dir()) \
        if (root / "captions").is_dir() else []
    sizes, bad, by_hash = Counter(), {}, {}
    coverage = {v: 0 for v in [None] + versions}
    bad_captions = {}
    for f in files:
        try:
            img = load_rgb(f)
        except BadImageError as e:
            bad[str(f)] = str(e)
            continue
        w, h = img.size
        sizes[f"{(w // 128) * 128}-{(w // 128) * 128 + 127} x {(h // 128) * 128}-{(h // 128) * 128 + 127}"] += 1
        by_hash.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), []).append(f.name)
        for v in coverage:
            cp = caption_path(f, root, v, caption_ext)
            if cp.is_file():
                try:
                    read_caption(cp)
                    coverage[v] += 1
                except CaptionError as e:
                    bad_captions[str(cp)] = str(e)
    dups = [names for names in by_hash.values() if len(names) > 1]
    return {"folder": str(root), "images": len(files), "readable": len(files) - len(bad),
            "sizes": dict(sorted(sizes.items())),
            "captions": {("default" if v is None else v): n for v, n in coverage.items()},
            "duplicates": dups, "unreadable": bad, "bad_captions": bad_captions}


def format_report(r: dict) -> str:
    lines = [f"{r['folder']}: {r['images']} images, {r['readable']} readable"]
    lines.append("sizes (w x h, px):")
    lines += [f"  {k}: {n}" for k, n in r["sizes"].items()]
    lines.append("captions:")
    lines += [f"  {v}: {n}/{r['readable']}" for v, n in r["captions"].items()]
    if r["duplicates"]:
        lines.append(f"{len(r['duplicates'])} groups of identical images:")
        lines += [f"  {', '.join(g)}" for g in r["duplicates"]]
    if r["unreadable"]:
        lines.append(f"{len(r['unreadable'])} unreadable files:")
        lines += [f"  {msg}" for msg in r["unreadable"].values()]
    if r["bad_captions"]:
        lines.append(f"{len(r['bad_captions'])} unreadable captions:")
        lines += [f"  {msg}" for msg in r["bad_captions"].values()]
    return "\n".join(lines)


def needs_fixing(r: dict) -> bool:
    return bool(r["unreadable"] or r["duplicates"] or r["bad_captions"] or r["captions"]["default"] < r["readable"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check a data set folder (images, captions, versions).")
    ap.add_argument("folder")
    ap.add_argument("--caption-ext", default=".txt")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    r = check_folder(a.folder, a.caption_ext)
    print(json.dumps(r, indent=2) if a.json else format_report(r))
    return 1 if needs_fixing(r) else 0


if __name__ == "__main__":
    sys.exit(main())
