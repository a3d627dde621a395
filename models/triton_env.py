"""Whether Triton is installed, and whether its interpreter runs our kernels on CPU tensors (TRITON_INTERPRET=1,
as the CPU tests do)."""
from __future__ import annotations

import os

try:
    import triton
except ImportError:  # pragma: no cover - torch builds without Triton (CPU wheels)
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    return triton is not None
