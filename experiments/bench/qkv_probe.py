"""Self-attention's LoRA'd q, k, v at SD1.5's batch-8 64x64 level (32768 x 320, three 320 x 320 projections, r 32,
dropout 0.1, bf16): per layer (lora/linear_fn.py's seeded path: three dropout_down.down, three lora_mm.forward;
three lora_mm.input_grad and autograd's two adds of the input gradients) against lora/qkv_mm.py (one down3, one
forward, one input gradient), over a few tile configurations. CUDA graph replays, operands cycled past L2
(experiments/bench/lora_gemm_probe.py's timing).

    python -m experiments.bench.qkv_probe [M] [C] [--no-sweep]
"""
from __future__ import annotations

import itertools
import sys

import torch

from experiments.bench.lora_gemm_probe import cycled, graph_us
from lora import dropout_down as dd
from lora import lora_mm, qkv_mm

# session 16's first sweep (64 and 128 wide tiles, 4 and 8 warps, 3 and 4 stages, GROUP_M 8 and 16) found 128-row
# tiles with 4 warps best both ways; these are its neighbourhood
FWD = [dict(BLOCK_M=128, BLOCK_N=bn, BLOCK_K=64, num_warps=nw, num_stages=ns)
       for bn, nw, ns in itertools.product((64, 128), (4, 8), (3, 4))]
DGRAD = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=ns)
         for bm, bn, bk, ns in itertools.product((64, 128), (32, 64), (64, 128), (3, 4))]


def main():
    args = [a for a in sys.argv[1:] if a != "--no-sweep"]
    m = int(args[0]) if args else 32768
    c = int(args[1]) if len(args) > 1 else 320
    dt, r, p, s = torch.bfloat16, 32, 0.1, 0.5
    dev = "cuda"

    def operands():
        return dict(x=torch.randn(m, c, device=dev, dtype=dt),
                    g=[torch.randn(m, c, device=dev, dtype=dt) for _ in range(3)],
                    w=(torch.randn(3, c, c, device=dev) * c ** -0.5).to(dt),
                    a=(torch.randn(3, r, c, device=dev) * 0.1).to(dt),
                    up=(torch.randn(3, c, r, device=dev) * 0.1).to(dt),
                    seeds=[dd.new_seed(dev) for _ in range(3)])
    nxt = cycled(operands)

    def per_layer_fwd():
        o = nxt()
        for j in range(3):
            h = dd.down(o["x"], o["a"][j], o["seeds"][j], p, s)
            lora_mm.forward(o["x"], o["w"][j], None, h, o["up"][j])

    def per_layer_dgrad():
        o = nxt()
        dx = None
        for j in range(3):
            d, _ = lora_mm.input_grad(o["g"][j], o["w"][j], o["up"][j], o["a"][j], o["seeds"][j], p, s)
            dx = d if dx is None else dx + d

    def fused_fwd(cfg=None):
        o = nxt()
        h = qkv_mm.down(o["x"], o["a"], o["seeds"], p, s)
        qkv_mm.forward(o["x"], o["w"], h, o["up"], cfg)

    def fused_dgrad(cfg=None):
        o = nxt()
        qkv_mm.input_grad(o["g"], o["w"], o["up"], o["a"], o["seeds"], p, s, cfg)

    def down_only(fused):
        o = nxt()
        if fused:
            qkv_mm.down(o["x"], o["a"], o["seeds"], p, s)
        else:
            for j in range(3):
                dd.down(o["x"], o["a"][j], o["seeds"][j], p, s)

    print(f"M={m} C={c}: us per q/k/v triple")
    print(f"  down x3 per layer {graph_us(lambda: down_only(False)):.1f}   down3 {graph_us(lambda: down_only(True)):.1f}")
    print(f"  forward (downs + GEMMs): per layer {graph_us(per_layer_fwd):.1f}   fused (shipped tiles) "
          f"{graph_us(fused_fwd):.1f}")
    print(f"  input grad: per layer + 2 adds {graph_us(per_layer_dgrad):.1f}   fused (shipped tiles) "
          f"{graph_us(fused_dgrad):.1f}")
    for name, fn, cfgs in (("forward", fused_fwd, FWD), ("input grad", fused_dgrad, DGRAD)) * ("--no-sweep" not in sys.argv):
        times = []
        for cfg in cfgs:
            try:
                times.append((graph_us(lambda: fn(cfg)), cfg))
            except Exception as e:  # a tile configuration out of shared memory or registers
                print(f"    {cfg}: {type(e).__name__}")
        times.sort(key=lambda t: t[0])
        for t, cfg in times[:3]:
            print(f"  {name}: {t:.1f} us {cfg}")


if __name__ == "__main__":
    main()
