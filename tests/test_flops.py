"""The FLOP count behind every utilisation figure (experiments/bench/flops.py), on the meta device."""
from __future__ import annotations

import pytest

from experiments.bench.configs import CONFIGS
from experiments.bench.flops import step_flops


def lora_forward_flops(r: int) -> float:
    """The report's r-rank LoRA on q/k/v/out of both attentions, worked out by hand: 2*T*r*(in + out) per
    projection; per level (tokens T, channels C, blocks n) attn1's four and attn2's q/out on T image tokens, attn2's
    k/v on 77 text tokens of width 768."""
    total = 0
    for t, c, n in ((4096, 320, 5), (1024, 640, 5), (256, 1280, 5), (64, 1280, 1)):
        total += n * (6 * 2 * t * r * 2 * c + 2 * 2 * 77 * r * (768 + c))
    return total


def test_sd15_forward_flops_match_the_anchor():
    """ANCHORS.md: one SD1.5 UNet forward at 64x64 latents is 803 GFLOP (counted independently of this code);
    the LoRA adds 9.1 GFLOP."""
    f = step_flops(1, CONFIGS["report"]["targets"], 32, train=False)
    assert lora_forward_flops(32) == pytest.approx(9.115e9, rel=1e-3)
    assert f == pytest.approx(803e9 + lora_forward_flops(32), rel=0.002)


def test_training_step_counts_forward_and_input_gradients():
    """The frozen base computes input gradients only, so a step is about 2x the forward (plus attention's
    recomputed scores and the LoRA weight gradients), and scales with the batch."""
    fwd = step_flops(2, CONFIGS["report"]["targets"], 32, train=False)
    step = step_flops(2, CONFIGS["report"]["targets"], 32)
    assert 2.0 < step / fwd < 2.3
    assert step_flops(4, CONFIGS["report"]["targets"], 32) == pytest.approx(2 * step, rel=0.01)
