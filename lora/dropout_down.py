"""LoRA dropout fused into the down projection (Triton): the dropped input is never written.

    h  = scale/(1-p) * (x * keep) A^T                                 (M, r)     forward, one pass over x
    dA = 1/(1-p) * gh^T (x * keep)                                    (r, K)     backward, x read again
    dx += keep/(1-p) * (gh A)                                         (M, K)     into the base's input gradient

keep = uniform16(hash((m * K + k) >> 1 ^ hash(seed))) >= p (a counter-based generator, `_keep`), regenerated
wherever it is needed: nothing but the seed (one int64 on the device,
drawn from torch's generator, so CUDA graphs and lora/mask_replay.py handle it like any random tensor)
is kept. Against torch's dropout kernel plus a GEMM, each LoRA'd projection on image tokens saves
writing the dropped copy and its mask and reading them twice (LoRA dropout took 2.1 ms of the batch-8
bf16 step on an H100, experiments/bench/RESULTS.md), and the saved activation is the input itself,
shared by q, k and v, instead of three dropped copies. The masks are other random draws than
nn.Dropout's (the same distribution). Used by lora/linear_fn.py; tested under Triton's interpreter
against torch on the masks from `keep_mask` (tests/test_dropout_down.py).
"""
from __future__ import annotations

import torch

from models import pdl
from models.triton_env import INTERPRET, available

if available():
    import triton
    import triton.language as tl

    @triton.jit
    def _hash(x):
        """lowbias32 (C. Wellons, "Prospecting for hash functions", 2018): uint32 -> uint32, a bijection whose
        output bits each flip with probability ~1/2 when any input bit does."""
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return x

    @triton.jit
    def _keep(seed, m, k, K, p):
        """The dropout mask of rows m, columns k of an (M, K) input: True where the element is kept. A counter-
        based generator: element i = m * K + k takes half i % 2 of hash((i >> 1) ^ hash(seed)) as a 16-bit
        uniform u, kept where u >= ceil(p * 2^16) (p is then a multiple of 2^-16: 0.1 drops 0.100006; FlashAttention's
        dropout quantises p to 2^-8). One hash per two elements (philox, tl.rand, made the kernels compute-bound:
        44 us for a 21 MB input on an H100), compared as integers (no int-to-float conversion, a quarter-rate
        instruction). This element-wise form serves any K; the kernels use `_keep_tile`, the same mask."""
        s = _hash(seed.to(tl.uint32))
        i = (m[:, None] * K + k[None, :]).to(tl.uint32)
        h = _hash((i >> 1) ^ s)
        u = tl.where((i & 1) == 0, h & 0xFFFF, h >> 16)
        return u >= tl.ceil(p * 65536.0).to(tl.uint32)

    @triton.jit
    def _keep_tile(seed, m, k0, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """`_keep` for columns k0 .. k0 + BLOCK_K - 1 of rows m, where K and k0 are even (`usable`): each pair of
        columns hashed once, its two halves interleaved."""
        s = _hash(seed.to(tl.uint32))
        c = tl.arange(0, BLOCK_K // 2)
        h = _hash((m[:, None] * (K // 2) + (k0 // 2 + c)[None, :]).to(tl.uint32) ^ s)   # (BLOCK_M, BLOCK_K / 2)
        u = tl.reshape(tl.join(h & 0xFFFF, h >> 16), (BLOCK_M, BLOCK_K))              # column 2c + t: half t
        return u >= tl.ceil(p * 65536.0).to(tl.uint32)

    @triton.jit
    def _down_kernel(x_ptr, a_ptr, h_ptr, seed_ptr, M, K, R, p, scale, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
        """h[m, :] = scale * sum_k (x * keep)[m, k] A[:, k], accumulated in fp32 over K in blocks."""
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xm = (m[:, None] < M) & (k[None, :] < K)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=xm, other=0.0)
            x = tl.where(_keep_tile(seed, m, k0, K, p, BLOCK_M, BLOCK_K), x, tl.zeros_like(x))
            at = tl.load(a_ptr + r[None, :] * K + k[:, None], mask=(k[:, None] < K) & (r[None, :] < R),
                         other=0.0)                                     # (BLOCK_K, BLOCK_R): A^T
            acc += tl.dot(x, at)
        tl.store(h_ptr + m[:, None] * R + r[None, :], (acc * scale).to(h_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (r[None, :] < R))

    @triton.jit
    def _grad_down_kernel(x_ptr, gh_ptr, seed_ptr, part_ptr, M, K, R, p, inv_keep, ROWS, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
        """part[s, :, k] = inv_keep * sum over this program's ROWS rows of gh^T (x * keep): (R, BLOCK_K), fp32."""
        pdl.start(PDL)
        k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        s = tl.program_id(1)
        r = tl.arange(0, BLOCK_R)
        seed = tl.load(seed_ptr)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(s * ROWS, tl.minimum(s * ROWS + ROWS, M), BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            mm = m < M
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=mm[:, None] & (k[None, :] < K), other=0.0)
            x = tl.where(_keep_tile(seed, m, tl.program_id(0) * BLOCK_K, K, p, BLOCK_M, BLOCK_K), x, tl.zeros_like(x))
            gh = tl.load(gh_ptr + m[:, None] * R + r[None, :], mask=mm[:, None] & (r[None, :] < R), other=0.0)
            acc += tl.dot(tl.trans(gh), x)
        tl.store(part_ptr + s * R * K + r[:, None] * K + k[None, :], acc * inv_keep,
                 mask=(r[:, None] < R) & (k[None, :] < K))

    @triton.jit
    def _add_grad_x_kernel(dx_ptr, gh_ptr, a_ptr, seed_ptr, M, K, R, p, inv_keep, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
        """dx[m, k] += keep * inv_keep * (gh A)[m, k], in place."""
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        r = tl.arange(0, BLOCK_R)
        seed = tl.load(seed_ptr)
        gh = tl.load(gh_ptr + m[:, None] * R + r[None, :], mask=(m[:, None] < M) & (r[None, :] < R), other=0.0)
        a = tl.load(a_ptr + r[:, None] * K + k[None, :], mask=(r[:, None] < R) & (k[None, :] < K), other=0.0)
        t = tl.dot(gh, a) * inv_keep                                    # (BLOCK_M, BLOCK_K) fp32
        mask = (m[:, None] < M) & (k[None, :] < K)
        off = m[:, None] * K + k[None, :]
        dx = tl.load(dx_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dx += tl.where(_keep_tile(seed, m, tl.program_id(1) * BLOCK_K, K, p, BLOCK_M, BLOCK_K), t, 0.0)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _mask_kernel(out_ptr, seed_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        pdl.start(PDL)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        keep = _keep(tl.load(seed_ptr), m, k, K, p)
        tl.store(out_ptr + m[:, None] * K + k[None, :], keep.to(tl.int8), mask=(m[:, None] < M) & (k[None, :] < K))

_BM, _BK = 64, 64
enabled = True   # train.triton_lora_dropout (training/loop.py): false keeps torch's dropout kernel in linear_fn
# Inputs smaller than this keep torch's dropout kernel and cuBLAS: with few row blocks the kernels leave SMs idle
# (H100: batch 8 gained 1.6 ms with every projection here, batch 2, whose largest input is 2.6M elements, lost
# 1.0 ms; experiments/bench/RESULTS.md)
min_elements = 4 * 2 ** 20


def rank_block(r: int) -> int:
    """The block size along the LoRA rank (also lora/lora_mm.py)."""
    return max(16, triton.next_power_of_2(r))   # tl.dot needs 16 or more along each dimension


def usable(x: torch.Tensor, dtype: torch.dtype, rank: int) -> bool:
    """Triton present; CUDA in fp16/bf16 (tl.dot would round fp32 to tf32), or the interpreter; an input of at
    least `min_elements` and with offsets within int32; a rank tl.dot holds in one block."""
    if not enabled or not available() or not min_elements <= x.numel() < 2 ** 31 or rank > 128 or x.shape[-1] % 2:
        return False
    return INTERPRET or (x.is_cuda and dtype in (torch.float16, torch.bfloat16))


def can_regenerate(x: torch.Tensor) -> bool:
    """Whether `keep_mask` can make x's dropout mask here (lora/mask_replay.py keeps its seed, not the mask)."""
    return enabled and available() and (INTERPRET or x.is_cuda) and 0 < x.numel() < 2 ** 31 and x.ndim > 0


def new_seed(device) -> torch.Tensor:
    """One int64 seed on the device, drawn from torch's generator (graph-safe: a random op like any other)."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int64)


def keep_mask(seed: torch.Tensor, m: int, k: int, p: float) -> torch.Tensor:
    """The (M, K) bool mask the kernels use for this seed (tests; lora/mask_replay.py for torch's dropout path)."""
    out = torch.empty(m, k, dtype=torch.int8, device=seed.device)
    _mask_kernel[(triton.cdiv(m, _BM), triton.cdiv(k, _BK))](out, seed, m, k, p, BLOCK_M=_BM, BLOCK_K=_BK, **pdl.kw(out))
    return out.view(torch.bool)                                          # 0/1 bytes: no copy


def down(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float, scale: float) -> torch.Tensor:
    """scale * dropout_p(x) @ a^T for x (M, K) contiguous, a (r, K): (M, r) in x's dtype."""
    m, k = x.shape
    r = a.shape[0]
    h = torch.empty(m, r, dtype=x.dtype, device=x.device)
    _down_kernel[(triton.cdiv(m, _BM),)](x, a.contiguous(), h, seed, m, k, r, p, scale / (1.0 - p),
                                         BLOCK_M=_BM, BLOCK_K=_BK, BLOCK_R=rank_block(r), **pdl.kw(x))
    return h


def grad_down(x: torch.Tensor, gh: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """gh^T @ dropout_p(x) (the same mask as forward): (r, K) in fp32. Rows split over ~4 programs per SM,
    partial sums added in a fixed order (deterministic)."""
    m, k = x.shape
    r = gh.shape[1]
    n_k = triton.cdiv(k, _BK)
    splits = max(1, min(triton.cdiv(m, _BM), 512 // n_k))
    rows = triton.cdiv(triton.cdiv(m, splits), _BM) * _BM
    splits = triton.cdiv(m, rows)
    part = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    _grad_down_kernel[(n_k, splits)](x, gh.contiguous(), seed, part, m, k, r, p, 1.0 / (1.0 - p), rows,
                                     BLOCK_M=_BM, BLOCK_K=_BK, BLOCK_R=rank_block(r), **pdl.kw(x))
    return part[0] if splits == 1 else part.sum(0)


def add_grad_input_(dx: torch.Tensor, gh: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, p: float) -> None:
    """dx += dropout_p'(gh @ a) in place (dx (M, K) contiguous, gh (M, r), a (r, K))."""
    m, k = dx.shape
    r = a.shape[0]
    _add_grad_x_kernel[(triton.cdiv(m, _BM), triton.cdiv(k, _BK))](dx, gh.contiguous(), a.contiguous(), seed, m, k,
                                                                    r, p, 1.0 / (1.0 - p), BLOCK_M=_BM,
                                                                    BLOCK_K=_BK, BLOCK_R=rank_block(r), **pdl.kw(dx))
