// Declarations of the specx ops' C++ implementations (registered in registration.cpp).
#pragma once
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace specx {

std::tuple<at::Tensor, at::Tensor, at::Tensor> speckd_rows(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, const std::string& divergence, const std::string& gate, int64_t k, double reject_weight,
    double temperature, double mix, int64_t seed, int64_t row_offset, const std::optional<at::Tensor>& grad_scale,
    bool compute_grad, std::optional<at::ScalarType> grad_dtype);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> speckd_loss(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, const std::string& divergence, const std::string& gate, int64_t k, double reject_weight,
    double temperature, double mix, const std::string& reduction, int64_t seed, bool compute_grad);

void scale_grad_(at::Tensor& grad, const at::Tensor& scale);

// ---- decoding: draft trees, verification, KV compaction (tree.cpp, verify.cpp) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_tree(
    const at::Tensor& candidate_tokens, const at::Tensor& candidate_log_probs, const at::Tensor& root_tokens,
    const std::string& mode, int64_t budget);

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_greedy(const at::Tensor& node_tokens, const at::Tensor& parents,
                                                             const std::optional<at::Tensor>& num_nodes,
                                                             const at::Tensor& target);

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_sample(
    const at::Tensor& node_tokens, const at::Tensor& parents, const std::optional<at::Tensor>& num_nodes,
    const at::Tensor& target_logits, const std::optional<at::Tensor>& draft_probs, double temperature, double top_p,
    int64_t seed, int64_t offset);

void compact_kv(at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor& lengths, const at::Tensor& accepted_nodes,
                const at::Tensor& accept_len);
// ---- tree attention ----
std::tuple<at::Tensor, at::Tensor> tree_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                                  const std::optional<at::Tensor>& tree_mask,
                                                  std::optional<double> scale, int64_t num_splits);

// ---- DeepKD ----

// Per row of [..., C] logits: the k-th largest value (logits dtype) and the count of entries
// strictly greater (int64). Ties: see csrc/include/specx/topk_threshold.h.
std::tuple<at::Tensor, at::Tensor> topk_threshold(const at::Tensor& logits, int64_t k);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deepkd_losses(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& target,
    std::optional<int64_t> k, double temperature, int64_t ignore_index, bool compute_grad);

void deepkd_sgd_step_(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads_task,
                      const c10::List<std::optional<at::Tensor>>& grads_tckd,
                      const c10::List<std::optional<at::Tensor>>& grads_nckd, at::TensorList task_buffers,
                      at::TensorList tckd_buffers, at::TensorList nckd_buffers, double lr, double momentum,
                      double delta, double weight_decay);

}  // namespace specx
