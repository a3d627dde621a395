"""models/sdpa_backend.py: the attention kernel asked for first, per policy and head dim."""
import pytest
import torch
from torch.nn.attention import SDPBackend

from models import sdpa_backend
from models.blocks import attention


@pytest.fixture(autouse=True)
def _restore_policy():
    yield
    sdpa_backend.set_policy("torch")


def test_the_hopper_table_follows_the_measurement():
    t = sdpa_backend.hopper_table
    assert t(40, True) == t(40, False) == SDPBackend.CUDNN_ATTENTION        # SD1.5's 64x64 level
    assert t(80, True) == t(80, False) == SDPBackend.FLASH_ATTENTION        # 32x32
    assert t(160, True) == SDPBackend.CUDNN_ATTENTION and t(160, False) == SDPBackend.EFFICIENT_ATTENTION


def test_policies_are_checked_and_the_cpu_keeps_torchs_choice():
    with pytest.raises(ValueError, match="sdpa_backend: 'fast'"):
        sdpa_backend.set_policy("fast")
    q, k = torch.randn(1, 8, 16, 40), torch.randn(1, 8, 77, 40)
    for policy in ("torch", "auto", "flash"):
        sdpa_backend.set_policy(policy)
        assert sdpa_backend.preferred(q, k) is None   # CPU tensors: torch's math kernel, nothing to choose


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


@cuda
def test_sdpa_policy_on_cuda_picks_the_kernel_and_keeps_the_numbers():
    """Under "auto" on Hopper each head dim runs the table's kernel (the aten op the profiler records), and
    every policy gives the math kernel's result in fp32 within bf16 rounding."""
    from torch.profiler import ProfilerActivity, profile
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the table applies to Hopper GPUs")
    ops = {SDPBackend.CUDNN_ATTENTION: "cudnn_attention", SDPBackend.FLASH_ATTENTION: "flash_attention",
           SDPBackend.EFFICIENT_ATTENTION: "efficient_attention"}
    torch.manual_seed(0)
    for n, m, d in [(1024, 1024, 40), (1024, 77, 40), (256, 256, 80), (64, 77, 160), (64, 64, 160)]:
        q = torch.randn(2, n, 8 * d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, m, 8 * d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ref = attention(q.float(), k.float(), v.float(), heads=8)
        for policy in ("torch", "auto"):
            sdpa_backend.set_policy(policy)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = attention(q, k, v, heads=8)
            assert ((out.float() - ref).norm() / ref.norm()) < 1e-2, (n, m, d, policy)
            if policy == "auto":
                want = ops[sdpa_backend.hopper_table(d, n == m)]
                names = [e.name for e in prof.events()]
                assert any(want in x for x in names), (n, m, d, want, sorted(set(names)))
