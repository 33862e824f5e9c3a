// CUDA draft-tree construction (one block per sequence) and KV compaction. No torch headers.
#include <cuda_runtime.h>

#include "specx/tree.h"
#include "specx/tree_kernel.cuh"

namespace specx {
namespace {

constexpr int kThreads = 256;

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

// topk_expand: depth by depth, rank the children of the kept nodes by counting, keep the best.
// Kept lists go to global scratch (level_*); `cand_*` hold one depth's candidates.
struct TopkScratch {
  float* level_score;  // [batch, depth, keep]
  int* level_parent;   // [batch, depth, keep]: rank of the parent in the previous depth
  int* level_slot;     // [batch, depth, keep]
};

__device__ void topk_nodes(const BuildTreeParams& p, int64_t b, NodeSmem s, int* n_out, TopkScratch g,
                           float* cand_score, int* cand_parent, int* cand_slot, int* level_count,
                           int* selected_count) {
  const int keep = p.size - 1;
  const int64_t level_base = b * p.depth * int64_t{keep};
  int prev_count = 1;  // the root
  int levels = 0;
  for (int d = 0; d < p.depth && prev_count > 0 && keep > 0; ++d) {
    const int n_cand = prev_count * p.k;
    for (int i = threadIdx.x; i < n_cand; i += blockDim.x) {
      const int pi = i / p.k, c = i % p.k;
      const float pscore = d == 0 ? 0.0f : g.level_score[level_base + (d - 1) * keep + pi];
      const int pslot = d == 0 ? 0 : g.level_slot[level_base + (d - 1) * keep + pi];
      const int64_t off = candidate_offset(p, b, d, pslot, c);
      const float lp = p.cand_log_probs[off];
      const bool valid = candidate_valid(p.cand_tokens[off], lp);
      cand_score[i] = valid ? pscore + score_step(lp) : -INFINITY;
      cand_parent[i] = valid ? pi : -1;
      cand_slot[i] = c;
    }
    if (threadIdx.x == 0) level_count[d] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n_cand; i += blockDim.x) {
      if (cand_parent[i] < 0) continue;
      int rank = 0;
      for (int j = 0; j < n_cand && rank < keep; ++j)
        rank += cand_parent[j] >= 0 && ranks_before(cand_score[j], cand_parent[j], cand_slot[j], cand_score[i],
                                                    cand_parent[i], cand_slot[i]);
      if (rank < keep) {
        const int64_t at = level_base + d * keep + rank;
        g.level_score[at] = cand_score[i];
        g.level_parent[at] = cand_parent[i];
        g.level_slot[at] = cand_slot[i];
        atomicAdd(&level_count[d], 1);
      }
    }
    __syncthreads();
    prev_count = level_count[d];
    levels = d + 1;
    __syncthreads();  // level_count is read by every thread before the next write
  }
  // Global ranking over all kept entries: each depth's selection is a prefix of its list.
  for (int d = threadIdx.x; d < levels; d += blockDim.x) selected_count[d] = 0;
  __syncthreads();
  for (int d = 0; d < levels; ++d) {
    for (int r = threadIdx.x; r < level_count[d]; r += blockDim.x) {
      const float sc = g.level_score[level_base + d * keep + r];
      int rank = 0;
      for (int e = 0; e < levels && rank < keep; ++e)
        for (int q = 0; q < level_count[e] && rank < keep; ++q)
          rank += ranks_before(g.level_score[level_base + e * keep + q], e, q, sc, d, r);
      if (rank < keep) atomicAdd(&selected_count[d], 1);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 1;
    for (int d = 0; d < levels; ++d) {
      const int m = selected_count[d];
      selected_count[d] = total;  // first node index of depth d
      total += m;
    }
    *n_out = total;
    for (int d = levels; d < p.depth; ++d) selected_count[d] = total;
  }
  __syncthreads();
  for (int d = 0; d < levels; ++d) {
    const int first = selected_count[d];
    const int count = (d + 1 < levels ? selected_count[d + 1] : *n_out) - first;
    for (int r = threadIdx.x; r < count; r += blockDim.x) {
      const int64_t at = level_base + d * keep + r;
      const int prank = g.level_parent[at];
      const int parent = d == 0 ? 0 : selected_count[d - 1] + prank;
      const int pslot = d == 0 ? 0 : g.level_slot[level_base + (d - 1) * keep + prank];
      s.token[first + r] = p.cand_tokens[candidate_offset(p, b, d, pslot, g.level_slot[at])];
      s.parent[first + r] = parent;
      s.score[first + r] = g.level_score[at];
      s.depth[first + r] = d + 1;
    }
  }
}

__global__ void __launch_bounds__(kThreads) build_tree_kernel(BuildTreeParams p, TopkScratch g) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.x;
  const int size = p.size;
  const int n_cand_max = p.mode == TreeMode::kBackbone ? p.depth * p.k : (size - 1) * p.k;
  NodeSmem s;
  unsigned char* at = smem;
  s.token = reinterpret_cast<int64_t*>(at);
  at += sizeof(int64_t) * size;
  s.score = reinterpret_cast<float*>(at);
  at += sizeof(float) * size;
  s.parent = reinterpret_cast<int*>(at);
  at += sizeof(int) * size;
  s.depth = reinterpret_cast<int*>(at);
  at += sizeof(int) * size;
  int* leaf_index = reinterpret_cast<int*>(at);
  at += sizeof(int) * size;
  int* leaf_of = reinterpret_cast<int*>(at);
  at += sizeof(int) * size;
  int* counts = reinterpret_cast<int*>(at);  // [depth] per-depth counters, then 4 scalars
  at += sizeof(int) * (2 * p.depth + 4);
  float* cand_score = reinterpret_cast<float*>(at);
  at += sizeof(float) * n_cand_max;
  s.index = reinterpret_cast<int*>(at);
  at += sizeof(int) * n_cand_max;
  int* cand_slot = reinterpret_cast<int*>(at);
  at += sizeof(int) * n_cand_max;
  s.flag = reinterpret_cast<uint8_t*>(at);  // n_cand_max, then reused as has_child[size]
  int* scalars = counts + 2 * p.depth;
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
    topk_nodes(p, b, s, n_nodes, g, cand_score, s.index, cand_slot, counts, counts + p.depth);
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

size_t build_tree_smem(const BuildTreeParams& p) {
  const size_t n_cand_max = p.mode == TreeMode::kBackbone ? size_t(p.depth) * p.k : size_t(p.size - 1) * p.k;
  const size_t bytes = size_t(p.size) * (8 + 4 * 5) + 4 * (2 * size_t(p.depth) + 4) + n_cand_max * 12 +
                       (n_cand_max > size_t(p.size) ? n_cand_max : size_t(p.size));
  return (bytes + 15) / 16 * 16;
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
  TopkScratch g{nullptr, nullptr, nullptr};
  if (p.mode == TreeMode::kTopkExpand && p.size > 1 && p.depth > 0) {
    const size_t entries = size_t(p.batch) * p.depth * (p.size - 1);
    void* scratch = nullptr;
    cudaError_t err = cudaMallocAsync(&scratch, entries * 12, st);
    if (err != cudaSuccess) return err;
    g.level_score = static_cast<float*>(scratch);
    g.level_parent = reinterpret_cast<int*>(g.level_score + entries);
    g.level_slot = g.level_parent + entries;
  }
  const size_t smem = build_tree_smem(p);
  // Raising the limit is a driver call: only trees past the default 48 KB need it.
  cudaError_t err = smem <= 48 * 1024 ? cudaSuccess
                                      : cudaFuncSetAttribute(build_tree_kernel,
                                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                             static_cast<int>(smem));
  if (err == cudaSuccess) {
    build_tree_kernel<<<static_cast<unsigned>(p.batch), kThreads, smem, st>>>(p, g);
    err = cudaGetLastError();
  }
  if (g.level_score != nullptr) {
    const cudaError_t free_err = cudaFreeAsync(g.level_score, st);
    if (err == cudaSuccess) err = free_err;
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
