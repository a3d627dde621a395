"""FlashAttention-4's kernels for the UNet's attentions (`train.sdpa_backend=fa4`), from the optional `flash-attn-4`
package (Dao-AILab/flash-attention's CuTe DSL implementation, which also ships the Hopper kernels of
FlashAttention-3: Shah et al. 2024, producer/consumer warpgroups and the softmax of one tile overlapped with the
other's GEMMs). Not a dependency: `pip install flash-attn-4` (it brings nvidia-cutlass-dsl). The kernels are
compiled on first use per shape (seconds each), so the first steps are slow.

It takes (B, N, heads, d) tensors, the layout the projections write, so no transposes: (B, N, h*d) views in,
(B, N, h*d) out. Head dims must be multiples of 8 up to 256 on Hopper (its `_validate_head_dims`); elsewhere,
and while torch.compile traces, the caller falls back to torch's SDPA.

`BACKWARD_FIX` picks how the wrong dq of flash-attn-4 4.0.0b36's Hopper backward is avoided. Measured on an H100
(experiments/bench/RESULTS.md, session 18): it returns a wrong dq at head dims 40, 48 and 80 (relative error 1.1-1.3;
out, dk, dv right) and a right one at 64, 96, 128 and 160. Its kernel rounds the head dim up to 16 (40 -> 48) and
writes the fp32 dq accumulator in blocks of tile_m x 48, while the interface lays the accumulator out, and its
post-processing kernel reads it, in blocks of tile_m x a multiple of 32 (64): every block after the first is read
from the wrong place (Dao-AILab/flash-attention pull request 2896, open).

- "accumulator" (the default): the post-processing kernel is told the kernel's multiple, 16, so it reads the
  blocks where they were written (`read_accumulator_by_16`; the interface still allocates and zeroes the larger
  64-wide layout, a superset). Head dims go in unpadded and both passes run 48-wide at head dim 40. The kernels the
  package compiles are its own; only the post-processing's compile key (which holds the multiple) changes.
- "tile32": pull request 2896's fix: the backward kernel rounds to 32 like the accumulator (`fix_backward_rounding`),
  so at head dim 40 the forward runs 48-wide and the backward 64-wide. Its compiled kernels are cached by shape, not
  by the class's rounding, so the patch also gives the backward a cache namespace of its own
  (`fresh_backward_cache`): no kernel built before it, in this process or on disk, is used after it.
- "pad": head dims that are not multiples of 32 are zero-padded to the next one (40 and 80 to 64 and 96), the softmax
  scale kept at 1/sqrt(d): zero columns change neither q.k nor the weights, and the output's extra columns (P times
  zero) are dropped. Costs copies (0.48 GiB more at batch 8) and 64-wide kernels.

Each fix applies only where the package's source has the lines it was written against; elsewhere "accumulator"
falls back to "tile32", and that to "pad" (`backward_route` says which is in force). Measured on an H100 (RESULTS.md,
sessions 19-20): all three right against fp32 at head dims 40, 80 and 160 (the CUDA test, bf16); graphed steps with
"accumulator" against cuDNN in one process: batch 8 bf16 43.84 against 47.02 ms, the report's batch 2 fp16 17.51
against 18.79, seed 000's batch 4 33.97 against 35.83, the same peak memory; "accumulator" 43.97 against "tile32"
44.64 ms at batch 8 in one process.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

HEAD_DIM_MULTIPLE = 32  # pad head dims to a multiple of this (see above)
BACKWARD_FIX = "accumulator"  # "accumulator", "tile32" or "pad" (see above)
# Attentions over fewer keys stay on torch's SDPA. The eager probe has FA4 slower than cuDNN at 1,024 and 256 keys
# (its host-side launch included), but in the graphed b8 step FA4 everywhere beat FA4 at 4,096 keys only (MIN_KEYS
# 2048): 45.11 against 45.72 ms (H100, session 19). So 0.
MIN_KEYS = 0
# Head dims above this stay on torch's SDPA. At SD1.5's 160 (the 16x16 level) the backward's swapped tiles round to
# 64 (192-wide); cuDNN there is not yet A/B'd against FA4 in the graph (graph_ab ... MAX_HEAD_DIM=128). So 256.
MAX_HEAD_DIM = 256
BACKWARD_CACHE = "bwd_tile32"  # the patched backward's compile-cache namespace (the package's own is "bwd")
_BUGGY, _FIXED = "64 if dKV_swapAB else 16", "64 if dKV_swapAB else 32"  # its rounding line, before and after
_ACCUMULATOR_32 = "hdim_multiple_of = 64 if arch // 10 == 9 and dKV_swapAB else 32"  # the interface's layout line


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    """flash_attn.cute.flash_attn_func, or None where the package (or its CUTLASS DSL) does not import."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # noqa: BLE001 - any failure to import (missing package, CUDA libraries) means: not here
        return None
    return flash_attn_func


def fix_backward_rounding(cls) -> bool:
    """Make a FlashAttentionBackwardSm90-like class round its non-swapped tile head dims to 32, as pull request 2896
    does: wraps __init__ to redo the rounding and the flags derived from it there. Returns whether the class
    rounds to 32 now (False: its source has neither the known buggy line nor the fixed one; left alone)."""
    if getattr(cls, "_rounds_to_32", False):
        return True
    source = inspect.getsource(cls.__init__)
    if _FIXED in source:
        return True
    if _BUGGY not in source:
        return False
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, dtype, head_dim, *args, **kwargs):
        init(self, dtype, head_dim, *args, **kwargs)
        if self.dKV_swapAB:
            return
        old_v = self.tile_hdimv
        self.tile_hdim = -(-self.tile_hdim // 32) * 32           # ceil32(ceil16(d)) = ceil32(d)
        self.tile_hdimv = -(-self.tile_hdimv // 32) * 32
        self.check_hdim_oob = head_dim != self.tile_hdim
        self.check_hdim_v_oob = self.check_hdim_v_oob or self.tile_hdimv != old_v
        # (shuffle_LSE/shuffle_dPsum test tile_hdim <= 64: the same for both roundings)
    cls.__init__ = __init__
    cls._rounds_to_32 = True
    return True


def fresh_backward_cache(interface, get_jit_cache) -> None:
    """Give the package's backward (`interface._flash_attn_bwd`) an empty compile cache under BACKWARD_CACHE. Its
    kernels are keyed by shape and dtype, so one compiled before the rounding fix (the bug included) would
    otherwise be reused after it; with FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 the cache is on disk, keyed by the
    package's unpatched source, and outlives the process."""
    interface._flash_attn_bwd.compile_cache = get_jit_cache(BACKWARD_CACHE)


def read_accumulator_by_16(interface, cls) -> bool:
    """Make the package's post-processing (`interface._bwd_postprocess_convert`) read the Hopper backward's fp32
    accumulators in the blocks that kernel writes: head dim rounded to 16 (its class `cls`), not to 32. Only where
    the interface's source has the 32 layout line and the class the 16 rounding line; returns whether it applies.
    The wrapper passes the package's own multiple on whenever the class rounds to 32 after all (`tile32` patched it
    in this process), on other architectures, and for swapped tiles (64, already the kernel's)."""
    convert = interface._bwd_postprocess_convert
    if getattr(convert, "_reads_by_16", False):
        return True
    if _ACCUMULATOR_32 not in inspect.getsource(interface._flash_attn_bwd) or _BUGGY not in inspect.getsource(
            cls.__init__):
        return False
    arch_at = list(inspect.signature(convert).parameters).index("arch")

    @functools.wraps(convert)
    def _bwd_postprocess_convert(*args, **kwargs):
        arch = args[arch_at] if len(args) > arch_at else kwargs["arch"]
        if arch // 10 == 9 and kwargs.get("hdim_multiple_of", 32) == 32 and not getattr(cls, "_rounds_to_32", False):
            kwargs["hdim_multiple_of"] = 16                       # the kernel's tile_hdim = ceil16(d)
        return convert(*args, **kwargs)
    _bwd_postprocess_convert._reads_by_16 = True
    interface._bwd_postprocess_convert = _bwd_postprocess_convert   # functools.wraps kept its compile_cache
    return True


@functools.lru_cache(maxsize=None)
def backward_route(fix: str) -> str:
    """Apply `fix` (BACKWARD_FIX's value) to the installed package once; the route in force: "accumulator",
    "tile32", "released" (the package's source has the fixed line already), or "pad" (asked for, or no fix applies
    to this version: its head dims are then padded). All but "pad" are right at any head dim that is a multiple of 8."""
    if fix == "pad":
        return "pad"
    try:
        from flash_attn.cute import cache_utils, flash_bwd_sm90, interface
    except ImportError:
        return "pad"
    cls = flash_bwd_sm90.FlashAttentionBackwardSm90
    if getattr(cls, "_rounds_to_32", False):                      # "tile32" patched it here before
        return "tile32"
    if fix == "accumulator" and read_accumulator_by_16(interface, cls):
        return "accumulator"
    if not fix_backward_rounding(cls):
        return "pad"
    if not getattr(cls, "_rounds_to_32", False):                  # a release with the fix: nothing patched
        return "released"
    fresh_backward_cache(interface, cache_utils.get_jit_cache)    # patched now
    return "tile32"


def available() -> bool:
    return _flash_attn_func() is not None


def usable(q: torch.Tensor, k: torch.Tensor, heads: int) -> bool:
    d = q.shape[-1] // heads
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and d % 8 == 0
            and 8 <= d <= min(256, MAX_HEAD_DIM) and k.shape[1] >= MIN_KEYS
            and torch.cuda.get_device_capability(q.device)[0] >= 9 and not torch.compiler.is_compiling()
            and available())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017, eq. 1) on (B, N, h*d), (B, M, h*d) -> (B, N, h*d)."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = q.view(b, n, heads, d), k.view(b, k.shape[1], heads, d), v.view(b, v.shape[1], heads, d)
    multiple = HEAD_DIM_MULTIPLE if backward_route(BACKWARD_FIX) == "pad" else 8
    padded = -(-d // multiple) * multiple
    if padded != d:                                               # (B, N, h, d) -> (B, N, h, padded), zeros
        q, k, v = (F.pad(t, (0, padded - d)) for t in (q, k, v))
    out = _flash_attn_func()(q, k, v, softmax_scale=d ** -0.5)    # (B, N, h, padded)
    out = out[0] if isinstance(out, tuple) else out               # (out, lse) in some versions
    return out[..., :d].reshape(b, n, inner)                      # (B, N, h*d)
