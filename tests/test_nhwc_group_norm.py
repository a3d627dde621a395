"""models/nhwc_group_norm.py: GroupNorm kernels on channels_last tensors equal torch's GroupNorm (and
SiLU after it), forward and backward, and the UNet routes its GroupNorms through them when asked. The
kernels run under Triton's interpreter on the CPU (tests/triton_helpers.py)."""
import pytest

pytest.importorskip("triton")
from triton_helpers import compile_for_h100, run_interpreted  # noqa: E402

SCRIPT = r'''
import torch, torch.nn.functional as F
from models import nhwc_group_norm as ng
assert ng.INTERPRET
torch.manual_seed(0)
# odd sizes: channels per group 2, 5, 3 (masked to powers of two), H*W not a multiple of the blocks; the
# last splits each group's statistics into 3 tiles (128, 128, 44 positions), combined afterwards
assert ng._blocks(300, 64, 16)["s"] == 3
for (b, c, h, w, g) in [(2, 64, 5, 7, 32), (1, 40, 3, 3, 8), (2, 96, 9, 4, 32), (2, 64, 15, 20, 4)]:
    for silu in (False, True):
        x = (torch.randn(b, c, h, w) * 3 + 2).to(memory_format=torch.channels_last).requires_grad_()
        wt, bs = torch.randn(c), torch.randn(c)
        y = ng.group_norm_nhwc(x, g, wt, bs, 1e-5, silu=silu)
        dy = torch.randn_like(y)
        dx, = torch.autograd.grad(y, x, dy)
        x2 = x.detach().contiguous().requires_grad_()
        y2 = F.group_norm(x2, g, wt, bs, 1e-5)
        y2 = F.silu(y2) if silu else y2
        dx2, = torch.autograd.grad(y2, x2, dy)
        err = ((y - y2).abs().max(), (dx - dx2).abs().max())
        assert err[0] < 1e-5 and err[1] < 1e-5, (b, c, silu, err)
        assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)

# a per-(sample, channel) shift added as the input is read (a resnet's conv bias + timestep embedding), and its
# gradient (dx summed over H, W) when it needs one; a (C,) shift is broadcast over the samples
for (b, c, h, w, g), per_sample in [((2, 64, 5, 7, 32), True), ((2, 64, 15, 20, 4), True), ((1, 40, 3, 3, 8), False)]:
    x = (torch.randn(b, c, h, w) * 3 + 2).to(memory_format=torch.channels_last).requires_grad_()
    shift = (torch.randn(b, c) * 2 if per_sample else torch.randn(c)).requires_grad_()
    wt, bs = torch.randn(c), torch.randn(c)
    y = ng.group_norm_nhwc(x, g, wt, bs, 1e-5, silu=True, shift=shift)
    dy = torch.randn_like(y)
    dx, ds = torch.autograd.grad(y, (x, shift), dy)
    sh = shift if per_sample else shift.expand(b, c)
    y2 = F.silu(F.group_norm(x + sh[:, :, None, None], g, wt, bs, 1e-5))
    dx2, ds2 = torch.autograd.grad(y2, (x, shift), dy)
    err = ((y - y2).abs().max(), (dx - dx2).abs().max(), (ds - ds2).abs().max())
    assert err[0] < 1e-5 and err[1] < 1e-5 and err[2] < 1e-4, (b, c, err)
    assert (ds2 - ds2.mean()).abs().max() > 0.1   # a gradient that could be wrong

# passthrough: (y, x') with x' x's values; x''s gradient (the residual path's) added in the backward's last pass, so x
# gets the sum of both paths' gradients; fuse_residual_grad=False leaves the sum to autograd (x' is then x itself)
for fuse in (True, False):
    ng.fuse_residual_grad = fuse
    for silu in (False, True):
        x = (torch.randn(2, 64, 5, 7) * 3 + 2).to(memory_format=torch.channels_last).requires_grad_()
        wt, bs = torch.randn(64), torch.randn(64)
        y, xp = ng.group_norm_nhwc(x, 32, wt, bs, 1e-5, silu=silu, passthrough=True)
        assert torch.equal(xp, x) and (xp is x) != fuse
        dy, dr = torch.randn_like(y), torch.randn_like(x)
        dx, = torch.autograd.grad((y, xp), x, (dy, dr))
        y2 = F.group_norm(x, 32, wt, bs, 1e-5)
        y2 = F.silu(y2) if silu else y2
        dn, = torch.autograd.grad(y2, x, dy)
        assert (y - y2).abs().max() < 1e-5 and (dx - (dn + dr)).abs().max() < 1e-5, (fuse, silu)
        assert (dx - dn).abs().max() > 1.0                       # the residual's part is there
        dx_res, = torch.autograd.grad(xp, x, dr, retain_graph=True)   # the norm's output unused: dr alone
        assert torch.equal(dx_res, dr)
ng.fuse_residual_grad = True
try:
    ng.group_norm_nhwc(x, 32, wt, bs, 1e-5, shift=torch.randn(64), passthrough=True)
    raise AssertionError("passthrough with a shift accepted")
except ValueError as e:
    assert "shift" in str(e)

# trainable affine parameters: torch's kernel while gradients are recorded, these kernels under no_grad (sampling)
gn = torch.nn.GroupNorm(8, 16)
xc = torch.randn(2, 16, 4, 4).to(memory_format=torch.channels_last)
assert not ng.usable(gn, xc)
with torch.no_grad():
    assert ng.usable(gn, xc)
gn.requires_grad_(False)
assert ng.usable(gn, xc) and not ng.usable(gn, xc.contiguous())
gn128 = torch.nn.GroupNorm(32, 128).requires_grad_(False)   # 2**31 elements or more: int32 offsets would overflow
assert ng.usable(gn128, torch.empty(15, 128, 1024, 1024, device="meta").to(memory_format=torch.channels_last))
assert not ng.usable(gn128, torch.empty(16, 128, 1024, 1024, device="meta").to(memory_format=torch.channels_last))
gn32 = torch.nn.GroupNorm(32, 32).requires_grad_(False)     # more than 65,535 x 32 positions: past the grid's limit
assert ng.usable(gn32, torch.empty(1, 32, 2047, 1024, device="meta").to(memory_format=torch.channels_last))
assert not ng.usable(gn32, torch.empty(1, 32, 2048, 1024, device="meta").to(memory_format=torch.channels_last))

# the UNet's GroupNorms go through the kernels with nhwc=True (the resnets' with SiLU fused), same numbers
import sys
sys.path.insert(0, "tests")
from models.blocks import ResnetBlock2D
from triton_helpers import count_calls, unet_on_off
calls = count_calls(ng, "group_norm_nhwc", lambda *a, **k: "silu" if (a[5] if len(a) > 5 else k.get("silu")) else "plain")
unet, outs, _ = unet_on_off(lambda u, on: u.set_norms_in_weight_dtype(True, nhwc=on), channels_last=True)
n_gn = sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
n_res = sum(isinstance(m, ResnetBlock2D) for m in unet.modules())
# every input is channels_last; with SiLU: the resnets' two norms and conv_norm_out (before conv_out)
assert sum(calls.values()) == n_gn and calls.get("silu", 0) == 2 * n_res + 1, (calls, n_gn, n_res)
assert (outs[0][0] - outs[1][0]).abs().max() < 1e-4 and (outs[0][1] - outs[1][1]).abs().max() < 1e-4

# the VAE's too (set_triton_kernels: channels_last, set_nhwc_norms, set_bias_folding): every GroupNorm but the
# mid-block attention's (it reads a (B, C, HW) view: torch's), the resnets' two and conv_norm_out's with SiLU; in the
# encoder conv1's bias as norm2's shift, conv2's in the residual sum's kernel where there is no 1x1 shortcut; encode and
# decode give the same numbers, from NCHW inputs as the trainer and the pipeline pass them (conv_in's channels_last
# weight converts)
from models import nhwc_add
from models.vae import AutoencoderKL, VAEConfig
adds = count_calls(nhwc_add, "add_with_bias", lambda *a, **k: "add")
vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)).requires_grad_(False)
for p in vae.parameters():
    p.data.normal_(0, 0.2)
img, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)
with torch.no_grad():
    ref = (vae.encode(img).mean, vae.decode(z))
    vae.set_triton_kernels(True)
    assert vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    calls.clear()
    got = (vae.encode(img).mean, vae.decode(z))
n_gn = sum(isinstance(m, torch.nn.GroupNorm) for m in vae.modules())
resnets = [m for m in vae.modules() if isinstance(m, ResnetBlock2D)]
n_res = len(resnets)
assert calls == {"silu": 2 * n_res + 2} and 2 * n_res + 2 == n_gn - 2, (calls, n_res, n_gn)
enc = [m for m in vae.encoder.modules() if isinstance(m, ResnetBlock2D)]
n_plain = sum(m.conv_shortcut is None for m in enc)
assert adds == {"add": n_plain} and 0 < n_plain < len(enc) < n_res, (adds, n_plain)
assert [m.fold_biases for m in resnets] == [m in enc for m in resnets]
for a, b in zip(ref, got):
    assert (a - b).abs().max() < 1e-4 * b.abs().max() and b.abs().max() > 0.1, ((a - b).abs().max(), b.abs().max())
vae.set_triton_kernels(False)
assert not any("nhwc" in m.__dict__ for m in vae.modules()) and vae.encoder.conv_in.weight.is_contiguous()
assert not any(m.fold_biases for m in resnets)
print("ok", calls, n_gn)
'''


def test_nhwc_group_norm_matches_torch_under_the_interpreter():
    run_interpreted(SCRIPT)


@pytest.mark.parametrize("silu", [False, True])
def test_nhwc_group_norm_kernels_compile_for_an_h100(silu):
    """silu=True also compiles the shifted variant (as the resnets' norm2 runs)."""
    from models import nhwc_group_norm as ng
    p, f, i = "*bf16", "*fp32", "i32"
    stats, apply = {"BLOCK_HW": 128, "BLOCK_C": 16}, {"BLOCK_HW": 32, "BLOCK_C": 128}
    compile_for_h100(ng._stats_kernel, dict(x_ptr=p, shift_ptr=f, pmean_ptr=f, pm2_ptr=f, HW=i, C=i, CG=i, G=i, S=i),
                     {"SHIFT": silu, **stats})
    compile_for_h100(ng._combine_stats_kernel, dict(pmean_ptr=f, pm2_ptr=f, mean_ptr=f, rstd_ptr=f, HW=i, CG=i, S=i,
                                                    eps="fp32"), {"BLOCK_HW": 128, "BLOCK_S": 32})
    compile_for_h100(ng._sum_parts_kernel, dict(part_ptr=f, out_ptr=f, S=i), {"BLOCK_S": 32})
    compile_for_h100(ng._apply_kernel, dict(x_ptr=p, shift_ptr=f, y_ptr=p, mean_ptr=f, rstd_ptr=f, w_ptr=p, b_ptr=p,
                                            HW=i, C=i, CG=i, G=i), {"SILU": silu, "SHIFT": silu, **apply})
    compile_for_h100(ng._grad_stats_kernel, dict(x_ptr=p, shift_ptr=f, dy_ptr=p, w_ptr=p, b_ptr=p, mean_ptr=f,
                                                 rstd_ptr=f, psg_ptr=f, psgx_ptr=f, HW=i, C=i, CG=i, G=i, S=i),
                     {"SILU": silu, "SHIFT": silu, **stats})
    compile_for_h100(ng._grad_x_kernel, dict(x_ptr=p, shift_ptr=f, dy_ptr=p, res_ptr=p, dx_ptr=p, w_ptr=p, b_ptr=p,
                                             mean_ptr=f, rstd_ptr=f, sg_ptr=f, sgx_ptr=f, HW=i, C=i, CG=i, G=i,
                                             inv_n="fp32"),
                     {"SILU": silu, "SHIFT": silu, "RES": not silu, **apply})   # the transformers' norm; norm2
    if silu:                                                                          # the resnets' norm1:
        compile_for_h100(ng._grad_x_kernel, dict(x_ptr=p, shift_ptr=f, dy_ptr=p, res_ptr=p, dx_ptr=p, w_ptr=p,
                                                 b_ptr=p, mean_ptr=f, rstd_ptr=f, sg_ptr=f, sgx_ptr=f, HW=i, C=i, CG=i,
                                                 G=i, inv_n="fp32"), {"SILU": True, "SHIFT": False, "RES": True, **apply})
