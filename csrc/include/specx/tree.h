// Draft-tree construction and KV compaction: torch-free interface shared by the torch glue
// (CPU kernels) and the CUDA launchers.
#pragma once
#include <cmath>
#include "specx/common.h"

namespace specx {

enum class TreeMode : int { kBackbone = 0, kTopkExpand = 1 };

// Candidate tensors are [batch, depth, k] (one list per depth) or [batch, depth, k, k] (one
// list per candidate slot of the parent; depth 0 reads slot 0). Outputs are [batch, size, ...].
struct BuildTreeParams {
  const int64_t* cand_tokens;
  const float* cand_log_probs;
  const int64_t* root_tokens;  // [batch]
  int64_t* tokens;             // [batch, size]
  int64_t* parents;            // [batch, size]
  int64_t* depths;             // [batch, size]
  float* scores;               // [batch, size]
  int32_t* mask;               // [batch, size, words]
  int64_t* paths;              // [batch, size, depth + 1]
  int64_t* num_nodes;          // [batch]
  int64_t batch;
  int depth;
  int k;
  bool per_parent;  // the 4-d candidate layout
  int size;         // nodes per sequence, root included (backbone: 1 + depth * k; topk: budget)
  int words;        // ceil(size / 32)
  TreeMode mode;
};

SPECX_HD int64_t candidate_offset(const BuildTreeParams& p, int64_t b, int d, int parent_slot, int c) {
  if (!p.per_parent) return (b * p.depth + d) * p.k + c;
  return ((b * p.depth + d) * p.k + (d == 0 ? 0 : parent_slot)) * p.k + c;
}

SPECX_HD bool candidate_valid(int64_t token, float log_prob) { return token >= 0 && log_prob > -INFINITY; }

// A candidate's log-probability as it enters the cumulative score (clamped so that a child
// never outranks its parent).
SPECX_HD float score_step(float log_prob) { return log_prob < 0.0f ? log_prob : 0.0f; }

// topk_expand's order: higher score first, then lower (depth or parent rank), then lower slot.
SPECX_HD bool ranks_before(float score_a, int major_a, int minor_a, float score_b, int major_b, int minor_b) {
  if (score_a != score_b) return score_a > score_b;
  if (major_a != major_b) return major_a < major_b;
  return minor_a < minor_b;
}

struct CompactKVParams {
  void* k_cache;                  // [batch, max_len, row_bytes]
  void* v_cache;
  int64_t* lengths;               // [batch], updated in place
  const int64_t* accepted_nodes;  // [batch, path_stride], root first
  const int64_t* accept_len;      // [batch]
  int64_t batch;
  int64_t max_len;
  int64_t row_bytes;              // heads_kv * head_dim * element size
  int64_t path_stride;
};

constexpr int kMaxTreeSizeCuda = 1024;
constexpr int kMaxTopkCandidatesCuda = 8192;
int build_tree_cuda(const BuildTreeParams& params, void* stream);
int compact_kv_cuda(const CompactKVParams& params, void* stream);

}  // namespace specx
