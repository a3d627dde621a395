"""Run the benchmark jobs, each in its own process (clean peak-memory counters), and print the table.

    python -m experiments.bench.run_all [--out DIR] [--only report,sampling] [--root /tmp/bench]
    python -m experiments.bench.run_all --jobs ours:report:unet:graph,diffusers:report:unet:eager   # in this order
    python -m experiments.bench.run_all --tiny        # the bundled tiny world on the CPU

Each job prints `RESULT {json}`; all results go to DIR/results.json and DIR/table.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
JOBS = [  # (module, config, part, mode); "default" = the shipped config (on CUDA: graph, channels_last, half norms)
    ("ours", "report", "unet", "eager"), ("ours", "report", "unet", "graph"),
    ("ours", "report", "unet", "graph_cl"), ("ours", "report", "unet", "graph_hn"),
    ("ours", "report", "unet", "default"), ("ours", "report", "unet", "graph_fq"),
    ("diffusers", "report", "unet", "eager"), ("diffusers", "report", "unet", "compile"),
    ("ours", "report", "full", "default"), ("diffusers", "report", "full", "eager"),
    ("ours", "seed000", "unet", "default"), ("diffusers", "seed000", "unet", "eager"),
    # gradient checkpointing with LoRA dropout: recorded in the graph since its masks are replayed (lora/mask_replay.py)
    ("ours", "seed000_ckpt", "unet", "default"), ("diffusers", "seed000_ckpt", "unet", "eager"),
    ("ours", "b8_bf16", "unet", "eager"), ("ours", "b8_bf16", "unet", "graph"),
    ("ours", "b8_bf16", "unet", "graph_cl"), ("ours", "b8_bf16", "unet", "graph_hn"),
    ("ours", "b8_bf16", "unet", "default"), ("ours", "b8_bf16", "unet", "graph_compile"),
    ("diffusers", "b8_bf16", "unet", "eager"),
    ("ours", "sampling", "-", "graph"), ("ours", "sampling", "-", "eager"), ("diffusers", "sampling", "-", "-"),
    ("ours", "sdxl_seed004", "unet", "default"), ("diffusers", "sdxl_seed004", "unet", "eager"),
    ("ours", "sampling_sdxl", "-", "graph"), ("diffusers", "sampling_sdxl", "-", "-"),
]
TINY_JOBS = JOBS  # the same list on the bundled tiny world (SDXL: a tiny random SDXL)
COMPILE_TIMEOUT_FACTOR = 4  # torch.compile of the SD1.5 UNet (forward + backward) took over 150 s on the H100 machine


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """The GPU's measured bf16 matmul throughput (random operands), the denominator of utilisation."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def table(results: list[dict], peak: float) -> str:
    rows = ["| config | part | impl | mode | s/step (s/image) | images/s | peak GiB (alloc / reserved; CPU: RSS) "
            "| note |", "|---|---|---|---|---|---|---|---|"]
    flops = {r["config"]: r["flops_per_step"] for r in results if r.get("flops_per_step")}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | {r['part']} | {r['impl']} | {r['mode']} | failed | | | "
                        f"{r['error'][-80:]} |")
            continue
        t = r.get("s_per_step", r.get("s_per_image"))
        notes = []
        f = flops.get(r["config"])
        if f and "s_per_step" in r:  # both implementations compute the same model FLOPs; ours counted them
            notes.append(f"{f / 1e9:.1f} GFLOP/step, {f / r['s_per_step'] / 1e12:.3g} TFLOP/s"
                         + (f" = {100 * f / r['s_per_step'] / 1e12 / peak:.0f}% of bf16 matmul" if peak else ""))
        mem = (f"{r['peak_alloc_gib']:.2f} / {r.get('peak_reserved_gib', float('nan')):.2f}" if "peak_alloc_gib" in r
               else f"{r.get('peak_rss_gib', float('nan')):.2f}")
        if "steady_alloc_gib" in r:
            notes.append(f"after warm-up {r['steady_alloc_gib']:.2f} GiB")
        if r.get("graph_failed"):
            notes.append("graph failed: " + r["graph_failed"][:60])
        note = "; ".join(notes)
        rows.append(f"| {r['config']} | {r['part']} | {r['impl']} | {r['mode']} | {t:.4f} | "
                    f"{r.get('images_per_s', 1 / t):.1f} | {mem} | {note} |")
    return "\n".join(rows) + (f"\n\nbf16 matmul 8192^3 measured: {peak:.0f} TFLOP/s\n" if peak else "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--only", default="", help="configs or MOD:CONFIG:PART:MODE of the job list")
    ap.add_argument("--jobs", default="", help="MOD:CONFIG:PART:MODE,... run in this order instead of the list")
    ap.add_argument("--root", default="/tmp/bench")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--tiny", action="store_true", help="the bundled tiny world on the CPU")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(",")) - {""}
    t = time.time()
    jobs = [tuple(j.split(":")) for j in a.jobs.split(",") if j] or (TINY_JOBS if a.tiny else JOBS)
    if not a.tiny:  # built once, before the jobs: each job's process loads it
        from experiments.bench.configs import arch_of
        from experiments.bench.world import image_folder, sd15_folder, sdxl_folder
        if any(arch_of(j[1]) == "sd15" for j in jobs):
            sd15_folder(Path(a.root)), image_folder(Path(a.root))
        if any(arch_of(j[1]) == "sdxl" for j in jobs):
            sdxl_folder(Path(a.root)), image_folder(Path(a.root), size=1024)
    print(f"world ready in {time.time() - t:.0f} s", flush=True)
    peak = matmul_tflops() if not a.tiny else None
    results = []
    for mod, cfg, part, mode in jobs:
        if only and cfg not in only and f"{mod}:{cfg}:{part}:{mode}" not in only:
            continue
        script = ["-m", "experiments.bench.ours"] if mod == "ours" else [str(ROOT / "tests" / "diffusers_baseline.py")]
        cmd = [sys.executable, *script, cfg, part, mode, a.root] + (["--tiny"] if a.tiny else [])
        t = time.time()
        try:
            limit = a.timeout * (COMPILE_TIMEOUT_FACTOR if "compile" in mode else 1)
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                r = json.loads(lines[-1][7:])
            else:
                r = {"impl": mod, "config": cfg, "part": part, "mode": mode, "error": p.stderr.strip()[-1500:]}
        except subprocess.TimeoutExpired:
            r = {"impl": mod, "config": cfg, "part": part, "mode": mode, "error": f"timeout {limit}s"}
        r["wall_s"] = time.time() - t
        results.append(r)
        print(json.dumps(r)[:600], flush=True)
        (out / "results.json").write_text(json.dumps({"date": datetime.datetime.now().isoformat(),
                                                      "device": "cpu" if a.tiny else torch.cuda.get_device_name(),
                                                      "torch": torch.__version__, "matmul_bf16_tflops": peak,
                                                      "results": results}, indent=2))
    md = table(results, peak)
    (out / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
