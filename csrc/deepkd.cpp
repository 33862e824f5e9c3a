// DeepKD losses: argument checks, the CPU row kernel (double precision, the same mask as the CUDA
// kernel bit for bit), and the hand-off to the fused CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "ops.h"
#include "specx/topk_threshold.h"
#include "topk_host.h"


namespace specx {
namespace {

double log_add_exp(double x, double y) {
  const double hi = std::max(x, y), lo = std::min(x, y);
  if (lo == -INFINITY) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// log sum_{j in set} exp(v_j), -inf for an empty set.
template <typename InSet>
double log_sum_exp(const std::vector<double>& v, InSet&& in_set) {
  double m = -INFINITY;
  for (size_t j = 0; j < v.size(); ++j)
    if (in_set(j)) m = std::max(m, v[j]);
  if (m == -INFINITY) return -INFINITY;
  double sum = 0;
  for (size_t j = 0; j < v.size(); ++j)
    if (in_set(j)) sum += std::exp(v[j] - m);
  return m + std::log(sum);
}

template <typename T>
void deepkd_row_cpu(const DeepKDParams& p, int64_t row, std::vector<uint32_t>& keys, std::vector<uint32_t>& scratch,
                    std::vector<double>& s, std::vector<double>& a, std::vector<double>& b) {
  const int64_t C = p.classes;
  const T* s_row = static_cast<const T*>(p.student) + row * C;
  const T* t_row = static_cast<const T*>(p.teacher) + row * C;
  T* grads[3] = {nullptr, nullptr, nullptr};
  if (p.grad_ce) {
    grads[0] = static_cast<T*>(p.grad_ce) + row * C;
    grads[1] = static_cast<T*>(p.grad_tckd) + row * C;
    grads[2] = static_cast<T*>(p.grad_nckd) + row * C;
  }
  float* losses = p.row_losses + 3 * row;
  const int64_t y = p.target[row];
  if (y == p.ignore_index) {
    for (T* g : grads)
      if (g) std::fill(g, g + C, T(0.0f));
    std::fill(losses, losses + 3, 0.0f);
    return;
  }
  const double inv_t = 1.0 / p.temperature, temp = p.temperature;
  for (int64_t j = 0; j < C; ++j) {
    s[j] = static_cast<float>(s_row[j]);
    a[j] = s[j] * inv_t;
    b[j] = static_cast<float>(t_row[j]) * inv_t;
  }
  uint32_t thr_key = 0;
  int64_t tie_last = C - 1;
  if (p.k < C) {
    for (int64_t j = 0; j < C; ++j) keys[j] = host_key(t_row[j]);
    const TopKSelection sel = select_topk_host(keys.data(), C, p.k, scratch);
    thr_key = sel.key;
    tie_last = sel.tie_last;
  }
  auto non_target = [&](size_t j) { return static_cast<int64_t>(j) != y; };
  auto kept = [&](size_t j) {
    return static_cast<int64_t>(j) != y &&
           (p.k >= C || topk_kept(keys[j], static_cast<int64_t>(j), thr_key, tie_last));
  };

  const double lse1 = log_sum_exp(s, [](size_t) { return true; });
  const double lse_nt_s = log_sum_exp(a, non_target), lse_nt_t = log_sum_exp(b, non_target);
  const double lse_s = log_add_exp(a[y], lse_nt_s), lse_t = log_add_exp(b[y], lse_nt_t);
  const double log_ps = a[y] - lse_s, log_1mps = lse_nt_s - lse_s;
  const double log_pt = b[y] - lse_t, log_1mpt = lse_nt_t - lse_t;
  const double ps = std::exp(log_ps), pt = std::exp(log_pt), one_m_pt = std::exp(log_1mpt);
  double tckd = 0;
  if (pt > 0) tckd += pt * (log_pt - log_ps);
  if (one_m_pt > 0) tckd += one_m_pt * (log_1mpt - log_1mps);
  const double lse_k_s = log_sum_exp(a, kept), lse_k_t = log_sum_exp(b, kept);
  double nckd = 0;
  if (lse_k_t > -INFINITY) {
    for (int64_t j = 0; j < C; ++j)
      if (kept(j)) nckd += std::exp(b[j] - lse_k_t) * ((b[j] - lse_k_t) - (a[j] - lse_k_s));
  }
  losses[0] = static_cast<float>(lse1 - s[y]);
  losses[1] = static_cast<float>(temp * temp * tckd);
  losses[2] = static_cast<float>(temp * temp * nckd);

  if (grads[0]) {
    const double scale = *p.grad_scale;
    const double coef_tc = temp * scale * (ps - pt), coef_nc = temp * scale;
    for (int64_t j = 0; j < C; ++j) {
      const bool is_y = j == y;
      grads[0][j] = static_cast<T>(static_cast<float>(scale * (std::exp(s[j] - lse1) - (is_y ? 1.0 : 0.0))));
      grads[1][j] = static_cast<T>(static_cast<float>(is_y ? coef_tc : -coef_tc * std::exp(a[j] - lse_nt_s)));
      grads[2][j] = static_cast<T>(static_cast<float>(
          kept(j) ? coef_nc * (std::exp(a[j] - lse_k_s) - std::exp(b[j] - lse_k_t)) : 0.0));
    }
  }
}

template <typename T>
void deepkd_rows_cpu(const DeepKDParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> keys(p.classes), scratch;
    std::vector<double> s(p.classes), a(p.classes), b(p.classes);
    for (int64_t r = lo; r < hi; ++r) deepkd_row_cpu<T>(p, r, keys, scratch, s, a, b);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deepkd_losses(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& target,
    std::optional<int64_t> k, double temperature, int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK_VALUE(student_logits.dim() >= 1, "deepkd_losses: student_logits needs a class dimension");
  TORCH_CHECK_VALUE(student_logits.sizes() == teacher_logits.sizes(),
                    "deepkd_losses: student_logits and teacher_logits must have the same shape; got ",
                    student_logits.sizes(), " and ", teacher_logits.sizes());
  TORCH_CHECK_VALUE(student_logits.scalar_type() == teacher_logits.scalar_type(),
                    "deepkd_losses: student_logits and teacher_logits must have the same dtype; got ",
                    student_logits.scalar_type(), " and ", teacher_logits.scalar_type());
  TORCH_CHECK_VALUE(student_logits.device() == teacher_logits.device() && target.device() == student_logits.device(),
                    "deepkd_losses: student_logits, teacher_logits and target must be on the same device; got ",
                    student_logits.device(), ", ", teacher_logits.device(), " and ", target.device());
  const DType dtype = float_dtype(student_logits.scalar_type(), "deepkd_losses: student_logits");
  const int64_t classes = student_logits.size(-1);
  TORCH_CHECK_VALUE(classes >= 1 && classes <= std::numeric_limits<int32_t>::max(),
                    "deepkd_losses: the class dimension must be in [1, 2^31); got ", classes);
  const auto lead = student_logits.sizes().slice(0, student_logits.dim() - 1);
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong, "deepkd_losses: target must be int64; got ",
                    target.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == lead, "deepkd_losses: target must have the leading shape of the logits ",
                    lead, "; got ", target.sizes());
  TORCH_CHECK_VALUE(!k.has_value() || (*k >= 1 && *k <= classes), "deepkd_losses: k must be None or in [1, ",
                    classes, "]; got ", k.value_or(0));
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "deepkd_losses: temperature must be > 0; got ",
                    temperature);

  const at::Tensor s = student_logits.reshape({-1, classes}).contiguous();
  const at::Tensor t = teacher_logits.reshape({-1, classes}).contiguous();
  const at::Tensor y = target.reshape({-1}).contiguous();
  const int64_t rows = s.size(0);
  if (s.is_cpu() && rows > 0) {
    // On the GPU a bad target turns that row's losses into NaN instead (checking would synchronise).
    const at::Tensor bad = y.ne(ignore_index).logical_and(y.lt(0).logical_or(y.ge(classes)));
    TORCH_CHECK_VALUE(!bad.any().item<bool>(), "deepkd_losses: target values must be in [0, ", classes,
                      ") or equal ignore_index (", ignore_index, ")");
  }
  const auto fopts = s.options().dtype(at::kFloat);
  const at::Tensor n_valid = y.ne(ignore_index).sum().to(at::kFloat);
  const at::Tensor scale = n_valid.clamp_min(1.0).reciprocal();
  at::Tensor row_losses = at::empty({rows, 3}, fopts);
  at::Tensor grads[3];
  for (at::Tensor& g : grads) g = compute_grad ? at::empty({rows, classes}, s.options()) : at::empty({0}, s.options());

  DeepKDParams p;
  p.student = s.data_ptr();
  p.teacher = t.data_ptr();
  p.target = y.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.grad_ce = compute_grad ? grads[0].data_ptr() : nullptr;
  p.grad_tckd = compute_grad ? grads[1].data_ptr() : nullptr;
  p.grad_nckd = compute_grad ? grads[2].data_ptr() : nullptr;
  p.grad_scale = scale.data_ptr<float>();
  p.row_losses = row_losses.data_ptr<float>();
  p.rows = rows;
  p.classes = classes;
  p.k = k.value_or(classes);
  p.temperature = static_cast<float>(temperature);
  p.dtype = dtype;
  p.threshold = nullptr;
  p.count_greater = nullptr;
  at::Tensor threshold, count_greater;
  if (s.is_cuda() && p.k < classes) {
    // The teacher's top-k threshold first, by the leaner select kernel; the row kernel then only
    // resolves the ties (the CPU rows select on their own).
    std::tie(threshold, count_greater) = topk_threshold(t, p.k);
    p.threshold = threshold.data_ptr();
    p.count_greater = count_greater.data_ptr<int64_t>();
  }
  if (s.is_cuda()) {
    launch_on_cuda(s.device(), "deepkd_losses", [&](void* stream) { return deepkd_rows_cuda(p, stream); });
  } else {
    TORCH_CHECK_VALUE(s.is_cpu(), "deepkd_losses: unsupported device ", s.device());
    if (rows > 0) {
      switch (dtype) {
        case DType::kFloat32: deepkd_rows_cpu<float>(p); break;
        case DType::kFloat16: deepkd_rows_cpu<c10::Half>(p); break;
        case DType::kBFloat16: deepkd_rows_cpu<c10::BFloat16>(p); break;
      }
    }
  }
  // Each loss is the mean over the non-ignored rows (0 when there are none).
  at::Tensor losses[3];
  for (int i = 0; i < 3; ++i) losses[i] = row_losses.select(1, i).sum().mul(scale);
  for (at::Tensor& g : grads)
    if (compute_grad) g = g.view(student_logits.sizes());
  return {losses[0], losses[1], losses[2], grads[0], grads[1], grads[2]};
}

}  // namespace specx
