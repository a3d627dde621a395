#!/bin/bash
# flash-attn-4 and its dependencies as wheels for a device machine without package access (Python 3.12, CUDA 13),
# in two carry folders, each under the device tool's 64 MiB with the working tree (move assets/ out for those calls):
#   experiments/bench/fa4_wheels.sh                  # here: fills .fa4a/ (62 MB) and .fa4b/ (49 MB)
#   call 1, carry [".fa4a"]:          mkdir -p /tmp/fa4parts && cp .fa4a/cu13part.aa /tmp/fa4parts/
#   call 2 (same warm machine, carry [".fa4b", ".whl"]): source experiments/bench/fa4_wheels.sh --install; then e.g.
#                                     python3 -m experiments.bench.fa4_probe 8
# The CUTLASS DSL's CUDA 13 wheel (92 MB, its MLIR compiler) is the one split in two. Session 18's versions.
if [ "$1" = "--install" ]; then   # on the device, in the repository root
  cat /tmp/fa4parts/cu13part.aa .fa4b/cu13part.ab \
    > /tmp/fa4parts/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  pip="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir"
  $pip --target /tmp/fa4site /tmp/fa4parts/*.whl .fa4b/*.whl
  $pip --target /tmp/fa4pb .fa4b/pb/*.whl                        # protobuf, behind the image's own
  $pip --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
  # the CUTLASS DSL's .pth (not read from a --target folder) puts dsl_packages on the path
  export PYTHONPATH=/tmp/site:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PWD:/tmp/fa4pb
  export PYTHONUNBUFFERED=1
  python3 -c "import flash_attn.cute, cutlass; print('flash-attn-4 imports')"
  return 0 2>/dev/null || exit 0
fi
set -e
get() {  # get DIR WHEEL...: cp312 manylinux wheels, no dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d "$1" "${@:2}"
}
tmp=$(mktemp -d)
get "$tmp" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1 einops==0.8.2
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b/pb
get .fa4b/pb protobuf==7.36.2
split -b 62000000 "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl "$tmp"/cu13part.
mv "$tmp"/cu13part.aa .fa4a/ && mv "$tmp"/cu13part.ab .fa4b/
rm "$tmp"/nvidia_cutlass_dsl_libs_cu13-*.whl && mv "$tmp"/*.whl .fa4b/
du -sh .fa4a .fa4b
