// Cluster-wide radix select of the k-th largest key of a row, and the top-k threshold kernel.
//
// One thread-block cluster owns one row; each block keeps its slice of the row in shared memory
// (read from HBM once). Each pass histograms the next 11-bit digit of the ordered key among the
// entries that match the digits decided so far (shared-memory atomics, 2048 bins: wide enough that
// logits concentrated in a few exponents still spread over many bins). Each block then adds its
// non-zero bins into every block's copy of the cluster histogram (remote atomics, fire and forget:
// a handful of bins for logit-like rows), so after one cluster barrier every block scans a complete
// local histogram and picks the same digit; no block reads another's shared memory. 16-bit keys
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
constexpr int kBinsPerThread = kBins / kThreads;  // every digit width (11, 10, 5) has a multiple of this many bins

__device__ __forceinline__ uint32_t key_of(float v) { return ordered_key32(__float_as_uint(v)); }
__device__ __forceinline__ uint32_t key_of(__nv_bfloat16 v) { return ordered_key16(__bfloat16_as_ushort(v)); }
__device__ __forceinline__ uint32_t key_of(__half v) { return ordered_key16(__half_as_ushort(v)); }

// The keys of the two 16-bit values (bf16 or fp16) in a 32-bit word, in the same halves: S - m for a
// negative half, S | m for a positive one (no borrow crosses the halves: m <= 0x7FFF). Five
// instructions for two keys, where key_of takes about four for one.
__device__ __forceinline__ uint32_t key_pair_of(uint32_t w) {
  uint32_t negative;  // each half's sign bit replicated over the half (prmt's sign-replicate mode)
  asm("prmt.b32 %0, %1, 0, 0xBB99;" : "=r"(negative) : "r"(w));
  const uint32_t magnitude = w & 0x7FFF7FFFu;
  return ((0x80008000u - magnitude) & negative) | ((magnitude | 0x80008000u) & ~negative);
}

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

// *addr += v in block `rank`'s copy of this block's shared variable at addr, without a return
// value (the generic atomicAdd would wait for one).
__device__ __forceinline__ void cluster_red_add(unsigned* addr, unsigned rank, unsigned v) {
  const uint32_t remote = peer_address(shared_address(addr), rank);
  asm volatile("red.relaxed.cluster.shared::cluster.add.u32 [%0], %1;" ::"r"(remote), "r"(v) : "memory");
}

// Shared memory of one select (one per block and kernel: the last pass leaves it dirty). Aligned
// for the 16-byte accesses of init() and resolve().
struct alignas(16) SelectShared {
  unsigned local[kBins];   // this block's histogram of the current pass
  // The cluster's histogram, summed here by every block. Passes alternate between the two, so a
  // block can push the next pass into one while a slower block still scans the other.
  unsigned sum[2][kBins];
  unsigned warp_totals[kThreads / 32];
  uint32_t digit;
  unsigned before;
};

// The k-th largest of a row's keys. Every thread of every block of the cluster holds the same
// state. Per pass: the caller calls add(key) for the keys it owns, then all threads call resolve().
struct RadixSelect {
  SelectShared* sh;
  int shift;           // lowest bit of the current digit
  int width;           // bits in the current digit
  uint32_t prefix;     // the digits decided so far, in place
  uint32_t high_mask;  // which bits of prefix are decided
  unsigned remaining;  // the rank sought among the keys matching prefix (1-based)
  unsigned greater;    // keys above the prefix
  int pass;

  // Clears the histograms and arrives on the cluster barrier that the first resolve() waits on, so
  // no block pushes into a histogram its owner has not cleared yet. Called by all threads.
  __device__ __forceinline__ void init(SelectShared* s, int key_bits, unsigned k, cg::cluster_group& cluster) {
    sh = s;
    width = key_bits < kDigitBits ? key_bits : kDigitBits;
    shift = key_bits - width;
    prefix = 0;
    high_mask = 0;
    remaining = k;
    greater = 0;
    pass = 0;
    // local and both sums: 3 * kBins words, 16 bytes at a time.
    for (int i = threadIdx.x; i < 3 * kBins / 4; i += kThreads) reinterpret_cast<uint4*>(sh->local)[i] = make_uint4(0, 0, 0, 0);
    __syncthreads();
    cluster.barrier_arrive();
  }

  __device__ __forceinline__ bool candidate(uint32_t key) const { return (key & high_mask) == prefix; }

  __device__ __forceinline__ void add(uint32_t key) {
    if (candidate(key)) atomicAdd(&sh->local[(key >> shift) & ((1u << width) - 1u)], 1u);
  }
  // The first pass: every key is a candidate and its top digit is all of key >> shift.
  __device__ __forceinline__ void add_first(uint32_t key) { atomicAdd(&sh->local[key >> shift], 1u); }
  // The same for the two 16-bit keys of a key_pair_of word.
  __device__ __forceinline__ void add_first_pair(uint32_t keys) {
    atomicAdd(&sh->local[(keys >> shift) & ((1u << width) - 1u)], 1u);
    atomicAdd(&sh->local[keys >> (16 + shift)], 1u);
  }
  // A later pass over the two 16-bit keys of a key_pair_of word. A half of `diff` is 0 exactly for
  // a candidate; (diff - 0x10001) & ~diff & 0x80008000 is non-zero exactly when some half is 0 (a
  // borrow crosses into the high half only when the low half is 0), so most words cost one test.
  __device__ __forceinline__ void add_pair(uint32_t keys) {
    const uint32_t diff = (keys ^ (prefix * 0x10001u)) & (high_mask * 0x10001u);
    if (((diff - 0x10001u) & ~diff & 0x80008000u) == 0) return;
    const uint32_t digit_mask = (1u << width) - 1u;
    if ((diff & 0xFFFFu) == 0) atomicAdd(&sh->local[(keys >> shift) & digit_mask], 1u);
    if ((diff >> 16) == 0) atomicAdd(&sh->local[(keys >> (16 + shift)) & digit_mask], 1u);
  }
  // The keys of one 16-byte pack of T values (16-bit ones two per word); kFirst: the first pass.
  template <typename T, bool kFirst>
  __device__ __forceinline__ void add_pack(const uint4& pack) {
    const uint32_t words[4] = {pack.x, pack.y, pack.z, pack.w};
#pragma unroll
    for (const uint32_t w : words) {
      if constexpr (sizeof(T) == 2) {
        if constexpr (kFirst) add_first_pair(key_pair_of(w)); else add_pair(key_pair_of(w));
      } else {
        if constexpr (kFirst) add_first(ordered_key32(w)); else add(ordered_key32(w));
      }
    }
  }

  // Sums the cluster's histograms, picks the digit holding the remaining-th largest key and clears
  // this pass's histograms. Returns true when the key is complete.
  __device__ bool resolve(cg::cluster_group& cluster) {
    const unsigned nblocks = cluster.num_blocks(), rank = cluster.block_rank();
    const int nbins = 1 << width;
    const bool last = shift == 0;
    unsigned* sum = sh->sum[pass & 1];
    __syncthreads();                        // this block's histogram is complete
    if (pass == 0) cluster.barrier_wait();  // every block has cleared its histograms (init)
    // Consecutive bins go to different threads, so the few hot bins spread over the block; each
    // thread starts at its own rank so the pushes spread over the cluster.
    for (int b = threadIdx.x; b < nbins; b += kThreads) {
      const unsigned c = sh->local[b];
      if (c == 0) continue;
      for (unsigned i = 0, r = rank; i < nblocks; ++i, r = r + 1 == nblocks ? 0 : r + 1) cluster_red_add(sum + b, r, c);
    }
    cluster.sync();  // every block's pushes have landed

    // Thread t scans digits nbins-1-8t down to nbins-8-8t (descending); 16-byte reads.
    const int top = nbins - kBinsPerThread * static_cast<int>(threadIdx.x);
    unsigned counts[kBinsPerThread];
    unsigned mine = 0;
#pragma unroll
    for (int h = 0; h < kBinsPerThread / 4; ++h) {
      const uint4 q = top > 0 ? *reinterpret_cast<const uint4*>(sum + top - 4 * (h + 1)) : make_uint4(0, 0, 0, 0);
      counts[4 * h] = q.w;
      counts[4 * h + 1] = q.z;
      counts[4 * h + 2] = q.y;
      counts[4 * h + 3] = q.x;
      mine += q.x + q.y + q.z + q.w;
    }
    unsigned before = block_scan(mine, sh->warp_totals).before;
    if (before < remaining && remaining <= before + mine) {
#pragma unroll
      for (int e = 0; e < kBinsPerThread; ++e) {
        if (before + counts[e] >= remaining) {
          sh->digit = static_cast<uint32_t>(top - 1 - e);
          sh->before = before;
          break;
        }
        before += counts[e];
      }
    }
    __syncthreads();
    const uint32_t digit = sh->digit;
    greater += sh->before;
    remaining -= sh->before;
    prefix |= digit << shift;
    high_mask |= ((1u << width) - 1u) << shift;
    ++pass;
    if (last) return true;
    // This pass's sum is pushed into again two passes on, after the barrier the next pass ends with.
    for (int b = threadIdx.x; b < nbins; b += kThreads) {
      sh->local[b] = 0;
      sum[b] = 0;
    }
    __syncthreads();
    width = shift < kDigitBits ? shift : kDigitBits;
    shift -= width;
    return false;
  }
};

// One later pass of a select over a slice, 16 bytes at a time where `vec`.
template <typename T>
__device__ __forceinline__ void select_pass(RadixSelect& sel, const T* x, int len, bool vec) {
  constexpr int kN = Pack<T>::kN;
  int scalar_from = 0;
  if (vec) {
    const int nvec = len / kN;
    for (int v = threadIdx.x; v < nvec; v += kThreads) sel.add_pack<T, false>(reinterpret_cast<const uint4*>(x)[v]);
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads) sel.add(key_of(x[i]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    topk_threshold_kernel(const TopKThresholdParams prm, const int slice_len, const bool cached) {
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t C = prm.cols;
  const auto [nblocks, rank, row, begin, len] = this_row_slice(C, slice_len);
  const T* g = static_cast<const T*>(prm.logits) + row * C + begin;
  const bool global_vec = aligned16(g);

  extern __shared__ __align__(16) unsigned char slice_smem[];
  __shared__ SelectShared sh;
  T* cache = cached ? reinterpret_cast<T*>(slice_smem) : nullptr;
  RadixSelect sel;
  sel.init(&sh, kKeyBits<T>, static_cast<unsigned>(prm.k), cluster);

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
            sel.add_pack<T, true>(a[u]);
          }
        }
      }
      scalar_from = nvec * kN;
    }
    for (int i = scalar_from + threadIdx.x; i < len; i += kThreads) {
      const T x = g[i];
      if (cached) cache[i] = x;
      sel.add_first(key_of(x));
    }
  }
  const T* src = cached ? cache : g;
  const bool vec = cached || global_vec;
  while (!sel.resolve(cluster)) select_pass(sel, src, len, vec);
  if (rank == 0 && threadIdx.x == 0) {
    static_cast<T*>(prm.threshold)[row] = value_of_key<T>(sel.prefix);
    prm.count_greater[row] = static_cast<int64_t>(sel.greater);
  }
  // Blocks may leave now: every access to another block's shared memory came before the last
  // resolve's cluster barrier.
}

}  // namespace specx::topk_cuda
