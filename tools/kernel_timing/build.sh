#!/bin/sh
# Builds a kernel timing binary for sm_90a, one op's CUDA launcher and its main here, against the
# working tree or with variant headers first on the include path (a variant directory that holds
# a launcher's source, e.g. verify.cu, replaces that too):
#   ./tools/kernel_timing/build.sh OP OUT [INCLUDE_DIR...]    OP: topk_threshold, verify_sample, speckd, deepkd,
#                                                             tree_attention
# No GPU and no torch needed here; carry OUT to the GPU machine and run it there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
op=$1
out=$2
shift 2
case "$op" in
  topk_threshold) sources=topk_threshold.cu ;;
  verify_sample) sources=verify.cu ;;
  speckd) sources=speckd.cu ;;
  deepkd) sources="deepkd.cu topk_threshold.cu" ;;
  tree_attention) sources=tree_attention.cu ;;
  *) echo "unknown op '$op' (topk_threshold, verify_sample, speckd, deepkd, tree_attention)" >&2; exit 2 ;;
esac
includes=""
for dir in "$@"; do includes="$includes -I $dir"; done
# Each launcher source from the first variant directory that has it, else from csrc/cuda.
srcs=""
for name in $sources; do
  src="$root/csrc/cuda/$name"
  for dir in "$@"; do
    if [ -f "$dir/$name" ]; then src="$dir/$name"; break; fi
  done
  srcs="$srcs $src"
done
# SPECX_HAS_SM90A as CMake sets it for an sm_90a build (the tree-attention launcher picks wgmma by it).
# shellcheck disable=SC2086  # one -I per directory, one argument per source
nvcc -std=c++20 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -DSPECX_HAS_SM90A=1 $includes -I "$root/csrc/include" \
  -o "$out" "$here/$op.cu" $srcs
