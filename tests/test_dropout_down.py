"""lora/dropout_down.py: LoRA dropout inside the down projection's Triton kernels equals torch's arithmetic on
the same mask (forward, the weight gradient, the input gradient), the mask keeps 1-p of the elements and
follows its seed, and a LoRA layer and a checkpointed UNet use it consistently (kept seeds replayed, also for
torch's dropout path, whose masks are then regenerated from kept seeds). Run under
Triton's interpreter on the CPU (tests/triton_helpers.py); the kernels also compile for an H100."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import sys
import torch
from lora import dropout_down as dd
assert dd.INTERPRET
dd.min_elements = 0                                 # the tests' inputs are tiny
torch.manual_seed(0)
M, K, R, p = 150, 72, 4, 0.3                       # not multiples of the 64-blocks; rank padded to 16
seed = torch.tensor([1234], dtype=torch.int64)
keep = dd.keep_mask(seed, M, K, p)
assert abs(keep.float().mean().item() - (1 - p)) < 0.02, keep.float().mean()
assert torch.equal(keep, dd.keep_mask(seed.clone(), M, K, p))
assert (keep != dd.keep_mask(torch.tensor([99], dtype=torch.int64), M, K, p)).float().mean() > 0.2
x, a, gh = torch.randn(M, K), torch.randn(R, K), torch.randn(M, R)
xd = x * keep / (1 - p)
h = dd.down(x, a, seed, p, 0.7)
assert (h - 0.7 * xd @ a.t()).abs().max() < 1e-4
assert (dd.grad_down(x, gh, seed, p) - gh.t() @ xd).abs().max() < 1e-3
dx = torch.randn(M, K)
want = dx + keep / (1 - p) * (gh @ a)
dd.add_grad_input_(dx, gh, a, seed, p)
assert (dx - want).abs().max() < 1e-4

# a LoRA layer through lora/linear_fn.py with the seeded path, against torch on the same mask
from lora.layers import LoRALayer
fixed = torch.tensor([77], dtype=torch.int64)
dd.new_seed = lambda device: fixed.clone()
layer = LoRALayer(torch.nn.Linear(K, 40).requires_grad_(False))
ad = layer.add_adapter("default", rank=R, alpha=2, dropout=p)
torch.nn.init.normal_(ad.up.weight, std=0.2)
layer.train()
layer.fused_backward = True
xi = torch.randn(3, 50, K, requires_grad=True)
y = layer(xi)
g = torch.randn_like(y)
got = torch.autograd.grad(y, [xi, ad.down.weight, ad.up.weight], g)
m = dd.keep_mask(fixed, 150, K, p).view(3, 50, K)
xr = xi.detach().clone().requires_grad_()
yr = layer.base_layer(xr) + (xr * m / (1 - p)) @ ad.down.weight.t() @ ad.up.weight.t() * ad.scale
want = torch.autograd.grad(yr, [xr, ad.down.weight, ad.up.weight], g)
assert (y - yr).abs().max() < 1e-4
assert all((u - v).abs().max() < 1e-3 * max(1.0, v.abs().max().item()) for u, v in zip(got, want))

# a checkpointed UNet block recomputes with the kept seeds (as inside a CUDA graph) = the plain forward
sys.path.insert(0, "tests")
from conftest import UNET_CONFIGS
from models.unet import UNet2DConditionModel, UNetConfig
del dd.new_seed
import importlib; importlib.reload(dd)
dd.min_elements = 0
from lora_grads import unet_lora_grads
def grads(ckpt):
    torch.manual_seed(1)                            # the same random UNet for both
    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS["sd15"])).requires_grad_(False)
    return unet_lora_grads(unet, ["to_q", "to_k", "to_v", "to_out.0"], fused=True, ckpt=ckpt)
(o1, g1), (o2, g2) = grads(False), grads(True)
assert torch.allclose(o1, o2, atol=1e-6) and all(torch.allclose(u, v, rtol=1e-4, atol=1e-7) for u, v in zip(g1, g2))

# torch's dropout path (inputs under min_elements; and LoRAAdapter's own, unfused) in a checkpointed step keeps
# each mask's seed, not the mask, and regenerates the same mask for the recomputation
from lora import mask_replay
dd.min_elements = 2 ** 40
kinds, real_mask = [], mask_replay.mask
mask_replay.mask = lambda owner, kind, draw: (kinds.append(kind), real_mask(owner, kind, draw))[1]
for fused in (True, False):
    def grads(ckpt):
        torch.manual_seed(1)
        unet = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS["sd15"])).requires_grad_(False)
        return unet_lora_grads(unet, ["to_q", "to_out.0"], fused=fused, ckpt=ckpt)
    kinds.clear()
    (o1, g1), (o2, g2) = grads(False), grads(True)
    assert kinds and set(kinds) == {"dropout_seed"}, (fused, set(kinds))
    assert torch.allclose(o1, o2, atol=1e-6), fused
    assert all(torch.allclose(u, v, rtol=1e-4, atol=1e-7) for u, v in zip(g1, g2)), fused
    assert any(float(v.abs().max()) > 0 for v in g1)
print("ok")
'''


def test_dropout_inside_the_down_projection_under_the_interpreter():
    run_interpreted(SCRIPT)


def test_dropout_down_kernels_compile_for_an_h100():
    from lora import dropout_down as dd
    h, f, i, s = "*bf16", "*fp32", "i32", "*i64"
    blocks = {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 32}
    compile_for_h100(dd._down_kernel, dict(x_ptr=h, a_ptr=h, h_ptr=h, seed_ptr=s, M=i, K=i, R=i, p="fp32",
                                           scale="fp32"), blocks)
    compile_for_h100(dd._grad_down_kernel, dict(x_ptr=h, gh_ptr=h, seed_ptr=s, part_ptr=f, M=i, K=i, R=i, p="fp32",
                                                inv_keep="fp32", ROWS=i), blocks)
    compile_for_h100(dd._add_grad_x_kernel, dict(dx_ptr=h, gh_ptr=h, a_ptr=h, seed_ptr=s, M=i, K=i, R=i, p="fp32",
                                                 inv_keep="fp32"), blocks)
