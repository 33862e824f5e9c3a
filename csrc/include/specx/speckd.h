// SpecKD row kernel interface: torch-free, shared by the CUDA launcher and the torch glue.
#pragma once
#include <cmath>
#include "specx/common.h"

namespace specx {

struct SpecKDParams {
  const void* student;        // [rows, vocab], contiguous
  const void* teacher;        // [rows, vocab], contiguous, same dtype as student
  const int64_t* labels;      // [rows] or null: rows with labels == ignore_index are skipped
  int64_t ignore_index;
  void* grad;                 // [rows, vocab] in grad_dtype, or null (no gradient)
  const float* grad_scale;    // device scalar multiplying the gradient, or null for 1
  float* row_divergence;      // [rows]: D of each row (0 where ignored)
  bool* row_accepted;         // [rows]: the gate a (false where ignored)
  int64_t rows;
  int64_t vocab;
  int64_t row_offset;         // global index of row 0, keys the spec gate's random numbers
  DType dtype;                // of both logits
  DType grad_dtype;           // dtype, or bf16 / fp16 for fp32 logits
  Divergence divergence;
  Gate gate;
  int k;
  float reject_weight;
  float inv_temperature;
  float mix;                  // jsd_beta for jsd, skew for skl / srkl
  uint64_t seed;
};

// Per-element pieces of each divergence, in terms of log-probabilities lp (teacher) and
// lq (student). R is float on the GPU and double on the CPU.
template <typename R>
struct DivergenceTerms {
  R d;  // this element's share of D
  R g;  // dD/dq_j, up to a constant; the gradient wrt s_j is q_j (g_j - sum_k q_k g_k)
};

SPECX_HD double fast_log(double x) { return log(x); }
SPECX_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return logf(x);
#endif
}

// a / b; on the GPU the fast reciprocal (2 ulp), without the IEEE division's slow-path call.
SPECX_HD double fast_div(double a, double b) { return a / b; }
SPECX_HD float fast_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}

template <typename R>
SPECX_HD R log_mixture(R w_p, R p, R w_q, R q) {
  const R m = w_p * p + w_q * q;
  return m > R(0) ? fast_log(m) : R(-INFINITY);
}

// jsd, skl, srkl need normalised p and q; fkl and rkl are folded into sums by the callers.
template <typename R>
SPECX_HD DivergenceTerms<R> mixture_terms(Divergence div, R mix, R lp, R lq, R p, R q) {
  DivergenceTerms<R> out{R(0), R(0)};
  if (div == Divergence::kJSD) {
    const R lm = log_mixture(mix, p, R(1) - mix, q);
    if (lm == R(-INFINITY)) return out;
    out.d = mix * p * (lp - lm) + (R(1) - mix) * q * (lq - lm);
    out.g = (R(1) - mix) * (lq - lm);
  } else if (div == Divergence::kSKL) {
    const R m = mix * p + (R(1) - mix) * q;
    if (!(m > R(0))) return out;
    out.d = p > R(0) ? p * (lp - fast_log(m)) : R(0);
    out.g = -(R(1) - mix) * fast_div(p, m);
  } else {  // kSRKL
    const R m = (R(1) - mix) * p + mix * q;
    if (!(m > R(0))) return out;
    const R lm = fast_log(m);
    out.d = q > R(0) ? q * (lq - lm) : R(0);
    out.g = lq - lm - mix * fast_div(q, m);
  }
  return out;
}

// Launches the fused row kernel on `stream` (a cudaStream_t). Returns a CUDA error code.
int speckd_rows_cuda(const SpecKDParams& params, void* stream);
// grad[r, :] *= scale[per_row ? r : 0]; a single scale equal to 1 returns without touching grad.
int scale_rows_cuda(void* grad, DType dtype, int64_t rows, int64_t vocab, const float* scale, bool per_row,
                    void* stream);

}  // namespace specx
