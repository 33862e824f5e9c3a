// Draft-tree construction and KV compaction: argument checks, CPU kernels, hand-off to CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "ops.h"
#include "specx/tree.h"


namespace specx {
namespace {

struct Node {
  int64_t token;
  int parent;
  float score;
};

// Candidate kept at one depth of topk_expand.
struct Kept {
  float score;
  int parent_rank;  // rank in the previous depth's list
  int slot;
  int64_t token;
};

void build_nodes_backbone(const BuildTreeParams& p, int64_t b, std::vector<Node>& nodes) {
  int spine = 0;
  for (int d = 0; d < p.depth; ++d) {
    int next_spine = -1;
    for (int c = 0; c < p.k; ++c) {
      const int64_t off = candidate_offset(p, b, d, 0, c);
      const int64_t t = p.cand_tokens[off];
      const float lp = p.cand_log_probs[off];
      if (!candidate_valid(t, lp)) continue;
      if (c == 0) next_spine = static_cast<int>(nodes.size());
      nodes.push_back({t, spine, nodes[spine].score + score_step(lp)});
    }
    if (next_spine < 0) break;
    spine = next_spine;
  }
}

void build_nodes_topk(const BuildTreeParams& p, int64_t b, std::vector<Node>& nodes) {
  const int keep = p.size - 1;
  std::vector<std::vector<Kept>> levels;
  std::vector<Kept> prev{{0.0f, 0, 0, 0}};
  for (int d = 0; d < p.depth && !prev.empty() && keep > 0; ++d) {
    std::vector<Kept> cands;
    for (int pi = 0; pi < static_cast<int>(prev.size()); ++pi) {
      for (int c = 0; c < p.k; ++c) {
        const int64_t off = candidate_offset(p, b, d, prev[pi].slot, c);
        const int64_t t = p.cand_tokens[off];
        const float lp = p.cand_log_probs[off];
        if (candidate_valid(t, lp)) cands.push_back({prev[pi].score + score_step(lp), pi, c, t});
      }
    }
    std::sort(cands.begin(), cands.end(), [](const Kept& a, const Kept& o) {
      return ranks_before(a.score, a.parent_rank, a.slot, o.score, o.parent_rank, o.slot);
    });
    if (static_cast<int>(cands.size()) > keep) cands.resize(keep);
    levels.push_back(cands);
    prev = cands;
  }
  struct Ref {
    float score;
    int depth, rank;
  };
  std::vector<Ref> all;
  for (int d = 0; d < static_cast<int>(levels.size()); ++d)
    for (int r = 0; r < static_cast<int>(levels[d].size()); ++r) all.push_back({levels[d][r].score, d, r});
  std::sort(all.begin(), all.end(),
            [](const Ref& a, const Ref& o) { return ranks_before(a.score, a.depth, a.rank, o.score, o.depth, o.rank); });
  if (static_cast<int>(all.size()) > keep) all.resize(keep);
  std::sort(all.begin(), all.end(), [](const Ref& a, const Ref& o) {
    return a.depth != o.depth ? a.depth < o.depth : a.rank < o.rank;
  });
  // Node index of each kept (depth, rank); the parent is always chosen before its child.
  std::vector<std::vector<int>> index(levels.size());
  for (size_t d = 0; d < levels.size(); ++d) index[d].assign(levels[d].size(), -1);
  for (const Ref& r : all) {
    const Kept& kept = levels[r.depth][r.rank];
    const int parent = r.depth == 0 ? 0 : index[r.depth - 1][kept.parent_rank];
    index[r.depth][r.rank] = static_cast<int>(nodes.size());
    nodes.push_back({kept.token, parent, kept.score});
  }
}

void build_tree_row(const BuildTreeParams& p, int64_t b) {
  std::vector<Node> nodes{{p.root_tokens[b], -1, 0.0f}};
  if (p.mode == TreeMode::kBackbone) {
    build_nodes_backbone(p, b, nodes);
  } else {
    build_nodes_topk(p, b, nodes);
  }
  const int n = static_cast<int>(nodes.size());
  const int path_len = p.depth + 1;
  int64_t* tokens = p.tokens + b * p.size;
  int64_t* parents = p.parents + b * p.size;
  int64_t* depths = p.depths + b * p.size;
  float* scores = p.scores + b * p.size;
  int32_t* mask = p.mask + b * p.size * p.words;
  int64_t* paths = p.paths + b * p.size * path_len;
  std::fill(tokens, tokens + p.size, -1);
  std::fill(parents, parents + p.size, -1);
  std::fill(depths, depths + p.size, 0);
  std::fill(scores, scores + p.size, -INFINITY);
  std::fill(mask, mask + int64_t{p.size} * p.words, 0);
  std::fill(paths, paths + int64_t{p.size} * path_len, -1);
  std::vector<char> has_child(n, 0);
  for (int i = 0; i < n; ++i) {
    tokens[i] = nodes[i].token;
    parents[i] = nodes[i].parent;
    scores[i] = nodes[i].score;
    if (i > 0) {
      const int par = nodes[i].parent;
      depths[i] = depths[par] + 1;
      std::memcpy(mask + int64_t{i} * p.words, mask + int64_t{par} * p.words, sizeof(int32_t) * p.words);
      has_child[par] = 1;
    }
    mask[int64_t{i} * p.words + i / 32] |= static_cast<int32_t>(1u << (i % 32));
  }
  int leaf = 0;
  for (int i = 0; i < n; ++i) {
    if (has_child[i]) continue;
    for (int j = i; j >= 0; j = parents[j]) paths[int64_t{leaf} * path_len + depths[j]] = j;
    ++leaf;
  }
  p.num_nodes[b] = n;
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), "; got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree(
    const at::Tensor& candidate_tokens, const at::Tensor& candidate_log_probs, const at::Tensor& root_tokens,
    const std::string& mode, int64_t budget) {
  TORCH_CHECK_VALUE(mode == "backbone" || mode == "topk_expand",
                    "build_tree: mode must be 'backbone' or 'topk_expand'; got '", mode, "'");
  const int64_t dims = candidate_tokens.dim();
  TORCH_CHECK_VALUE(dims == 3 || dims == 4, "build_tree: candidate_tokens must be [batch, depth, k] or "
                    "[batch, depth, k, k]; got ", candidate_tokens.sizes());
  TORCH_CHECK_VALUE(candidate_tokens.scalar_type() == at::kLong, "build_tree: candidate_tokens must be int64; got ",
                    candidate_tokens.scalar_type());
  TORCH_CHECK_VALUE(dims == 3 || candidate_tokens.size(2) == candidate_tokens.size(3),
                    "build_tree: 4-d candidate_tokens must be [batch, depth, k, k]; got ", candidate_tokens.sizes());
  TORCH_CHECK_VALUE(candidate_log_probs.sizes() == candidate_tokens.sizes(),
                    "build_tree: candidate_log_probs must have the shape of candidate_tokens ",
                    candidate_tokens.sizes(), "; got ", candidate_log_probs.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(candidate_log_probs.scalar_type()),
                    "build_tree: candidate_log_probs must be floating point; got ", candidate_log_probs.scalar_type());
  const int64_t batch = candidate_tokens.size(0), depth = candidate_tokens.size(1), k = candidate_tokens.size(-1);
  TORCH_CHECK_VALUE(root_tokens.dim() == 1 && root_tokens.size(0) == batch && root_tokens.scalar_type() == at::kLong,
                    "build_tree: root_tokens must be int64 [batch] with batch = ", batch, " (candidate_tokens); got ",
                    root_tokens.scalar_type(), " ", root_tokens.sizes());
  check_same_device(candidate_log_probs, candidate_tokens, "build_tree", "candidate_log_probs");
  check_same_device(root_tokens, candidate_tokens, "build_tree", "root_tokens");
  int64_t size = 0;
  if (mode == "backbone") {
    size = 1 + depth * k;
  } else {
    TORCH_CHECK_VALUE(budget >= 1, "build_tree: budget must be >= 1 for topk_expand; got ", budget);
    size = budget;
  }
  const bool cuda = candidate_tokens.is_cuda();
#ifdef SPECX_WITH_CUDA
  if (cuda) {
    TORCH_CHECK_VALUE(size <= kMaxTreeSizeCuda, "build_tree: the tree size (", size, ") must be <= ",
                      kMaxTreeSizeCuda, " on CUDA");
    TORCH_CHECK_VALUE(mode == "backbone" || (size - 1) * k <= kMaxTopkCandidatesCuda, "build_tree: budget * k (",
                      (size - 1) * k, ") must be <= ", kMaxTopkCandidatesCuda, " for topk_expand on CUDA");
  }
#endif
  TORCH_CHECK_VALUE(size <= (int64_t{1} << 20), "build_tree: the tree size must be <= 2^20; got ", size);
  const int64_t words = (size + 31) / 32;
  const at::Tensor tok = candidate_tokens.contiguous();
  const at::Tensor lp = (candidate_log_probs.scalar_type() == at::kFloat ? candidate_log_probs
                                                                         : candidate_log_probs.to(at::kFloat))
                            .contiguous();
  const at::Tensor root = root_tokens.contiguous();
  const auto lopts = candidate_tokens.options();
  at::Tensor tokens = at::empty({batch, size}, lopts);
  at::Tensor parents = at::empty({batch, size}, lopts);
  at::Tensor depths = at::empty({batch, size}, lopts);
  at::Tensor scores = at::empty({batch, size}, lopts.dtype(at::kFloat));
  at::Tensor mask = at::empty({batch, size, words}, lopts.dtype(at::kInt));
  at::Tensor paths = at::empty({batch, size, depth + 1}, lopts);
  at::Tensor num_nodes = at::empty({batch}, lopts);

  BuildTreeParams p{};
  p.cand_tokens = tok.data_ptr<int64_t>();
  p.cand_log_probs = lp.data_ptr<float>();
  p.root_tokens = root.data_ptr<int64_t>();
  p.tokens = tokens.data_ptr<int64_t>();
  p.parents = parents.data_ptr<int64_t>();
  p.depths = depths.data_ptr<int64_t>();
  p.scores = scores.data_ptr<float>();
  p.mask = mask.data_ptr<int32_t>();
  p.paths = paths.data_ptr<int64_t>();
  p.num_nodes = num_nodes.data_ptr<int64_t>();
  p.batch = batch;
  p.depth = static_cast<int>(depth);
  p.k = static_cast<int>(k);
  p.per_parent = dims == 4;
  p.size = static_cast<int>(size);
  p.words = static_cast<int>(words);
  p.mode = mode == "backbone" ? TreeMode::kBackbone : TreeMode::kTopkExpand;
  if (batch > 0) {
    if (cuda) {
      launch_on_cuda(candidate_tokens.device(), "build_tree", [&](void* stream) { return build_tree_cuda(p, stream); });
    } else {
      at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) build_tree_row(p, b);
      });
    }
  }
  return {tokens, parents, depths, scores, mask, paths, num_nodes};
}

void compact_kv(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& lengths, const at::Tensor& accepted_nodes,
                const at::Tensor& accept_len) {
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "compact_kv: k_cache must be [batch, max_len, heads_kv, head_dim]; got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
                    "compact_kv: v_cache must match k_cache ", k_cache.sizes(), " ", k_cache.scalar_type(), "; got ",
                    v_cache.sizes(), " ", v_cache.scalar_type());
  TORCH_CHECK_VALUE(k_cache.is_contiguous() && v_cache.is_contiguous(),
                    "compact_kv: k_cache and v_cache must be contiguous (they are updated in place)");
  const int64_t batch = k_cache.size(0), max_len = k_cache.size(1);
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == batch && lengths.scalar_type() == at::kLong &&
                        lengths.is_contiguous(),
                    "compact_kv: lengths must be a contiguous int64 [batch] tensor with batch = ", batch,
                    " (k_cache); got ", lengths.scalar_type(), " ", lengths.sizes());
  TORCH_CHECK_VALUE(accepted_nodes.dim() == 2 && accepted_nodes.size(0) == batch &&
                        accepted_nodes.scalar_type() == at::kLong && accepted_nodes.size(1) >= 1,
                    "compact_kv: accepted_nodes must be int64 [batch, n] with batch = ", batch, " (k_cache); got ",
                    accepted_nodes.scalar_type(), " ", accepted_nodes.sizes());
  TORCH_CHECK_VALUE(accept_len.dim() == 1 && accept_len.size(0) == batch && accept_len.scalar_type() == at::kLong,
                    "compact_kv: accept_len must be int64 [batch] with batch = ", batch, " (k_cache); got ",
                    accept_len.scalar_type(), " ", accept_len.sizes());
  for (const auto* t : {&v_cache, &lengths}) check_same_device(*t, k_cache, "compact_kv", "v_cache / lengths");
  check_same_device(accepted_nodes, k_cache, "compact_kv", "accepted_nodes");
  check_same_device(accept_len, k_cache, "compact_kv", "accept_len");
  if (batch == 0) return;
  const at::Tensor nodes = accepted_nodes.contiguous();
  const at::Tensor alen = accept_len.contiguous();
  CompactKVParams p{};
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.lengths = lengths.data_ptr<int64_t>();
  p.accepted_nodes = nodes.data_ptr<int64_t>();
  p.accept_len = alen.data_ptr<int64_t>();
  p.batch = batch;
  p.max_len = max_len;
  p.row_bytes = k_cache.numel() == 0 ? 0 : k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  p.path_stride = nodes.size(1);
  if (k_cache.is_cuda()) {
    launch_on_cuda(k_cache.device(), "compact_kv", [&](void* stream) { return compact_kv_cuda(p, stream); });
    return;
  }
  // Check everything before moving anything, so a bad sequence leaves the caches untouched.
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = p.accept_len[b] + 1, base = p.lengths[b];
    TORCH_CHECK_VALUE(n >= 1 && n <= p.path_stride, "compact_kv: accept_len[", b, "] = ", n - 1,
                      " must be in [0, ", p.path_stride - 1, "]");
    int64_t prev = -1;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t node = p.accepted_nodes[b * p.path_stride + i];
      TORCH_CHECK_VALUE(node > prev && node >= i && base >= 0 && base + node < max_len, "compact_kv: accepted_nodes[",
                        b, ", ", i, "] = ", node, " must increase along the path and stay inside the cache (length ",
                        base, ", max_len ", max_len, ")");
      prev = node;
    }
  }
  at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t n = p.accept_len[b] + 1, base = p.lengths[b];
      for (void* cache : {p.k_cache, p.v_cache}) {
        char* seq = static_cast<char*>(cache) + b * max_len * p.row_bytes;
        // Path nodes only move down (node >= i), so ascending order never overwrites a source.
        for (int64_t i = 1; i < n; ++i) {
          const int64_t node = p.accepted_nodes[b * p.path_stride + i];
          if (node != i) std::memcpy(seq + (base + i) * p.row_bytes, seq + (base + node) * p.row_bytes, p.row_bytes);
        }
      }
      p.lengths[b] = base + n;
    }
  });
}

}  // namespace specx
