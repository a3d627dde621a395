"""A frozen projection and its LoRA term in one Triton GEMM, forward and input gradient, for the dropout path
of lora/linear_fn.py (the mask a seed, lora/dropout_down.py).

    y  = x W^T + b + h B^T                             (M, N)   h = s/(1-p) * (x * keep) A^T  (M, r), given
    gh = s * g B                                       (M, r)   also returned, for dA (dropout_down.grad_down)
    dx = g W + keep/(1-p) * (gh A)                     (M, K)

cuBLAS computes x W^T, then adds the LoRA term as a second GEMM whose C is the first's output: y is written,
read and written again (42 MB more per call at SD1.5's 64x64 level at batch 8, where K = 320 makes these
GEMMs bound by memory). The input gradient took three kernels: gh = s g B (g read once more), g W, and
dropout_down's masked add of gh A (dx read and written again). Here the rank-r products are more tl.dot
calls on tiles the GEMM has loaded anyway: h B^T into the forward's accumulator; g B accumulated beside
g W over the same g tiles, then gh A masked (the seed's mask, `dropout_down._keep`) and added before the one
store. H100, bf16, 32768 x 320 x 320, r 32 (experiments/bench/lora_gemm_probe.py, CUDA graph replays): forward
44.3 -> 28.6 us, input gradient 45.6 -> 41.9 us; 640-wide layers (the 32x32 level, 8192 rows) were slower
(20.2 -> 21.0 and 27.7 -> 29.8 us) and keep cuBLAS (`usable`).
"""
from __future__ import annotations

import torch

from lora.dropout_down import rank_block
from models import pdl
from models.triton_env import available

if available():
    import triton
    import triton.language as tl

    from lora.dropout_down import _keep_tile

    @triton.jit
    def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Program -> (row block, column block), GROUP_M row blocks sweeping all column blocks together (their
        rows of the left operand stay in L2 while every column block reads them)."""
        num_n = tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first = group * GROUP_M
        size = tl.minimum(tl.cdiv(M, BLOCK_M) - first, GROUP_M)
        pm = first + (pid % (GROUP_M * num_n)) % size
        pn = (pid % (GROUP_M * num_n)) // size
        return pm, pn

    @triton.jit
    def _fwd_tile(x_ptr, w_ptr, h_ptr, up_ptr, m, n, M, N, K, R, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """x W^T + h B^T on rows m and columns n: the (BLOCK_M, BLOCK_N) fp32 accumulator (also lora/qkv_mm.py)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)
            wt = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=(n[None, :] < N) & (k[:, None] < K), other=0.0)
            acc = tl.dot(x, wt, acc)                                              # (BLOCK_M, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + m[:, None] * R + r[None, :], mask=(m[:, None] < M) & (r[None, :] < R), other=0.0)
        bt = tl.load(up_ptr + n[None, :] * R + r[:, None], mask=(n[None, :] < N) & (r[:, None] < R), other=0.0)
        return tl.dot(h, bt, acc)                                                 # + h B^T

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, b_ptr, h_ptr, up_ptr, y_ptr, M, N, K, R, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    GROUP_M: tl.constexpr, PDL: tl.constexpr = False):
        """y = x W^T + b + h B^T: x (M, K), W (N, K), h (M, R), B (N, R), all contiguous; fp32 accumulation."""
        pdl.start(PDL)
        pm, pn = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _fwd_tile(x_ptr, w_ptr, h_ptr, up_ptr, m, n, M, N, K, R, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))

    @triton.jit
    def _dgrad_tile(acc, g_ptr, w_ptr, up_ptr, a_ptr, seed_ptr, gh_ptr, m, k, pk, M, N, K, R, p, scale, inv_keep,
                    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_R: tl.constexpr):
        """acc + g W + keep * inv_keep * (gh A) on rows m and columns k, gh = scale * g B (stored by the first
        column block, pk = 0); the reduction runs over N (also lora/qkv_mm.py)."""
        r = tl.arange(0, BLOCK_R)
        gh = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + m[:, None] * N + n[None, :], mask=(m[:, None] < M) & (n[None, :] < N), other=0.0)
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
            b = tl.load(up_ptr + n[:, None] * R + r[None, :], mask=(n[:, None] < N) & (r[None, :] < R), other=0.0)
            acc = tl.dot(g, w, acc)                                               # (BLOCK_M, BLOCK_K)
            gh = tl.dot(g, b, gh)                                                 # (BLOCK_M, BLOCK_R)
        gh = (gh * scale).to(g_ptr.dtype.element_ty)        # rounded as cuBLAS's gh would be, then used
        if pk == 0:
            tl.store(gh_ptr + m[:, None] * R + r[None, :], gh, mask=(m[:, None] < M) & (r[None, :] < R))
        a = tl.load(a_ptr + r[:, None] * K + k[None, :], mask=(r[:, None] < R) & (k[None, :] < K), other=0.0)
        lo = tl.dot(gh, a) * inv_keep                                             # (BLOCK_M, BLOCK_K)
        if DROPOUT:
            lo = tl.where(_keep_tile(tl.load(seed_ptr), m, pk * BLOCK_K, K, p, BLOCK_M, BLOCK_K), lo, 0.0)
        return acc + lo

    @triton.jit
    def _dgrad_kernel(g_ptr, w_ptr, up_ptr, a_ptr, seed_ptr, dx_ptr, gh_ptr, M, N, K, R, p, scale, inv_keep,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      GROUP_M: tl.constexpr, PDL: tl.constexpr = False):
        """dx = g W + keep * inv_keep * (gh A) with gh = scale * g B: g (M, N), W (N, K), B (N, R), A (R, K).
        The output's columns are K and the reduction runs over N; the first column block also stores gh."""
        pdl.start(PDL)
        pm, pk = _tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
        m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        k = pk * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = _dgrad_tile(tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), g_ptr, w_ptr, up_ptr, a_ptr, seed_ptr,
                          gh_ptr, m, k, pk, M, N, K, R, p, scale, inv_keep, True, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R)
        tl.store(dx_ptr + m[:, None] * K + k[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (k[None, :] < K))

# the fastest of experiments/bench/lora_gemm_probe.py's configurations on an H100 at 32768 x 320 x 320, r 32, bf16
FWD = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
DGRAD = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
enabled = True        # train.triton_lora_gemm (training/loop.py)
max_weight = 2 ** 17  # N * K at most: the memory-bound projections (320 x 320), where the saved passes pay


def usable(w: torch.Tensor) -> bool:
    """For the dropout path's inputs (dropout_down.usable said yes: Triton, CUDA half precision, rank <= 128): a
    weight of at most `max_weight` elements."""
    return enabled and w.numel() <= max_weight


def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, h: torch.Tensor, up: torch.Tensor,
            config: dict | None = None) -> torch.Tensor:
    """x W^T + b + h B^T for x (M, K), w (N, K), b (N,) or None, h (M, r), up (N, r): (M, N) in x's dtype."""
    c = dict(FWD, **(config or {}))
    x, w, h, up = x.contiguous(), w.contiguous(), h.contiguous(), up.contiguous()
    m, k = x.shape
    n, r = w.shape[0], h.shape[1]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
    _fwd_kernel[grid](x, w, b if b is not None else x, h, up, y, m, n, k, r, HAS_BIAS=b is not None,
                      BLOCK_R=rank_block(r), **c, **pdl.kw(x))
    return y


def input_grad(g: torch.Tensor, w: torch.Tensor, up: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float,
               scale: float, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, gh): dx = g W + keep/(1-p) * (gh A), gh = scale * g B, for g (M, N), w (N, K), up (N, r), a (r, K)
    and the dropout seed of the forward (dropout_down.down)."""
    c = dict(DGRAD, **(config or {}))
    g, w, up, a = g.contiguous(), w.contiguous(), up.contiguous(), a.contiguous()
    m, n = g.shape
    k, r = w.shape[1], up.shape[1]
    dx = torch.empty(m, k, dtype=g.dtype, device=g.device)
    gh = torch.empty(m, r, dtype=g.dtype, device=g.device)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(k, c["BLOCK_K"]),)
    _dgrad_kernel[grid](g, w, up, a, seed, dx, gh, m, n, k, r, p, scale, 1.0 / (1.0 - p), BLOCK_R=rank_block(r), **c, **pdl.kw(g))
    return dx, gh
