#!/bin/sh
# Builds and runs the host emulation of the build_tree kernel (see main.cpp) against the working
# tree: ./tools/tree_emulation/run.sh [seeds] [few|big]. No GPU needed; the default set takes
# about 4 minutes on 2 cores, "few" seconds.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
{
  echo '#include "cuda_shim.h"'
  echo '#include "specx/topk_threshold.h"'
  echo '#include "specx/tree.h"'
  echo '#include "specx/tree_kernel.cuh"'
  # The kernel: from the namespace to the KV compaction kernel, with shared memory from the shim.
  awk '/^namespace specx \{/ {on = 1} /^\/\/ One block per sequence; each thread owns/ {exit} on' \
    "$root/csrc/cuda/tree.cu" |
    sed 's/extern __shared__ __align__(16) unsigned char smem\[\];/unsigned char* smem = g_ctx->smem;/'
  echo '}  // namespace'
  echo '}  // namespace specx'
} > "$out/kernel_gen.h"
{
  echo 'namespace specx { namespace cpuref {'
  # The CPU path: the anonymous namespace's contents up to the argument checks.
  awk '/^void check_same_device/ {exit} on; /^namespace \{$/ {on = 1}' "$root/csrc/tree.cpp"
  echo '}}'
} > "$out/cpu_gen.h"
g++ -std=c++20 -O1 -I "$here" -I "$out" -I "$root/csrc/include" "$here/main.cpp" -o "$out/emu" -pthread
"$out/emu" "${1:-1}" ${2:-}
