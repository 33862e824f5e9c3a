// Top-k threshold of long rows of 16-bit keys (bf16, fp16): one block per row, one read of the row.
//
// A 16-bit key has 65536 values, so the k-th largest can be found from per-key counts without a
// second pass over the row, as long as only the keys near it are counted. A sample (one 16-byte
// pack in kSampleStride) is histogrammed by the key's top 11 bits; the sample ranks k / C * n +- 5
// standard deviations bracket a range of those coarse bins. The one read of the row then counts
// the keys above the range in registers and the keys inside it per key (shared-memory atomics,
// for the few percent of keys in the range). When the k-th largest falls outside the range (a
// sample that misleads: rare for rows in no particular order, with 5 standard deviations of
// margin; certain for rows built against the stride), the row is read again:
// a full coarse histogram gives the exact bin, and the count is repeated over it. The next row's
// sample is copied in (cp.async) while this row is read.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "specx/slice.cuh"
#include "specx/topk_threshold.h"
#include "specx/topk_threshold_kernel.cuh"  // key_pair_of, value_of_key

namespace specx::topk_cuda {

constexpr int kRowThreads = 512;
constexpr int kRowBlocksPerSM = 2;  // one block's sample and select phases overlap the other's read
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kCoarseBits = 11;
constexpr int kFineBits = 16 - kCoarseBits;  // keys per coarse bin: 1 << kFineBits
constexpr int kCoarseBins = 1 << kCoarseBits;
// The most keys counted one by one: 32-bit counters up to kMaxRange / 2 keys, beyond that two
// 16-bit counters per word (64 KiB either way), exact while the range holds under 65536 keys.
constexpr int kMaxRange = 32768;
constexpr int kSampleStride = 16;   // one pack in 16 goes into the sample
constexpr int kMinSampleKeys = 1024;  // fewer: skip the sample, take the exact coarse histogram
constexpr int kSampleStaged = 1024;   // sample packs copied in ahead of their row
constexpr int kRowUnroll = 4;         // 16-byte loads in flight per thread: 32 KiB per block

struct RowSelectShared {
  unsigned range_counts[kMaxRange / 2];  // per key of the candidate range, zero between rows
  unsigned coarse[kCoarseBins];      // per top-11-bit bin, zero between rows
  uint4 sample[kSampleStaged];       // the next row's first sample packs, copied in during this row's read
  unsigned warp_sums[2][kRowWarps];
  unsigned found_bin, found_before;
};

struct RankHit {
  unsigned bin;     // the bin holding the want-th largest key
  unsigned before;  // keys in higher bins
};

// The bin of the want-th largest key (1 <= want <= total) among n counters in ascending key order,
// n a multiple of 32 * kRowWarps. Warp w scans the w-th block of bins from the top, its lanes on
// consecutive counters (no bank conflicts). Called by the whole block; ends with a barrier.
template <typename Count>
__device__ __forceinline__ RankHit find_rank(const Count* bins, int n, unsigned want, RowSelectShared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int per_warp = n / kRowWarps;
  const int base = n - (warp + 1) * per_warp;
  unsigned mine = 0;
  for (int c = lane; c < per_warp; c += 32) mine += bins[base + c];
  const unsigned warp_total = __reduce_add_sync(~0u, mine);
  if (lane == 0) sh.warp_sums[0][warp] = warp_total;
  __syncthreads();
  unsigned before = 0;
  for (int w = 0; w < warp; ++w) before += sh.warp_sums[0][w];
  if (before < want && want <= before + warp_total) {  // one warp: walk its chunks of 32 bins from the top
    for (int c0 = per_warp - 32; c0 >= 0; c0 -= 32) {
      const unsigned v = bins[base + c0 + lane];
      const unsigned chunk = __reduce_add_sync(~0u, v);
      if (before + chunk >= want) {
        unsigned upper = v;  // this lane's bin and the chunk's higher ones
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const unsigned u = __shfl_down_sync(~0u, upper, off);
          if (lane + off < 32) upper += u;
        }
        if (before + upper - v < want && want <= before + upper) {
          sh.found_bin = static_cast<unsigned>(base + c0 + lane);
          sh.found_before = before + upper - v;
        }
        break;
      }
      before += chunk;
    }
  }
  __syncthreads();
  return {sh.found_bin, sh.found_before};
}

// Sums of two per-thread counts over the block, in every thread. Ends with a barrier.
__device__ __forceinline__ uint2 block_sum2(unsigned a, unsigned b, RowSelectShared& sh) {
  const int warp = threadIdx.x / 32;
  a = __reduce_add_sync(~0u, a);
  b = __reduce_add_sync(~0u, b);
  if (threadIdx.x % 32 == 0) {
    sh.warp_sums[0][warp] = a;
    sh.warp_sums[1][warp] = b;
  }
  __syncthreads();
  uint2 s{0, 0};
  for (int w = 0; w < kRowWarps; ++w) {
    s.x += sh.warp_sums[0][w];
    s.y += sh.warp_sums[1][w];
  }
  __syncthreads();
  return s;
}

// A row as its unaligned head, its 16-byte packs and its tail.
template <typename T>
struct RowView {
  const T* x;
  int head;  // elements before the first 16-byte boundary
  int packs;
  int64_t tail_from;
  int64_t len;

  __device__ RowView(const T* row, int64_t n) : x(row), len(n) {
    const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16) / static_cast<int>(sizeof(T));
    const int64_t to_boundary = misalign == 0 ? 0 : static_cast<int64_t>(16 / sizeof(T)) - misalign;
    head = static_cast<int>(to_boundary < n ? to_boundary : n);
    packs = static_cast<int>((n - head) / 8);
    tail_from = head + 8ll * packs;
  }
  __device__ const uint4* pack_ptr() const { return reinterpret_cast<const uint4*>(x + head); }
  // f(key) on the elements outside the packs.
  template <typename F>
  __device__ void for_each_loose_key(F&& f) const {
    for (int64_t i = threadIdx.x; i < head; i += kRowThreads) f(key_of(x[i]));
    for (int64_t i = tail_from + threadIdx.x; i < len; i += kRowThreads) f(key_of(x[i]));
  }
};

template <typename T>
__device__ __forceinline__ bool row_is_sampled(const RowView<T>& row) {
  return row.packs / kSampleStride >= kMinSampleKeys / 8;
}

// Starts copying the sample's first kSampleStaged packs into `staging`; each thread copies the
// packs it reads in coarse_histogram.
template <typename T>
__device__ __forceinline__ void prefetch_sample(const RowView<T>& row, uint4* staging) {
  const int n = min((row.packs + kSampleStride - 1) / kSampleStride, kSampleStaged);
  if (row_is_sampled(row)) {
    for (int s = threadIdx.x; s < n; s += kRowThreads)
      cp_async_16(shared_address(staging + s), row.pack_ptr() + static_cast<int64_t>(s) * kSampleStride);
  }
  cp_async_commit();
}

// The coarse histogram of every `stride`-th pack (stride 1: every element of the row); with
// `staging`, the first kSampleStaged of them come from prefetch_sample. Returns the keys counted.
template <typename T>
__device__ __forceinline__ unsigned coarse_histogram(const RowView<T>& row, int stride, unsigned* coarse,
                                                     const uint4* staging = nullptr) {
  const uint4* packs = row.pack_ptr();
  const int n = (row.packs + stride - 1) / stride;
  auto add = [&](uint32_t key) { atomicAdd(&coarse[key >> kFineBits], 1u); };
  if (staging != nullptr) cp_async_wait<0>();  // each thread reads only the pack it copied
  for (int s = threadIdx.x; s < n; s += kRowThreads) {
    const uint4 p =
        staging != nullptr && s < kSampleStaged ? staging[s] : __ldg(packs + static_cast<int64_t>(s) * stride);
    const uint32_t words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (const uint32_t w : words) {
      const uint32_t keys = key_pair_of(w);
      add(keys & 0xFFFFu);
      add(keys >> 16);
    }
  }
  if (stride == 1) {
    row.for_each_loose_key(add);
    return static_cast<unsigned>(row.len);
  }
  return 8u * n;
}

// Adds one to key i's counter: range_counts[i], or with `packed` the 16-bit half i % 2 of
// range_counts[i / 2].
__device__ __forceinline__ void count_key(unsigned* range_counts, uint32_t i, bool packed) {
  if (packed)
    atomicAdd(&range_counts[i >> 1], 1u << ((i & 1u) << 4));
  else
    atomicAdd(&range_counts[i], 1u);
}

// visit(pack) on each of the row's 16-byte packs, kRowUnroll loads in flight per thread.
template <typename T, typename F>
__device__ __forceinline__ void for_each_row_pack(const RowView<T>& row, F&& visit) {
  const uint4* packs = row.pack_ptr();
  for (int base = threadIdx.x; base < row.packs; base += kRowUnroll * kRowThreads) {
    uint4 a[kRowUnroll];
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      if (base + u * kRowThreads < row.packs) a[u] = __ldcs(packs + base + u * kRowThreads);
    }
#pragma unroll
    for (int u = 0; u < kRowUnroll; ++u) {
      if (base + u * kRowThreads >= row.packs) break;
      visit(a[u]);
    }
  }
}

// One read of the row: keys above [lo, lo + span) counted in the result's x, keys inside it
// counted per key (count_key) and in the result's y (per thread).
template <typename T>
__device__ __forceinline__ uint2 count_range(const RowView<T>& row, uint32_t lo, uint32_t span,
                                             unsigned* range_counts, bool packed) {
  const uint32_t above_from = lo + span;
  unsigned above = 0, inside = 0;
  auto add = [&](uint32_t key) {
    above += key >= above_from;
    if (key - lo < span) {
      count_key(range_counts, key - lo, packed);
      ++inside;
    }
  };
  for_each_row_pack(row, [&](const uint4& pack) {
    uint32_t keys[8], hits = 0;
    const uint32_t words[4] = {pack.x, pack.y, pack.z, pack.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t pair = key_pair_of(words[w]);
      keys[2 * w] = pair & 0xFFFFu;
      keys[2 * w + 1] = pair >> 16;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      above += keys[j] >= above_from;
      hits |= (keys[j] - lo < span ? 1u : 0u) << j;
    }
    // The pack's keys inside the range, one atomic each; a few percent of keys, so the loop
    // runs once or twice per warp where a branch per key would diverge at almost every key.
    while (hits != 0) {
      const int j = __ffs(hits) - 1;
      hits &= hits - 1;
      uint32_t key = keys[0];
#pragma unroll
      for (int q = 1; q < 8; ++q) key = q == j ? keys[q] : key;
      count_key(range_counts, key - lo, packed);
      ++inside;
    }
  });
  row.for_each_loose_key(add);
  return {above, inside};
}

// Two 16-bit values of T as one operand of the paired compares (__hgt2_mask and the like: 0xffff
// in each half where the comparison holds, false for a NaN).
template <typename T>
using ValuePair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
template <typename T>
__device__ __forceinline__ ValuePair<T> as_pair(uint32_t word) {
  return *reinterpret_cast<const ValuePair<T>*>(&word);
}

// count_range by value instead of by key: a NaN has no place in value order, but apart from NaN
// (and -0 == +0, which share a key) a key lies in [lo, lo + span) exactly when its value lies
// between the values of the range's ends, and above it when its value is greater. Two values per
// compare make about a third of count_range's instructions per pack. The range is clipped to the
// keys of -inf and +inf (the keys beyond are NaNs).
template <typename T>
struct ValueRange {
  static constexpr uint32_t kInfBits = std::is_same_v<T, __half> ? 0x7C00u : 0x7F80u;  // also the exponent mask
  uint32_t first, last;  // clipped keys
  __device__ ValueRange(uint32_t lo, uint32_t span)
      : first(max(lo, ordered_key16(kInfBits | 0x8000u))), last(min(lo + span - 1, ordered_key16(kInfBits))) {}
  // Ends that are normal numbers or infinities: a compare that flushes subnormal operands to zero
  // decides the same for every value against them. (Without this check, rows of every 16-bit value
  // faulted on the H200: in-range by value, out of range by key.)
  __device__ bool countable() const {
    return first <= last && (key_to_bits16(first) & kInfBits) != 0 && (key_to_bits16(last) & kInfBits) != 0;
  }
};
// Returns count_range's counts in x and y, and in z whether the thread met a NaN: then the counts
// are not the row's, and the caller counts it again by key. Requires a countable() range.
template <typename T>
__device__ __forceinline__ uint3 count_range_by_value(const RowView<T>& row, uint32_t lo, uint32_t span,
                                                      unsigned* range_counts, bool packed) {
  constexpr uint32_t kInfBits = ValueRange<T>::kInfBits;
  const ValueRange<T> range(lo, span);
  const ValuePair<T> hi_pair = as_pair<T>(key_to_bits16(range.last) * 0x10001u);
  const ValuePair<T> lo_pair = as_pair<T>(key_to_bits16(range.first) * 0x10001u);
  unsigned above_halves = 0, inside = 0;  // above_halves: 16 per key
  ValuePair<T> nan_max = as_pair<T>(0);  // the maximum that keeps a NaN; +0 in both halves
  for_each_row_pack(row, [&](const uint4& pack) {
    const uint32_t words[4] = {pack.x, pack.y, pack.z, pack.w};
    uint32_t in[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const ValuePair<T> pair = as_pair<T>(words[w]);
      const uint32_t greater = __hgt2_mask(pair, hi_pair);
      above_halves += __popc(greater);
      in[w] = __hge2_mask(pair, lo_pair) & ~greater;
      nan_max = __hmax2_nan(nan_max, pair);
    }
    if ((in[0] | in[1] | in[2] | in[3]) == 0) return;
    // The pack's keys inside the range, one atomic each (see count_range).
    uint32_t hits = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) hits |= ((in[w] & 1u) | (in[w] >> 15 & 2u)) << (2 * w);
    while (hits != 0) {
      const int j = __ffs(hits) - 1;
      hits &= hits - 1;
      // Selects, not an indexed array (which the compiler would put in local memory).
      const uint32_t low = j & 2 ? words[1] : words[0], high = j & 2 ? words[3] : words[2];
      const uint32_t word = j & 4 ? high : low;
      const uint32_t key = key_pair_of(word) >> (16 * (j & 1)) & 0xFFFFu;
      count_key(range_counts, key - lo, packed);
      ++inside;
    }
  });
  bool loose_nan = false;
  const uint32_t above_from = lo + span;
  row.for_each_loose_key([&](uint32_t key) {
    loose_nan |= key > ordered_key16(kInfBits) || key < ordered_key16(kInfBits | 0x8000u);
    above_halves += key >= above_from ? 16u : 0u;
    if (key - lo < span) {
      count_key(range_counts, key - lo, packed);
      ++inside;
    }
  });
  const uint32_t max_bits = *reinterpret_cast<const uint32_t*>(&nan_max);
  const bool nan = loose_nan || (max_bits & 0x7FFFu) > kInfBits || (max_bits >> 16 & 0x7FFFu) > kInfBits;
  return {above_halves / 16, inside, nan};
}

// Zeroes counters [0, n) (n a multiple of 4) and waits for the block.
__device__ __forceinline__ void clear_counts(unsigned* counts, int n) {
  for (int i = threadIdx.x; i < n / 4; i += kRowThreads) reinterpret_cast<uint4*>(counts)[i] = make_uint4(0, 0, 0, 0);
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, kRowBlocksPerSM)
    topk_threshold_row_kernel(const TopKThresholdParams prm) {
  static_assert(sizeof(T) == 2, "16-bit keys");
  extern __shared__ __align__(16) unsigned char row_smem[];
  RowSelectShared& sh = *reinterpret_cast<RowSelectShared*>(row_smem);
  clear_counts(sh.range_counts, kMaxRange / 2);
  clear_counts(sh.coarse, kCoarseBins);
  const int64_t C = prm.cols;
  const unsigned k = static_cast<unsigned>(prm.k);
  const T* logits = static_cast<const T*>(prm.logits);
  if (blockIdx.x < prm.rows) prefetch_sample(RowView<T>(logits + blockIdx.x * C, C), sh.sample);
  for (int64_t r = blockIdx.x; r < prm.rows; r += gridDim.x) {
    const RowView<T> row(logits + r * C, C);
    uint32_t bin_lo, bin_hi;  // the candidate coarse bins
    const unsigned sampled = row_is_sampled(row) ? coarse_histogram(row, kSampleStride, sh.coarse, sh.sample) : 0u;
    if (sampled != 0) {
      __syncthreads();
      // Sample ranks (1-based, from the top) bracketing the k-th largest of the row.
      const float p = static_cast<float>(k) / static_cast<float>(C);
      const float mid = p * sampled, margin = 5.0f * sqrtf(sampled * p * (1.0f - p)) + 2.0f;
      const float rank_hi = floorf(mid - margin), rank_lo = ceilf(mid + margin);
      const RankHit top = rank_hi >= 1.0f ? find_rank(sh.coarse, kCoarseBins, static_cast<unsigned>(rank_hi), sh)
                                          : RankHit{kCoarseBins - 1, 0};
      const RankHit bottom = rank_lo <= static_cast<float>(sampled)
                                 ? find_rank(sh.coarse, kCoarseBins, static_cast<unsigned>(rank_lo), sh)
                                 : RankHit{0, sampled - sh.coarse[0]};
      bin_hi = top.bin;
      bin_lo = bottom.bin;
      // A wide range the sample says holds 32768 keys or more would likely overflow 16-bit counters
      // (a constant row with k = 1, say): count 16384 keys around the sample's k-th instead.
      const unsigned in_sample = bottom.before + sh.coarse[bin_lo] - top.before;
      __syncthreads();  // every thread has read the coarse bins before they are cleared
      constexpr uint32_t kWindowBins = (kMaxRange / 2) >> kFineBits;
      if (bin_hi - bin_lo >= kWindowBins &&
          static_cast<float>(in_sample) * static_cast<float>(C) >= 32768.0f * static_cast<float>(sampled)) {
        const unsigned mid_rank = static_cast<unsigned>(fmaxf(rintf(mid), 1.0f));
        const uint32_t mid_bin = find_rank(sh.coarse, kCoarseBins, mid_rank, sh).bin;
        const uint32_t from = mid_bin > bin_lo + kWindowBins / 2 ? mid_bin - kWindowBins / 2 : bin_lo;
        bin_lo = min(from, bin_hi + 1 - kWindowBins);
        bin_hi = bin_lo + kWindowBins - 1;
      }
    } else {
      coarse_histogram(row, 1, sh.coarse);
      __syncthreads();
      bin_lo = bin_hi = find_rank(sh.coarse, kCoarseBins, k, sh).bin;
    }
    clear_counts(sh.coarse, kCoarseBins);
    if (r + gridDim.x < prm.rows) prefetch_sample(RowView<T>(logits + (r + gridDim.x) * C, C), sh.sample);
    for (;;) {  // at most twice: the sampled range, then the exact bin
      const uint32_t hi_end = (bin_hi + 1) << kFineBits;
      const uint32_t span = min(hi_end - (bin_lo << kFineBits), static_cast<uint32_t>(kMaxRange));
      const uint32_t lo = hi_end - span;
      const int counted = static_cast<int>((span + 32 * kRowWarps - 1) / (32 * kRowWarps) * (32 * kRowWarps));
      const bool packed = counted > kMaxRange / 2;
      uint2 mine;
      if (ValueRange<T>(lo, span).countable()) {
        const uint3 by_value = count_range_by_value(row, lo, span, sh.range_counts, packed);
        mine = {by_value.x, by_value.y};
        if (__syncthreads_or(by_value.z)) {  // rare: the row is read again, its keys counted
          clear_counts(sh.range_counts, packed ? counted / 2 : counted);
          mine = count_range(row, lo, span, sh.range_counts, packed);
        }
      } else {  // a range end at zero or subnormal (around the median of logits, say)
        mine = count_range(row, lo, span, sh.range_counts, packed);
      }
      __syncthreads();
      const uint2 total = block_sum2(mine.x, mine.y, sh);  // keys above the range, inside it
      // A 16-bit counter may have wrapped once the range holds 65536 keys: take the exact bin.
      if (total.x < k && k <= total.x + total.y && (!packed || total.y < 65536u)) {
        const RankHit hit = packed ? find_rank(reinterpret_cast<const unsigned short*>(sh.range_counts), counted,
                                               k - total.x, sh)
                                   : find_rank(sh.range_counts, counted, k - total.x, sh);
        if (threadIdx.x == 0) {
          static_cast<T*>(prm.threshold)[r] = value_of_key<T>(lo + hit.bin);
          prm.count_greater[r] = static_cast<int64_t>(total.x) + hit.before;
        }
        clear_counts(sh.range_counts, packed ? counted / 2 : counted);
        break;
      }
      clear_counts(sh.range_counts, packed ? counted / 2 : counted);
      coarse_histogram(row, 1, sh.coarse);
      __syncthreads();
      bin_lo = bin_hi = find_rank(sh.coarse, kCoarseBins, k, sh).bin;
      clear_counts(sh.coarse, kCoarseBins);
    }
  }
}

}  // namespace specx::topk_cuda
