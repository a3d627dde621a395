"""models/sdpa_backend.py: the attention kernel asked for first."""
import contextlib

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
