"""The upsamplers' nearest 2x + 3x3 convolution, direct against the sub-pixel form (models/subpixel_upsample.py):
forward and forward + input gradient, CUDA graph replays, at the shapes of SD1.5's UNet at batch 8 and 2 (bf16,
channels_last, cuDNN's timed algorithm search on, as in training), SDXL's UNet at batch 1 and 2 (fp16) and of SDXL's VAE decoding 1024x1024 (fp32,
heuristic algorithms, as models/vae.py runs it).

    python -m experiments.bench.subpixel_probe
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import nhwc_upsample
from models.subpixel_upsample import parity_kernels, upsample_conv

UNET = [(b, c, s, s) for b in (8, 2) for c, s in ((1280, 8), (1280, 16), (640, 32))]   # (B, C, h, w) before upsampling
SDXL = [(b, c, s, s) for b in (1, 2) for c, s in ((1280, 32), (640, 64))]   # training (batch 1), sampling (CFG: 2)
VAE = [(1, 512, 128, 128), (1, 512, 256, 256), (1, 256, 512, 512)]


def graph_ms(fn, reps: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def main():
    print("| shape (B, C, h, w) | dtype | direct fwd ms | sub-pixel fwd ms | direct fwd+dx ms | sub-pixel fwd+dx ms "
          "| error direct / sub-pixel (max abs against fp32, over max abs) |")
    print("|---|---|---|---|---|---|---|")
    for shapes, dtype, bench in ((UNET, torch.bfloat16, True), (SDXL, torch.float16, True),
                                 (VAE, torch.float32, False)):
        torch.backends.cudnn.benchmark = bench
        for b, c, h, w in shapes:
            conv = nn.Conv2d(c, c, 3, padding=1).cuda().to(dtype).requires_grad_(False)
            conv = conv.to(memory_format=torch.channels_last)
            x = torch.randn(b, c, h, w, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
            k = parity_kernels(conv.weight)
            dy = torch.randn(b, c, 2 * h, 2 * w, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
            xg = x.clone().requires_grad_()

            def direct(x=x):   # as Upsample2D without it: the NHWC Triton upsampling where it runs
                return conv(nhwc_upsample.upsample2x(x) if nhwc_upsample.usable(x)
                            else F.interpolate(x, scale_factor=2.0, mode="nearest"))

            def sub(x=x):
                return upsample_conv(x, conv, k)

            def direct_bwd():
                return torch.autograd.grad(direct(xg), xg, dy)

            def sub_bwd():
                return torch.autograd.grad(sub(xg), xg, dy)
            with torch.no_grad():
                y1, y2 = direct(), sub()
                ref = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), conv.weight.double(),
                               conv.bias.double(), padding=1)
            err = [((y.double() - ref).abs().max() / ref.abs().max()).item() for y in (y1, y2)]
            with torch.no_grad():
                t = [graph_ms(direct), graph_ms(sub)]
            t += [graph_ms(direct_bwd), graph_ms(sub_bwd)]
            print(f"| {(b, c, h, w)} | {str(dtype)[6:]} | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | {t[3]:.3f} | {err[0]:.1e} / {err[1]:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
