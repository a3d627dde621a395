"""Attention over a short key sequence (cross-attention's 77 text tokens) in one Triton kernel each way.

    S = Q K^T / sqrt(d);  P = softmax(S);  O = P V                        (Vaswani et al. 2017, eq. 1)
    dV = P^T dO;  dP = dO V^T;  delta = rowsum(dO * O);  dS = P * (dP - delta)
    dQ = dS K / sqrt(d);  dK = dS^T Q / sqrt(d)          (Dao 2023, FlashAttention-2, Alg. 2 and its row term D)

Why: all L <= 128 keys of a head fit in one tile, so a program holds that head's K and V and takes blocks of
queries whose whole softmax rows are in registers: no online rescaling, forward one pass over Q writing O (and
the rows' log-sum-exp for the backward), backward one pass over Q, O and dO writing dQ directly. dK and dV are
summed in registers over each program's query blocks and its partial sums added by torch (deterministic: no
atomics). cuDNN's flash kernels, made for long keys, split the backward over key blocks (one or two per head
here), accumulate dQ in fp32 and run a kernel before (dO . O) and one after (dQ to 16 bits): the batch-8 bf16
profile spent 0.17 ms per 4,096 x 77 cross-attention backward on them. Forward + backward, bf16, 77 keys
(experiments/bench/RESULTS.md, session 10): SD1.5's 64x64 level 210 against cuDNN's 220 us at batch 8, 67
against 134 at batch 2; SDXL's 64x64 level at batch 1 59 against 128 (the report's step: -1.8%). CUDA with fp16/bf16 (or Triton's interpreter), head dim <= 64, keys <= 128; `usable` says
when, and attention() in models/blocks.py falls back to torch's SDPA otherwise.
"""
from __future__ import annotations

import math

import torch

from models import pdl
from models.triton_env import INTERPRET, available

if available():
    import triton
    import triton.language as tl

enabled = True          # a process-wide off switch (experiments/bench/graph_ab.py compares the step without it)
MAX_KEYS = 128
MAX_HEAD_DIM = 64   # d = 80 (SD1.5's 32x32 level) measured slower than cuDNN's kernels: 122.6 against 92.6 us
LOG2E = 1.4426950408889634
# (BLOCK_M, num_warps, programs per SM) of each kernel; experiments/bench/short_attention_probe.py times others
FWD_CONFIG = (64, 4, 8)
BWD_CONFIG = (64, 4, 4)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


if available():
    @triton.jit
    def _tile(ptr, b, s_b, rows, s_row, n_rows, col, d, D: tl.constexpr):
        """Rows `rows` of batch b, one head's columns `col`, of a (B, tokens, H * D) tensor: (len(rows), BLOCK_D),
        zeros past n_rows and past D."""
        mask = (rows[:, None] < n_rows) & (d[None, :] < D)
        return tl.load(ptr + b * s_b + rows[:, None] * s_row + col, mask=mask, other=0.0)

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, N, L, H,
                    sq_b, sq_n, sk_b, sk_l, sv_b, sv_l, so_b, so_n, qk_scale, SPLIT, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
        """One (batch * head, split) per program: K and V loaded once, then query blocks split, split + SPLIT, ...
        q, k, v, o are (B, tokens, H * D) with unit last stride. D is a compile-time constant so that Triton
        sees each head's columns start at a multiple of 8 (d = 40: 16-byte vector loads; as a run-time integer
        the loads went element by element, 2.5x slower)."""
        pdl.start(PDL)
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        l, d = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
        col = h * D + d[None, :]
        k = _tile(k_ptr, b, sk_b, l, sk_l, L, col, d, D)                     # (BLOCK_L, BLOCK_D)
        v = _tile(v_ptr, b, sv_b, l, sv_l, L, col, d, D)
        for start in range(split * BLOCK_M, N, SPLIT * BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            md = (m[:, None] < N) & (d[None, :] < D)
            q = _tile(q_ptr, b, sq_b, m, sq_n, N, col, d, D)               # (BLOCK_M, BLOCK_D)
            s = tl.dot(q, tl.trans(k)) * qk_scale                  # (BLOCK_M, BLOCK_L) scores in log2 units
            s = tl.where(l[None, :] < L, s, float("-inf"))
            mx = tl.max(s, 1)
            p = tl.exp2(s - mx[:, None])
            den = tl.sum(p, 1)
            o = tl.dot(p.to(v.dtype), v) / den[:, None]            # (BLOCK_M, BLOCK_D)
            tl.store(o_ptr + b * so_b + m[:, None] * so_n + col, o.to(o_ptr.dtype.element_ty), mask=md)
            tl.store(lse_ptr + bh.to(tl.int64) * N + m, mx + tl.log2(den), mask=m < N)

    @triton.jit
    def _bwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, N, L, H, C,
                    sq_b, sq_n, sk_b, sk_l, sv_b, sv_l, so_b, so_n, sdo_b, sdo_n, part_stride,
                    sm_scale, qk_scale, SPLIT, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
        """One (batch * head, split) per program: query blocks split, split + SPLIT, ...; dq (B, N, C) written,
        this program's sums of dK and dV written to part `split` of (SPLIT, B, L, C) fp32 buffers. (Scores as
        S^T, keys x queries, so that only dQ = dS K transposes a tile, was slower: 328 against 204 us forward
        and backward at SD1.5's 64x64 level at batch 8; experiments/bench/RESULTS.md, session 10.)"""
        pdl.start(PDL)
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        l, d = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
        col = h * D + d[None, :]
        ld = (l[:, None] < L) & (d[None, :] < D)
        k = _tile(k_ptr, b, sk_b, l, sk_l, L, col, d, D)                     # (BLOCK_L, BLOCK_D)
        v = _tile(v_ptr, b, sv_b, l, sv_l, L, col, d, D)
        dk = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        for start in range(split * BLOCK_M, N, SPLIT * BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            md = (m[:, None] < N) & (d[None, :] < D)
            q = _tile(q_ptr, b, sq_b, m, sq_n, N, col, d, D)               # (BLOCK_M, BLOCK_D)
            o = _tile(o_ptr, b, so_b, m, so_n, N, col, d, D)
            do = _tile(do_ptr, b, sdo_b, m, sdo_n, N, col, d, D)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * N + m, mask=m < N, other=float("inf"))
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)       # (BLOCK_M,)
            s = tl.dot(q, tl.trans(k)) * qk_scale                      # (BLOCK_M, BLOCK_L)
            p = tl.where(l[None, :] < L, tl.exp2(s - lse[:, None]), 0.0)    # P recomputed; 0 on padding
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)              # += P^T dO
            dp = tl.dot(do, tl.trans(v))                               # (BLOCK_M, BLOCK_L)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dq = tl.dot(ds, k) * sm_scale                              # (BLOCK_M, BLOCK_D)
            dk = tl.dot(tl.trans(ds), q, dk)                           # += dS^T Q
            tl.store(dq_ptr + b * N * C + m[:, None] * C + col, dq.to(dq_ptr.dtype.element_ty), mask=md)
        part = split.to(tl.int64) * part_stride + b * L * C + l[:, None] * C + col
        tl.store(dk_ptr + part, dk * sm_scale, mask=ld)
        tl.store(dv_ptr + part, dv, mask=ld)


def usable(q: torch.Tensor, k: torch.Tensor, heads: int) -> bool:
    """Triton present; CUDA fp16/bf16 (or the interpreter); keys and head dim within one tile; unit last
    strides. Other calls take torch's SDPA."""
    d = q.shape[-1] // heads
    return (enabled and available() and (INTERPRET or (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)))
            and q.ndim == 3 and k.dtype == q.dtype and k.shape[1] <= MAX_KEYS and d <= MAX_HEAD_DIM and q.shape[1] > 0)


def _splits(bh: int, blocks: int, per_sm: int, device: torch.device) -> int:
    """Query-block splits per head: enough programs for about `per_sm` per multiprocessor."""
    sms = 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(per_sm * sms, bh)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q: torch.Tensor, k: torch.Tensor, heads: int, config: tuple) -> tuple:
    """One kernel's geometry: (batch, queries, width, keys, head dim, BLOCK_M, warps, query splits)."""
    b, n, c = q.shape
    bm, warps, per_sm = config
    return b, n, c, k.shape[1], c // heads, bm, warps, _splits(b * heads, triton.cdiv(n, bm), per_sm, q.device)


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, heads):
        q, k, v = _rows(q), _rows(k), _rows(v)
        b, n, c, keys, d, bm, warps, split = _launch(q, k, heads, FWD_CONFIG)
        o = torch.empty(b, n, c, dtype=q.dtype, device=q.device)
        lse = torch.empty(b * heads, n, dtype=torch.float32, device=q.device)
        _fwd_kernel[(b * heads, split)](
            q, k, v, o, lse, n, keys, heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
            v.stride(1), o.stride(0), o.stride(1), LOG2E / math.sqrt(d), split, D=d,
            BLOCK_M=bm, BLOCK_L=_block(keys), BLOCK_D=_block(d), num_warps=warps, **pdl.kw(q))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.heads = heads
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        heads = ctx.heads
        do = _rows(do)
        b, n, c, keys, d, bm, warps, split = _launch(q, k, heads, BWD_CONFIG)
        dq = torch.empty(b, n, c, dtype=q.dtype, device=q.device)
        dk = torch.empty(split, b, keys, c, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
        _bwd_kernel[(b * heads, split)](
            q, k, v, o, do, lse, dq, dk, dv, n, keys, heads, c, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), do.stride(0), do.stride(1),
            b * keys * c, 1.0 / math.sqrt(d), LOG2E / math.sqrt(d), split, D=d,
            BLOCK_M=bm, BLOCK_L=_block(keys), BLOCK_D=_block(d), num_warps=warps, **pdl.kw(q))
        return dq, dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype), None


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head for q (B, N, heads*d), k and v (B, L, heads*d), L <= 128:
    -> (B, N, heads*d) in q's dtype."""
    return _ShortAttention.apply(q, k, v, heads)
