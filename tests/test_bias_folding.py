"""models/bias_folding.py (and its kernel, models/nhwc_add.py): convolution biases folded into GEMM epilogues, the resnets' second GroupNorm and
the residual sum give the unfolded UNet's numbers, LoRA on the folded convolutions included. The Triton
kernels run under Triton's interpreter on the CPU (tests/triton_helpers.py)."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import sys
import torch, torch.nn.functional as F
from models import bias_folding as bf
from models import nhwc_group_norm as ng
assert ng.INTERPRET
torch.manual_seed(0)
cl = torch.channels_last

# skip + h + bias in one kernel, forward and backward (the bias's gradient where it has one)
for (b, c, h, w) in [(2, 40, 5, 7), (1, 320, 3, 3)]:
    a = torch.randn(b, c, h, w).to(memory_format=cl).requires_grad_()
    x = torch.randn(b, c, h, w).to(memory_format=cl).requires_grad_()
    bias = torch.randn(c).requires_grad_()
    y = bf.add_with_bias(a, x, bias)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (a, x, bias), g)
    ref = a + x + bias[None, :, None, None]
    want = torch.autograd.grad(ref, (a, x, bias), g)
    assert (y - ref).abs().max() < 1e-6 and y.is_contiguous(memory_format=cl)
    assert all((p - q).abs().max() < 1e-4 for p, q in zip(got, want))
calls = {"add": 0}
from models import nhwc_add
real_apply = nhwc_add._AddWithBias.apply
def counted(*a):
    calls["add"] += 1
    return real_apply(*a)
nhwc_add._AddWithBias.apply = counted

# a 1x1 convolution as a GEMM over NHWC memory, with an extra bias folded in, with and without LoRA
from lora.layers import LoRALayer
conv = torch.nn.Conv2d(24, 40, 1)
x = torch.randn(2, 24, 5, 6).to(memory_format=cl)
extra = torch.randn(40)
y = bf.pointwise(conv, x, extra)
assert (y - (conv(x) + extra[None, :, None, None])).abs().max() < 1e-5 and y.is_contiguous(memory_format=cl)
layer = LoRALayer(conv)
a = layer.add_adapter("default", rank=4, alpha=2)
torch.nn.init.normal_(a.up.weight, std=0.1)                 # B non-zero
y = bf.pointwise(layer, x)
assert (y - layer(x)).abs().max() < 1e-5 and (layer(x) - conv(x)).abs().max() > 1e-2

# the UNet: channels_last with NHWC norms (biases folded) against NCHW with torch's norms (biases added by
# torch), LoRA on every folded convolution and on time_emb_proj (so the norm's shift needs a gradient)
sys.path.insert(0, "tests")
from conftest import UNET_CONFIGS
from lora.inject import inject_lora, lora_parameters
from models.unet import UNet2DConditionModel, UNetConfig
torch.manual_seed(1)
unet = UNet2DConditionModel(UNetConfig.from_dict(UNET_CONFIGS["sd15"]))
for p in unet.parameters():
    torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else torch.nn.init.normal_(p, std=0.5)  # biases that matter
unet.requires_grad_(False)
inject_lora(unet, ["conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj", "to_q"], rank=4)
lora = list(lora_parameters(unet))
for p in lora:
    torch.nn.init.normal_(p, std=0.05)
x0 = torch.randn(2, 4, 8, 8)
t, ctx = torch.tensor([10, 500]), torch.randn(2, 77, UNET_CONFIGS["sd15"]["cross_attention_dim"])
outs = []
for folded in (False, True):
    unet.to(memory_format=cl if folded else torch.contiguous_format)
    unet.set_norms_in_weight_dtype(True, nhwc=folded)
    unet.set_bias_folding(folded)
    x = (x0.to(memory_format=cl) if folded else x0.clone()).requires_grad_()
    y = unet(x, t, ctx)
    outs.append((y, *torch.autograd.grad(y.square().sum(), [x] + lora)))
n_plain_skip = sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D" and m.conv_shortcut is None)
assert calls["add"] == n_plain_skip > 0, calls
scale = outs[0][0].abs().max()
for u, v in zip(*outs):
    assert (u - v).abs().max() <= 1e-4 * max(1.0, float(v.abs().max())), ((u - v).abs().max(), v.abs().max())
assert all(v.abs().max() > 0 for v in outs[1][2:])
print("ok", calls, float(scale))
'''


def test_folded_biases_match_torch_under_the_interpreter():
    run_interpreted(SCRIPT)


def test_add_with_bias_kernel_compiles_for_an_h100():
    from models import nhwc_add
    p = "*bf16"
    compile_for_h100(nhwc_add._add_bias_kernel, dict(a_ptr=p, b_ptr=p, bias_ptr=p, out_ptr=p, M="i32", C="i32"),
                     {"BLOCK_M": 32, "BLOCK_C": 128})
