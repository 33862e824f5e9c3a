// The SpecKD `spec` gate, written once for the CPU and CUDA paths. Every step is correctly rounded
// IEEE arithmetic (fused multiply-adds only where written) and every sum is over integers, so the sampled
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

// Unnormalised probability exp((v - vmax) * inv_temp) in fixed point with 2^-40 resolution, a
// 24-bit significand shifted: no bits are set more than 23 below the leading one.
constexpr int kFixedBits = 40;
constexpr int kWeightSignificandBits = 24;

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

// The spec gate's proposal masses: mass(v) = floor(2^31 * 2^y), y = (v - vmax) log2(e) / T, a
// 32-bit integer per element, so a row's total (V <= 2^22) fits 64 bits; elements below 2^-31 of
// the row's maximum get none. Cheaper than det_weight: a degree-5 polynomial in fused
// multiply-adds, a floor that keeps off the conversion unit, and the fixed point read straight
// from the float's bits.
constexpr int kMassBits = 31;

struct MassScale {
  float vmax;
  float c;  // log2(e) / T
};

SPECX_HD MassScale mass_scale(float vmax, float inv_temp) { return {vmax, exact_mul(inv_temp, 1.44269504088896341f)}; }

// y = (v - vmax) log2(e) / T, the exponent of the mass (the same float as any other caller's
// fast (v - vmax) * c).
SPECX_HD float mass_exponent(float v, MassScale m) { return exact_mul(exact_add(v, -m.vmax), m.c); }

SPECX_HD uint32_t mass_of_exponent(float y) {
  // y <= 0; NaN and -inf go to -64, which has no mass.
  y = fmaxf(y, -64.0f);
#if defined(__CUDA_ARCH__)
  const float r = __fadd_rd(y, 0x1.8p23f);  // 1.5 * 2^23 + floor(y), exactly
  const float n = __fsub_rn(r, 0x1.8p23f);
  const int shift = 0x4B400000 - __float_as_int(r);
#else
  const float n = floorf(y);
  const int shift = -static_cast<int>(n);
#endif
  const float f = exact_add(y, -n);
  // 2^f within 1.5e-7 (a relative minimax fit with p(0) = 1); for every float f in [0, 1), p is
  // in [1, 2) (checked exhaustively).
  float p = 1.867130748e-3f;
  p = exact_fma(p, f, 9.017028846e-3f);
  p = exact_fma(p, f, 5.579991266e-2f);
  p = exact_fma(p, f, 2.401644439e-1f);
  p = exact_fma(p, f, 6.931512952e-1f);
  p = exact_fma(p, f, 1.0f);
  // p's biased exponent is 127, so its bits shifted left by 8 are p * 2^31 exactly.
  uint32_t bits;
  memcpy(&bits, &p, sizeof(bits));
#if defined(__CUDA_ARCH__)
  return __funnelshift_rc(bits << 8, 0u, shift);  // shifts of 32 and more give 0
#else
  return shift < 32 ? (bits << 8) >> shift : 0u;
#endif
}

SPECX_HD uint32_t spec_mass(float v, MassScale m) { return mass_of_exponent(mass_exponent(v, m)); }

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
// inclusive prefix sum of spec_mass exceeds it (total > 0).
SPECX_HD uint64_t proposal_target(double pick, uint64_t total) {
  const uint64_t target = static_cast<uint64_t>(pick * static_cast<double>(total));
  return target < total ? target : total - 1;
}

// Accept iff coin < min(1, p(x) / q(x)), with p(x) = p_mass / p_total and q(x) = q_mass / q_total
// the masses the proposal was drawn from.
SPECX_HD bool proposal_accepted(double coin, uint32_t p_mass, uint64_t p_total, uint32_t q_mass, uint64_t q_total) {
  const double ratio = exact_ddiv(exact_dmul(p_mass, static_cast<double>(q_total)),
                                  exact_dmul(q_mass, static_cast<double>(p_total)));
  return coin < ratio;
}

}  // namespace specx
