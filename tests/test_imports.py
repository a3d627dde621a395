"""diffusers, peft and accelerate are test oracles: our code must not import them.

transformers itself imports accelerate when it is installed (it is here, as a dependency of peft),
so accelerate is checked as "nothing of ours pulls it in beyond what transformers already did",
plus a scan of our sources for the import statements.
"""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORACLES = ("diffusers", "peft", "accelerate")


def _our_sources():
    for d in ("models", "lora", "data", "experiments", "training"):
        yield from (p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    yield from (p for p in ROOT.glob("*.py"))


def test_no_oracle_import_statements():
    pat = re.compile(rf"^\s*(import|from)\s+({'|'.join(ORACLES)})\b", re.M)
    bad = [str(p.relative_to(ROOT)) for p in _our_sources() if pat.search(p.read_text())]
    assert not bad, bad


def test_package_imports_leave_oracles_out():
    mods = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in _our_sources() if p.parent != ROOT or p.stem in ("train", "sample"))
    code = ("import importlib, sys\n"
            "import transformers; from transformers import CLIPTextModel, CLIPTokenizer\n"
            "before = set(sys.modules)\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"new = [m for m in set(sys.modules) - before if m.split('.')[0] in {ORACLES!r}]\n"
            "assert not new, new\n"
            "assert 'diffusers' not in sys.modules and 'peft' not in sys.modules\n"
            f"print({len(mods)})")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= 8  # it did import our modules
