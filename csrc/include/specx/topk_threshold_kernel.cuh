// Cluster-wide radix select of the k-th largest key of a row, and the top-k threshold kernel.
//
// One thread-block cluster owns one row; each block keeps its slice of the row in shared memory
// (read from HBM once). Each pass histograms the next 11-bit digit of the ordered key among the
// entries that match the digits decided so far (shared-memory atomics, 2048 bins: wide enough that
// logits concentrated in a few exponents still spread over many bins), the blocks' histograms are
// summed through distributed shared memory, and every block picks the same digit. 16-bit keys
// (bf16, fp16) take 2 passes, fp32 keys 3. The first pass runs while the slice is being loaded.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "specx/reduce.cuh"
#include "specx/slice.cuh"
#include "specx/topk_threshold.h"

namespace specx::topk_cuda {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kBinsPerThread = kBins / kThreads;

__device__ __forceinline__ uint32_t key_of(float v) { return ordered_key32(__float_as_uint(v)); }
__device__ __forceinline__ uint32_t key_of(__nv_bfloat16 v) { return ordered_key16(__bfloat16_as_ushort(v)); }
__device__ __forceinline__ uint32_t key_of(__half v) { return ordered_key16(__half_as_ushort(v)); }

template <typename T>
__device__ __forceinline__ T value_of_key(uint32_t key) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(key_to_bits32(key));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __ushort_as_half(static_cast<unsigned short>(key_to_bits16(key)));
  } else {
    return __ushort_as_bfloat16(static_cast<unsigned short>(key_to_bits16(key)));
  }
}

template <typename T>
constexpr int kKeyBits = 8 * sizeof(T);

// Shared memory of one select. Two histograms alternate between passes, so a block can clear the
// next one while the other blocks of its cluster still read the current one.
struct SelectShared {
  unsigned hist[2][kBins];
  unsigned long long prefix[kThreads];
  unsigned long long warp_totals[kThreads / 32];
  uint32_t digit;
  unsigned long long before;
  unsigned bin_count;
};

// The k-th largest of a row's keys. Every thread of every block of the cluster holds the same
// state. Per pass: the caller calls add(key) for the keys it owns, then all threads call resolve().
struct RadixSelect {
  SelectShared* sh;
  int shift;           // lowest bit of the current digit
  int width;           // bits in the current digit
  uint32_t prefix;     // the digits decided so far, in place
  uint32_t high_mask;  // which bits of prefix are decided
  unsigned long long remaining;  // the rank sought among the keys matching prefix (1-based)
  unsigned long long greater;    // keys above the prefix
  unsigned tie_count;            // after the last pass: the keys equal to the result
  int pass;                      // parity picks the histogram; continues across selects

  // Histogram `start_pass & 1` must be zero: clear_histograms() before a block's first select;
  // a select's last resolve() leaves the one the next select starts on cleared.
  __device__ __forceinline__ void init(SelectShared* s, int key_bits, unsigned long long k, int start_pass) {
    sh = s;
    width = key_bits < kDigitBits ? key_bits : kDigitBits;
    shift = key_bits - width;
    prefix = 0;
    high_mask = 0;
    remaining = k;
    greater = 0;
    tie_count = 0;
    pass = start_pass;
  }

  __device__ __forceinline__ bool candidate(uint32_t key) const { return (key & high_mask) == prefix; }

  __device__ __forceinline__ void add(uint32_t key) {
    if (candidate(key)) atomicAdd(&sh->hist[pass & 1][(key >> shift) & ((1u << width) - 1u)], 1u);
  }

  // Sums the cluster's histograms, picks the digit holding the remaining-th largest key and
  // clears the other histogram for the next pass. Returns true when the key is complete.
  __device__ bool resolve(cg::cluster_group& cluster) {
    __syncthreads();
    cluster.sync();  // every block's histogram of this pass is complete
    const unsigned nblocks = cluster.num_blocks();
    unsigned* hist = sh->hist[pass & 1];
    const int nbins = 1 << width;
    unsigned counts[kBinsPerThread];
    unsigned long long mine = 0;
#pragma unroll
    for (int e = 0; e < kBinsPerThread; ++e) {
      const int digit = nbins - 1 - (static_cast<int>(threadIdx.x) * kBinsPerThread + e);  // descending
      unsigned c = 0;
      if (digit >= 0) {
        for (unsigned r = 0; r < nblocks; ++r) c += cluster.map_shared_rank(hist, r)[digit];
      }
      counts[e] = c;
      mine += c;
    }
    block_exclusive_scan(mine, sh->prefix, sh->warp_totals);
    unsigned long long before = sh->prefix[threadIdx.x];
    if (before < remaining && remaining <= before + mine) {
#pragma unroll
      for (int e = 0; e < kBinsPerThread; ++e) {
        if (before + counts[e] >= remaining) {
          sh->digit = static_cast<uint32_t>(nbins - 1 - (static_cast<int>(threadIdx.x) * kBinsPerThread + e));
          sh->before = before;
          sh->bin_count = counts[e];
          break;
        }
        before += counts[e];
      }
    }
    // The other histogram's last readers (the previous pass) are past the cluster.sync above.
    unsigned* next = sh->hist[(pass + 1) & 1];
    for (int i = threadIdx.x; i < kBins; i += kThreads) next[i] = 0;
    __syncthreads();
    const uint32_t digit = sh->digit;
    greater += sh->before;
    remaining -= sh->before;
    tie_count = sh->bin_count;
    prefix |= digit << shift;
    high_mask |= ((1u << width) - 1u) << shift;
    ++pass;
    if (shift == 0) return true;
    width = shift < kDigitBits ? shift : kDigitBits;
    shift -= width;
    return false;
  }
};

// Clears both histograms (before a block's first select).
__device__ __forceinline__ void clear_histograms(SelectShared* sh) {
  for (int i = threadIdx.x; i < 2 * kBins; i += kThreads) (&sh->hist[0][0])[i] = 0;
  __syncthreads();
}

// Calls f(local index, value) over a slice, 16 bytes at a time where `vec`.
template <typename T, typename F>
__device__ __forceinline__ void for_each_value(const T* x, int len, bool vec, F&& f) {
  constexpr int kN = Pack<T>::kN;
  int scalar_from = 0;
  if (vec) {
    const int nvec = len / kN;
    for (int v = threadIdx.x; v < nvec; v += kThreads) {
      const Pack<T> a = reinterpret_cast<const Pack<T>*>(x)[v];
#pragma unroll
      for (int e = 0; e < kN; ++e) f(v * kN + e, a.v[e]);
    }
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads) f(i, x[i]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_threshold_kernel(const TopKThresholdParams prm, const int slice_len, const bool cached) {
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t C = prm.cols;
  const auto [nblocks, rank, row, begin, len] = this_row_slice(C, slice_len);
  const T* g = static_cast<const T*>(prm.logits) + row * C + begin;
  const bool global_vec = reinterpret_cast<uintptr_t>(g) % 16 == 0;

  extern __shared__ __align__(16) unsigned char slice_smem[];
  __shared__ SelectShared sh;
  T* cache = cached ? reinterpret_cast<T*>(slice_smem) : nullptr;
  clear_histograms(&sh);
  RadixSelect sel;
  sel.init(&sh, kKeyBits<T>, static_cast<unsigned long long>(prm.k), 0);

  // Pass 1 while loading the slice (streaming: this row is not read from HBM again).
  {
    constexpr int kN = Pack<T>::kN;
    constexpr int kUnroll = 4;
    int scalar_from = 0;
    if (global_vec) {
      const int nvec = len / kN;
      const uint4* src = reinterpret_cast<const uint4*>(g);
      for (int base = threadIdx.x; base < nvec; base += kUnroll * kThreads) {
        uint4 a[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int v = base + u * kThreads;
          if (v < nvec) a[u] = __ldcs(src + v);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int v = base + u * kThreads;
          if (v < nvec) {
            if (cached) reinterpret_cast<uint4*>(cache)[v] = a[u];
            const Pack<T> p = *reinterpret_cast<const Pack<T>*>(&a[u]);
#pragma unroll
            for (int e = 0; e < kN; ++e) sel.add(key_of(p.v[e]));
          }
        }
      }
      scalar_from = nvec * kN;
    }
    for (int i = scalar_from + threadIdx.x; i < len; i += kThreads) {
      const T x = g[i];
      if (cached) cache[i] = x;
      sel.add(key_of(x));
    }
  }
  bool done = sel.resolve(cluster);
  const T* src = cached ? cache : g;
  const bool vec = cached || global_vec;
  while (!done) {
    for_each_value(src, len, vec, [&](int, T x) { sel.add(key_of(x)); });
    done = sel.resolve(cluster);
  }
  if (rank == 0 && threadIdx.x == 0) {
    static_cast<T*>(prm.threshold)[row] = value_of_key<T>(sel.prefix);
    prm.count_greater[row] = static_cast<int64_t>(sel.greater);
  }
  // No block may leave while another can still read its histograms.
  cluster.sync();
}

}  // namespace specx::topk_cuda
