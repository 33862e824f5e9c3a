// CUDA tree verification: greedy (argmax fused, last block of each sequence walks the tree)
// and sampling (one cluster per sequence walks the tree depth by depth). No torch headers.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "specx/cluster_launch.cuh"
#include "specx/speckd_gate.h"
#include "specx/tree.h"
#include "specx/verify.h"
#include "specx/verify_kernel.cuh"

namespace specx {
namespace {

namespace cg = cooperative_groups;
using verify_cuda::ArgMax;

constexpr int kArgmaxThreads = 256;
constexpr int kWalkThreads = 256;
constexpr int kNodesPerThread = kMaxTreeSizeCuda / kWalkThreads;
constexpr int kSampleThreads = 512;
constexpr int kMaxSampleCluster = 8;  // blocks per sequence (a power of two)
static_assert(kArgmaxThreads == kWalkThreads, "the greedy walk runs in the argmax kernel's last block");

// Longest accepted path by pointer jumping: after the rounds, good[i] says every node from i
// up to the root matches the argmax at its parent, and dep[i] is i's depth.
__device__ void greedy_walk(const VerifyParams& p, int64_t b, const int64_t* argmax_src) {
  __shared__ int64_t am[kMaxTreeSizeCuda];
  __shared__ int anc[kMaxTreeSizeCuda];
  __shared__ int dep[kMaxTreeSizeCuda];
  __shared__ uint8_t good[kMaxTreeSizeCuda];
  __shared__ unsigned long long best_key;
  const int64_t row = b * p.size;
  const int64_t nn = tree_nodes(p.num_nodes, b, p.size);
  const int n = nn < 1 ? 1 : (nn > p.size ? p.size : static_cast<int>(nn));
  for (int i = threadIdx.x; i < n; i += blockDim.x) am[i] = argmax_src[row + i];
  if (threadIdx.x == 0) best_key = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t par = p.parents[row + i];
    const bool attached = i > 0 && par >= 0 && par < i;
    anc[i] = attached ? static_cast<int>(par) : -1;
    good[i] = i == 0 || (attached && p.node_tokens[row + i] == am[par]);
    dep[i] = attached ? 1 : 0;
  }
  __syncthreads();
  for (int span = 1; span < n; span <<= 1) {
    int new_anc[kNodesPerThread], new_dep[kNodesPerThread];
    uint8_t new_good[kNodesPerThread];
#pragma unroll
    for (int r = 0; r < kNodesPerThread; ++r) {
      const int i = threadIdx.x + r * kWalkThreads;
      if (i >= n) break;
      const int a = anc[i];
      new_anc[r] = a >= 0 ? anc[a] : -1;
      new_dep[r] = a >= 0 ? dep[i] + dep[a] : dep[i];
      new_good[r] = a >= 0 ? good[i] & good[a] : good[i];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kNodesPerThread; ++r) {
      const int i = threadIdx.x + r * kWalkThreads;
      if (i >= n) break;
      anc[i] = new_anc[r];
      dep[i] = new_dep[r];
      good[i] = new_good[r];
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    // Deepest first, then the lowest index.
    if (good[i]) atomicMax(&best_key, (static_cast<unsigned long long>(dep[i]) << 32) | (0xFFFFFFFFu - i));
  }
  for (int i = threadIdx.x; i < p.size; i += blockDim.x) p.accepted_nodes[row + i] = -1;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int best = static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(best_key & 0xFFFFFFFFu));
    const int depth = dep[best];
    int j = best;
    for (int d = depth; d >= 0; --d) {
      p.accepted_nodes[row + d] = j;
      j = d > 0 ? static_cast<int>(p.parents[row + j]) : -1;
    }
    p.accept_len[b] = depth;
    p.next_token[b] = am[best];
  }
}

// grid (tree_size, batch): block (node, b) takes the argmax of its row into accepted_nodes
// (scratch); the last block of sequence b to finish walks its tree. accept_len[b], zeroed
// before the launch, counts the finished blocks until the walk writes it.
template <typename T>
__global__ void __launch_bounds__(kArgmaxThreads) verify_greedy_logits_kernel(VerifyParams p) {
  __shared__ ArgMax scratch[33];
  __shared__ bool last;
  const int64_t b = blockIdx.y;
  const int node = blockIdx.x;
  const int64_t nn = tree_nodes(p.num_nodes, b, p.size);
  if (node < nn) {
    const T* row = static_cast<const T*>(p.logits) + (b * p.size + node) * p.vocab;
    const ArgMax best = verify_cuda::row_argmax(row, p.vocab, scratch);
    if (threadIdx.x == 0) p.accepted_nodes[b * p.size + node] = best.index;
  }
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(reinterpret_cast<unsigned long long*>(p.accept_len) + b, 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  greedy_walk(p, b, p.accepted_nodes);
}

__global__ void __launch_bounds__(kWalkThreads) verify_greedy_argmax_kernel(VerifyParams p) {
  greedy_walk(p, blockIdx.x, p.argmax);
}

// ---- sampling: one cluster per sequence; each block keeps its slice of a node's weights ----

constexpr int kHistBits = 11;
constexpr int kHistBins = 1 << kHistBits;

struct SampleSmem {
  unsigned long long warp_sums[32];
  float warp_max[32];
  unsigned long long warp_totals[kSampleThreads / 32];
  unsigned long long slot[2];  // this block's value in a cluster exchange (alternating)
  int64_t child_tok[kMaxTreeSizeCuda];
  int children[kMaxTreeSizeCuda];
  int path[kMaxTreeSizeCuda];
  uint8_t dup[kMaxTreeSizeCuda];  // the child's token came earlier among its siblings
  int64_t result;
  unsigned long long cross_above, cross_mass;
  int cross_bin;
  int child_count;
  int accepted;
  uint64_t left;
};

// One node's target distribution: this block's slice of fixed-point weights and the row-wide
// statistics. top-p keeps the weights >= tau (0: all); `total` is the kept mass.
template <typename T>
struct SampleRow {
  const T* logits;
  const uint64_t* w;
  float vmax;
  float inv_t;
  uint64_t tau;
  uint64_t total;
  __device__ uint64_t local(int i) const { return w[i] >= tau ? w[i] : 0; }
  // Any token, from the logits: the value its owner block holds.
  __device__ uint64_t at(int64_t v) const {
    const uint64_t x = det_weight(to_float(logits[v]), vmax, inv_t);
    return x >= tau ? x : 0;
  }
};

// Calls f(rank, value) on every thread for each block's `mine` (given in thread 0), in rank
// order; the peers' values are read all at once. A slot is rewritten only after the cluster has
// passed another exchange.
template <typename F>
__device__ void cluster_exchange(unsigned long long mine, SampleSmem& s, int& parity, F&& f) {
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) s.slot[parity] = mine;
  cluster.sync();
  const unsigned nblocks = cluster.num_blocks();
#pragma unroll
  for (unsigned r = 0; r < kMaxSampleCluster; ++r)
    if (r < nblocks) f(r, *cluster.map_shared_rank(&s.slot[parity], r));
  parity ^= 1;
}

template <typename F>
__device__ unsigned long long block_total(int len, SampleSmem& s, F&& weight) {
  unsigned long long acc = 0;
  for (int i = threadIdx.x; i < len; i += kSampleThreads) acc += weight(i);
  return block_reduce(acc, s.warp_sums, [](unsigned long long a, unsigned long long b) { return a + b; });
}

template <typename F>
__device__ uint64_t cluster_sum(int len, SampleSmem& s, int& parity, F&& weight) {
  uint64_t total = 0;
  cluster_exchange(block_total(len, s, weight), s, parity, [&](unsigned, unsigned long long v) { total += v; });
  return total;
}

// Inverse-CDF sample over the row: the block whose slice holds `target` scans it and writes
// the token to *out (vocab - 1 when the total is 0).
template <typename F>
__device__ void cluster_sample(uint64_t target, const RowSlice& sl, int64_t vocab, SampleSmem& s, int& parity,
                               int64_t* out, F&& weight) {
  const unsigned long long mine = block_total(sl.len, s, weight);
  unsigned long long before = 0, own = 0, total = 0;
  cluster_exchange(mine, s, parity, [&](unsigned r, unsigned long long v) {
    if (static_cast<int>(r) < sl.rank) before += v;
    if (static_cast<int>(r) == sl.rank) own = v;
    total += v;
  });
  if (own > 0 && before <= target && target - before < own) {
    const int64_t i = verify_cuda::block_sample(sl.len, target - before, s.warp_totals, &s.result, weight);
    if (threadIdx.x == 0) *out = sl.begin + i;
  } else if (target >= total && sl.rank == 0 && threadIdx.x == 0) {
    *out = vocab - 1;
  }
}

// top-p's histogram of masses over one kHistBins x 8-byte buffer: each bin's 64-bit sum is kept
// as a low and a high 32-bit word, so every update is a native shared atomic (a 64-bit atomicAdd
// on shared memory is a compare-and-swap loop, which spins on the many updates a popular bin gets).
struct MassHist {
  unsigned* words;  // lo[kHistBins], then hi[kHistBins]
  __device__ explicit MassHist(unsigned long long* buffer) : words(reinterpret_cast<unsigned*>(buffer)) {}
  __device__ void add(int bin, uint64_t mass) const {
    const unsigned lo = static_cast<unsigned>(mass), hi = static_cast<unsigned>(mass >> 32);
    const unsigned before = atomicAdd(&words[bin], lo);
    const unsigned carry = before + lo < before ? 1u : 0u;  // this add wrapped the low word
    if (hi + carry != 0) atomicAdd(&words[kHistBins + bin], hi + carry);
  }
  static __device__ uint64_t read(const unsigned long long* buffer, int bin) {
    const unsigned* w = reinterpret_cast<const unsigned*>(buffer);
    return (static_cast<uint64_t>(w[kHistBins + bin]) << 32) + w[bin];
  }
};

// Adds masses to a MassHist, one update per run of equal keys (a thread's weights often share a
// bin).
struct MassRun {
  MassHist hist;
  int key;
  unsigned long long mass;
  __device__ void add(int k, uint64_t w) {
    if (k != key) {
      flush();
      key = k;
    }
    mass += w;
  }
  __device__ void flush() {
    if (mass > 0) hist.add(key, mass);
    mass = 0;
  }
};

// First-level key of a weight > 0, monotone: its leading bit's position, then the next 5 bits.
__device__ __forceinline__ int top_p_key(uint64_t w) {
  const int e = 63 - __clzll(static_cast<long long>(w));
  const uint64_t m = e >= 5 ? w >> (e - 5) : w << (5 - e);
  return e * 32 + static_cast<int>(m & 31);
}

// The largest tau whose kept mass (weights >= tau) reaches top_p of the row's mass, and that
// mass. Each level narrows tau's range to one bin of a cluster-wide histogram; the first level's
// histogram was filled while the weights were computed, later passes touch only weights still in
// range. The cluster reduces each level's histogram scattered: every block sums its share of the
// bins over the cluster (`summed`), the shares' totals are exchanged, and every block scans the
// share holding the crossing.
__device__ void top_p_select(const uint64_t* w, int len, double top_p, unsigned long long* hist,
                             unsigned long long* summed, SampleSmem& s, int& parity, uint64_t& tau, uint64_t& kept) {
  cg::cluster_group cluster = cg::this_cluster();
  const int nblocks = static_cast<int>(cluster.num_blocks()), rank = static_cast<int>(cluster.block_rank());
  const int share = kHistBins / nblocks;
  const int per = share > kSampleThreads ? share / kSampleThreads : 1;  // bins per thread in a scan
  uint64_t lo = 0, above = 0, need = 0;
  int bits = -1, shift = 0;  // tau in [lo, lo + 2^bits), keyed by (w - lo) >> shift; -1: first level
  int exact_bits = 0;        // weights in tau's range are multiples of 2^exact_bits
  while (true) {
    if (bits >= 0) {
      for (int i = threadIdx.x; i < kHistBins; i += kSampleThreads) hist[i] = 0;
      __syncthreads();
      MassRun run{MassHist(hist), 0, 0};
      for (int i = threadIdx.x; i < len; i += kSampleThreads) {
        const uint64_t x = w[i];
        if (x >= lo && ((x - lo) >> bits) == 0) run.add(static_cast<int>((x - lo) >> shift), x);
      }
      run.flush();
    }
    cluster.sync();
    unsigned long long part = 0;
    for (int i = threadIdx.x; i < share; i += kSampleThreads) {
      const int bin = rank * share + i;
      uint64_t sum = 0;
#pragma unroll
      for (int r = 0; r < kMaxSampleCluster; ++r)
        if (r < nblocks) sum += MassHist::read(cluster.map_shared_rank(hist, r), bin);
      summed[i] = sum;
      part += sum;
    }
    part = block_reduce(part, s.warp_sums, [](unsigned long long a, unsigned long long b) { return a + b; });
    unsigned long long share_mass[kMaxSampleCluster];
    cluster_exchange(part, s, parity, [&](unsigned r, unsigned long long v) { share_mass[r] = v; });
    if (bits < 0) {
      uint64_t total = 0;
#pragma unroll
      for (int r = 0; r < kMaxSampleCluster; ++r)
        if (r < nblocks) total += share_mass[r];
      need = top_p_need(top_p, total);
    }
    // The share where the mass counted from the top first reaches `need`.
    int owner = -1;
    unsigned long long acc = above;
#pragma unroll
    for (int r = kMaxSampleCluster - 1; r >= 0; --r) {
      if (r >= nblocks || owner >= 0) continue;
      if (acc < need && acc + share_mass[r] >= need)
        owner = r;
      else
        acc += share_mass[r];
    }
    if (owner < 0) {  // no positive weight (an all-NaN row): everything is kept, as on the CPU
      tau = 0;
      kept = 0;
      return;
    }
    // Thread t sums the owner's bins t * per.. counted from the top; the crossing bin is the first
    // where the mass from the top reaches `need`.
    const unsigned long long* owned = cluster.map_shared_rank(summed, owner);
    unsigned long long g[kHistBins / kSampleThreads], sum = 0;
#pragma unroll
    for (int j = 0; j < kHistBins / kSampleThreads; ++j) {
      const int i = threadIdx.x * per + j;
      g[j] = j < per && i < share ? owned[share - 1 - i] : 0;
      sum += g[j];
    }
    acc += block_scan(sum, s.warp_totals).before;
#pragma unroll
    for (int j = 0; j < kHistBins / kSampleThreads; ++j) {
      if (acc < need && acc + g[j] >= need) {
        s.cross_bin = owner * share + share - 1 - (threadIdx.x * per + j);
        s.cross_above = acc;
        s.cross_mass = g[j];
      }
      acc += g[j];
    }
    __syncthreads();
    const int d = s.cross_bin;
    if (bits < 0) {
      const int e = d >> 5, m = d & 31;
      lo = e >= 5 ? static_cast<uint64_t>(32 + m) << (e - 5) : static_cast<uint64_t>(32 + m) >> (5 - e);
      bits = e >= 5 ? e - 5 : 0;
      exact_bits = e >= kWeightSignificandBits ? e - (kWeightSignificandBits - 1) : 0;
    } else {
      lo += static_cast<uint64_t>(d) << shift;
      bits = shift;
    }
    above = s.cross_above;
    if (bits <= exact_bits) {  // one weight left in range: lo
      tau = lo;
      kept = above + s.cross_mass;
      return;
    }
    shift = bits - kHistBits > exact_bits ? bits - kHistBits : exact_bits;
    __syncthreads();  // s.cross_* is rewritten next level
  }
}

// The weights of node row `logits` into this block's slice, and the row-wide statistics.
template <typename T>
__device__ SampleRow<T> load_row(const VerifyParams& p, const T* logits, const RowSlice& sl, uint64_t* w,
                                 unsigned long long* hist, SampleSmem& s, int& parity) {
  const bool top_p = p.top_p < 1.0;
  if (top_p)
    for (int i = threadIdx.x; i < kHistBins; i += kSampleThreads) hist[i] = 0;
  float m = -INFINITY;
  verify_cuda::for_each_value(logits + sl.begin, sl.len, kSampleThreads, [&](float x) { m = fmaxf(m, x); });
  m = block_reduce(m, s.warp_max, [](float a, float b) { return fmaxf(a, b); });
  SampleRow<T> row{logits, w, -INFINITY, p.inv_temperature, 0, 0};
  cluster_exchange(__float_as_uint(m), s, parity, [&](unsigned, unsigned long long v) {
    row.vmax = fmaxf(row.vmax, __uint_as_float(static_cast<uint32_t>(v)));
  });
  // The second read comes from L2, kLoads values per thread in flight (loads are not moved
  // above the stores to w, which might alias); element tid + k * threads keeps the 8-byte stores
  // conflict-free.
  // Weights below top_p_floor share the lowest bin, which tau never reaches: fewer updates.
  MassRun run{MassHist(hist), 0, 0};
  const uint64_t heavy = top_p ? top_p_floor(p.top_p, p.vocab) : 0;
  unsigned long long acc = 0, light = 0;
  constexpr int kLoads = 8;
  for (int base = threadIdx.x; base < sl.len; base += kLoads * kSampleThreads) {
    float v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kSampleThreads;
      v[u] = i < sl.len ? to_float(__ldg(logits + sl.begin + i)) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int i = base + u * kSampleThreads;
      if (i >= sl.len) break;
      const uint64_t x = det_weight(v[u], row.vmax, row.inv_t);
      w[i] = x;
      acc += x;
      if (!top_p || x == 0) continue;
      if (x >= heavy)
        run.add(top_p_key(x), x);
      else
        light += x;
    }
  }
  if (top_p) {  // the histogram's bins sum to the row's mass
    run.flush();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) light += __shfl_xor_sync(0xffffffffu, light, off);
    if (threadIdx.x % 32 == 0 && light > 0) run.hist.add(0, light);
    top_p_select(w, sl.len, p.top_p, hist, hist + kHistBins, s, parity, row.tau, row.total);
    return row;
  }
  acc = block_reduce(acc, s.warp_sums, [](unsigned long long a, unsigned long long b) { return a + b; });
  cluster_exchange(acc, s, parity, [&](unsigned, unsigned long long v) { row.total += v; });
  return row;
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads) verify_sample_kernel(VerifyParams p, int slice_len,
                                                                       uint64_t* w_global) {
  extern __shared__ __align__(16) unsigned long long sample_smem[];
  __shared__ SampleSmem s;
  const RowSlice sl = this_row_slice(p.vocab, slice_len);
  unsigned long long* hist = sample_smem;  // top-p's histogram, then this block's share of it summed
  uint64_t* w = w_global != nullptr ? w_global + static_cast<int64_t>(blockIdx.x) * slice_len
                                    : reinterpret_cast<uint64_t*>(sample_smem + 2 * kHistBins);
  const int64_t b = sl.row;
  const int64_t row0 = b * p.size;
  const int64_t nn = tree_nodes(p.num_nodes, b, p.size);
  const int n = nn < 1 ? 1 : (nn > p.size ? p.size : static_cast<int>(nn));
  const uint32_t seq = static_cast<uint32_t>(b);
  int parity = 0;
  int cur = 0, depth = 0;
  if (threadIdx.x == 0) s.path[0] = 0;
  while (true) {
    const SampleRow<T> row = load_row(p, static_cast<const T*>(p.logits) + (row0 + cur) * p.vocab, sl, w, hist, s,
                                      parity);
    // Children of `cur`, in index order (they all come after it).
    if (threadIdx.x < 32) {
      int base = 0;
      for (int start = cur + 1; start < n; start += 32) {
        const int i = start + threadIdx.x;
        const bool child = i < n && p.parents[row0 + i] == cur;
        const unsigned m = __ballot_sync(0xffffffffu, child);
        if (child) {
          const int j = base + __popc(m & ((1u << threadIdx.x) - 1u));
          s.children[j] = i;
          s.child_tok[j] = p.node_tokens[row0 + i];
        }
        base += __popc(m);
      }
      if (threadIdx.x == 0) s.child_count = base;
    }
    if (threadIdx.x == 0) s.accepted = -1;
    __syncthreads();
    const int count = s.child_count;
    const double pick = tree_verify_draw(p.seed, seq, p.offset, depth, kFinalTrial).pick;
    int64_t* out = p.next_token + b;
    if (count == 0) {
      cluster_sample(sample_target(pick, row.total), sl, p.vocab, s, parity, out,
                     [&](int i) { return row.local(i); });
      break;
    }
    if (p.draft_probs == nullptr) {
      // A repeated token has no mass left once its first copy is rejected.
      for (int j = threadIdx.x; j < count; j += kSampleThreads) {
        bool seen = false;
        for (int i = 0; i < j && !seen; ++i) seen = s.child_tok[i] == s.child_tok[j];
        s.dup[j] = seen;
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        uint64_t left = row.total;
        for (int j = 0; j < count; ++j) {
          const int64_t x = s.child_tok[j];
          const uint64_t px = x >= 0 && x < p.vocab && !s.dup[j] ? row.at(x) : 0;
          const double coin = tree_verify_draw(p.seed, seq, p.offset, depth, static_cast<uint32_t>(j)).coin;
          if (accept_deterministic(coin, px, left)) {
            s.accepted = s.children[j];
            break;
          }
          left -= px;
        }
        s.left = left;
      }
      __syncthreads();
      if (s.accepted < 0) {
        const uint64_t left = s.left;
        // Nothing left only when the rejected tokens held all the mass: sample from p itself.
        if (left > 0) {
          for (int j = threadIdx.x; j < count; j += kSampleThreads) {
            const int64_t i = s.child_tok[j] - sl.begin;
            if (i >= 0 && i < sl.len) w[i] = 0;
          }
          __syncthreads();
        }
        cluster_sample(sample_target(pick, left > 0 ? left : row.total), sl, p.vocab, s, parity, out,
                       [&](int i) { return row.local(i); });
      }
    } else {
      const float* q = p.draft_probs + (row0 + cur) * p.vocab;
      const float* ql = q + sl.begin;
      const double dtotal = static_cast<double>(row.total);
      double coef = 0.0;
      auto residual = [&](int i) { return residual_fixed(row.local(i), dtotal, coef, ql[i]); };
      for (int j = 0; j < count; ++j) {
        const uint64_t s_j = cluster_sum(sl.len, s, parity, residual);
        if (threadIdx.x == 0) {
          const int64_t x = s.child_tok[j];
          const double coin = tree_verify_draw(p.seed, seq, p.offset, depth, static_cast<uint32_t>(j)).coin;
          if (x >= 0 && x < p.vocab && accept_with_draft(coin, residual_fixed(row.at(x), dtotal, coef, q[x]), s_j, q[x]))
            s.accepted = s.children[j];
        }
        __syncthreads();
        if (s.accepted >= 0) break;
        coef = coef + static_cast<double>(s_j) / kFixed52;
      }
      if (s.accepted < 0) {
        const uint64_t s_final = cluster_sum(sl.len, s, parity, residual);
        if (s_final > 0) {
          cluster_sample(sample_target(pick, s_final), sl, p.vocab, s, parity, out, residual);
        } else {
          cluster_sample(sample_target(pick, row.total), sl, p.vocab, s, parity, out,
                         [&](int i) { return row.local(i); });
        }
      }
    }
    const int accepted = s.accepted;
    if (accepted < 0) break;
    cur = accepted;
    ++depth;
    if (threadIdx.x == 0) s.path[depth] = accepted;
    __syncthreads();  // s.accepted and the children are rewritten next round
  }
  __syncthreads();
  if (sl.rank == 0) {
    for (int i = threadIdx.x; i < p.size; i += kSampleThreads) p.accepted_nodes[row0 + i] = i <= depth ? s.path[i] : -1;
    if (threadIdx.x == 0) p.accept_len[b] = depth;
  }
  cg::this_cluster().sync();  // peers may still read this block's shared memory
}

template <typename T>
cudaError_t launch_greedy_logits(const VerifyParams& p, cudaStream_t st) {
  const cudaError_t err = cudaMemsetAsync(p.accept_len, 0, p.batch * sizeof(int64_t), st);
  if (err != cudaSuccess) return err;
  verify_greedy_logits_kernel<T><<<dim3(p.size, static_cast<unsigned>(p.batch)), kArgmaxThreads, 0, st>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sample(const VerifyParams& p, cudaStream_t st) {
  // Slices of >= 4096 weights over up to 8 blocks, in shared memory up to 160 KB each (else in
  // global scratch), after top-p's histogram and the summed share of it.
  SlicePlan plan = plan_row_slices(p.vocab, p.batch, sizeof(uint64_t), 8, 4096 * sizeof(uint64_t), 160 * 1024,
                                   kMaxSampleCluster);
  uint64_t* w_global = nullptr;
  if (!plan.cached) {
    const cudaError_t err =
        cudaMallocAsync(reinterpret_cast<void**>(&w_global), p.batch * plan.cluster * plan.slice * sizeof(uint64_t), st);
    if (err != cudaSuccess) return err;
  }
  plan.smem_bytes += 2 * kHistBins * sizeof(unsigned long long);
  cudaError_t err = launch_row_clusters(verify_sample_kernel<T>, p.batch, plan, kSampleThreads, st, p,
                                        static_cast<int>(plan.slice), w_global);
  if (w_global != nullptr) {
    const cudaError_t free_err = cudaFreeAsync(w_global, st);
    if (err == cudaSuccess) err = free_err;
  }
  return err;
}

}  // namespace

int verify_greedy_cuda(const VerifyParams& p, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.batch == 0) return 0;
  if (p.argmax != nullptr) {
    verify_greedy_argmax_kernel<<<static_cast<unsigned>(p.batch), kWalkThreads, 0, st>>>(p);
    return cudaGetLastError();
  }
  return dispatch_dtype(p.dtype, [&](auto zero) { return launch_greedy_logits<decltype(zero)>(p, st); });
}

int verify_sample_cuda(const VerifyParams& p, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.batch == 0) return 0;
  return dispatch_dtype(p.dtype, [&](auto zero) { return launch_sample<decltype(zero)>(p, st); });
}

}  // namespace specx
