// Greedy and sampling verification of a draft tree: torch-free interface and the arithmetic
// that the CPU and CUDA paths share bit for bit.
#pragma once
#include "specx/exact.h"
#include "specx/philox.h"
#include "specx/speckd.h"  // DType
#include "specx/speckd_gate.h"  // kFixedBits

namespace specx {

struct VerifyParams {
  const int64_t* node_tokens;  // [batch, size]
  const int64_t* parents;      // [batch, size]
  const int64_t* num_nodes;    // [batch], or null: every tree fills `size`
  const void* logits;          // [batch, size, vocab] (greedy: or null when argmax is given)
  const int64_t* argmax;       // [batch, size] given argmax (greedy), or null
  const float* draft_probs;    // [batch, size, vocab] (sampling) or null: deterministic drafts
  int64_t* accepted_nodes;     // [batch, size]: root first, -1 padded
  int64_t* accept_len;         // [batch]
  int64_t* next_token;         // [batch]
  int64_t batch;
  int size;
  int64_t vocab;
  DType dtype;
  float inv_temperature;
  double top_p;
  uint64_t seed;
  uint32_t offset;
};

SPECX_HD int64_t tree_nodes(const int64_t* num_nodes, int64_t b, int64_t size) {
  return num_nodes != nullptr ? num_nodes[b] : size;
}

constexpr uint32_t kTreeVerifyTag = 0x54525653u;  // "TRVS", apart from SpecKD's "SPKD"
constexpr uint32_t kFinalTrial = 0xFFFFu;
constexpr double kFixed52 = 4503599627370496.0;  // 2^52: draft-mode residual resolution

struct VerifyDraw {
  double coin;
  double pick;
};

SPECX_HD VerifyDraw tree_verify_draw(uint64_t seed, uint32_t seq, uint32_t offset, uint32_t depth, uint32_t trial) {
  const Philox4 r = philox4x32_10(Philox4{{seq, offset, (depth << 16) | (trial & 0xFFFFu), kTreeVerifyTag}},
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return {uniform53(r.v[0], r.v[1]), uniform53(r.v[2], r.v[3])};
}

// Draft-mode residual max(p - coef * q, 0) at one token, in 2^-52 fixed point, p = weight / total.
SPECX_HD uint64_t residual_fixed(uint64_t weight, double total, double coef, float q) {
  const double p = exact_ddiv(static_cast<double>(weight), total);
  const double r = exact_dsub(p, exact_dmul(coef, static_cast<double>(q)));
  return r > 0.0 ? static_cast<uint64_t>(exact_dmul(r, kFixed52)) : 0;
}

// Deterministic-draft accept test: coin < P(x) / S.
SPECX_HD bool accept_deterministic(double coin, uint64_t px, uint64_t left) {
  return left > 0 && coin < exact_ddiv(static_cast<double>(px), static_cast<double>(left));
}

// Draft-probability accept test: coin < R(x) / (S q(x)).
SPECX_HD bool accept_with_draft(double coin, uint64_t rx, uint64_t s, float qx) {
  if (s == 0) return false;
  if (!(qx > 0.0f)) return rx > 0;
  return coin < exact_ddiv(static_cast<double>(rx), exact_dmul(static_cast<double>(s), static_cast<double>(qx)));
}

// The fixed-point mass below which the sample lies: the first token whose inclusive prefix
// sum exceeds it.
SPECX_HD uint64_t sample_target(double pick, uint64_t total) {
  const uint64_t t = static_cast<uint64_t>(exact_dmul(pick, static_cast<double>(total)));
  return t < total ? t : total - 1;
}

// top-p's required kept mass.
SPECX_HD uint64_t top_p_need(double top_p, uint64_t total) {
  const uint64_t need = static_cast<uint64_t>(exact_dmul(top_p, static_cast<double>(total)));
  return need > 0 ? need : 1;  // the top token is always kept
}

// A weight that top-p's threshold never falls below: the lighter tokens together hold less than
// 1 - top_p of any row's mass, since a row's top token alone weighs 2^kFixedBits. The margin
// covers this bound's rounding and top_p_need's.
SPECX_HD uint64_t top_p_floor(double top_p, int64_t vocab) {
  return static_cast<uint64_t>((1.0 - top_p) * ldexp(1.0, kFixedBits) / static_cast<double>(vocab) * (1.0 - 1e-6));
}

int verify_greedy_cuda(const VerifyParams& params, void* stream);
int verify_sample_cuda(const VerifyParams& params, void* stream);

}  // namespace specx
