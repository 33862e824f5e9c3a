// Block-wide helpers of the verification kernels: row argmax, sums and max over a vocabulary
// row, and inverse-CDF sampling over fixed-point weights (integer sums: order-independent).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "specx/reduce.cuh"
#include "specx/slice.cuh"

namespace specx {
namespace verify_cuda {

struct ArgMax {
  float value;
  int64_t index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

// Argmax of a row (lowest index on ties), valid in thread 0. 16-byte loads where aligned.
template <typename T>
__device__ ArgMax row_argmax(const T* row, int64_t vocab, ArgMax* scratch) {
  constexpr int kN = 16 / sizeof(T);
  ArgMax best{-INFINITY, vocab};
  int64_t scalar_from = 0;
  if (aligned16(row)) {
    const int64_t nvec = vocab / kN;
    for (int64_t g = threadIdx.x; g < nvec; g += blockDim.x) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + g);
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        const float x = to_float(vals[e]);
        if (x > best.value) best = {x, g * kN + e};  // indices rise within a thread
      }
    }
    scalar_from = nvec * kN;
  }
  for (int64_t v = scalar_from + threadIdx.x; v < vocab; v += blockDim.x) best = better(best, {to_float(row[v]), v});
  best = block_reduce(best, scratch, [](ArgMax a, ArgMax b) { return better(a, b); });
  if (best.index >= vocab) best.index = 0;  // all NaN
  return best;
}

// Calls f(value) on the len values from g, as 16-byte loads (four in flight per thread) where
// aligned.
template <typename T, typename F>
__device__ __forceinline__ void for_each_value(const T* g, int len, int threads, F&& f) {
  constexpr int kN = 16 / sizeof(T), kUnroll = 4;
  int scalar_from = 0;
  if (aligned16(g)) {
    const int nvec = len / kN;
    const uint4* vg = reinterpret_cast<const uint4*>(g);
    for (int base = threadIdx.x; base < nvec; base += kUnroll * threads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (base + u * threads < nvec) raw[u] = __ldg(vg + base + u * threads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * threads >= nvec) break;
        const T* vals = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
        for (int e = 0; e < kN; ++e) f(to_float(vals[e]));
      }
    }
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += threads) f(to_float(g[i]));
}

// The first i < len whose inclusive prefix sum of weight(i) exceeds `target` (< the total). Each
// warp sums a contiguous chunk, its lanes side by side (conflict-free shared-memory reads); the
// warp holding the target scans its chunk 32 weights at a time.
template <typename F>
__device__ int64_t block_sample(int64_t len, uint64_t target, unsigned long long* warp_totals, int64_t* result,
                                F&& weight) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  const int64_t chunk = (len + nwarps * 32 - 1) / (nwarps * 32) * 32;
  const int64_t lo = warp * chunk, hi = lo + chunk < len ? lo + chunk : len;
  unsigned long long own = 0;
  for (int64_t i = lo + lane; i < hi; i += 32) own += weight(i);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) own += __shfl_xor_sync(0xffffffffu, own, off);
  if (lane == 0) warp_totals[warp] = own;
  if (threadIdx.x == 0) *result = len - 1;
  __syncthreads();
  unsigned long long acc = 0;
  for (int w = 0; w < warp; ++w) acc += warp_totals[w];
  if (own > 0 && acc <= target && target - acc < own) {
    for (int64_t base = lo; base < hi; base += 32) {
      const int64_t i = base + lane;
      unsigned long long incl = i < hi ? weight(i) : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += up;
      }
      const unsigned hit = __ballot_sync(0xffffffffu, acc + incl > target);
      if (hit != 0) {
        if (lane == __ffs(hit) - 1) *result = i;
        break;
      }
      acc += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  const int64_t sampled = *result;
  __syncthreads();  // *result and warp_totals may be reused right after
  return sampled;
}

}  // namespace verify_cuda
}  // namespace specx
