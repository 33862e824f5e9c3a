// IEEE-rounded arithmetic that the compiler may not fuse into multiply-adds (fused ones only where
// asked for, correctly rounded everywhere), so host and device code built from one source round
// identically (the deterministic gates and samplers need it).
#pragma once
#include <cmath>

#include "specx/common.h"

namespace specx {

SPECX_HD float exact_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SPECX_HD float exact_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// a * b + c with one rounding: the same on every IEEE device.
SPECX_HD float exact_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return fmaf(a, b, c);
#endif
}

SPECX_HD double exact_dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

SPECX_HD double exact_dsub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

SPECX_HD double exact_ddiv(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace specx
