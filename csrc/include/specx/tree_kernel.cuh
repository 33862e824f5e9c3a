// Device helpers shared by the tree and verification kernels (one block per sequence).
#pragma once
#include <cstdint>

namespace specx {
namespace tree_cuda {

// Warp 0 only: index[i] = number of set flags before i (for flagged i); returns the total.
__device__ __forceinline__ int warp_compact(const uint8_t* flags, int* index, int n) {
  const int lane = threadIdx.x % 32;
  int base = 0;
  for (int start = 0; start < n; start += 32) {
    const int i = start + lane;
    const bool f = i < n && flags[i];
    const unsigned m = __ballot_sync(0xffffffffu, f);
    if (f) index[i] = base + __popc(m & ((1u << lane) - 1u));
    base += __popc(m);
  }
  return base;
}

}  // namespace tree_cuda
}  // namespace specx
