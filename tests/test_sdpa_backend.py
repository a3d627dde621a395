"""models/sdpa_backend.py: the attention kernel asked for first."""
import contextlib
import sys

import pytest
import torch

from models import sdpa_backend
from models.blocks import attention


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    sdpa_backend.set_policy("torch")


def test_policies_are_checked_and_the_cpu_keeps_torchs_choice():
    with pytest.raises(ValueError, match="sdpa_backend: 'fast'"):
        sdpa_backend.set_policy("fast")
    q, k, v = torch.randn(1, 16, 320), torch.randn(1, 77, 320), torch.randn(1, 77, 320)
    ref = attention(q, k, v, heads=8)
    sdpa_backend.set_policy("math")
    assert isinstance(sdpa_backend.choose(q), contextlib.nullcontext)  # CPU tensors: torch's math kernel anyway
    assert torch.equal(attention(q, k, v, heads=8), ref)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


@cuda
def test_sdpa_policy_on_cuda_picks_the_kernel_and_keeps_the_numbers():
    """Each named policy runs its kernel (the aten op the profiler records) at SD1.5's head dims and gives
    the fp32 result within bf16 rounding."""
    from torch.profiler import ProfilerActivity, profile
    ops = {"cudnn": "cudnn_attention", "flash": "flash_attention", "efficient": "efficient_attention",
           "math": "_scaled_dot_product_attention_math"}
    torch.manual_seed(0)
    for n, m, d in [(1024, 1024, 40), (256, 77, 80), (64, 64, 160)]:
        q = torch.randn(2, n, 8 * d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, m, 8 * d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ref = attention(q.float(), k.float(), v.float(), heads=8)
        for policy, op in ops.items():
            sdpa_backend.set_policy(policy)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = attention(q, k, v, heads=8)
            assert ((out.float() - ref).norm() / ref.norm()) < 1e-2, (n, m, d, policy)
            names = {e.name for e in prof.events()}
            if not (policy == "cudnn" and torch.backends.cudnn.version() is None):
                assert any(op in x for x in names), (n, m, d, policy, sorted(names))


def test_fa4_policy_needs_the_package_and_says_how_to_get_it(monkeypatch):
    from models import fa4_attention
    monkeypatch.setattr(fa4_attention, "available", lambda: False)
    with pytest.raises(ValueError, match="pip install flash-attn-4"):
        sdpa_backend.set_policy("fa4")
    sdpa_backend.set_policy("auto")                                # auto: torch's order where it does not import
    assert sdpa_backend._policy == "torch"
    assert sdpa_backend.describe() == "torch"
    monkeypatch.setattr(fa4_attention, "available", lambda: True)
    sdpa_backend.set_policy("auto")
    assert sdpa_backend._policy == "fa4"
    monkeypatch.setattr(fa4_attention, "backward_route", lambda fix: f"{fix} fell back to tile32")
    assert sdpa_backend.describe().startswith("fa4 (flash-attn-4 ")
    assert sdpa_backend.describe().endswith(f"backward {fa4_attention.BACKWARD_FIX} fell back to tile32)")


def test_fa4_route_passes_heads_in_the_projections_layout(monkeypatch):
    """The FA4 route hands flash_attn_func (B, N, h, d) views of the (B, N, h*d) projections (q sliced out of a
    fused q/k/v buffer, as lora/qkv_fn.py writes it), head dim 40 zero-padded to 64 with the softmax scale of 40,
    and takes its (out, lse) back: a stand-in with FA4's signature (SDPA on its own transposes) must give
    blocks.attention's numbers and input gradients. On CPU tensors the policy itself falls back to torch (the
    kernels are CUDA-only)."""
    from models import fa4_attention
    seen = []

    def fake(q, k, v, softmax_scale):                             # FA4's layout: (B, N, h, d)
        seen.append((tuple(q.shape), tuple(k.shape), softmax_scale))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2),
                                                               scale=softmax_scale).transpose(1, 2)
        return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])
    monkeypatch.setattr(fa4_attention, "_flash_attn_func", lambda: fake)
    monkeypatch.setattr(fa4_attention, "BACKWARD_FIX", "pad")
    torch.manual_seed(0)
    qkv = torch.randn(2, 16, 3 * 320, requires_grad=True)
    q, k, v = qkv[..., :320], qkv[..., 320:640], qkv[..., 640:]   # strided views, token stride 960
    g = torch.randn(2, 16, 320)
    ref = attention(q, k, v, heads=8)
    ref_grad, = torch.autograd.grad(ref, qkv, g)
    out = fa4_attention.attention(q, k, v, heads=8)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(out, qkv, g)[0], ref_grad, atol=1e-5)
    assert seen == [((2, 16, 8, 64), (2, 16, 8, 64), 40 ** -0.5)]
    q, k, v = (t.detach() for t in (q, k, v))
    sdpa_backend.set_policy("fa4")
    assert not sdpa_backend.fa4(q, k, 8)                           # CPU: torch's kernels
    assert torch.equal(attention(q, k, v, heads=8), ref)


class _Sm90BackwardLike:
    """A stand-in for flash-attn-4 4.0.0b36's FlashAttentionBackwardSm90: its __init__'s rounding as written there."""

    def __init__(self, dtype, head_dim, head_dim_v=None, dKV_swapAB=False, SdP_swapAB=True):
        hdim_multiple_of = 64 if dKV_swapAB else 16
        self.tile_hdim = -(-head_dim // hdim_multiple_of) * hdim_multiple_of
        head_dim_v = head_dim_v if head_dim_v is not None else head_dim
        self.tile_hdimv = -(-head_dim_v // hdim_multiple_of) * hdim_multiple_of
        self.check_hdim_oob = head_dim != self.tile_hdim
        self.check_hdim_v_oob = head_dim_v != self.tile_hdimv
        self.dKV_swapAB, self.SdP_swapAB = dKV_swapAB, SdP_swapAB
        self.shuffle_LSE = self.shuffle_dPsum = self.SdP_swapAB and self.tile_hdim <= 64


def test_fa4_backward_rounding_fix_rounds_like_the_dq_accumulator():
    """fix_backward_rounding (pull request 2896's fix): non-swapped tiles round to 32 (40 -> 64, 80 -> 96, was 48
    and 80) with the out-of-bounds flags to match; swapped tiles, already multiples of 32, and classes with other
    source are left alone; patching twice wraps once."""
    from models import fa4_attention

    class Patched(_Sm90BackwardLike):
        __init__ = _Sm90BackwardLike.__init__
    assert Patched(None, 40).tile_hdim == 48                       # the bug: 48, where dq's accumulator has 64
    assert fa4_attention.fix_backward_rounding(Patched) and fa4_attention.fix_backward_rounding(Patched)
    for d, tile, oob in ((40, 64, True), (48, 64, True), (64, 64, False), (80, 96, True), (96, 96, False),
                         (128, 128, False)):
        k = Patched(None, d)
        assert (k.tile_hdim, k.tile_hdimv, k.check_hdim_oob, k.check_hdim_v_oob) == (tile, tile, oob, oob), d
        assert k.shuffle_LSE == (tile <= 64)
    assert Patched(None, 160, dKV_swapAB=True).tile_hdim == 192    # swapped: 64-multiples, untouched
    assert Patched(None, 64, head_dim_v=40).check_hdim_v_oob

    class Other:
        def __init__(self, dtype, head_dim):
            self.tile_hdim = head_dim
    assert not fa4_attention.fix_backward_rounding(Other) and Other(None, 40).tile_hdim == 40


def test_fa4_patch_gives_the_backward_a_cache_without_kernels_built_before_it(monkeypatch):
    """backward_route("tile32") on a stand-in package: the class rounds to 32 afterwards, and the backward's
    compile cache is a new one under its own name, so a kernel compiled (with the bug) before the patch is not reused:
    session 19's probe, which ran FA4 unpatched first, got the wrong dq after patching until this."""
    import types

    from models import fa4_attention

    class Bwd(_Sm90BackwardLike):
        __init__ = _Sm90BackwardLike.__init__

    def _flash_attn_bwd():
        pass
    _flash_attn_bwd.compile_cache = {("bf16", 40): "kernel built at tile 48"}
    made = []

    def get_jit_cache(name):
        made.append(name)
        return {}
    mods = {"flash_attn": types.ModuleType("flash_attn"), "flash_attn.cute": types.ModuleType("flash_attn.cute"),
            "flash_attn.cute.flash_bwd_sm90": types.SimpleNamespace(FlashAttentionBackwardSm90=Bwd),
            "flash_attn.cute.interface": types.SimpleNamespace(_flash_attn_bwd=_flash_attn_bwd),
            "flash_attn.cute.cache_utils": types.SimpleNamespace(get_jit_cache=get_jit_cache)}
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("flash_bwd_sm90", "interface", "cache_utils"):
        monkeypatch.setattr(mods["flash_attn.cute"], name, mods[f"flash_attn.cute.{name}"], raising=False)
    route = fa4_attention.backward_route.__wrapped__               # the undecorated function: no cached answer
    assert route("tile32") == "tile32" and Bwd(None, 40).tile_hdim == 64
    assert made == [fa4_attention.BACKWARD_CACHE] and _flash_attn_bwd.compile_cache == {}
    _flash_attn_bwd.compile_cache["k"] = "kernel built at tile 64"
    assert route("tile32") == "tile32" and made == [fa4_attention.BACKWARD_CACHE]  # patched already: cache kept
    assert route("accumulator") == "tile32" and made == [fa4_attention.BACKWARD_CACHE]  # the class rounds to 32
    assert route("pad") == "pad"
    assert _flash_attn_bwd.compile_cache == {"k": "kernel built at tile 64"}


def _accumulator_package(iface, cls, tile_m=4):
    """A stand-in for flash-attn-4 4.0.0b36's Hopper backward and its dq post-processing, reduced to the fp32
    accumulator's layout: the kernel (`cls`'s rounding) writes dq's row blocks of tile_m x tile_hdim one after
    another; the post-processing reads blocks of tile_m x d rounded to its multiple, which the interface passes as
    its source does. Returns the backward: (N, d) dq in, dq as read back out."""
    def _bwd_postprocess_convert(accum, output, scale, cu_seqlens, seqused, arch, dtype, hdim, block_size,
                                 hdim_multiple_of=32):
        tile = -(-hdim // hdim_multiple_of) * hdim_multiple_of
        blocks = accum[:output.shape[0] // block_size * block_size * tile].view(-1, block_size, tile)
        output.copy_(blocks[..., :hdim].reshape(output.shape) * scale)

    def _flash_attn_bwd(dq_true, arch=90, dKV_swapAB=False):
        n, d = dq_true.shape
        hdim_multiple_of = 64 if arch // 10 == 9 and dKV_swapAB else 32
        head_dim_rounded = -(-d // hdim_multiple_of) * hdim_multiple_of
        accum = torch.zeros(n * head_dim_rounded)                   # laid out by the interface's multiple
        tile_hdim = cls(None, d, dKV_swapAB=dKV_swapAB).tile_hdim if arch // 10 == 9 else head_dim_rounded
        blocks = torch.nn.functional.pad(dq_true, (0, tile_hdim - d)).view(-1, tile_m, tile_hdim)
        accum[:blocks.numel()] = blocks.flatten()                   # written by the kernel's tile
        dq = torch.empty_like(dq_true)
        iface._bwd_postprocess_convert(accum, dq, 1.0, None, None, arch, torch.float32, d, tile_m,
                                       hdim_multiple_of=hdim_multiple_of)
        return dq
    _bwd_postprocess_convert.compile_cache = {"post": "kernels"}
    iface._bwd_postprocess_convert, iface._flash_attn_bwd = _bwd_postprocess_convert, _flash_attn_bwd
    return _flash_attn_bwd


def test_fa4_accumulator_fix_reads_dq_where_the_kernel_wrote_it():
    """read_accumulator_by_16 on a stand-in of the package's dq accumulator layout: unfixed, dq at head dim 40 comes
    back scrambled (the kernel writes 48-wide blocks, the post-processing reads 64-wide ones: session 18's wrong dq);
    fixed, it comes back exact at 40 to 128, and stays exact where the package's multiple was already the
    kernel's (swapped tiles, other architectures) and after "tile32" rounds the kernel to 32 too. Patching twice
    wraps once and keeps the post-processing's compile cache; an interface with other source is left alone."""
    import types

    from models import fa4_attention

    class Bwd(_Sm90BackwardLike):
        __init__ = _Sm90BackwardLike.__init__
    iface = types.SimpleNamespace()
    bwd = _accumulator_package(iface, Bwd)
    dq = torch.randn(12, 40)
    assert not torch.equal(bwd(dq), dq)                            # the bug
    assert fa4_attention.read_accumulator_by_16(iface, Bwd)
    wrapped = iface._bwd_postprocess_convert
    assert fa4_attention.read_accumulator_by_16(iface, Bwd) and iface._bwd_postprocess_convert is wrapped
    assert wrapped.compile_cache == {"post": "kernels"}
    for d in (40, 48, 64, 80, 128):
        dq = torch.randn(12, d)
        assert torch.equal(bwd(dq), dq), d
        assert torch.equal(bwd(dq, dKV_swapAB=True), dq) and torch.equal(bwd(dq, arch=100), dq), d
    fa4_attention.fix_backward_rounding(Bwd)                       # "tile32" in the same process
    assert Bwd(None, 40).tile_hdim == 64 and torch.equal(bwd(dq := torch.randn(12, 40)), dq)

    class Other(_Sm90BackwardLike):
        __init__ = _Sm90BackwardLike.__init__
    other = types.SimpleNamespace()
    _accumulator_package(other, Other)
    other._flash_attn_bwd = lambda dq_true: dq_true                # source without the layout line
    assert not fa4_attention.read_accumulator_by_16(other, Other)


def test_fa4_route_with_the_rounding_fixed_passes_head_dims_unpadded(monkeypatch):
    from models import fa4_attention
    seen = []

    def fake(q, k, v, softmax_scale):
        seen.append((q.shape[-1], softmax_scale))
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale).transpose(1, 2)
    monkeypatch.setattr(fa4_attention, "_flash_attn_func", lambda: fake)
    monkeypatch.setattr(fa4_attention, "backward_route", lambda fix: "accumulator")
    q, k, v = torch.randn(3, 2, 16, 320).unbind(0)
    assert torch.allclose(fa4_attention.attention(q, k, v, heads=8), attention(q, k, v, heads=8), atol=1e-6)
    assert seen == [(40, 40 ** -0.5)]


@cuda
def test_fa4_kernels_match_fp32_where_installed(monkeypatch):
    """flash-attn-4's kernels (when installed, on Hopper or newer) at SD1.5's self-attention head dims, forward and
    input gradients against fp32 SDPA on the same bf16 inputs, on each BACKWARD_FIX route; 1,000 queries (not a
    multiple of any tile) over 77 keys too, a cross-attention's shape; fp16 (the report's dtype) on the default route
    (all passed on an H100, session 21)."""
    from models import fa4_attention
    if not fa4_attention.available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("flash-attn-4 not installed or GPU older than Hopper")
    sdpa_backend.set_policy("fa4")
    torch.manual_seed(0)
    cases = [(n, m, d, fix, torch.bfloat16) for fix in ("pad", "accumulator", "tile32")  # "tile32" last: for good
             for n, m, d in ((1024, 1024, 40), (256, 256, 80), (64, 64, 160), (1000, 77, 40))]
    cases[4:4] = [(1024, 1024, 40, "accumulator", torch.float16), (1000, 77, 40, "accumulator", torch.float16)]
    for n, m, d, fix, dtype in cases:
        monkeypatch.setattr(fa4_attention, "BACKWARD_FIX", fix)
        q, k, v = (torch.randn(2, t, 8 * d, device="cuda", dtype=dtype, requires_grad=True) for t in (n, m, m))
        assert sdpa_backend.fa4(q, k, 8)
        monkeypatch.setattr(fa4_attention, "MIN_KEYS", m + 1)
        assert not sdpa_backend.fa4(q, k, 8)                       # fewer keys than MIN_KEYS: torch's SDPA
        monkeypatch.setattr(fa4_attention, "MIN_KEYS", 0)
        monkeypatch.setattr(fa4_attention, "MAX_HEAD_DIM", d - 8)
        assert not sdpa_backend.fa4(q, k, 8)                       # a larger head dim than MAX_HEAD_DIM: torch's
        monkeypatch.setattr(fa4_attention, "MAX_HEAD_DIM", 256)
        g = torch.randn(2, n, 8 * d, device="cuda", dtype=dtype)
        out = attention(q, k, v, heads=8)
        grads = torch.autograd.grad(out, (q, k, v), g)
        f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
        sdpa_backend.set_policy("math")
        ref = attention(*f32, heads=8)
        ref_grads = torch.autograd.grad(ref, f32, g.float())
        sdpa_backend.set_policy("fa4")
        for a, b in ((out, ref), *zip(grads, ref_grads)):
            assert ((a.float() - b).norm() / b.norm()) < 1e-2, (n, m, d, fix, dtype)
