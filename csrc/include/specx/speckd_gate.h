// The SpecKD `spec` gate, written once for the CPU and CUDA paths. Every step is IEEE-rounded
// arithmetic without fused multiply-adds and every sum is over integers, so the sampled
// proposals and the accept decisions are bit-identical on any device or launch shape.
#pragma once
#include <cmath>
#include <cstring>
#include "specx/exact.h"
#include "specx/philox.h"

namespace specx {

// exp(x) for x <= 0 as mant * 2^exp2 (mant in [0.7, 1.42]), from Cephes' exp2f polynomial.
struct DetExp {
  float mant;
  int exp2;
};

SPECX_HD DetExp det_exp(float x) {
  const float y = exact_mul(x, 1.44269504088896341f);
  if (!(y >= -100.0f)) return {0.0f, 0};  // far below the fixed-point resolution; NaN too
  const float n = rintf(y);
  const float f = exact_add(y, -n);
  float p = 1.535336188319500e-4f;
  p = exact_add(exact_mul(p, f), 1.339887440266574e-3f);
  p = exact_add(exact_mul(p, f), 9.618437357674640e-3f);
  p = exact_add(exact_mul(p, f), 5.550332471162809e-2f);
  p = exact_add(exact_mul(p, f), 2.402264791363012e-1f);
  p = exact_add(exact_mul(p, f), 6.931472028550421e-1f);
  p = exact_add(exact_mul(p, f), 1.0f);
  return {p, static_cast<int>(n)};
}

// Unnormalised probability exp((v - vmax) * inv_temp) in fixed point with 2^-40 resolution.
constexpr int kFixedBits = 40;

SPECX_HD uint64_t det_weight(float v, float vmax, float inv_temp) {
  const DetExp e = det_exp(exact_mul(exact_add(v, -vmax), inv_temp));
  if (!(e.mant > 0.0f)) return 0;
  // floor(mant * 2^(exp2 + 40)) with integer shifts: mant is a normal float, so it is
  // significand * 2^(biased exponent - 150) exactly.
  uint32_t bits;
  memcpy(&bits, &e.mant, sizeof(bits));
  const uint64_t significand = (bits & 0x7FFFFFu) | 0x800000u;
  const int shift = static_cast<int>(bits >> 23) - 150 + e.exp2 + kFixedBits;
  if (shift <= -64) return 0;
  return shift >= 0 ? significand << shift : significand >> -shift;
}

// The same value as a double, unquantised (exact: a float mantissa scaled by a power of 2).
SPECX_HD double det_value(float v, float vmax, float inv_temp) {
  const DetExp e = det_exp(exact_mul(exact_add(v, -vmax), inv_temp));
  return ldexp(static_cast<double>(e.mant), e.exp2);
}

// Random numbers of proposal `i` of global row `row`: where to draw it, and the accept coin.
struct ProposalDraw {
  double pick;
  double coin;
};

SPECX_HD ProposalDraw proposal_draw(uint64_t seed, uint64_t row, uint32_t i) {
  constexpr uint32_t kTag = 0x53504B44u;  // "SPKD": keeps these streams apart from other ops
  const Philox4 r = philox4x32_10(
      Philox4{{static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), i, kTag}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return {uniform53(r.v[0], r.v[1]), uniform53(r.v[2], r.v[3])};
}

// The fixed-point mass below which the proposal lies: x is the first index whose
// inclusive prefix sum of det_weight exceeds it.
SPECX_HD uint64_t proposal_target(double pick, uint64_t total) {
  const uint64_t target = static_cast<uint64_t>(pick * static_cast<double>(total));
  return target < total ? target : total - 1;
}

// Accept iff coin < min(1, p(x) / q(x)) with p = p_val / p_total, q = q_val / q_total.
SPECX_HD bool proposal_accepted(double coin, double p_val, uint64_t p_total, double q_val,
                                uint64_t q_total) {
  const double ratio = (p_val * static_cast<double>(q_total)) / (q_val * static_cast<double>(p_total));
  return coin < ratio;
}

}  // namespace specx
