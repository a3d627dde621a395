#!/bin/bash
# The FlashAttention-4 checks and the table against diffusers+peft, after `source experiments/bench/fa4_wheels.sh
# --install`, in parts that each fit one device call (10 minutes). Logs go to $OUT (default bench_out) as each part
# ends, so a call cut short keeps what it measured.
#   experiments/bench/fa4_gpu.sh ROUNDS checks   # the card and its bf16 matmul rate; the CUDA test of every FA4 route
#                                                # against fp32 (bf16 and fp16); graph_ab at batch 8 bf16: FA4
#                                                # everywhere against FA4 below head dim 160 (MAX_HEAD_DIM=128)
#   experiments/bench/fa4_gpu.sh ROUNDS table1   # run_all: the report's step (UNet only and full) and seed 000's,
#                                                # `default` (sdpa_backend=auto: FA4 here) against diffusers+peft eager
#   experiments/bench/fa4_gpu.sh ROUNDS table2   # run_all: seed 000 with checkpointing, batch 8 bf16, sampling with
#                                                # torch's attention and with FA4, then diffusers with torch.compile
#   experiments/bench/fa4_gpu.sh ROUNDS vae      # the NHWC VAE (train.nhwc_vae): its CUDA test against fp32,
#                                                # vae_probe, and the full step with and without it, twice each
#                                                # (needs only .whl, no flash-attn-4: pip install --no-index
#                                                # --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:$PWD)
#   experiments/bench/fa4_gpu.sh ROUNDS vae_search  # the same CUDA tests; the full step with cuDNN's timed search
#                                                # inside the NHWC VAE (train.vae_conv_search) against its heuristic
#                                                # choice and the NCHW VAE; sampling; against diffusers (.whl only)
#   experiments/bench/fa4_gpu.sh ROUNDS vae_eager   # the same tests; vae_probe; the full step (VAE biases folded)
#                                                # against the NCHW VAE and diffusers; sampling; the search launched
#                                                # eagerly (session 22 ran vae, vae_search and vae_eager in that order)
# (Session 20's version also timed cuDNN against FA4 and "accumulator" against "tile32" under graph_ab, and
# fa4_probe: RESULTS.md.)
set -o pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
rounds=${1:-5}
part=${2:-checks}
fa4="models.sdpa_backend._policy='fa4'"
ab() {  # graph_ab CONFIG ARGS..., its result lines appended to graph_ab.log
  echo "graph_ab $*" | tee -a "$OUT/graph_ab.log"
  timeout 200 python3 -m experiments.bench.graph_ab "$@" 2>&1 | grep -v Warning | tail -3 | tee -a "$OUT/graph_ab.log"
}
vae_tests() {  # the NHWC VAE's CUDA tests (against fp32, with cuDNN's search on) and its config test
  (cd tests && timeout 150 python3 -m pytest -q -rs test_fast_paths.py -k "nhwc or conv_search" -p no:cacheprovider) \
    2>&1 | tee "$OUT/tests_vae.log" | tail -3
}
table() {  # run_all JOBS: results.json and table.md in $OUT/PART
  timeout 540 python3 -m experiments.bench.run_all --out "$OUT/$part" --jobs "$1" 2>&1 \
    | grep -v "Warning\|exe_args" | tail -16
}
case $part in
  checks)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
    python3 -m experiments.bench.gemm_probe 2>/dev/null | head -1 | tee -a "$OUT/device.txt"
    (cd tests && timeout 150 python3 -m pytest -q -rs test_sdpa_backend.py -p no:cacheprovider) 2>&1 \
      | tee "$OUT/tests.log" | tail -4
    ab b8_bf16 models.fa4_attention.MAX_HEAD_DIM=128 "$rounds" --base "$fa4" ;;  # the 16x16 level on cuDNN
  table1)
    table ours:report:unet:default,diffusers:report:unet:eager,ours:report:full:default,diffusers:report:full:eager,\
ours:seed000:unet:default,diffusers:seed000:unet:eager ;;
  table2)
    table ours:seed000_ckpt:unet:default,diffusers:seed000_ckpt:unet:eager,ours:b8_bf16:unet:default,\
diffusers:b8_bf16:unet:eager,ours:sampling:-:graph,ours:sampling:-:graph_fa4,diffusers:sampling:-:-,\
diffusers:report:unet:compile ;;
  vae)
    vae_tests
    timeout 90 python3 -m experiments.bench.vae_probe 20 2>&1 | grep -v Warn | tee "$OUT/vae_probe.txt"
    table ours:report:full:default,ours:report:full:default_nchw_vae,ours:report:full:default,\
ours:report:full:default_nchw_vae,diffusers:report:full:eager ;;
  vae_search)
    vae_tests
    table ours:report:full:default,ours:report:full:default_vae_heuristic,ours:report:full:default_nchw_vae,\
ours:report:full:default,ours:report:full:default_vae_heuristic,diffusers:report:full:eager,ours:sampling:-:graph,\
diffusers:sampling:-:-
    for m in default default_nchw_vae; do  # where the NHWC VAE's time goes in the full step (kernels by kind)
      timeout 100 python3 -m experiments.bench.profile report $m --part full --rows 25 > "$OUT/profile_full_$m.txt" 2>&1
      grep -A8 "ms/step" "$OUT/profile_full_$m.txt"
    done ;;
  vae_eager)  # the VAE with its biases folded (the default) against NCHW and against diffusers, sampling; the search
              # against the heuristic with the step launched eagerly (as the latent cache's encodes run)
    vae_tests
    timeout 90 python3 -m experiments.bench.vae_probe 20 2>&1 | grep -v Warn | tee "$OUT/vae_probe.txt"
    table ours:report:full:default,ours:report:full:default_nchw_vae,diffusers:report:full:eager,\
ours:sampling:-:graph,diffusers:sampling:-:-,ours:report:full:eager_vae_heuristic,ours:report:full:eager_vae_search ;;
  *) echo "unknown part $part: checks, table1, table2, vae, vae_search or vae_eager" >&2; exit 2 ;;
esac
