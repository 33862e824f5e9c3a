// CUDA draft-tree construction (one block per sequence) and KV compaction. No torch headers.
#include <cuda_runtime.h>

#include "specx/topk_threshold.h"  // ordered_key32, key_to_bits32
#include "specx/tree.h"
#include "specx/tree_kernel.cuh"

namespace specx {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// topk_expand ranks a depth's contenders as uint64 keys. When they are many it sorts them: a warp
// sorts blocks of kBlock keys (kRegs per lane, consecutive) in registers, so only strides >= kBlock
// need the block's barrier.
constexpr int kRegs = 2;
constexpr int kLogBlock = 6;
constexpr int kBlock = 1 << kLogBlock;
static_assert(kBlock == 32 * kRegs, "a warp's block is its lanes' registers");
constexpr uint64_t kNoKey = ~0ull;  // invalid candidates and padding: sort last
// Sequences with at most this many candidates read them into shared memory first: one memory
// round trip for the tree instead of one per depth and one for the tokens.
constexpr int kMaxPreloadCandidates = 4096;
// Candidates a lane keys per step of a depth's loop (their loads overlap).
constexpr int kKeysPerLane = 2;
// Up to this many items (contenders or running entries) count their ranks, with no sort. The
// counts cost items^2 / kThreads steps per thread: past 128 the sort is faster (H200).
constexpr int kMaxCountedItems = 128;
// Contenders sampled to tighten the bar when there are more than kMaxCountedItems of them.
constexpr int kPivots = 32;

__host__ __device__ inline int next_pow2(int n) {
  int m = 1;
  while (m < n) m <<= 1;
  return m;
}

__host__ __device__ inline int64_t candidates_per_sequence(const BuildTreeParams& p) {
  return int64_t{p.depth} * p.k * (p.per_parent ? p.k : 1);
}

// Depths with per-depth arrays. topk_expand fills at most budget - 1 depths (an entry enters with
// all its ancestors in the running best) and looks at one more; backbone needs none.
__host__ __device__ inline int tracked_depths(const BuildTreeParams& p) {
  if (p.mode != TreeMode::kTopkExpand) return 0;
  return p.size < p.depth ? p.size : p.depth;
}

constexpr size_t kNotPreloaded = ~size_t{0};
// topk_expand's per-depth int arrays (TopkSmem: contenders, entered, first, tight, retained).
constexpr int kDepthArrays = 5;

// Dynamic shared memory: the nodes, then the mode's own arrays. The launcher sizes it and the
// kernel places its arrays with the same offsets.
struct SmemLayout {
  size_t token, score, parent, depth, leaf_index, leaf_of, counts;
  size_t flag;                        // backbone: candidate flags; both: has_child[size]
  size_t index;                       // backbone
  size_t keys, prev, run_key, run_i;  // topk_expand
  size_t steps, cand_tokens;          // topk_expand, when the candidates fit (else kNotPreloaded)
  size_t bytes;
};

__host__ __device__ inline SmemLayout smem_layout(const BuildTreeParams& p) {
  SmemLayout l{};
  size_t at = 0;
  auto take = [&at](size_t bytes, size_t align) {
    at = (at + align - 1) / align * align;
    const size_t off = at;
    at += bytes;
    return off;
  };
  const size_t size = size_t(p.size);
  l.token = take(8 * size, 16);
  l.score = take(4 * size, 4);
  l.parent = take(4 * size, 4);
  l.depth = take(4 * size, 4);
  l.leaf_index = take(4 * size, 4);
  l.leaf_of = take(4 * size, 4);
  l.counts = take(4 * (kDepthArrays * size_t(tracked_depths(p)) + 4), 4);  // the per-depth arrays, then 4 scalars
  if (p.mode == TreeMode::kBackbone) {
    const size_t n_cand = size_t(p.depth) * p.k;
    l.index = take(4 * n_cand, 16);
    l.flag = take(n_cand > size ? n_cand : size, 1);
  } else {
    const size_t keep = size - 1;
    const size_t region = at = (at + 15) / 16 * 16;
    l.keys = take(8 * size_t(next_pow2(static_cast<int>(keep * p.k))), 16);
    l.prev = take(8 * keep, 8);
    l.run_key = take(8 * 2 * keep, 8);
    l.run_i = take(2 * 2 * keep, 2);
    const int64_t cands = candidates_per_sequence(p);
    const bool preload = cands <= kMaxPreloadCandidates;
    l.cand_tokens = preload ? take(8 * size_t(cands), 8) : kNotPreloaded;
    l.steps = preload ? take(4 * size_t(cands), 4) : kNotPreloaded;
    l.flag = region;  // has_child is written once the sort arrays are dead
    if (at < region + size) at = region + size;
  }
  l.bytes = (at + 15) / 16 * 16;
  return l;
}

struct NodeSmem {
  int64_t* token;
  int* parent;
  float* score;
  int* depth;
  uint8_t* flag;
  int* index;
};

__device__ void backbone_nodes(const BuildTreeParams& p, int64_t b, NodeSmem s, int* n_out, int* first_bad) {
  const int n_cand = p.depth * p.k;
  if (threadIdx.x == 0) *first_bad = p.depth;
  __syncthreads();
  for (int i = threadIdx.x; i < n_cand; i += blockDim.x) {
    const int d = i / p.k, c = i % p.k;
    const int64_t off = candidate_offset(p, b, d, 0, c);
    const bool valid = candidate_valid(p.cand_tokens[off], p.cand_log_probs[off]);
    s.flag[i] = valid;
    if (c == 0 && !valid) atomicMin(first_bad, d);
  }
  __syncthreads();
  // Depth d exists iff the spine is whole above it.
  for (int i = threadIdx.x; i < n_cand; i += blockDim.x)
    if (i / p.k > *first_bad) s.flag[i] = 0;
  __syncthreads();
  if (threadIdx.x < 32) {
    const int total = tree_cuda::warp_compact(s.flag, s.index, n_cand);
    if (threadIdx.x == 0) *n_out = 1 + total;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n_cand; i += blockDim.x) {
    if (!s.flag[i]) continue;
    const int d = i / p.k;
    const int64_t off = candidate_offset(p, b, d, 0, i % p.k);
    const int node = 1 + s.index[i];
    const int parent = d == 0 ? 0 : 1 + s.index[(d - 1) * p.k];
    s.token[node] = p.cand_tokens[off];
    s.parent[node] = parent;
    s.depth[node] = d + 1;
    // The spine's score is the sum of its log-probs, in depth order (as on the CPU).
    float score = 0.0f;
    for (int e = 0; e < d; ++e) score += score_step(p.cand_log_probs[candidate_offset(p, b, e, 0, 0)]);
    s.score[node] = score + score_step(p.cand_log_probs[off]);
  }
}

// A score as the high half of a sort key: the complement of its order-preserving key
// (topk_threshold.h), so ascending keys are descending scores and equal scores (ranks_before's ==,
// so -0.0 and +0.0 too) are equal bits. Exactly invertible otherwise.
__device__ __forceinline__ uint32_t score_key(float score) { return ~ordered_key32(__float_as_uint(score)); }

__device__ __forceinline__ uint32_t key_hi(uint64_t key) { return static_cast<uint32_t>(key >> 32); }

__device__ __forceinline__ float key_score(uint64_t key) { return __uint_as_float(key_to_bits32(~key_hi(key))); }

// Bank-conflict-free placement of the sort keys: a lane's kRegs consecutive keys and a warp's
// consecutive keys both spread over all banks (a permutation within each aligned group of 8).
__device__ __forceinline__ int swz(int e) { return e ^ ((e >> 3) & 7); }

// One compare-exchange step (stride 2^LJ) of bitonic stage `stage` on a warp's block: lane l
// holds keys e0 .. e0 + kRegs - 1, e0 = block start + l * kRegs.
template <int LJ>
__device__ __forceinline__ void bitonic_step(uint64_t (&v)[kRegs], int e0, int lane, int stage) {
  constexpr int j = 1 << LJ;
  if constexpr (j < kRegs) {
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      if (r & j) continue;
      const uint64_t a = v[r], c = v[r | j];
      if ((a > c) == (((e0 + r) & stage) == 0)) {
        v[r] = c;
        v[r | j] = a;
      }
    }
  } else {
    constexpr int m = j / kRegs;
    const bool lower = (lane & m) == 0;
#pragma unroll
    for (int r = 0; r < kRegs; ++r) {
      const uint64_t o = __shfl_xor_sync(0xffffffffu, v[r], m);
      const bool keep_min = lower == (((e0 + r) & stage) == 0);
      v[r] = keep_min == (o < v[r]) ? o : v[r];
    }
  }
}

// Steps of stride 2^LJ down to 1 of a stage, those below the stage's size.
template <int LJ>
__device__ __forceinline__ void bitonic_steps(uint64_t (&v)[kRegs], int e0, int lane, int stage) {
  if ((1 << LJ) < stage) bitonic_step<LJ>(v, e0, lane, stage);
  if constexpr (LJ > 0) bitonic_steps<LJ - 1>(v, e0, lane, stage);
}

// Sorts keys[swz(0 .. n_pow2 - 1)] ascending, n_pow2 >= kBlock a power of two: each warp's blocks
// in registers, then strides >= kBlock across the thread block.
__device__ void bitonic_sort(uint64_t* keys, int n_pow2) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int stage = kBlock; stage <= n_pow2; stage <<= 1) {
    for (int j = stage / 2; j >= kBlock; j /= 2) {
      for (int q = threadIdx.x; q < n_pow2 / 2; q += kThreads) {
        const int e = (q & (j - 1)) | ((q & ~(j - 1)) << 1);
        const uint64_t a = keys[swz(e)], c = keys[swz(e | j)];
        if ((a > c) == ((e & stage) == 0)) {
          keys[swz(e)] = c;
          keys[swz(e | j)] = a;
        }
      }
      __syncthreads();
    }
    for (int blk = warp; blk * kBlock < n_pow2; blk += kWarps) {
      const int e0 = blk * kBlock + lane * kRegs;
      uint64_t v[kRegs];
#pragma unroll
      for (int r = 0; r < kRegs; ++r) v[r] = keys[swz(e0 + r)];
      for (int s = stage == kBlock ? 2 : stage; s <= stage; s <<= 1) bitonic_steps<kLogBlock - 1>(v, e0, lane, s);
#pragma unroll
      for (int r = 0; r < kRegs; ++r) keys[swz(e0 + r)] = v[r];
    }
    __syncthreads();
  }
}

// Length of the prefix of 0 .. n - 1 where in_prefix(i) holds (it holds for a prefix): a binary search.
template <typename InPrefix>
__device__ __forceinline__ int prefix_length(int n, InPrefix in_prefix) {
  int lo = 0;
  while (n > 0) {
    const int half = n / 2;
    if (in_prefix(lo + half)) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

// Sum of v over each aligned group of g lanes (g a power of two <= 32), in every lane of the group.
__device__ __forceinline__ int group_sum(int v, int g) {
  for (int o = 1; o < g; o *= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Appends this lane's keys whose score key is below `bar` to keys[swz(*count ...)], in any order.
__device__ __forceinline__ void append_below(const uint64_t (&key)[kKeysPerLane], uint32_t bar, int* count,
                                             uint64_t* keys) {
  const int lane = threadIdx.x % 32;
  unsigned mask[kKeysPerLane];
  int total = 0;
#pragma unroll
  for (int r = 0; r < kKeysPerLane; ++r) {
    mask[r] = __ballot_sync(0xffffffffu, key_hi(key[r]) < bar);
    total += __popc(mask[r]);
  }
  int base = 0;
  if (lane == 0 && total > 0) base = atomicAdd(count, total);
  base = __shfl_sync(0xffffffffu, base, 0);
#pragma unroll
  for (int r = 0; r < kKeysPerLane; ++r) {
    if (mask[r] >> lane & 1u) keys[swz(base + __popc(mask[r] & ((1u << lane) - 1u)))] = key[r];
    base += __popc(mask[r]);
  }
}

// A candidate's score step, or -inf for an invalid candidate.
__device__ __forceinline__ float candidate_step(int64_t token, float log_prob) {
  return candidate_valid(token, log_prob) ? score_step(log_prob) : -INFINITY;
}

// Ascending keys are ranks_before's order: score key, then candidate index = parent rank * k + slot
// (< 8192 = kMaxTopkCandidatesCuda). Ranks are < 1024 (kMaxTreeSizeCuda); depth < 2^22 (far above
// what the per-depth shared arrays allow).
struct TopkSmem {
  uint64_t* keys;        // a depth's contenders, any order (sorted if many): (score key << 32) | candidate index
  uint64_t* prev;        // the previous depth's selected list: (score key << 32) | slot
  uint64_t* run_key;     // [2][keep] best `keep` entries so far: (score key << 32) | depth << 10 | rank
  uint16_t* run_i;       // [2][keep] their candidate index
  float* steps;          // the sequence's candidate_step values, or null: read from global memory
  int64_t* cand_tokens;  // the sequence's candidate tokens (with steps)
  int* contenders;       // [depth] keys of each depth that could enter the running best
  int* entered;          // [depth] those that did
  unsigned* tight;       // [depth] complement of the tightened bar (0: none)
  int* retained;         // [depth] contenders under the tightened bar
  int* first;            // [depth] selected per depth, then the first node of each depth
  int* slot;             // [size] a node's candidate slot
};

// topk_expand, depth by depth: rank the children of the selected nodes (ranks_before's order) and
// merge the best `keep` of them into the running best `keep` over all depths. Only children that
// outrank the running best's last entry (once it is full) contend, and only the entries that enter
// it have their children expanded: the rest score no higher and rank after every entry that can
// still enter, so the tree and every selected entry's rank are those of expanding each depth's
// best `keep`.
__device__ void topk_nodes(const BuildTreeParams& p, int64_t b, NodeSmem s, int* n_out, TopkSmem t) {
  const int keep = p.size - 1;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t seq = candidate_offset(p, b, 0, 0, 0);
  if (t.steps) {
    const int cands = static_cast<int>(candidates_per_sequence(p));
    for (int i = threadIdx.x; i < cands; i += kThreads) {
      const int64_t token = p.cand_tokens[seq + i];
      t.cand_tokens[i] = token;
      t.steps[i] = candidate_step(token, p.cand_log_probs[seq + i]);
    }
  }
  const int depths = tracked_depths(p);
  for (int i = threadIdx.x; i < kDepthArrays * depths; i += kThreads) t.contenders[i] = 0;  // the per-depth arrays
  __syncthreads();
  uint64_t* run_in = t.run_key;
  uint64_t* run_out = t.run_key + keep;
  uint16_t* run_i_in = t.run_i;
  uint16_t* run_i_out = t.run_i + keep;
  int prev_count = 1;  // the root
  int run_count = 0;
  int levels = 0;
  for (int d = 0; d < depths && keep > 0 && p.k > 0; ++d) {
    const int n = prev_count * p.k;
    // Contenders: valid, and ahead of the running best's last entry once it is full (an equal
    // score loses: the running best's entries are shallower).
    const uint32_t bar = run_count == keep ? key_hi(run_in[keep - 1]) : ~0u;
    for (int e0 = warp * 32; e0 < n; e0 += kKeysPerLane * kThreads) {
      uint64_t key[kKeysPerLane];
#pragma unroll
      for (int r = 0; r < kKeysPerLane; ++r) {
        const int e = e0 + r * kThreads + lane;
        const int pi = e / p.k, c = e - pi * p.k;
        key[r] = kNoKey;
        if (e < n) {
          const uint64_t pk = d > 0 ? t.prev[pi] : 0;  // the root: score 0, slot 0
          const int64_t off = candidate_offset(p, 0, d, static_cast<int>(static_cast<uint32_t>(pk)), c);
          const float step =
              t.steps ? t.steps[off] : candidate_step(p.cand_tokens[seq + off], p.cand_log_probs[seq + off]);
          if (step > -INFINITY)
            key[r] = uint64_t{score_key((d > 0 ? key_score(pk) : 0.0f) + step)} << 32 | static_cast<uint32_t>(e);
        }
      }
      append_below(key, bar, &t.contenders[d], t.keys);  // invalid keys never: their score key is ~0u
    }
    __syncthreads();
    int m = t.contenders[d];
    // Many contenders: tighten the bar with sampled pivots. A pivot that `keep` entries surely
    // precede (contenders scoring higher, running entries scoring at least as high) ranks before
    // no entry that can enter, and neither does any contender scoring no higher than it.
    if (m > kMaxCountedItems && m <= kKeysPerLane * kThreads) {
      const int g = kThreads / kPivots, part = threadIdx.x % g;
      const uint32_t pivot = key_hi(t.keys[swz(threadIdx.x / g * m / kPivots)]);
      int ahead = 0;
      for (int j = part; j < m; j += g) ahead += key_hi(t.keys[swz(j)]) < pivot;
      for (int q = part; q < run_count; q += g) ahead += key_hi(run_in[q]) <= pivot;
      ahead = group_sum(ahead, g);
      if (part == 0 && ahead >= keep) atomicMax(&t.tight[d], ~pivot);  // the best such pivot
      uint64_t key[kKeysPerLane];
#pragma unroll
      for (int r = 0; r < kKeysPerLane; ++r) {
        const int j = threadIdx.x + r * kThreads;
        key[r] = j < m ? t.keys[swz(j)] : kNoKey;
      }
      __syncthreads();  // every key read before any moves
      append_below(key, ~t.tight[d], &t.retained[d], t.keys);
      __syncthreads();
      m = t.retained[d];
    }
    // An entry of this depth (its rank among the contenders) enters the running best at its rank
    // plus the running entries ranking before it; a running entry moves down by the contenders
    // ranking before it.
    int entered = 0;
    const auto enter = [&](uint64_t key, int rank) {
      const uint32_t h = key_hi(key), i = static_cast<uint32_t>(key);
      const int at = rank + prefix_length(run_count, [&](int q) { return key_hi(run_in[q]) <= h; });
      if (at >= keep) return;
      t.prev[rank] = uint64_t{h} << 32 | i % p.k;
      run_out[at] = uint64_t{h} << 32 | static_cast<uint32_t>(d) << 10 | rank;
      run_i_out[at] = static_cast<uint16_t>(i);
      ++entered;
    };
    const auto stay = [&](int q, int behind) {
      if (q + behind >= keep) return;
      run_out[q + behind] = run_in[q];
      run_i_out[q + behind] = run_i_in[q];
    };
    const int items = max(m, run_count);  // a contender and/or a running entry each
    if (items <= kMaxCountedItems) {
      // Few: each item counts the contenders before it, g lanes to an item, with no sort.
      int g = 1;
      while (g < 32 && items * g * 2 <= kThreads) g *= 2;
      const int item = threadIdx.x / g, part = threadIdx.x % g;
      const uint64_t key = item < m ? t.keys[swz(item)] : kNoKey;
      const uint32_t run_h = item < run_count ? key_hi(run_in[item]) : 0u;
      int before = 0, behind = 0;
      for (int j = part; j < m; j += g) {
        const uint64_t o = t.keys[swz(j)];
        before += o < key;
        behind += key_hi(o) < run_h;
      }
      before = group_sum(before, g);
      behind = group_sum(behind, g);
      if (part == 0 && item < m && before < keep) enter(key, before);
      if (part == 0 && item < run_count) stay(item, behind);
    } else {
      const int n_pow2 = max(kBlock, next_pow2(m));  // the key buffer holds this many (m or keep > kMaxCountedItems)
      for (int j = m + threadIdx.x; j < n_pow2; j += kThreads) t.keys[swz(j)] = kNoKey;
      __syncthreads();
      bitonic_sort(t.keys, n_pow2);
      const int kept = min(keep, m);
      for (int j = threadIdx.x; j < kept; j += kThreads) enter(t.keys[swz(j)], j);
      for (int q = threadIdx.x; q < run_count; q += kThreads) {
        const uint32_t h = key_hi(run_in[q]);
        stay(q, prefix_length(kept, [&](int j) { return key_hi(t.keys[swz(j)]) < h; }));
      }
    }
    entered = __reduce_add_sync(0xffffffffu, entered);
    if (lane == 0 && entered > 0) atomicAdd(&t.entered[d], entered);
    __syncthreads();
    // Nothing of this depth among the best `keep`: nothing deeper either (a child's score is at
    // most its parent's, and ties go to the shallower), so the tree is complete.
    if (t.entered[d] == 0) break;
    uint64_t* const key_out = run_out;
    run_out = run_in;
    run_in = key_out;
    uint16_t* const i_out = run_i_out;
    run_i_out = run_i_in;
    run_i_in = i_out;
    prev_count = t.entered[d];
    run_count = min(keep, run_count + prev_count);
    levels = d + 1;
  }
  for (int q = threadIdx.x; q < run_count; q += kThreads)
    atomicAdd(&t.first[static_cast<uint32_t>(run_in[q]) >> 10], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 1;
    for (int d = 0; d < levels; ++d) {
      const int m = t.first[d];
      t.first[d] = total;
      total += m;
    }
    *n_out = total;
  }
  __syncthreads();
  // Node order: depth by depth, rank order within a depth.
  for (int q = threadIdx.x; q < run_count; q += kThreads) {
    const uint64_t key = run_in[q];
    const int d = static_cast<int>(static_cast<uint32_t>(key) >> 10);
    const int node = t.first[d] + static_cast<int>(key & 1023u);
    const int i = run_i_in[q];
    s.score[node] = key_score(key);
    s.parent[node] = d == 0 ? 0 : t.first[d - 1] + i / p.k;
    s.depth[node] = d + 1;
    t.slot[node] = i % p.k;
  }
  __syncthreads();
  for (int node = 1 + threadIdx.x; node < *n_out; node += kThreads) {
    const int d = s.depth[node] - 1;
    const int pslot = d == 0 ? 0 : t.slot[s.parent[node]];
    const int64_t off = candidate_offset(p, 0, d, pslot, t.slot[node]);
    s.token[node] = t.cand_tokens ? t.cand_tokens[off] : p.cand_tokens[seq + off];
  }
}

__global__ void __launch_bounds__(kThreads) build_tree_kernel(BuildTreeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.x;
  const int size = p.size;
  const SmemLayout l = smem_layout(p);
  NodeSmem s;
  s.token = reinterpret_cast<int64_t*>(smem + l.token);
  s.score = reinterpret_cast<float*>(smem + l.score);
  s.parent = reinterpret_cast<int*>(smem + l.parent);
  s.depth = reinterpret_cast<int*>(smem + l.depth);
  s.flag = smem + l.flag;  // the mode's flags, then has_child[size]
  s.index = reinterpret_cast<int*>(smem + l.index);
  int* leaf_index = reinterpret_cast<int*>(smem + l.leaf_index);
  int* leaf_of = reinterpret_cast<int*>(smem + l.leaf_of);
  int* counts = reinterpret_cast<int*>(smem + l.counts);  // [tracked depths] x kDepthArrays, then 4 scalars
  const int depths = tracked_depths(p);
  int* scalars = counts + kDepthArrays * depths;
  int* n_nodes = scalars;

  if (threadIdx.x == 0) {
    s.token[0] = p.root_tokens[b];
    s.parent[0] = -1;
    s.score[0] = 0.0f;
    s.depth[0] = 0;
  }
  if (p.mode == TreeMode::kBackbone) {
    backbone_nodes(p, b, s, n_nodes, scalars + 1);
  } else {
    TopkSmem t;
    t.keys = reinterpret_cast<uint64_t*>(smem + l.keys);
    t.prev = reinterpret_cast<uint64_t*>(smem + l.prev);
    t.run_key = reinterpret_cast<uint64_t*>(smem + l.run_key);
    t.run_i = reinterpret_cast<uint16_t*>(smem + l.run_i);
    t.steps = l.steps == kNotPreloaded ? nullptr : reinterpret_cast<float*>(smem + l.steps);
    t.cand_tokens = l.cand_tokens == kNotPreloaded ? nullptr : reinterpret_cast<int64_t*>(smem + l.cand_tokens);
    t.contenders = counts;
    t.entered = counts + depths;
    t.first = counts + 2 * depths;
    t.tight = reinterpret_cast<unsigned*>(counts + 3 * depths);
    t.retained = counts + 4 * depths;
    t.slot = leaf_index;  // free until the leaves are numbered
    topk_nodes(p, b, s, n_nodes, t);
  }
  __syncthreads();
  const int n = *n_nodes;
  uint8_t* has_child = s.flag;
  for (int i = threadIdx.x; i < size; i += blockDim.x) has_child[i] = 0;
  __syncthreads();
  for (int i = 1 + threadIdx.x; i < n; i += blockDim.x) has_child[s.parent[i]] = 1;
  __syncthreads();
  for (int i = threadIdx.x; i < size; i += blockDim.x) has_child[i] = i < n && !has_child[i];  // leaf flags
  __syncthreads();
  if (threadIdx.x < 32) {
    const int leaves = tree_cuda::warp_compact(has_child, leaf_index, n);
    if (threadIdx.x == 0) scalars[3] = leaves;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    if (has_child[i]) leaf_of[leaf_index[i]] = i;
  __syncthreads();

  const int64_t row = b * size;
  const int path_len = p.depth + 1;
  const int leaves = scalars[3];
  for (int i = threadIdx.x; i < size; i += blockDim.x) {
    const bool real = i < n;
    p.tokens[row + i] = real ? s.token[i] : -1;
    p.parents[row + i] = real ? s.parent[i] : -1;
    p.depths[row + i] = real ? s.depth[i] : 0;
    p.scores[row + i] = real ? s.score[i] : -INFINITY;
    // Ancestor mask row: ancestors come in decreasing index order, so words fill top down.
    int32_t* mrow = p.mask + (row + i) * p.words;
    int j = real ? i : -1;
    for (int w = p.words - 1; w >= 0; --w) {
      uint32_t word = 0;
      while (j >= 0 && j / 32 == w) {
        word |= 1u << (j % 32);
        j = s.parent[j];
      }
      mrow[w] = static_cast<int32_t>(word);
    }
    int64_t* prow = p.paths + (row + i) * path_len;
    const int leaf = i < leaves ? leaf_of[i] : -1;
    const int leaf_depth = leaf >= 0 ? s.depth[leaf] : -1;
    for (int e = leaf_depth + 1; e < path_len; ++e) prow[e] = -1;
    for (int a = leaf; a >= 0; a = s.parent[a]) prow[s.depth[a]] = a;
  }
  if (threadIdx.x == 0) p.num_nodes[b] = n;
}


// One block per sequence; each thread owns 16-byte pieces of a cache row and moves them along
// the path. A source (node >= i) never lies below an earlier destination, so reading a batch
// of sources before writing them keeps the ascending order's result, and the loads of a batch
// are in flight together instead of one round trip per node.
template <typename U>
__device__ __forceinline__ void move_path_units(char* seq, const int64_t* path, int64_t n, int64_t base,
                                                int64_t row_bytes, int64_t units) {
  constexpr int kBatch = 8;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    for (int64_t first = 1; first < n; first += kBatch) {
      U val[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        if (first + k < n) val[k] = reinterpret_cast<const U*>(seq + (base + path[first + k]) * row_bytes)[u];
#pragma unroll
      for (int k = 0; k < kBatch; ++k)
        if (first + k < n && path[first + k] != first + k)
          reinterpret_cast<U*>(seq + (base + first + k) * row_bytes)[u] = val[k];
    }
  }
}

__global__ void compact_kv_kernel(CompactKVParams p) {
  const int64_t b = blockIdx.x;
  __shared__ int64_t base_s, n_s;
  __shared__ int ok_s;
  if (threadIdx.x == 0) {
    base_s = p.lengths[b];
    n_s = p.accept_len[b] + 1;
    ok_s = 1;
  }
  __syncthreads();
  const int64_t base = base_s, n = n_s;
  const int64_t* path = p.accepted_nodes + b * p.path_stride;
  const bool n_ok = n >= 1 && n <= p.path_stride && base >= 0;
  if (n_ok) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const int64_t node = path[i];
      if (!(node > (i == 0 ? -1 : path[i - 1]) && node >= i && base + node < p.max_len)) ok_s = 0;
    }
  }
  __syncthreads();
  if (!n_ok || !ok_s) return;  // a bad path moves nothing and keeps the length
  for (int which = 0; which < 2; ++which) {
    char* seq = static_cast<char*>(which == 0 ? p.k_cache : p.v_cache) + b * p.max_len * p.row_bytes;
    if (p.row_bytes % 16 == 0) {
      move_path_units<int4>(seq, path, n, base, p.row_bytes, p.row_bytes / 16);
    } else {
      move_path_units<char>(seq, path, n, base, p.row_bytes, p.row_bytes);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) p.lengths[b] = base + n;
}

}  // namespace

int build_tree_cuda(const BuildTreeParams& p, void* stream) {
  if (p.batch == 0) return 0;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const size_t smem = smem_layout(p).bytes;
  // Raising the limit is a driver call: only trees past the default 48 KB need it.
  cudaError_t err = smem <= 48 * 1024 ? cudaSuccess
                                      : cudaFuncSetAttribute(build_tree_kernel,
                                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                             static_cast<int>(smem));
  if (err == cudaSuccess) {
    build_tree_kernel<<<static_cast<unsigned>(p.batch), kThreads, smem, st>>>(p);
    err = cudaGetLastError();
  }
  return err;
}

int compact_kv_cuda(const CompactKVParams& p, void* stream) {
  if (p.batch == 0 || p.row_bytes == 0) return 0;
  const bool vec = p.row_bytes % 16 == 0;
  const int64_t units = vec ? p.row_bytes / 16 : p.row_bytes;
  const int threads = units >= 256 ? 256 : static_cast<int>((units + 31) / 32 * 32);
  compact_kv_kernel<<<static_cast<unsigned>(p.batch), threads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return cudaGetLastError();
}

}  // namespace specx
