#!/bin/sh
# Builds a kernel timing binary for sm_90a, one op's CUDA launcher and its main here, against the
# working tree or with variant headers first on the include path (a variant directory that holds
# the launcher's source, e.g. verify.cu, replaces that too):
#   ./tools/kernel_timing/build.sh OP OUT [INCLUDE_DIR...]    OP: topk_threshold, verify_sample, speckd
# No GPU and no torch needed here; carry OUT to the GPU machine and run it there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
op=$1
out=$2
shift 2
case "$op" in
  topk_threshold) source=topk_threshold.cu ;;
  verify_sample) source=verify.cu ;;
  speckd) source=speckd.cu ;;
  *) echo "unknown op '$op' (topk_threshold, verify_sample, speckd)" >&2; exit 2 ;;
esac
src="$root/csrc/cuda/$source"
includes=""
for dir in "$@"; do
  includes="$includes -I $dir"
  if [ -f "$dir/$source" ] && [ "$src" = "$root/csrc/cuda/$source" ]; then src="$dir/$source"; fi
done
# shellcheck disable=SC2086  # one -I per directory
nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a $includes -I "$root/csrc/include" \
  -o "$out" "$here/$op.cu" "$src"
