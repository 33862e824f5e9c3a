// SpecKD ops: argument checks, the CPU row kernel, and the hand-off to the CUDA launcher.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "ops.h"
#include "specx/speckd.h"
#include "specx/speckd_gate.h"


namespace specx {
namespace {

constexpr int64_t kMaxVocab = int64_t{1} << 22;  // keeps the spec gate's fixed-point sums in 64 bits

// a (la - lb), 0 where a = 0 (0 log 0 = 0, whatever the logs: a -inf logit has la = -inf).
double xlog_ratio(double a, double la, double lb) { return a > 0.0 ? a * (la - lb) : 0.0; }
// q x, 0 where q = 0 (a student term that is -inf times a zero probability).
double times_prob(double q, double x) { return q > 0.0 ? q * x : 0.0; }

// jsd / skl / srkl per element, from log-probabilities lp (teacher) and lq (student): d, this
// element's share of D, and g = dD/dq_j up to a constant (the gradient wrt s_j is q_j (g_j - G),
// G = sum_k q_k g_k). The CUDA kernel computes the same in base 2 (MixtureBase2).
struct MixtureTerms {
  double d;
  double g;
};
MixtureTerms mixture_terms(Divergence div, double mix, double lp, double lq, double p, double q) {
  // m, the mixture; srkl weighs the teacher by 1 - mix.
  const double w_p = div == Divergence::kSRKL ? 1.0 - mix : mix, w_q = 1.0 - w_p;
  const double m = w_p * p + w_q * q;
  if (!(m > 0.0)) return {0.0, 0.0};
  const double lm = std::log(m);
  if (div == Divergence::kJSD) return {w_p * xlog_ratio(p, lp, lm) + w_q * xlog_ratio(q, lq, lm), w_q * (lq - lm)};
  if (div == Divergence::kSKL) return {xlog_ratio(p, lp, lm), -w_q * p / m};
  return {xlog_ratio(q, lq, lm), lq - lm - w_q * q / m};  // kSRKL
}

Divergence parse_divergence(const std::string& name) {
  if (name == "fkl") return Divergence::kFKL;
  if (name == "rkl") return Divergence::kRKL;
  if (name == "jsd") return Divergence::kJSD;
  if (name == "skl") return Divergence::kSKL;
  if (name == "srkl") return Divergence::kSRKL;
  TORCH_CHECK_VALUE(false, "speckd: divergence must be one of fkl, rkl, jsd, skl, srkl; got '", name, "'");
}

Gate parse_gate(const std::string& name) {
  if (name == "none") return Gate::kNone;
  if (name == "topk") return Gate::kTopK;
  if (name == "spec") return Gate::kSpec;
  TORCH_CHECK_VALUE(false, "speckd: gate must be one of none, topk, spec; got '", name, "'");
}

DType parse_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "speckd: student_logits must be float32, float16 or bfloat16; got ", t);
  }
}

// Rows with labels == ignore_index are skipped.
struct RowKernelArgs {
  SpecKDParams prm;
  at::Tensor student, teacher, labels, row_divergence, row_accepted, grad, grad_scale;
};

RowKernelArgs prepare(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                      const std::optional<at::Tensor>& labels, int64_t ignore_index, const std::string& divergence,
                      const std::string& gate, int64_t k, double reject_weight, double temperature, double mix,
                      int64_t seed, int64_t row_offset, const std::optional<at::Tensor>& grad_scale,
                      bool compute_grad, std::optional<at::ScalarType> grad_dtype) {
  TORCH_CHECK_VALUE(student_logits.dim() >= 1, "speckd: student_logits needs a vocabulary dimension");
  TORCH_CHECK_VALUE(student_logits.sizes() == teacher_logits.sizes(),
                    "speckd: student_logits and teacher_logits must have the same shape; got ",
                    student_logits.sizes(), " and ", teacher_logits.sizes());
  TORCH_CHECK_VALUE(student_logits.scalar_type() == teacher_logits.scalar_type(),
                    "speckd: student_logits and teacher_logits must have the same dtype; got ",
                    student_logits.scalar_type(), " and ", teacher_logits.scalar_type());
  TORCH_CHECK_VALUE(student_logits.device() == teacher_logits.device(),
                    "speckd: student_logits and teacher_logits must be on the same device; got ",
                    student_logits.device(), " and ", teacher_logits.device());
  const int64_t vocab = student_logits.size(-1);
  TORCH_CHECK_VALUE(vocab >= 1 && vocab <= kMaxVocab, "speckd: the vocabulary size must be in [1, ", kMaxVocab,
                    "]; got ", vocab);
  TORCH_CHECK_VALUE(k >= 1, "speckd: k must be >= 1; got ", k);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "speckd: temperature must be > 0; got ",
                    temperature);
  TORCH_CHECK_VALUE(reject_weight >= 0 && reject_weight <= 1, "speckd: reject_weight must be in [0, 1]; got ",
                    reject_weight);
  TORCH_CHECK_VALUE(mix >= 0 && mix <= 1, "speckd: jsd_beta / skew must be in [0, 1]; got ", mix);
  TORCH_CHECK_VALUE(row_offset >= 0, "speckd: row_offset must be >= 0; got ", row_offset);

  RowKernelArgs a;
  a.student = student_logits.reshape({-1, vocab}).contiguous();
  a.teacher = teacher_logits.reshape({-1, vocab}).contiguous();
  const int64_t rows = a.student.size(0);
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_VALUE(l.scalar_type() == at::kLong, "speckd: labels must be int64; got ", l.scalar_type());
    TORCH_CHECK_VALUE(l.numel() == rows && l.sizes() == student_logits.sizes().slice(0, student_logits.dim() - 1),
                      "speckd: labels must have the leading shape of the logits ",
                      student_logits.sizes().slice(0, student_logits.dim() - 1), "; got ", l.sizes());
    TORCH_CHECK_VALUE(l.device() == student_logits.device(), "speckd: labels must be on ", student_logits.device(),
                      "; got ", l.device());
    a.labels = l.reshape({rows}).contiguous();
  }
  const auto fopts = student_logits.options().dtype(at::kFloat);
  a.row_divergence = at::empty({rows}, fopts);
  a.row_accepted = at::empty({rows}, fopts.dtype(at::kBool));
  const at::ScalarType gdtype = grad_dtype.value_or(student_logits.scalar_type());
  TORCH_CHECK_VALUE(gdtype == student_logits.scalar_type() ||
                        (student_logits.scalar_type() == at::kFloat && (gdtype == at::kBFloat16 || gdtype == at::kHalf)),
                    "speckd: grad_dtype must be the logits' dtype, or bfloat16 / float16 for float32 logits; got ",
                    gdtype, " for ", student_logits.scalar_type(), " logits");
  const auto gopts = student_logits.options().dtype(gdtype);
  a.grad = compute_grad ? at::empty({rows, vocab}, gopts) : at::empty({0}, gopts);
  if (compute_grad && grad_scale.has_value()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->device() == student_logits.device(),
                      "speckd: grad_scale must be a one-element tensor on ", student_logits.device());
    a.grad_scale = grad_scale->to(at::kFloat).contiguous();
  }

  Divergence div = parse_divergence(divergence);
  // The generalised JSD's end points are the plain KLs (as in TRL and Liger).
  if (div == Divergence::kJSD && mix == 0.0) div = Divergence::kFKL;
  if (div == Divergence::kJSD && mix == 1.0) div = Divergence::kRKL;

  SpecKDParams& p = a.prm;
  p.student = a.student.data_ptr();
  p.teacher = a.teacher.data_ptr();
  p.labels = a.labels.defined() ? a.labels.data_ptr<int64_t>() : nullptr;
  p.ignore_index = ignore_index;
  p.grad = compute_grad ? a.grad.data_ptr() : nullptr;
  p.grad_scale = a.grad_scale.defined() ? a.grad_scale.data_ptr<float>() : nullptr;
  p.row_divergence = a.row_divergence.data_ptr<float>();
  p.row_accepted = a.row_accepted.data_ptr<bool>();
  p.rows = rows;
  p.vocab = vocab;
  p.row_offset = row_offset;
  p.dtype = parse_dtype(student_logits.scalar_type());
  p.grad_dtype = parse_dtype(gdtype);
  p.divergence = div;
  p.gate = parse_gate(gate);
  p.k = static_cast<int>(std::min<int64_t>(k, std::numeric_limits<int>::max()));
  p.reject_weight = static_cast<float>(reject_weight);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.mix = static_cast<float>(mix);
  p.seed = static_cast<uint64_t>(seed);
  return a;
}

// ---- CPU: the same math in double precision, the same gate bit for bit ----

template <typename T, typename TG>
void speckd_row_cpu(const SpecKDParams& p, int64_t row) {
  const T* s_row = static_cast<const T*>(p.student) + row * p.vocab;
  const T* t_row = static_cast<const T*>(p.teacher) + row * p.vocab;
  TG* g_row = p.grad ? static_cast<TG*>(p.grad) + row * p.vocab : nullptr;
  const int64_t V = p.vocab;
  if (p.labels != nullptr && p.labels[row] == p.ignore_index) {
    if (g_row) std::fill(g_row, g_row + V, TG(0.0f));
    p.row_divergence[row] = 0.0f;
    p.row_accepted[row] = false;
    return;
  }
  std::vector<float> s(V), t(V);
  for (int64_t j = 0; j < V; ++j) {
    s[j] = static_cast<float>(s_row[j]);
    t[j] = static_cast<float>(t_row[j]);
  }
  int64_t y = 0;
  float max_t = t[0];
  for (int64_t j = 1; j < V; ++j) {
    if (s[j] > s[y]) y = j;
    max_t = std::max(max_t, t[j]);
  }
  const float max_s = s[y];
  const double inv_t = p.inv_temperature;
  std::vector<double> lq(V), lp(V);
  double sum_s = 0, sum_t = 0;
  for (int64_t j = 0; j < V; ++j) {
    lq[j] = (double(s[j]) - max_s) * inv_t;
    lp[j] = (double(t[j]) - max_t) * inv_t;
    sum_s += std::exp(lq[j]);
    sum_t += std::exp(lp[j]);
  }
  const double lse_s = std::log(sum_s), lse_t = std::log(sum_t);
  for (int64_t j = 0; j < V; ++j) {
    lq[j] -= lse_s;
    lp[j] -= lse_t;
  }

  double d = 0, g_sum = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double q = std::exp(lq[j]), pp = std::exp(lp[j]);
    switch (p.divergence) {
      case Divergence::kFKL: d += xlog_ratio(pp, lp[j], lq[j]); break;
      case Divergence::kRKL: d += xlog_ratio(q, lq[j], lp[j]); break;
      default: {
        const MixtureTerms term = mixture_terms(p.divergence, p.mix, lp[j], lq[j], pp, q);
        d += term.d;
        g_sum += times_prob(q, term.g);
      }
    }
  }
  if (p.divergence == Divergence::kRKL) g_sum = d;

  bool accepted = true;
  if (p.gate == Gate::kTopK) {
    int64_t above = 0;
    for (int64_t j = 0; j < V; ++j) above += t[j] > t[y];
    accepted = above < p.k;
  } else if (p.gate == Gate::kSpec) {
    const MassScale scale_q = mass_scale(max_s, p.inv_temperature), scale_p = mass_scale(max_t, p.inv_temperature);
    std::vector<uint64_t> cum_q(V);
    uint64_t zq = 0, zp = 0;
    for (int64_t j = 0; j < V; ++j) {
      zq += spec_mass(s[j], scale_q);
      zp += spec_mass(t[j], scale_p);
      cum_q[j] = zq;
    }
    accepted = false;
    for (int i = 0; i < p.k && !accepted && zq > 0; ++i) {
      const ProposalDraw draw = proposal_draw(p.seed, static_cast<uint64_t>(p.row_offset + row), i);
      const uint64_t target = proposal_target(draw.pick, zq);
      const int64_t x = std::upper_bound(cum_q.begin(), cum_q.end(), target) - cum_q.begin();
      accepted = proposal_accepted(draw.coin, spec_mass(t[x], scale_p), zp, spec_mass(s[x], scale_q), zq);
    }
  }
  p.row_divergence[row] = static_cast<float>(d);
  p.row_accepted[row] = accepted;

  if (g_row) {
    const double weight = accepted ? 1.0 : p.reject_weight;
    const double coef = (p.grad_scale ? *p.grad_scale : 1.0) * weight * inv_t;
    for (int64_t j = 0; j < V; ++j) {
      const double q = std::exp(lq[j]), pp = std::exp(lp[j]);
      double ds;
      switch (p.divergence) {
        case Divergence::kFKL: ds = q - pp; break;
        case Divergence::kRKL: ds = times_prob(q, lq[j] - lp[j] - g_sum); break;
        default: ds = times_prob(q, mixture_terms(p.divergence, p.mix, lp[j], lq[j], pp, q).g - g_sum);
      }
      g_row[j] = static_cast<TG>(static_cast<float>(coef * ds));
    }
  }
}

template <typename T, typename TG>
void speckd_rows_cpu(const SpecKDParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) speckd_row_cpu<T, TG>(p, r);
  });
}

void launch(const RowKernelArgs& a) {
  const SpecKDParams& p = a.prm;
  if (a.student.is_cuda()) {
    launch_on_cuda(a.student.device(), "speckd", [&](void* stream) { return speckd_rows_cuda(p, stream); });
    return;
  }
  TORCH_CHECK_VALUE(a.student.is_cpu(), "speckd: unsupported device ", a.student.device());
  if (p.rows == 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      switch (p.grad_dtype) {
        case DType::kFloat32: speckd_rows_cpu<float, float>(p); break;
        case DType::kFloat16: speckd_rows_cpu<float, c10::Half>(p); break;
        case DType::kBFloat16: speckd_rows_cpu<float, c10::BFloat16>(p); break;
      }
      break;
    case DType::kFloat16: speckd_rows_cpu<c10::Half, c10::Half>(p); break;
    case DType::kBFloat16: speckd_rows_cpu<c10::BFloat16, c10::BFloat16>(p); break;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> speckd_rows(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, const std::string& divergence, const std::string& gate, int64_t k, double reject_weight,
    double temperature, double mix, int64_t seed, int64_t row_offset, const std::optional<at::Tensor>& grad_scale,
    bool compute_grad, std::optional<at::ScalarType> grad_dtype) {
  RowKernelArgs a = prepare(student_logits, teacher_logits, labels, ignore_index, divergence, gate, k, reject_weight,
                            temperature, mix, seed, row_offset, grad_scale, compute_grad, grad_dtype);
  launch(a);
  return {a.row_divergence, a.row_accepted, compute_grad ? a.grad.view(student_logits.sizes()) : a.grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> speckd_loss(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, const std::string& divergence, const std::string& gate, int64_t k, double reject_weight,
    double temperature, double mix, const std::string& reduction, int64_t seed, bool compute_grad) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "accepted" || reduction == "none",
                    "speckd: reduction must be one of mean, sum, accepted, none; got '", reduction, "'");
  const int64_t rows = student_logits.dim() >= 1 ? student_logits.numel() / std::max<int64_t>(1, student_logits.size(-1)) : 0;
  const auto fopts = student_logits.options().dtype(at::kFloat);
  // Few ops: each is a launch on the GPU, and at small shapes they, not the row kernel, set the time.
  // Which rows count: for the mean's divisor, and the accepted weights when rejected rows weigh.
  const bool need_valid =
      labels.has_value() && (reduction == "mean" || (reduction == "accepted" && reject_weight != 0.0));
  const at::Tensor valid = need_valid ? labels->reshape({-1}).ne(ignore_index) : at::Tensor();
  // "mean" knows its scale before the kernel runs, so the gradient comes out final.
  std::optional<at::Tensor> grad_scale;
  if (reduction == "mean") {
    const at::Tensor n_valid =
        valid.defined() ? at::sum(valid, at::kFloat) : at::full({}, static_cast<double>(rows), fopts);
    grad_scale = n_valid.clamp_min(1.0).reciprocal();
  }
  auto [row_div, row_acc, grad] = speckd_rows(student_logits, teacher_logits, labels, ignore_index, divergence, gate,
                                              k, reject_weight, temperature, mix, seed, 0, grad_scale, compute_grad,
                                              std::nullopt);
  // Ignored rows come out with D = 0 and a = 0, so only "accepted" needs their weight zeroed.
  at::Tensor weight = at::where(row_acc, 1.0, reject_weight).to(at::kFloat);
  const at::Tensor row_loss = weight.mul(row_div);
  at::Tensor loss;
  if (reduction == "none") {
    loss = row_loss.view(student_logits.sizes().slice(0, student_logits.dim() - 1));
  } else if (reduction == "sum") {
    loss = row_loss.sum();
  } else if (reduction == "mean") {
    loss = row_loss.sum().mul(*grad_scale);
  } else {
    if (valid.defined()) weight = weight.mul(valid);
    const at::Tensor total_weight = weight.sum();
    loss = at::where(total_weight.gt(0), row_loss.sum().div(total_weight.clamp_min(1e-30)), at::zeros({}, fopts));
  }
  return {loss, row_div, row_acc, grad};
}

void scale_grad_(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(grad.dim() >= 1 && grad.is_contiguous(), "scale_grad_: grad must be a contiguous tensor");
  const int64_t vocab = grad.size(-1), rows = vocab ? grad.numel() / vocab : 0;
  TORCH_CHECK_VALUE(scale.numel() == 1 || scale.numel() == rows, "scale_grad_: scale must have 1 or ", rows,
                    " elements; got ", scale.numel());
  TORCH_CHECK_VALUE(scale.device() == grad.device(), "scale_grad_: scale must be on ", grad.device());
  if (grad.numel() == 0) return;
  const at::Tensor s = scale.to(at::kFloat).contiguous();
#ifdef SPECX_WITH_CUDA
  if (grad.is_cuda()) {
    launch_on_cuda(grad.device(), "scale_grad_", [&](void* stream) {
      return scale_rows_cuda(grad.data_ptr(), parse_dtype(grad.scalar_type()), rows, vocab, s.data_ptr<float>(),
                             s.numel() != 1, stream);
    });
    return;
  }
#endif
  grad.view({rows, vocab}).mul_(s.view({-1, 1}));
}

}  // namespace specx
