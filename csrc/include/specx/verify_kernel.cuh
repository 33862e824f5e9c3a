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

// Sum over v < vocab of f(v) (uint64), returned to every thread.
template <typename F>
__device__ uint64_t block_sum(int64_t vocab, uint64_t* scratch, F&& f) {
  unsigned long long acc = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) acc += f(v);
  acc = block_reduce(acc, reinterpret_cast<unsigned long long*>(scratch),
                     [](unsigned long long a, unsigned long long b) { return a + b; });
  if (threadIdx.x == 0) scratch[32] = acc;
  __syncthreads();
  return scratch[32];
}

template <typename F>
__device__ float block_max(int64_t vocab, float* scratch, F&& f) {
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) m = fmaxf(m, f(v));
  m = block_reduce(m, scratch, [](float a, float b) { return fmaxf(a, b); });
  if (threadIdx.x == 0) scratch[32] = m;
  __syncthreads();
  return scratch[32];
}

// The first v whose inclusive prefix sum of weight(v) exceeds `target` (< the total). Each
// thread sums a contiguous segment; the one holding the target scans it.
template <typename F>
__device__ int64_t block_sample(int64_t vocab, uint64_t target, unsigned long long* prefix,
                                unsigned long long* warp_totals, int64_t* result, F&& weight) {
  const int64_t seg = (vocab + blockDim.x - 1) / blockDim.x;
  const int64_t lo = threadIdx.x * seg, hi = lo + seg < vocab ? lo + seg : vocab;
  unsigned long long local = 0;
  for (int64_t v = lo; v < hi; ++v) local += weight(v);
  if (threadIdx.x == 0) *result = vocab - 1;
  block_exclusive_scan(local, prefix, warp_totals);
  const unsigned long long before = prefix[threadIdx.x];
  if (local > 0 && before <= target && target < before + local) {
    unsigned long long acc = before;
    for (int64_t v = lo; v < hi; ++v) {
      acc += weight(v);
      if (acc > target) {
        *result = v;
        break;
      }
    }
  }
  __syncthreads();
  const int64_t sampled = *result;
  __syncthreads();  // *result may be reused right after
  return sampled;
}

}  // namespace verify_cuda
}  // namespace specx
