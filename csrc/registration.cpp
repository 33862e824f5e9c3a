// Every specx op schema, in one place, and the CPU / CUDA implementations behind them.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// `import specx._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "specx compiled ops", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef SPECX_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}

TORCH_LIBRARY(specx, m) {
  // Per-row SpecKD: divergence D and gate a of each row, and (if compute_grad) the gradient
  // grad_scale * w * dD/d(student_logits), in grad_dtype (default: the logits' dtype). Kernel
  // level: speckd_loss and the fused-linear loss build on it.
  m.def(
      "speckd_rows(Tensor student_logits, Tensor teacher_logits, Tensor? labels, int ignore_index, "
      "str divergence, str gate, int k, float reject_weight, float temperature, float mix, int seed, "
      "int row_offset, Tensor? grad_scale, bool compute_grad, ScalarType? grad_dtype=None) -> "
      "(Tensor row_divergence, Tensor row_accepted, Tensor grad)");
  // The reduced SpecKD loss, with the per-row statistics and the gradient the backward uses.
  m.def(
      "speckd_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, int ignore_index, "
      "str divergence, str gate, int k, float reject_weight, float temperature, float mix, str reduction, "
      "int seed, bool compute_grad) -> (Tensor loss, Tensor row_divergence, Tensor row_accepted, Tensor grad)");
  // grad *= scale, per row or as a whole; skips the pass when a single scale equals 1.
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");

  // ---- decoding: draft trees, verification, KV compaction (docs: specx.decode) ----
  m.def(
      "build_tree(Tensor candidate_tokens, Tensor candidate_log_probs, Tensor root_tokens, str mode, int budget) -> "
      "(Tensor tokens, Tensor parents, Tensor depths, Tensor scores, Tensor mask, Tensor paths, Tensor num_nodes)");
  m.def(
      "verify_greedy(Tensor node_tokens, Tensor parents, Tensor? num_nodes, Tensor target) -> "
      "(Tensor accepted_nodes, Tensor accept_len, Tensor next_token)");
  m.def(
      "verify_sample(Tensor node_tokens, Tensor parents, Tensor? num_nodes, Tensor target_logits, "
      "Tensor? draft_probs, float temperature, float top_p, int seed, int offset) -> "
      "(Tensor accepted_nodes, Tensor accept_len, Tensor next_token)");
  m.def(
      "compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) lengths, Tensor accepted_nodes, "
      "Tensor accept_len) -> ()");
  // ---- end decoding: trees / verification ----
  // ---- tree attention ----
  // Attention of T tree nodes per sequence over a KV cache prefix plus their ancestors (bit-packed
  // tree_mask [batch, T, ceil(T/32)] int32; None: causal). num_splits 0 picks the KV-length split.
  m.def(
      "tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor? tree_mask=None, "
      "float? scale=None, int num_splits=0) -> (Tensor out, Tensor lse)");

  // ---- DeepKD ----
  // Per row of [..., C] logits: the k-th largest value and the count of entries strictly above it
  // (radix select, no sort). Tie rule in csrc/include/specx/topk_threshold.h.
  m.def("topk_threshold(Tensor logits, int k) -> (Tensor threshold, Tensor count_greater)");
  // CE, TCKD and top-k-masked NCKD (each a mean over non-ignored rows) and, if compute_grad, the
  // gradient of each wrt student_logits, from one fused pass. k=None keeps every non-target class.
  m.def(
      "deepkd_losses(Tensor student_logits, Tensor teacher_logits, Tensor target, int? k, float temperature, "
      "int ignore_index, bool compute_grad) -> (Tensor ce, Tensor tckd, Tensor nckd, Tensor grad_ce, "
      "Tensor grad_tckd, Tensor grad_nckd)");
  // The DeepKD optimizer's update of every param (three momentum buffers each), in place.
  m.def(
      "deepkd_sgd_step_(Tensor(a!)[] params, Tensor?[] grads_task, Tensor?[] grads_tckd, Tensor?[] grads_nckd, "
      "Tensor(b!)[] task_buffers, Tensor(c!)[] tckd_buffers, Tensor(d!)[] nckd_buffers, float lr, float momentum, "
      "float delta, float weight_decay) -> ()");
}

// Every op's C++ function serves both devices (it dispatches on the tensors' device inside).
static void register_impls(torch::Library& m) {
  m.impl("speckd_rows", &specx::speckd_rows);
  m.impl("speckd_loss", &specx::speckd_loss);
  m.impl("scale_grad_", &specx::scale_grad_);
  m.impl("build_tree", &specx::build_tree);
  m.impl("verify_greedy", &specx::verify_greedy);
  m.impl("verify_sample", &specx::verify_sample);
  m.impl("compact_kv", &specx::compact_kv);
  m.impl("tree_attention", &specx::tree_attention);
  m.impl("topk_threshold", &specx::topk_threshold);
  m.impl("deepkd_losses", &specx::deepkd_losses);
  m.impl("deepkd_sgd_step_", &specx::deepkd_sgd_step_);
}

TORCH_LIBRARY_IMPL(specx, CPU, m) { register_impls(m); }

#ifdef SPECX_WITH_CUDA
TORCH_LIBRARY_IMPL(specx, CUDA, m) { register_impls(m); }
#endif
