"""Running Triton kernels without a GPU: under Triton's interpreter (CPU tensors; TRITON_INTERPRET=1 must be
set before Triton is imported, hence a subprocess), and compiling them for an H100 with Triton's bundled
ptxas, which checks what the interpreter does not (loop-carried types, layouts)."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, timeout: int = 600) -> str:
    """Run `script` with TRITON_INTERPRET=1 from the repository root; it must print `ok`. Returns stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def compile_for_h100(fn, signature: dict, constexprs: dict) -> None:
    """Compile one @triton.jit kernel for sm_90; signature: argument -> Triton type ("*bf16", "i32", ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip("this Triton's ASTSource takes other arguments")
    variants = [constexprs]
    if "PDL" in inspect.signature(fn.fn).parameters and "PDL" not in constexprs:
        # models/pdl.py: each kernel compiled plainly and with programmatic dependent launch
        variants = [{**constexprs, "PDL": False}, {**constexprs, "PDL": True}]
    for cx in variants:
        sig = {**signature, **{k: "constexpr" for k in cx}}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        assert ".entry" in ptx and compiled.asm.get("cubin"), fn.__name__
        assert ("griddepcontrol.wait" in ptx) == bool(cx.get("PDL")), (fn.__name__, cx.get("PDL"))


def count_calls(owner, name: str, key=None) -> dict:
    """Replace owner.<name> by a wrapper that counts its calls (by key(*args, **kwargs), default "n") and
    calls the original: -> the counter dict. For the interpreter scripts' "the UNet routes X through it"."""
    calls, orig = {}, getattr(owner, name)

    def counted(*args, **kwargs):
        k = key(*args, **kwargs) if key else "n"
        calls[k] = calls.get(k, 0) + 1
        return orig(*args, **kwargs)
    setattr(owner, name, counted)
    return calls


def unet_on_off(toggle, channels_last: bool = False, init=None):
    """The tiny SD1.5 UNet (frozen, random) with toggle(unet, False) then toggle(unet, True): its output and
    input gradient each time. -> (unet, [(y, dx) off, (y, dx) on], (x, t, context))."""
    import torch

    from conftest import UNET_CONFIGS
    from models.unet import UNet2DConditionModel, UNetConfig
    cfg = UNET_CONFIGS["sd15"]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet = UNet2DConditionModel(UNetConfig.from_dict(cfg)).requires_grad_(False)
    if init is not None:
        init(unet)
    unet = unet.to(memory_format=layout)
    x = torch.randn(2, 4, 8, 8).to(memory_format=layout).requires_grad_()
    t, ctx = torch.tensor([10, 500]), torch.randn(2, 77, cfg["cross_attention_dim"])
    outs = []
    for on in (False, True):
        toggle(unet, on)
        y = unet(x, t, ctx)
        outs.append((y, torch.autograd.grad(y.square().sum(), x)[0]))
    return unet, outs, (x, t, ctx)
