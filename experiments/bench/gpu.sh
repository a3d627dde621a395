#!/bin/bash
# Everything GPU-side in one go: the CUDA cases of tests/test_fast_paths.py and the other files below, then the
# benchmark jobs.
#   experiments/bench/gpu.sh [run_all args, e.g. --only report,sampling]
# Writes gpu_tests.log, bench.log, results.json and table.md into $OUT (default bench_out).
# TESTS_S / BENCH_S bound the two parts (150 s / 420 s: one device call); SKIP_TESTS=1 skips the tests.
# diffusers/peft/hydra missing on the machine? Put their wheels in .whl/ (installed to /tmp/site first); on the
# H100 image (torch 2.11, peft present) these were needed: diffusers 0.42.1, importlib_metadata, hydra-core 1.3.8,
# omegaconf 2.3.1, antlr4-python3-runtime 4.9.3 (the last via `pip wheel --no-deps`: it has no wheel on PyPI).
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
if [ -z "$SKIP_TESTS" ]; then
  # only the CUDA cases: the file's CPU cases (torch.compile on the CPU among them) took the whole 150 s there
  (cd tests && timeout "${TESTS_S:-150}" python3 -m pytest -q -rs test_fast_paths.py test_sdpa_backend.py test_fused_layer_norm.py test_unet.py test_lora_mm.py test_qkv_lora.py test_sdxl.py test_short_attention.py -k "cuda or graphed_sampling" \
     -p no:cacheprovider) 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
fi
# results.json is rewritten after every job, so a run cut short keeps what it measured
timeout "${BENCH_S:-420}" python3 -m experiments.bench.run_all --out "$OUT" --timeout 150 "$@" 2>&1 \
  | tee "$OUT/bench.log" | tail -45
