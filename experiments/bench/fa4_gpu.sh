#!/bin/bash
# The FlashAttention-4 checks in one device call, after `source experiments/bench/fa4_wheels.sh --install`:
# the card and its bf16 matmul rate, the CUDA test of every FA4 route against fp32, then graph_ab: cuDNN against
# FA4 (its default backward fix, "accumulator") at batch 8 bf16, the report's batch 2 fp16 and seed 000's batch 4;
# "accumulator" against "tile32" at batch 8; and fa4_probe at batch 8. Logs go to $OUT (default bench_out) as each
# part ends, so a call cut short keeps what it measured.
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
ab() {  # graph_ab CONFIG ARGS..., its result lines appended to graph_ab.log
  echo "graph_ab $*" | tee -a "$OUT/graph_ab.log"
  timeout 200 python3 -m experiments.bench.graph_ab "$@" 2>&1 | grep -v Warning | tail -3 | tee -a "$OUT/graph_ab.log"
}
ab b8_bf16 "$fa4" "$rounds"                                              # cuDNN against FA4
ab b8_bf16 "models.fa4_attention.BACKWARD_FIX='tile32'" "$rounds" --base "$fa4"  # the two fixes
ab report "$fa4" "$rounds"
ab seed000 "$fa4" "$rounds"
timeout 150 python3 -m experiments.bench.fa4_probe 8 2>&1 | tee "$OUT/probe.log"
