#!/bin/bash
# The FlashAttention-4 checks in one device call, after `source experiments/bench/fa4_wheels.sh --install`:
# the card and its bf16 matmul rate, the CUDA test of both FA4 routes against fp32, then graph_ab and fa4_probe at
# batch 8 (bf16): cuDNN against FA4 with the rounding fix, the fix against the padded route, and FA4 at the 64x64
# level only. Logs go to $OUT (default bench_out) as each part ends, so a call cut short keeps what it measured.
#   experiments/bench/fa4_gpu.sh [ROUNDS]
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
rounds=${1:-5}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -m experiments.bench.gemm_probe 2>/dev/null | head -1 | tee -a "$OUT/device.txt"
(cd tests && timeout 150 python3 -m pytest -q -rs test_sdpa_backend.py -p no:cacheprovider) 2>&1 \
  | tee "$OUT/tests.log" | tail -4
fa4="models.sdpa_backend._policy='fa4'"
fix="models.fa4_attention.FIX_BACKWARD_ROUNDING=True"
ab() {  # graph_ab b8_bf16 ARGS..., its result lines appended to graph_ab.log
  echo "graph_ab b8_bf16 $*" | tee -a "$OUT/graph_ab.log"
  timeout 200 python3 -m experiments.bench.graph_ab b8_bf16 "$@" 2>&1 | grep -v Warning | tail -3 | tee -a "$OUT/graph_ab.log"
}
ab "$fa4" "$rounds" --base "$fix"                                       # cuDNN against FA4 with the fix
timeout 120 python3 -m experiments.bench.fa4_probe 8 2>&1 | tee "$OUT/probe.log"
ab models.fa4_attention.MIN_KEYS=2048 "$rounds" --base "$fa4" --base "$fix"  # FA4 at the 64x64 level only
ab "$fix" "$rounds" --base "$fa4"                                       # padded against the fix
