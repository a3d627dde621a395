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
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert ".entry" in compiled.asm["ptx"] and compiled.asm.get("cubin"), fn.__name__
