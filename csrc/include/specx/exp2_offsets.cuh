// Base-2 exponents around a row constant in one multiply-add, with the constant's rounding kept
// exactly (shared by the SpecKD and DeepKD row kernels). Torch-free.
#pragma once
#include <cuda_runtime.h>

namespace specx {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A row's base-2 exponents as x * c - k in one multiply-add, with k = vmax * c rounded and
// err = vmax * c - k exactly: sums of 2^(x c - k) carry the factor 2^err, which the log-sums take
// back out.
struct ExpOffset {
  float k;
  float err;
};
__device__ __forceinline__ ExpOffset exp_offset(float vmax, float c) {
  const float k = __fmul_rn(vmax, c);
  return {k, fmaf(vmax, c, -k)};
}

// n_hi + n_lo as k + err, k rounded and err exact (two-sum): x c - n_hi - n_lo is then
// fmaf(x, c, -k) - err, one multiply-add and one add with the constant's rounding kept.
__device__ __forceinline__ ExpOffset exp_split(float n_hi, float n_lo) {
  const float k = __fadd_rn(n_hi, n_lo);
  const float hi_part = __fsub_rn(k, n_lo);
  return {k, __fadd_rn(__fsub_rn(n_hi, hi_part), __fsub_rn(n_lo, __fsub_rn(k, hi_part)))};
}

// 2^(x c - n_hi - n_lo) = scale * 2^(x c - k) with k = n_hi + n_lo rounded, so each element costs
// one multiply-add and one exp while the rounding of k is kept in the row constant `scale`.
struct ExpNorm {
  float k;
  float scale;
};
__device__ __forceinline__ ExpNorm exp_norm(float n_hi, float n_lo, float scale) {
  const ExpOffset split = exp_split(n_hi, n_lo);
  return {split.k, scale * exp2f(-split.err)};
}

// exp_norm for 2^(x c - lse log2(e)): the product lse log2(e) split exactly into its rounded value
// and its error, so a row's lse of any magnitude costs no accuracy.
__device__ __forceinline__ ExpNorm exp_norm_of(float lse, float log2e, float scale) {
  const float hi = __fmul_rn(lse, log2e);
  return exp_norm(hi, fmaf(lse, log2e, -hi), scale);
}

}  // namespace specx
