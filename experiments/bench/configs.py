"""The benchmarked training configurations (issue 9) and how each side spells them: `lora_conf` is our
conf/lora group, `targets` the same modules as the walker's preset of that name (what peft is given)."""
from lora.inject import PRESETS


def _job(batch, rank, alpha, lora_conf, precision, ckpt=False, arch="sd15") -> dict:
    return dict(batch=batch, rank=rank, alpha=alpha, lora_conf=lora_conf, targets=list(PRESETS[lora_conf]),
                precision=precision, ckpt=ckpt, arch=arch)


CONFIGS = {
    # the Hieu report: batch 2, r32/a16 on the attention projections, LoRA dropout 0.1, fp16, 512x512
    "report": _job(2, 32, 16, "attention", "fp16"),
    # seed 000 (FFHQ faces): batch 4, r16/a32 on attention, projection and resnet convolutions
    "seed000": _job(4, 16, 32, "attention_proj_conv", "fp16"),
    "seed000_ckpt": _job(4, 16, 32, "attention_proj_conv", "fp16", ckpt=True),
    # batch 8 in bf16: where the GPU can be kept busy
    "b8_bf16": _job(8, 32, 16, "attention", "bf16"),
    # seed 004 (SDXL DreamBooth, conf/experiment/sdxl_dreambooth.yaml): SDXL base at 1024x1024, batch 1, r4/a4 on
    # the attention projections, fp16, gradient checkpointing
    "sdxl_seed004": _job(1, 4, 4, "attention", "fp16", ckpt=True, arch="sdxl"),
}
# Sampling jobs: 50 DDIM steps with CFG and a LoRA applied unmerged, on the architecture and with the LoRA of
# the named training config.
SAMPLING = {"sampling": "report", "sampling_sdxl": "sdxl_seed004"}
DROPOUT = 0.1
LR = 1e-4


def arch_of(config: str) -> str:
    """sd15 | sdxl: which random world a job (training or sampling config) runs on."""
    return CONFIGS.get(SAMPLING.get(config, config), {}).get("arch", "sd15")


def world(root, tiny: bool, config: str | None = None) -> dict:
    """Where a job runs: the SD1.5-size random model on the GPU at 512x512, or (--tiny) the bundled tiny
    world on the CPU at 64x64 in fp32 (a CPU has no fast fp16). An SDXL config: SDXL base's size at 1024x1024
    (fewer timed steps: each is several times an SD1.5 step), or a tiny random SDXL at 64x64 on the CPU."""
    from pathlib import Path

    from experiments.bench.world import image_folder, sd15_folder, sdxl_folder
    sdxl = config is not None and arch_of(config) == "sdxl"
    if tiny:
        assets = Path(__file__).resolve().parents[2] / "assets"
        return {"device": "cpu", "model": sdxl_folder(Path(root), tiny=True) if sdxl else assets / "tiny-sd15",
                "data": assets / "tiny-world" / "subject", "resolution": 64, "precision": "fp32", "warm": 2,
                "steps": 10, "sample_dtype": "fp32"}
    if sdxl:
        return {"device": "cuda", "model": sdxl_folder(Path(root)), "data": image_folder(Path(root), size=1024),
                "resolution": 1024, "precision": None, "warm": 3, "steps": 20, "sample_dtype": "fp16"}
    return {"device": "cuda", "model": sd15_folder(Path(root)), "data": image_folder(Path(root)), "resolution": 512,
            "precision": None, "warm": 4, "steps": 60, "sample_dtype": "fp16"}


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


def split_peak(device: str, first: dict) -> dict:
    """The run's peak (the larger of the warm-up's `first` and the timed part's) and the timed part's own
    peak as `steady_alloc_gib`: warm-up alone holds cuDNN's algorithm search workspaces and graph recording."""
    last = peak_memory(device)
    if "peak_alloc_gib" not in last:
        return last
    return {"peak_alloc_gib": max(first["peak_alloc_gib"], last["peak_alloc_gib"]),
            "peak_reserved_gib": max(first["peak_reserved_gib"], last["peak_reserved_gib"]),
            "steady_alloc_gib": last["peak_alloc_gib"], "warmup_alloc_gib": first["peak_alloc_gib"]}


def reset_peak(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def median_seconds(fn, device: str, repeats: int = 3, after_first=None) -> tuple[float, float]:
    """Call fn(0) once (warm-up: graphs, kernels, caches), then `after_first()`, then fn(1..repeats), each
    timed between device syncs. -> (median seconds, the first call's seconds)."""
    import time
    t = time.perf_counter()
    fn(0)
    sync(device)
    first = time.perf_counter() - t
    if after_first is not None:
        after_first()
    times = []
    for r in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn(r + 1)
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], first


def cap_gpu_memory(argv: list[str], args: list[str]) -> None:
    """`--gpu-gib N` in argv: act as a smaller GPU, the caching allocator may hold at most N GiB (N is also taken
    out of the positional `args`). Used alike by our jobs and diffusers' (tests/diffusers_baseline.py)."""
    if "--gpu-gib" not in argv:
        return
    import torch
    cap = argv[argv.index("--gpu-gib") + 1]
    args.remove(cap)
    torch.cuda.set_per_process_memory_fraction(float(cap) * 2 ** 30 / torch.cuda.get_device_properties(0).total_memory)
