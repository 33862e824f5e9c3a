#!/bin/sh
# Builds the top-k threshold timing binary (main.cu) for sm_90a against the working tree, or with
# variant headers first on the include path: ./tools/topk_timing/build.sh OUT [INCLUDE_DIR...].
# No GPU and no torch needed here; carry OUT to the GPU machine and run it there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$1
shift
includes=""
for dir in "$@"; do includes="$includes -I $dir"; done
# shellcheck disable=SC2086  # one -I per directory
nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a $includes -I "$root/csrc/include" \
  -o "$out" "$here/main.cu" "$root/csrc/cuda/topk_threshold.cu"
