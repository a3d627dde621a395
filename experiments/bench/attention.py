"""SDPA backends at SD1.5's attention shapes: forward + backward time and TFLOP/s per backend.

    python -m experiments.bench.attention [BATCH] [bf16|fp16] [--forward] [--dims]   (default 8 bf16; 512x512)

--forward times the forward alone (sampling). --dims: cuDNN's self-attention over 4,096 tokens, 8 heads, at head
dims 32 to 80, forward and forward + backward (what the 64x64 level's head dim 40 costs against its neighbours). Batch 2 at fp16 is the report's training step and, with
classifier-free guidance's two halves, one sampling step.

Each row is one attention of the UNet: self-attention over the latent tokens, or cross-attention to 77
text tokens, 8 heads. FLOPs: 4*B*h*N*M*d forward (QK^T and PV), 2.5x that backward (FlashAttention-2's
count, Dao 2023, section 3.3: five matmuls of the same size, recomputing QK^T). Backends that refuse a
shape print `-`.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # (name, tokens N, key tokens M, channels; 8 heads), per UNet level at 512x512
    ("self 64x64 d40", 4096, 4096, 320), ("cross 64x64 d40", 4096, 77, 320),
    ("self 32x32 d80", 1024, 1024, 640), ("cross 32x32 d80", 1024, 77, 640),
    ("self 16x16 d160", 256, 256, 1280), ("cross 16x16 d160", 256, 77, 1280),
    ("self 8x8 d160", 64, 64, 1280),
]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def head_dims(b: int, dtype) -> None:
    print("| head dim (cuDNN, 4,096 tokens, 8 heads) | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s at that dim |")
    print("|---|---|---|---|")
    # "40 in 48": SD1.5's 40-wide heads zero-padded to 48 (as q/k/v projections with zero rows would write them),
    # softmax scale 1/sqrt(40): the same attention; is cuDNN's 48-wide kernel the faster one in the UNet's layout?
    for d, label, scale in ((32, "32", None), (40, "40", None), (48, "48", None), (48, "40 in 48", 40 ** -0.5),
                            (64, "64", None), (80, "80", None)):
        q, k, v = (torch.randn(b, 4096, 8 * d, device="cuda", dtype=dtype).view(b, 4096, 8, d).transpose(1, 2)
                   .requires_grad_() for _ in range(3))
        g = torch.randn_like(q)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            fwd = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
            both = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=scale).backward(g))
        flops = 4 * b * 8 * 4096 * 4096 * d * 3.5
        print(f"| {label} | {fwd:.3f} | {both:.3f} | {flops / both / 1e9:.0f} |", flush=True)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    b = int(args[0]) if args else 8
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args[1] if len(args) > 1 else "bf16"]
    train = "--forward" not in sys.argv
    if "--dims" in sys.argv:
        return head_dims(b, dtype)
    heads = 8
    what = "fwd+bwd" if train else "fwd"
    print(f"| attention (B={b}, 8 heads, {dtype}) | " + " | ".join(f"{k} ms {what} (TFLOP/s)" for k in BACKENDS) + " |")
    print("|---|" + "---|" * len(BACKENDS))
    for name, n, m, c in SHAPES:
        d = c // heads
        # the UNet's layout: (B, N, h*d) projections viewed as (B, h, N, d)
        q = torch.randn(b, n, c, device="cuda", dtype=dtype).view(b, n, heads, d).transpose(1, 2)
        k = torch.randn(b, m, c, device="cuda", dtype=dtype).view(b, m, heads, d).transpose(1, 2)
        v = torch.randn(b, m, c, device="cuda", dtype=dtype).view(b, m, heads, d).transpose(1, 2)
        for t in (q, k, v):  # LoRA on to_k/to_v: cross-attention's k and v need gradients too
            t.requires_grad_(train)
        g = torch.randn(b, heads, n, d, device="cuda", dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
        flops = 4 * b * heads * n * m * d * (3.5 if train else 1.0)
        cells = []
        for backend in BACKENDS.values():
            def step():
                with sdpa_kernel(backend), torch.set_grad_enabled(train):
                    out = F.scaled_dot_product_attention(q, k, v)
                if train:
                    out.backward(g)
            try:
                ms = time_ms(step)
                cells.append(f"{ms:.3f} ({flops / ms / 1e9:.0f})")
            except RuntimeError as e:
                cells.append("-")
                print(f"  {name} {backend}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
