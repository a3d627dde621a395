"""Self-attention's q, k and v projections with their LoRA terms in one Triton kernel each way (issue 9's "fused QKV
with LoRA"), for lora/qkv_fn.py. Three frozen projections W_j (N, K) of the same input x (M, K), j = q, k, v, each
with its own adapter (A_j (r, K), B_j (N, r), dropout seed j):

    h_j  = s/(1-p) * (x * keep_j) A_j^T                         (M, r)   `down`: x read once for all three
    y_j  = x W_j^T + h_j B_j^T                                   (M, N)   `forward`: one launch, y (3, M, N)
    gh_j = s * g_j B_j                                           (M, r)   `input_grad`, also returned (for dA_j)
    dx   = sum_j [ g_j W_j + keep_j/(1-p) * (gh_j A_j) ]        (M, K)   one fp32 accumulator, stored once

Per layer (lora/linear_fn.py with lora/lora_mm.py and lora/dropout_down.py) the same step reads x three times in the
down projections and three times in the GEMMs, and writes three (M, K) input gradients that autograd then adds in
two more passes (at SD1.5's 64x64 level at batch 8: 21 MB per read or write, and two 63 MB adds per attention).
Here the forward's programs that share a row block of x run together (GROUP_M), so x comes from DRAM about once;
the input gradient sums the three products in one accumulator (one rounding instead of three). The forward tiles
and the down projection's arithmetic are lora_mm's and dropout_down's, so y_j and h_j are the same bits as there.
"""
from __future__ import annotations

import torch

from lora.dropout_down import _BK, _BM, rank_block
from models import pdl
from models.triton_env import available

if available():
    import triton
    import triton.language as tl

    from lora.dropout_down import _keep_tile
    from lora.lora_mm import _dgrad_tile, _fwd_tile, _tile

    @triton.jit
    def _down3_kernel(x_ptr, a_ptr, h_ptr, s0_ptr, s1_ptr, s2_ptr, M, K, R, p, scale, DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
        """h[j, m, :] = scale * sum_k (x * keep_j)[m, k] A[j, :, k], j = 0, 1, 2: x (M, K), A (3, R, K), h (3, M, R)."""
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            am = (k[:, None] < K) & (r[None, :] < R)
            at = r[None, :] * K + k[:, None]                                   # (BLOCK_K, BLOCK_R): A_j^T
            a0 = tl.load(a_ptr + at, mask=am, other=0.0)
            a1 = tl.load(a_ptr + R * K + at, mask=am, other=0.0)
            a2 = tl.load(a_ptr + 2 * R * K + at, mask=am, other=0.0)
            if DROPOUT:
                zero = tl.zeros_like(x)
                acc0 += tl.dot(tl.where(_keep_tile(tl.load(s0_ptr), m, k0, K, p, BLOCK_M, BLOCK_K), x, zero), a0)
                acc1 += tl.dot(tl.where(_keep_tile(tl.load(s1_ptr), m, k0, K, p, BLOCK_M, BLOCK_K), x, zero), a1)
                acc2 += tl.dot(tl.where(_keep_tile(tl.load(s2_ptr), m, k0, K, p, BLOCK_M, BLOCK_K), x, zero), a2)
            else:
                acc0 += tl.dot(x, a0)
                acc1 += tl.dot(x, a1)
                acc2 += tl.dot(x, a2)
        hm = (m[:, None] < M) & (r[None, :] < R)
        ho = m[:, None] * R + r[None, :]
        dt = h_ptr.dtype.element_ty
        tl.store(h_ptr + ho, (acc0 * scale).to(dt), mask=hm)
        tl.store(h_ptr + M * R + ho, (acc1 * scale).to(dt), mask=hm)
        tl.store(h_ptr + 2 * M * R + ho, (acc2 * scale).to(dt), mask=hm)

    @triton.jit
    def _fwd3_kernel(x_ptr, w_ptr, h_ptr, up_ptr, y_ptr, M, N, K, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr = False):
        """y[j] = x W[j]^T + h[j] B[j]^T: x (M, K), W (3, N, K), h (3, M, R), B (3, N, R), y (3, M, N). The column
        blocks of the three outputs are one sequence (j major), swept together by each group of row blocks."""
        pdl.start(PDL)
        nb = tl.cdiv(N, BLOCK_N)
        pm, pv = _tile(tl.program_id(0), M, 3 * nb * BLOCK_N, BLOCK_M, BLOCK_N, GROUP_M)
        j = pv // nb
        m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        n = (pv % nb) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _fwd_tile(x_ptr, w_ptr + j * N * K, h_ptr + j * M * R, up_ptr + j * N * R, m, n, M, N, K, R, BLOCK_M,
                        BLOCK_N, BLOCK_K, BLOCK_R)
        tl.store(y_ptr + j * M * N + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))

    @triton.jit
    def _dgrad3_kernel(g0_ptr, g1_ptr, g2_ptr, w_ptr, up_ptr, a_ptr, s0_ptr, s1_ptr, s2_ptr, dx_ptr, gh_ptr,
                       M, N, K, R, p, scale, inv_keep, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                       PDL: tl.constexpr = False):
        """dx = sum_j g_j W[j] + keep_j * inv_keep * (gh[j] A[j]), gh[j] = scale * g_j B[j]: g_j (M, N) each,
        W (3, N, K), B (3, N, R), A (3, R, K), dx (M, K), gh (3, M, R)."""
        pdl.start(PDL)
        pm, pk = _tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
        m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        acc = _dgrad_tile(acc, g0_ptr, w_ptr, up_ptr, a_ptr, s0_ptr, gh_ptr, m, k, pk, M, N, K, R, p, scale,
                          inv_keep, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        acc = _dgrad_tile(acc, g1_ptr, w_ptr + N * K, up_ptr + N * R, a_ptr + R * K, s1_ptr, gh_ptr + M * R,
                          m, k, pk, M, N, K, R, p, scale, inv_keep, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        acc = _dgrad_tile(acc, g2_ptr, w_ptr + 2 * N * K, up_ptr + 2 * N * R, a_ptr + 2 * R * K, s2_ptr,
                          gh_ptr + 2 * M * R, m, k, pk, M, N, K, R, p, scale, inv_keep, DROPOUT, BLOCK_M, BLOCK_N,
                          BLOCK_K, BLOCK_R)
        tl.store(dx_ptr + m[:, None] * K + k[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (k[None, :] < K))

# The forward: lora_mm's tiles (so y_j is lora_mm's bits; the best of qkv_probe's 32 configurations, 128/64/64, was
# 2 us faster of 107). The input gradient: qkv_probe's sweep (session 16, H200, 32 configurations) put 128/32/64 at
# 128.7 us against 136.8 for lora_mm's 128/64/64 (the best, 64/32/128 with 4 stages, 128.6).
FWD = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
DGRAD = dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def _seeds(seeds):
    """Three seed tensors, or (p = 0) None: any tensor stands in (DROPOUT=False never reads it)."""
    return (None, None, None) if seeds is None else seeds


def down(x: torch.Tensor, a: torch.Tensor, seeds, p: float, scale: float) -> torch.Tensor:
    """scale * dropout_p(x) @ a[j]^T for x (M, K) contiguous, a (3, r, K), seeds three int64 (1,) tensors (or None
    for p = 0): h (3, M, r) in x's dtype."""
    m, k = x.shape
    r = a.shape[1]
    s = _seeds(seeds)
    h = torch.empty(3, m, r, dtype=x.dtype, device=x.device)
    _down3_kernel[(triton.cdiv(m, _BM),)](x, a.contiguous(), h, s[0] if seeds else x, s[1] if seeds else x,
                                          s[2] if seeds else x, m, k, r, p, scale / (1.0 - p),
                                          DROPOUT=seeds is not None, BLOCK_M=_BM, BLOCK_K=_BK,
                                          BLOCK_R=rank_block(r), **pdl.kw(x))
    return h


def forward(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, up: torch.Tensor, config: dict | None = None):
    """x W[j]^T + h[j] B[j]^T for x (M, K), w (3, N, K), h (3, M, r), up (3, N, r): y (3, M, N) in x's dtype."""
    c = dict(FWD, **(config or {}))
    x, w, h, up = x.contiguous(), w.contiguous(), h.contiguous(), up.contiguous()
    m, k = x.shape
    n, r = w.shape[1], h.shape[2]
    y = torch.empty(3, m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * 3 * triton.cdiv(n, c["BLOCK_N"]),)
    _fwd3_kernel[grid](x, w, h, up, y, m, n, k, r, BLOCK_R=rank_block(r), **c, **pdl.kw(x))
    return y


def input_grad(gs, w: torch.Tensor, up: torch.Tensor, a: torch.Tensor, seeds, p: float, scale: float,
               config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, gh): dx = sum_j g_j W[j] + keep_j/(1-p) * (gh[j] A[j]), gh[j] = scale * g_j B[j], for gs three (M, N)
    gradients, w (3, N, K), up (3, N, r), a (3, r, K) and the forward's seeds (None: p = 0)."""
    c = dict(DGRAD, **(config or {}))
    g0, g1, g2 = (g.contiguous() for g in gs)
    w, up, a = w.contiguous(), up.contiguous(), a.contiguous()
    m, n = g0.shape
    k, r = w.shape[2], up.shape[2]
    s = _seeds(seeds)
    dx = torch.empty(m, k, dtype=g0.dtype, device=g0.device)
    gh = torch.empty(3, m, r, dtype=g0.dtype, device=g0.device)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(k, c["BLOCK_K"]),)
    _dgrad3_kernel[grid](g0, g1, g2, w, up, a, s[0] if seeds else g0, s[1] if seeds else g0, s[2] if seeds else g0,
                         dx, gh, m, n, k, r, p, scale, 1.0 / (1.0 - p), DROPOUT=seeds is not None,
                         BLOCK_R=rank_block(r), **c, **pdl.kw(g0))
    return dx, gh
