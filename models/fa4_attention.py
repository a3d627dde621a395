"""FlashAttention-4's kernels for the UNet's attentions (`train.sdpa_backend=fa4`), from the optional `flash-attn-4`
package (Dao-AILab/flash-attention's CuTe DSL implementation, which also ships the Hopper kernels of
FlashAttention-3: Shah et al. 2024, producer/consumer warpgroups and the softmax of one tile overlapped with the
other's GEMMs). Not a dependency: `pip install flash-attn-4` (it brings nvidia-cutlass-dsl). The kernels are
compiled on first use per shape (seconds each), so the first steps are slow.

It takes (B, N, heads, d) tensors, the layout the projections write, so no transposes: (B, N, h*d) views in,
(B, N, h*d) out. Head dims must be multiples of 8 up to 256 on Hopper (its `_validate_head_dims`); elsewhere,
and while torch.compile traces, the caller falls back to torch's SDPA.

Where the fix below is off or does not apply, head dims that are not multiples of 32 are zero-padded to the next
one (SD1.5's 40 and 80 to 64 and 96), the softmax scale kept at 1/sqrt(d): zero columns change neither q.k nor the
weights, and the output's extra columns (P times zero) are dropped. Measured on an H100
(experiments/bench/RESULTS.md, session 18): flash-attn-4 4.0.0b36's Hopper backward returns a wrong dq at head dims
40, 48 and 80 (relative error 1.1-1.3; out, dk, dv right) and a right one at 64, 96, 128 and 160. Its kernel rounds
the head dim up to 16 while the dq accumulator it hands on is laid out for a multiple of 32
(Dao-AILab/flash-attention pull request 2896, open).

`FIX_BACKWARD_ROUNDING` (on) instead applies that pull request's fix to the installed package (its Hopper backward
kernel rounds to 32 like its dq accumulator; `fix_backward_rounding`) and passes head dims unpadded: the forward
then runs 48-wide at head dim 40, the backward 64-wide, with no copies. The backward's compiled kernels are cached by
shape, not by the class's rounding, so the patch also gives the backward a cache namespace of its own
(`fresh_backward_cache`): no kernel built before it, in this process or on disk, is used after it. Measured on an
H100 (RESULTS.md, session 19): right against fp32 at head dims 40 and 80 (the CUDA test); batch 8's graphed step
44.79 ms against 47.30 with cuDNN in one process, 45.02 against 47.35 padded in another, and the padded route's
0.48 GiB of copies gone. Where the package's source has neither the buggy line nor the fixed one, the head dims
are padded as above.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

HEAD_DIM_MULTIPLE = 32  # pad head dims to a multiple of this (see above)
FIX_BACKWARD_ROUNDING = True  # patch the package's backward rounding instead of padding (see above)
# Attentions over fewer keys stay on torch's SDPA. The eager probe has FA4 slower than cuDNN at 1,024 and 256 keys
# (its host-side launch included), but in the graphed b8 step FA4 everywhere beat FA4 at 4,096 keys only (MIN_KEYS
# 2048): 45.11 against 45.72 ms (H100, session 19). So 0.
MIN_KEYS = 0
BACKWARD_CACHE = "bwd_tile32"  # the patched backward's compile-cache namespace (the package's own is "bwd")
_BUGGY, _FIXED = "64 if dKV_swapAB else 16", "64 if dKV_swapAB else 32"  # its rounding line, before and after


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


@functools.lru_cache(maxsize=None)
def _backward_rounding_fixed() -> bool:
    """Patch the installed package once (the class and its backward's cache); whether it rounds to 32 now (False:
    a version laid out otherwise, whose head dims are then padded)."""
    try:
        from flash_attn.cute import cache_utils, flash_bwd_sm90, interface
    except ImportError:
        return False
    cls = flash_bwd_sm90.FlashAttentionBackwardSm90
    if getattr(cls, "_rounds_to_32", False):                      # patched here before, its cache swapped then
        return True
    if not fix_backward_rounding(cls):
        return False
    if getattr(cls, "_rounds_to_32", False):                      # patched now (not a release with the fix)
        fresh_backward_cache(interface, cache_utils.get_jit_cache)
    return True


def available() -> bool:
    return _flash_attn_func() is not None


def usable(q: torch.Tensor, k: torch.Tensor, heads: int) -> bool:
    d = q.shape[-1] // heads
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and d % 8 == 0
            and 8 <= d <= 256 and k.shape[1] >= MIN_KEYS and torch.cuda.get_device_capability(q.device)[0] >= 9
            and not torch.compiler.is_compiling() and available())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head (Vaswani et al. 2017, eq. 1) on (B, N, h*d), (B, M, h*d) -> (B, N, h*d)."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = q.view(b, n, heads, d), k.view(b, k.shape[1], heads, d), v.view(b, v.shape[1], heads, d)
    multiple = 8 if FIX_BACKWARD_ROUNDING and _backward_rounding_fixed() else HEAD_DIM_MULTIPLE
    padded = -(-d // multiple) * multiple
    if padded != d:                                               # (B, N, h, d) -> (B, N, h, padded), zeros
        q, k, v = (F.pad(t, (0, padded - d)) for t in (q, k, v))
    out = _flash_attn_func()(q, k, v, softmax_scale=d ** -0.5)    # (B, N, h, padded)
    out = out[0] if isinstance(out, tuple) else out               # (out, lse) in some versions
    return out[..., :d].reshape(b, n, inner)                      # (B, N, h*d)
