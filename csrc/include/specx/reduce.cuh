// Block-wide reductions and scans over small trivially-copyable structs, in a fixed order
// (so results do not depend on scheduling).
#pragma once
#include <cstdint>

namespace specx {

template <typename P>
__device__ __forceinline__ P shfl_xor_struct(const P& v, int lane_mask) {
  static_assert(sizeof(P) % 4 == 0, "shuffled structs are made of 32-bit words");
  P out;
  const uint32_t* src = reinterpret_cast<const uint32_t*>(&v);
  uint32_t* dst = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
  for (int w = 0; w < static_cast<int>(sizeof(P) / 4); ++w) dst[w] = __shfl_xor_sync(0xffffffffu, src[w], lane_mask);
  return out;
}

// The block's combined value, valid in thread 0. `scratch` holds one P per warp; the
// leading barrier lets callers reuse it between calls.
template <typename P, typename F>
__device__ __forceinline__ P block_reduce(P v, P* scratch, F&& combine) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = combine(v, shfl_xor_struct(v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) v = combine(v, scratch[w]);
  }
  return v;
}

template <typename T>
struct BlockScan {
  T before;  // the sum over the block's earlier threads
  T total;   // the sum over the whole block
};

// Exclusive prefix sum of `v` over the threads of the block, in thread order. `warp_totals` holds
// one T per warp; the leading barrier lets callers reuse it between calls.
template <typename T>
__device__ __forceinline__ BlockScan<T> block_scan(T v, T* warp_totals) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += up;
  }
  __syncthreads();
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  BlockScan<T> out{incl - v, 0};
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
    if (w < warp) out.before += warp_totals[w];
    out.total += warp_totals[w];
  }
  return out;
}

}  // namespace specx
