#!/bin/bash
# The FlashAttention-4 checks in one device call, after `source experiments/bench/fa4_wheels.sh --install`:
# the card and its bf16 matmul rate, the CUDA test of every FA4 route against fp32 (bf16 and fp16), then graph_ab at
# batch 8 bf16: cuDNN against FA4, and FA4 everywhere against FA4 below head dim 160 (MAX_HEAD_DIM=128); then
# run_all against diffusers+peft: the report's and seed 000's steps with `default` (sdpa_backend=auto: FA4 here), and
# sampling with torch's attention and with FA4. Logs go to $OUT (default bench_out) as each part ends, so a call cut
# short keeps what it measured. (Session 20's version also timed "accumulator" against "tile32", the report and
# seed 000 under graph_ab, and fa4_probe: RESULTS.md.)
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
ab b8_bf16 models.fa4_attention.MAX_HEAD_DIM=128 "$rounds" --base "$fa4"  # the 16x16 level on cuDNN
jobs=ours:report:unet:default,diffusers:report:unet:eager,ours:seed000:unet:default,diffusers:seed000:unet:eager
jobs=$jobs,ours:sampling:-:graph,ours:sampling:-:graph_fa4,diffusers:sampling:-:-
timeout 400 python3 -m experiments.bench.run_all --out "$OUT" --jobs "$jobs" 2>&1 | grep -v "Warning\|exe_args" \
  | tail -14
