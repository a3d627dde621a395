"""The benchmarked training configurations (issue 9) and how each side spells them."""

CONFIGS = {
    # the Hieu report: batch 2, r32/a16 on the attention projections, LoRA dropout 0.1, fp16, 512x512
    "report": dict(batch=2, rank=32, alpha=16, targets=["to_q", "to_k", "to_v", "to_out.0"], precision="fp16",
                   lora_conf="attention", ckpt=False),
    # seed 000 (FFHQ faces): batch 4, r16/a32 on attention, projection and resnet convolutions
    "seed000": dict(batch=4, rank=16, alpha=32, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                          "conv1", "conv2", "conv_shortcut"],
                    precision="fp16", lora_conf="attention_proj_conv", ckpt=False),
    "seed000_ckpt": dict(batch=4, rank=16, alpha=32, targets=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                               "proj_out", "conv1", "conv2", "conv_shortcut"],
                         precision="fp16", lora_conf="attention_proj_conv", ckpt=True),
    # batch 8 in bf16: where the GPU can be kept busy
    "b8_bf16": dict(batch=8, rank=32, alpha=16, targets=["to_q", "to_k", "to_v", "to_out.0"], precision="bf16",
                    lora_conf="attention", ckpt=False),
}
DROPOUT = 0.1
LR = 1e-4


def world(root, tiny: bool) -> dict:
    """Where a job runs: the SD1.5-size random model on the GPU at 512x512, or (--tiny) the bundled tiny
    world on the CPU at 64x64 in fp32 (a CPU has no fast fp16)."""
    from pathlib import Path

    from experiments.bench.world import image_folder, sd15_folder
    if tiny:
        assets = Path(__file__).resolve().parents[2] / "assets"
        return {"device": "cpu", "model": assets / "tiny-sd15", "data": assets / "tiny-world" / "subject",
                "resolution": 64, "precision": "fp32", "warm": 2, "steps": 10, "sample_dtype": "fp32"}
    return {"device": "cuda", "model": sd15_folder(Path(root)), "data": image_folder(Path(root)), "resolution": 512,
            "precision": None, "warm": 4, "steps": 30, "sample_dtype": "fp16"}


def sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> dict:
    import torch
    if device != "cuda":
        import resource
        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30}


def reset_peak(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def median_seconds(fn, device: str, repeats: int = 3) -> tuple[float, float]:
    """Call fn(0) once (warm-up: graphs, kernels, caches), then fn(1..repeats), each timed between device
    syncs. -> (median seconds, the first call's seconds)."""
    import time
    t = time.perf_counter()
    fn(0)
    sync(device)
    first = time.perf_counter() - t
    times = []
    for r in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn(r + 1)
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], first
