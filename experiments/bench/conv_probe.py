"""Every convolution of one training step, timed alone: which shapes run far from the matmul rate.

    python -m experiments.bench.conv_probe [BATCH]          (default 8; SD1.5 at 512x512, r32 attention LoRA, bf16)
    python -m experiments.bench.conv_probe --step [CONFIG]  (the calls of a real Trainer step, eager_default mode)

The step's aten.convolution and aten.convolution_backward calls are recorded on the meta device (shapes, strides
dropped, arguments and output masks kept; the same forward + backward as experiments/bench/flops.py; plain
modules, so 1x1 convolutions and upsampling convolutions as nn.Conv2d runs them) or, with --step, during one
eager step of the benchmark's Trainer (bias folding's GEMMs and the sub-pixel upsampling as trained), then each
distinct call is replayed on CUDA with random bf16 channels_last tensors under cudnn.benchmark (as
train.cudnn_benchmark) and timed with CUDA events. FLOPs per call by torch.utils.flop_counter. Prints one row
per distinct call, costliest first (count x time), and the sum.
"""
from __future__ import annotations

import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from experiments.bench.attention import time_ms

aten = torch.ops.aten
CONV_OPS = {aten.convolution.default: "fwd", aten.convolution_backward.default: "bwd"}


def _spec(a):
    """A hashable stand-in for one argument: tensors by shape, everything else as is."""
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape))
    if isinstance(a, (list, tuple)):
        return tuple(_spec(b) for b in a)
    return a


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONV_OPS:
            self.calls[(func, _spec(args))] += 1
        return func(*args, **(kwargs or {}))


def record(batch: int) -> Counter:
    from lora.inject import inject_lora
    from models.unet import UNet2DConditionModel, UNetConfig
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig()).to(torch.bfloat16).requires_grad_(False)
        inject_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=32, alpha=32, dtype=torch.float32)
        unet.train(True)
        x = torch.randn(batch, 4, 64, 64, dtype=torch.bfloat16)
        ctx = torch.randn(batch, 77, 768, dtype=torch.bfloat16)
        t = torch.zeros(batch, dtype=torch.long)
    rec = _Record()
    with rec:
        unet(x, t, ctx).float().square().mean().backward()
    return rec.calls


def record_step(name: str) -> Counter:
    from experiments.bench.ours import warm_trainer
    with warm_trainer(name, "eager_default", 2) as tr:
        rec = _Record()
        with rec:
            tr.launch_step()
            tr.drain()
        torch.cuda.synchronize()
    return rec.calls


def _build(spec):
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "T":
        t = torch.randn(spec[1], device="cuda", dtype=torch.bfloat16)
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if isinstance(spec, tuple):
        return [_build(s) for s in spec]
    return spec


def _operands(func, args):
    """(input, weight, stride, padding, backward) of a recorded call; a backward's input is its output gradient."""
    if func is aten.convolution.default:
        return args[0], args[1], tuple(args[3]), tuple(args[4]), False
    return args[0], args[2], tuple(args[4]), tuple(args[5]), True


def _as_gemm(func, args):
    """A stride-1 1x1 convolution's forward or input gradient as one cuBLAS GEMM over channels_last rows, or None."""
    x, w, stride, _, backward = _operands(func, args)
    if w.shape[2:] != (1, 1) or stride != (1, 1):
        return None
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])                      # (B H W, C in), a view
    wm = w.view(w.shape[0], -1)                                                # (Cout, Cin)
    return (lambda: rows @ wm) if backward else (lambda: rows @ wm.t())       # (B H W, C out)


def _im2col_gemm(x: torch.Tensor, wm: torch.Tensor):
    """A 3x3, stride-1, padding-1 convolution of a channels_last x (B, C, H, W) as im2col + one cuBLAS GEMM (which
    may split K where cuDNN's tiles leave SMs idle): wm (Cout, 9 C) in (kh, kw, C) order. Returns (B H W, Cout)."""
    b, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))                      # (B, H+2, W+2, C)
    cols = xp.unfold(1, 3, 1).unfold(2, 3, 1)                                 # (B, H, W, C, 3, 3) view
    cols = cols.permute(0, 1, 2, 4, 5, 3).reshape(b * h * w, 9 * c)            # (B H W, 9 C), a copy
    return cols @ wm.t()


def _as_im2col(func, args):
    """The same 3x3 stride-1 forward or input gradient through _im2col_gemm (timed with its copy), or None."""
    x, w, stride, pad, backward = _operands(func, args)
    if w.shape[2:] != (3, 3) or stride != (1, 1) or pad != (1, 1):
        return None
    if backward:                                                               # the adjoint's kernel: (Cin, 9 Cout)
        wm = w.flip(2, 3).permute(1, 2, 3, 0).reshape(w.shape[1], -1)
    else:                                                                      # (Cout, 9 Cin)
        wm = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return lambda: _im2col_gemm(x, wm)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--step"]:
        name = args[1] if len(args) > 1 else "b8_bf16"
        calls, batch = record_step(name), name
    else:
        batch = int(args[0]) if args else 8
        calls = record(batch)
    torch.backends.cudnn.benchmark = True
    rows, total_ms, total_flop = [], 0.0, 0.0
    for (func, spec), n in calls.items():
        args = _build(spec)
        call = (lambda: func(*args))
        with FlopCounterMode(display=False) as fc:
            call()
        flop = fc.get_total_flops()
        ms = time_ms(call, 20)
        gemm = _as_gemm(func, args) or _as_im2col(func, args)
        alt = time_ms(gemm, 20) if gemm else None
        shapes = [s[1] for s in spec if isinstance(s, tuple) and len(s) == 2 and s[0] == "T"]
        mask = spec[-1] if func is aten.convolution_backward.default else None
        rows.append((n * ms, n, ms, flop, CONV_OPS[func], shapes, spec[3:5] if mask is None else spec[4:6], mask,
                     alt))
        total_ms += n * ms
        total_flop += n * flop
    print(f"batch {batch}: {sum(r[1] for r in rows)} convolution calls, {total_ms:.2f} ms alone, "
          f"{total_flop / 1e12:.2f} TFLOP, {total_flop / total_ms / 1e9:.0f} TFLOP/s")
    print("| total ms | calls | us each | TFLOP/s | op | tensors | stride, padding | grad mask | as one GEMM (3x3: im2col + GEMM), us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tot, n, ms, flop, op, shapes, sp, mask, alt in sorted(rows, key=lambda r: -r[0]):
        alt = "" if alt is None else f"{alt * 1e3:.1f}"
        print(f"| {tot:.3f} | {n} | {ms * 1e3:.1f} | {flop / ms / 1e9:.0f} | {op} | {shapes} | {sp} | {mask} | {alt} |")


if __name__ == "__main__":
    main()
