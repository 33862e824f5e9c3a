// Greedy and sampling verification of draft trees: argument checks, CPU kernels, hand-off to CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "ops.h"
#include "specx/speckd_gate.h"
#include "specx/tree.h"
#include "specx/verify.h"


namespace specx {
namespace {

constexpr int64_t kMaxSampleVocab = int64_t{1} << 22;

DType logits_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, op, ": target logits must be float32, float16 or bfloat16; got ", t);
  }
}

struct TreeArgs {
  at::Tensor node_tokens, parents, num_nodes;
  int64_t batch = 0, size = 0;
};

TreeArgs check_tree(const char* op, const at::Tensor& node_tokens, const at::Tensor& parents,
                    const std::optional<at::Tensor>& num_nodes) {
  TreeArgs a;
  TORCH_CHECK_VALUE(node_tokens.dim() == 2 && node_tokens.scalar_type() == at::kLong,
                    op, ": node_tokens must be int64 [batch, tree_size]; got ", node_tokens.scalar_type(), " ",
                    node_tokens.sizes());
  a.batch = node_tokens.size(0);
  a.size = node_tokens.size(1);
  TORCH_CHECK_VALUE(a.size >= 1, op, ": node_tokens needs at least the root node (tree_size >= 1)");
  TORCH_CHECK_VALUE(a.size <= (int64_t{1} << 20), op, ": tree_size must be <= 2^20; got ", a.size);
#ifdef SPECX_WITH_CUDA
  TORCH_CHECK_VALUE(!node_tokens.is_cuda() || a.size <= kMaxTreeSizeCuda, op, ": tree_size must be <= ",
                    kMaxTreeSizeCuda, " on CUDA; got ", a.size);
#endif
  TORCH_CHECK_VALUE(parents.sizes() == node_tokens.sizes() && parents.scalar_type() == at::kLong, op,
                    ": parents must be int64 with the shape of node_tokens ", node_tokens.sizes(), "; got ",
                    parents.scalar_type(), " ", parents.sizes());
  TORCH_CHECK_VALUE(parents.device() == node_tokens.device(), op, ": parents must be on ", node_tokens.device());
  a.node_tokens = node_tokens.contiguous();
  a.parents = parents.contiguous();
  if (num_nodes.has_value()) {
    TORCH_CHECK_VALUE(num_nodes->dim() == 1 && num_nodes->size(0) == a.batch && num_nodes->scalar_type() == at::kLong,
                      op, ": num_nodes must be int64 [batch] with batch = ", a.batch, " (node_tokens); got ",
                      num_nodes->scalar_type(), " ", num_nodes->sizes());
    TORCH_CHECK_VALUE(num_nodes->device() == node_tokens.device(), op, ": num_nodes must be on ",
                      node_tokens.device());
    a.num_nodes = num_nodes->contiguous();
  }
  if (node_tokens.is_cpu()) {
    // Values are checked here on the CPU; on CUDA the Python wrapper checks them (a device
    // sync), and the kernels treat a bad parent as a detached node.
    const int64_t* par = a.parents.data_ptr<int64_t>();
    const int64_t* nn = a.num_nodes.defined() ? a.num_nodes.data_ptr<int64_t>() : nullptr;
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t n = tree_nodes(nn, b, a.size);
      TORCH_CHECK_VALUE(n >= 1 && n <= a.size, op, ": num_nodes[", b, "] = ", n, " must be in [1, ", a.size, "]");
      for (int64_t i = 1; i < n; ++i) {
        const int64_t pi = par[b * a.size + i];
        TORCH_CHECK_VALUE(pi >= 0 && pi < i, op, ": parents[", b, ", ", i, "] = ", pi,
                          " must be in [0, ", i, ") (a parent comes before its child)");
      }
    }
  }
  return a;
}

struct VerifyOutputs {
  at::Tensor accepted_nodes, accept_len, next_token;
};

VerifyOutputs make_outputs(const TreeArgs& a, VerifyParams& p) {
  const auto lopts = a.node_tokens.options();
  VerifyOutputs o{at::empty({a.batch, a.size}, lopts), at::empty({a.batch}, lopts), at::empty({a.batch}, lopts)};
  p.node_tokens = a.node_tokens.data_ptr<int64_t>();
  p.parents = a.parents.data_ptr<int64_t>();
  p.num_nodes = a.num_nodes.defined() ? a.num_nodes.data_ptr<int64_t>() : nullptr;  // undefined: all nodes
  p.accepted_nodes = o.accepted_nodes.data_ptr<int64_t>();
  p.accept_len = o.accept_len.data_ptr<int64_t>();
  p.next_token = o.next_token.data_ptr<int64_t>();
  p.batch = a.batch;
  p.size = static_cast<int>(a.size);
  return o;
}

template <typename T>
int64_t row_argmax(const T* row, int64_t vocab) {
  int64_t best = 0;
  float best_v = static_cast<float>(row[0]);
  for (int64_t v = 1; v < vocab; ++v) {
    const float x = static_cast<float>(row[v]);
    if (x > best_v) {
      best_v = x;
      best = v;
    }
  }
  return best;
}

void write_path(const VerifyParams& p, int64_t b, int best, int accepted_depth, int64_t next) {
  int64_t* out = p.accepted_nodes + b * p.size;
  std::fill(out, out + p.size, -1);
  for (int j = best, d = accepted_depth; j >= 0 && d >= 0; --d) {
    out[d] = j;
    j = j == 0 ? -1 : static_cast<int>(p.parents[b * p.size + j]);
  }
  p.accept_len[b] = accepted_depth;
  p.next_token[b] = next;
}

void verify_greedy_row(const VerifyParams& p, int64_t b, const std::function<int64_t(int64_t, int)>& argmax_at) {
  const int n = static_cast<int>(tree_nodes(p.num_nodes, b, p.size));
  std::vector<int64_t> am(n);
  for (int i = 0; i < n; ++i) am[i] = argmax_at(b, i);
  std::vector<char> ok(n, 0);
  std::vector<int> depth(n, 0);
  ok[0] = 1;
  int best = 0;
  for (int i = 1; i < n; ++i) {
    const int par = static_cast<int>(p.parents[b * p.size + i]);
    ok[i] = ok[par] && p.node_tokens[b * p.size + i] == am[par];
    depth[i] = depth[par] + 1;
    if (ok[i] && depth[i] > depth[best]) best = i;
  }
  write_path(p, b, best, depth[best], am[best]);
}

// ---- sampling ----

template <typename T>
struct SampleRow {
  const VerifyParams& p;
  std::vector<uint64_t> w;

  // Fixed-point target weights of node `node`'s row after temperature and top-p.
  uint64_t load(int64_t b, int node) {
    const T* row = static_cast<const T*>(p.logits) + (b * p.size + node) * p.vocab;
    float vmax = -INFINITY;
    for (int64_t v = 0; v < p.vocab; ++v) vmax = std::max(vmax, static_cast<float>(row[v]));
    w.resize(p.vocab);
    uint64_t total = 0;
    for (int64_t v = 0; v < p.vocab; ++v) total += w[v] = det_weight(static_cast<float>(row[v]), vmax, p.inv_temperature);
    if (p.top_p < 1.0) {
      std::vector<uint64_t> sorted(w);
      std::sort(sorted.begin(), sorted.end(), std::greater<uint64_t>());
      const uint64_t need = top_p_need(p.top_p, total);
      uint64_t cum = 0, tau = sorted.back();
      for (uint64_t s : sorted) {
        cum += s;
        if (cum >= need) {
          tau = s;
          break;
        }
      }
      total = 0;
      for (uint64_t& x : w) total += x = x >= tau ? x : 0;
    }
    return total;
  }
};

template <typename Weight>
int64_t sample_from(const Weight& weight, int64_t vocab, uint64_t total, double pick) {
  const uint64_t target = sample_target(pick, total);
  uint64_t acc = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    acc += weight(v);
    if (acc > target) return v;
  }
  return vocab - 1;
}

template <typename T>
void verify_sample_row(const VerifyParams& p, int64_t b) {
  const int n = static_cast<int>(tree_nodes(p.num_nodes, b, p.size));
  const int64_t* par = p.parents + b * p.size;
  const int64_t* tok = p.node_tokens + b * p.size;
  const uint32_t seq = static_cast<uint32_t>(b);
  SampleRow<T> row{p, {}};
  int cur = 0, depth = 0, next_child = 1;
  std::vector<int> path{0};
  int64_t next = 0;
  while (true) {
    const uint64_t total = row.load(b, cur);
    std::vector<int> children;
    for (int i = next_child; i < n; ++i)
      if (par[i] == cur) children.push_back(i);
    const double final_pick = tree_verify_draw(p.seed, seq, p.offset, depth, kFinalTrial).pick;
    if (children.empty()) {
      next = sample_from([&](int64_t v) { return row.w[v]; }, p.vocab, total, final_pick);
      break;
    }
    int accepted = -1;
    if (p.draft_probs == nullptr) {
      uint64_t left = total;
      for (size_t j = 0; j < children.size() && accepted < 0; ++j) {
        const int64_t x = tok[children[j]];
        const uint64_t px = x >= 0 && x < p.vocab ? row.w[x] : 0;  // 0 once removed
        const double coin = tree_verify_draw(p.seed, seq, p.offset, depth, static_cast<uint32_t>(j)).coin;
        if (accept_deterministic(coin, px, left)) {
          accepted = children[j];
        } else if (px > 0) {
          row.w[x] = 0;
          left -= px;
        }
      }
      if (accepted < 0) {
        // Nothing left only when rejected tokens covered all the mass: sample from p itself.
        if (left == 0) left = row.load(b, cur);
        next = sample_from([&](int64_t v) { return row.w[v]; }, p.vocab, left, final_pick);
      }
    } else {
      const float* q = p.draft_probs + (b * p.size + cur) * p.vocab;
      const double dtotal = static_cast<double>(total);
      auto residual = [&](double coef) {
        uint64_t s = 0;
        for (int64_t v = 0; v < p.vocab; ++v) s += residual_fixed(row.w[v], dtotal, coef, q[v]);
        return s;
      };
      double coef = 0.0;
      for (size_t j = 0; j < children.size() && accepted < 0; ++j) {
        const uint64_t s = residual(coef);
        const int64_t x = tok[children[j]];
        const double coin = tree_verify_draw(p.seed, seq, p.offset, depth, static_cast<uint32_t>(j)).coin;
        if (x >= 0 && x < p.vocab && accept_with_draft(coin, residual_fixed(row.w[x], dtotal, coef, q[x]), s, q[x])) {
          accepted = children[j];
        } else {
          coef = coef + static_cast<double>(s) / kFixed52;
        }
      }
      if (accepted < 0) {
        const uint64_t s = residual(coef);
        if (s > 0) {
          next = sample_from([&](int64_t v) { return residual_fixed(row.w[v], dtotal, coef, q[v]); }, p.vocab, s,
                             final_pick);
        } else {
          next = sample_from([&](int64_t v) { return row.w[v]; }, p.vocab, total, final_pick);
        }
      }
    }
    if (accepted < 0) break;
    path.push_back(accepted);
    cur = accepted;
    next_child = accepted + 1;  // descendants come after their ancestors
    ++depth;
  }
  int64_t* out = p.accepted_nodes + b * p.size;
  std::fill(out, out + p.size, -1);
  std::copy(path.begin(), path.end(), out);
  p.accept_len[b] = static_cast<int64_t>(path.size()) - 1;
  p.next_token[b] = next;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy(const at::Tensor& node_tokens, const at::Tensor& parents,
                                                             const std::optional<at::Tensor>& num_nodes,
                                                             const at::Tensor& target) {
  TreeArgs a = check_tree("verify_greedy", node_tokens, parents, num_nodes);
  TORCH_CHECK_VALUE(target.device() == node_tokens.device(), "verify_greedy: target must be on ",
                    node_tokens.device(), "; got ", target.device());
  const bool given_argmax = !at::isFloatingType(target.scalar_type());
  at::Tensor tgt;
  VerifyParams p{};
  if (given_argmax) {
    TORCH_CHECK_VALUE(target.scalar_type() == at::kLong && target.sizes() == node_tokens.sizes(),
                      "verify_greedy: target must be logits [batch, tree_size, vocab] or int64 argmax "
                      "[batch, tree_size] matching node_tokens ", node_tokens.sizes(), "; got ",
                      target.scalar_type(), " ", target.sizes());
    tgt = target.contiguous();
    p.argmax = tgt.data_ptr<int64_t>();
  } else {
    TORCH_CHECK_VALUE(target.dim() == 3 && target.size(0) == a.batch && target.size(1) == a.size &&
                          target.size(2) >= 1,
                      "verify_greedy: target logits must be [batch, tree_size, vocab] with batch, tree_size = ",
                      a.batch, ", ", a.size, " (node_tokens) and vocab >= 1; got ", target.sizes());
    tgt = target.contiguous();
    p.logits = tgt.data_ptr();
    p.vocab = tgt.size(2);
    p.dtype = logits_dtype(tgt.scalar_type(), "verify_greedy");
  }
  VerifyOutputs o = make_outputs(a, p);
  if (a.batch == 0) return {o.accepted_nodes, o.accept_len, o.next_token};
  if (node_tokens.is_cuda()) {
    launch_on_cuda(node_tokens.device(), "verify_greedy", [&](void* stream) { return verify_greedy_cuda(p, stream); });
  } else {
    std::function<int64_t(int64_t, int)> argmax_at;
    if (given_argmax) {
      argmax_at = [&](int64_t b, int i) { return p.argmax[b * p.size + i]; };
    } else {
      argmax_at = [&](int64_t b, int i) -> int64_t {
        const int64_t off = (b * p.size + i) * p.vocab;
        switch (p.dtype) {
          case DType::kFloat32: return row_argmax(static_cast<const float*>(p.logits) + off, p.vocab);
          case DType::kFloat16: return row_argmax(static_cast<const c10::Half*>(p.logits) + off, p.vocab);
          default: return row_argmax(static_cast<const c10::BFloat16*>(p.logits) + off, p.vocab);
        }
      };
    }
    at::parallel_for(0, a.batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) verify_greedy_row(p, b, argmax_at);
    });
  }
  return {o.accepted_nodes, o.accept_len, o.next_token};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sample(
    const at::Tensor& node_tokens, const at::Tensor& parents, const std::optional<at::Tensor>& num_nodes,
    const at::Tensor& target_logits, const std::optional<at::Tensor>& draft_probs, double temperature, double top_p,
    int64_t seed, int64_t offset) {
  TreeArgs a = check_tree("verify_sample", node_tokens, parents, num_nodes);
  TORCH_CHECK_VALUE(target_logits.dim() == 3 && target_logits.size(0) == a.batch && target_logits.size(1) == a.size &&
                        target_logits.size(2) >= 1,
                    "verify_sample: target_logits must be [batch, tree_size, vocab] with batch, tree_size = ",
                    a.batch, ", ", a.size, " (node_tokens) and vocab >= 1; got ", target_logits.sizes());
  TORCH_CHECK_VALUE(target_logits.device() == node_tokens.device(), "verify_sample: target_logits must be on ",
                    node_tokens.device(), "; got ", target_logits.device());
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "verify_sample: temperature must be > 0; got ",
                    temperature);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "verify_sample: top_p must be in (0, 1]; got ", top_p);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= 0xFFFFFFFFll, "verify_sample: offset must be in [0, 2^32); got ",
                    offset);
  TORCH_CHECK_VALUE(target_logits.size(2) <= kMaxSampleVocab, "verify_sample: the vocabulary size must be <= ",
                    kMaxSampleVocab, " (fixed-point sums stay in 64 bits); got ", target_logits.size(2));
  VerifyParams p{};
  const at::Tensor logits = target_logits.contiguous();
  p.logits = logits.data_ptr();
  p.vocab = logits.size(2);
  p.dtype = logits_dtype(logits.scalar_type(), "verify_sample");
  at::Tensor q;
  if (draft_probs.has_value()) {
    TORCH_CHECK_VALUE(draft_probs->sizes() == target_logits.sizes(),
                      "verify_sample: draft_probs must have the shape of target_logits ", target_logits.sizes(),
                      "; got ", draft_probs->sizes());
    TORCH_CHECK_VALUE(draft_probs->device() == node_tokens.device(), "verify_sample: draft_probs must be on ",
                      node_tokens.device());
    TORCH_CHECK_VALUE(at::isFloatingType(draft_probs->scalar_type()), "verify_sample: draft_probs must be floating "
                      "point; got ", draft_probs->scalar_type());
    q = draft_probs->to(at::kFloat).contiguous();
    p.draft_probs = q.data_ptr<float>();
  }
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.top_p = top_p;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint32_t>(offset);
  VerifyOutputs o = make_outputs(a, p);
  if (a.batch == 0) return {o.accepted_nodes, o.accept_len, o.next_token};
  if (node_tokens.is_cuda()) {
    launch_on_cuda(node_tokens.device(), "verify_sample", [&](void* stream) { return verify_sample_cuda(p, stream); });
  } else {
    at::parallel_for(0, a.batch, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        switch (p.dtype) {
          case DType::kFloat32: verify_sample_row<float>(p, b); break;
          case DType::kFloat16: verify_sample_row<c10::Half>(p, b); break;
          case DType::kBFloat16: verify_sample_row<c10::BFloat16>(p, b); break;
        }
      }
    });
  }
  return {o.accepted_nodes, o.accept_len, o.next_token};
}

}  // namespace specx
