// CUDA tree verification: greedy (argmax fused, last block of each sequence walks the tree)
// and sampling (one block per sequence walks the tree depth by depth). No torch headers.
#include <cuda_runtime.h>

#include "specx/speckd_gate.h"
#include "specx/tree.h"
#include "specx/verify.h"
#include "specx/verify_kernel.cuh"

namespace specx {
namespace {

using verify_cuda::ArgMax;

constexpr int kArgmaxThreads = 256;
constexpr int kWalkThreads = 256;
constexpr int kNodesPerThread = kMaxTreeSizeCuda / kWalkThreads;
constexpr int kSampleThreads = 512;
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
  const int64_t nn = p.num_nodes[b];
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
// (scratch); the last block of sequence b to finish walks its tree.
template <typename T>
__global__ void __launch_bounds__(kArgmaxThreads) verify_greedy_logits_kernel(VerifyParams p, int* counters) {
  __shared__ ArgMax scratch[33];
  __shared__ bool last;
  const int64_t b = blockIdx.y;
  const int node = blockIdx.x;
  const int64_t nn = p.num_nodes[b];
  if (node < nn) {
    const T* row = static_cast<const T*>(p.logits) + (b * p.size + node) * p.vocab;
    const ArgMax best = verify_cuda::row_argmax(row, p.vocab, scratch);
    if (threadIdx.x == 0) p.accepted_nodes[b * p.size + node] = best.index;
  }
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&counters[b], 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  greedy_walk(p, b, p.accepted_nodes);
}

__global__ void __launch_bounds__(kWalkThreads) verify_greedy_argmax_kernel(VerifyParams p) {
  greedy_walk(p, blockIdx.x, p.argmax);
}

// ---- sampling ----

template <typename T>
struct TargetRow {
  const T* row;
  float vmax;
  float inv_t;
  uint64_t tau;  // top-p threshold on the weights (0: keep all)
  __device__ uint64_t raw(int64_t v) const { return det_weight(to_float(row[v]), vmax, inv_t); }
  __device__ uint64_t operator()(int64_t v) const {
    const uint64_t w = raw(v);
    return w >= tau ? w : 0;
  }
};

struct SampleSmem {
  uint64_t sums[33];
  float maxes[33];
  unsigned long long prefix[kSampleThreads];
  unsigned long long warp_totals[kSampleThreads / 32];
  unsigned long long hist[256];
  int64_t result;
  int children[kMaxTreeSizeCuda];
  int path[kMaxTreeSizeCuda];
  int child_count;
  int accepted;
  uint64_t left;
  uint64_t tau;
  uint64_t kept_total;
};

// The largest threshold whose kept mass (weights >= it) reaches `need`, digit by digit from the
// top (weights < 2^48); also the kept mass.
template <typename T>
__device__ void top_p_threshold(const TargetRow<T>& row, int64_t vocab, uint64_t need, SampleSmem& s) {
  uint64_t prefix = 0, above = 0;
  for (int shift = 40; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s.hist[i] = 0;
    __syncthreads();
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const uint64_t w = row.raw(v);
      if ((w >> (shift + 8)) == (prefix >> (shift + 8)) && w > 0) atomicAdd(&s.hist[(w >> shift) & 255], w);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int d = 255;
      for (; d > 0; --d) {
        if (above + s.hist[d] >= need) break;
        above += s.hist[d];
      }
      s.tau = prefix | (static_cast<uint64_t>(d) << shift);
      s.kept_total = above + s.hist[d];
    }
    __syncthreads();
    prefix = s.tau;
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads) verify_sample_kernel(VerifyParams p) {
  extern __shared__ uint32_t removed[];  // deterministic drafts: bitmap of rejected tokens
  __shared__ SampleSmem s;
  const int64_t b = blockIdx.x;
  const int64_t row0 = b * p.size;
  const int64_t nn = p.num_nodes[b];
  const int n = nn < 1 ? 1 : (nn > p.size ? p.size : static_cast<int>(nn));
  const int64_t words = p.draft_probs == nullptr ? (p.vocab + 31) / 32 : 0;
  const uint32_t seq = static_cast<uint32_t>(b);
  int cur = 0, depth = 0;
  int64_t next = 0;
  if (threadIdx.x == 0) s.path[0] = 0;
  while (true) {
    TargetRow<T> row{static_cast<const T*>(p.logits) + (row0 + cur) * p.vocab, 0.0f, p.inv_temperature, 0};
    row.vmax = verify_cuda::block_max(p.vocab, s.maxes, [&](int64_t v) { return to_float(row.row[v]); });
    uint64_t total = verify_cuda::block_sum(p.vocab, s.sums, [&](int64_t v) { return row.raw(v); });
    if (p.top_p < 1.0) {
      top_p_threshold(row, p.vocab, top_p_need(p.top_p, total), s);
      row.tau = s.tau;
      total = s.kept_total;
    }
    // Children of `cur`, in index order (they all come after it).
    if (threadIdx.x < 32) {
      int base = 0;
      for (int start = cur + 1; start < n; start += 32) {
        const int i = start + threadIdx.x;
        const bool child = i < n && p.parents[row0 + i] == cur;
        const unsigned m = __ballot_sync(0xffffffffu, child);
        if (child) s.children[base + __popc(m & ((1u << threadIdx.x) - 1u))] = i;
        base += __popc(m);
      }
      if (threadIdx.x == 0) s.child_count = base;
    }
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) removed[w] = 0;
    if (threadIdx.x == 0) s.accepted = -1;
    __syncthreads();
    const int count = s.child_count;
    const double pick = tree_verify_draw(p.seed, seq, p.offset, depth, kFinalTrial).pick;
    if (count == 0) {
      next = verify_cuda::block_sample(p.vocab, sample_target(pick, total), s.prefix, s.warp_totals, &s.result, row);
      break;
    }
    if (p.draft_probs == nullptr) {
      if (threadIdx.x == 0) {
        uint64_t left = total;
        for (int j = 0; j < count; ++j) {
          const int64_t x = p.node_tokens[row0 + s.children[j]];
          const bool fresh = x >= 0 && x < p.vocab && !(removed[x / 32] >> (x % 32) & 1u);
          const uint64_t px = fresh ? row(x) : 0;
          const double coin = tree_verify_draw(p.seed, seq, p.offset, depth, static_cast<uint32_t>(j)).coin;
          if (accept_deterministic(coin, px, left)) {
            s.accepted = s.children[j];
            break;
          }
          if (px > 0) {
            removed[x / 32] |= 1u << (x % 32);
            left -= px;
          }
        }
        s.left = left;
      }
      __syncthreads();
      if (s.accepted < 0) {
        const uint64_t left = s.left;
        // Nothing left only when rejected tokens covered all the mass: sample from p itself.
        const bool use_left = left > 0;
        next = verify_cuda::block_sample(p.vocab, sample_target(pick, use_left ? left : total), s.prefix,
                                         s.warp_totals, &s.result, [&](int64_t v) -> uint64_t {
                                           if (use_left && (removed[v / 32] >> (v % 32) & 1u)) return 0;
                                           return row(v);
                                         });
      }
    } else {
      const float* q = p.draft_probs + (row0 + cur) * p.vocab;
      const double dtotal = static_cast<double>(total);
      double coef = 0.0;
      for (int j = 0; j < count; ++j) {
        const uint64_t s_j = verify_cuda::block_sum(
            p.vocab, s.sums, [&](int64_t v) { return residual_fixed(row(v), dtotal, coef, q[v]); });
        if (threadIdx.x == 0) {
          const int64_t x = p.node_tokens[row0 + s.children[j]];
          const double coin = tree_verify_draw(p.seed, seq, p.offset, depth, static_cast<uint32_t>(j)).coin;
          if (x >= 0 && x < p.vocab && accept_with_draft(coin, residual_fixed(row(x), dtotal, coef, q[x]), s_j, q[x]))
            s.accepted = s.children[j];
        }
        __syncthreads();
        if (s.accepted >= 0) break;
        coef = coef + static_cast<double>(s_j) / kFixed52;
      }
      if (s.accepted < 0) {
        const uint64_t s_final = verify_cuda::block_sum(
            p.vocab, s.sums, [&](int64_t v) { return residual_fixed(row(v), dtotal, coef, q[v]); });
        if (s_final > 0) {
          next = verify_cuda::block_sample(p.vocab, sample_target(pick, s_final), s.prefix, s.warp_totals, &s.result,
                                           [&](int64_t v) { return residual_fixed(row(v), dtotal, coef, q[v]); });
        } else {
          next = verify_cuda::block_sample(p.vocab, sample_target(pick, total), s.prefix, s.warp_totals, &s.result,
                                           row);
        }
      }
    }
    const int accepted = s.accepted;
    if (accepted < 0) break;
    cur = accepted;
    ++depth;
    if (threadIdx.x == 0) s.path[depth] = accepted;
    __syncthreads();  // s.accepted and the bitmap are reset next round
  }
  __syncthreads();
  for (int i = threadIdx.x; i < p.size; i += blockDim.x) p.accepted_nodes[row0 + i] = i <= depth ? s.path[i] : -1;
  if (threadIdx.x == 0) {
    p.accept_len[b] = depth;
    p.next_token[b] = next;
  }
}

template <typename T>
cudaError_t launch_greedy_logits(const VerifyParams& p, cudaStream_t st, int* counters) {
  verify_greedy_logits_kernel<T><<<dim3(p.size, static_cast<unsigned>(p.batch)), kArgmaxThreads, 0, st>>>(p, counters);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sample(const VerifyParams& p, cudaStream_t st) {
  const size_t smem = p.draft_probs == nullptr ? static_cast<size_t>((p.vocab + 31) / 32) * 4 : 0;
  auto kernel = verify_sample_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(p.batch), kSampleThreads, smem, st>>>(p);
  return cudaGetLastError();
}

}  // namespace

int verify_greedy_cuda(const VerifyParams& p, void* stream, int* counters) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.batch == 0) return 0;
  if (p.argmax != nullptr) {
    verify_greedy_argmax_kernel<<<static_cast<unsigned>(p.batch), kWalkThreads, 0, st>>>(p);
    return cudaGetLastError();
  }
  return dispatch_dtype(p.dtype, [&](auto zero) { return launch_greedy_logits<decltype(zero)>(p, st, counters); });
}

int verify_sample_cuda(const VerifyParams& p, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p.batch == 0) return 0;
  return dispatch_dtype(p.dtype, [&](auto zero) { return launch_sample<decltype(zero)>(p, st); });
}

}  // namespace specx
