// Fused SpecKD forward (+ gradient) kernel. One thread-block cluster owns one row: each
// block of the cluster keeps its slice of the student and teacher logits in shared memory
// (read from HBM exactly once), the row statistics are combined across the cluster through
// distributed shared memory, and the gradient is written straight from the cached slice.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>
#include <type_traits>

#include "specx/cluster_exchange.cuh"
#include "specx/exp2_offsets.cuh"
#include "specx/reduce.cuh"
#include "specx/slice.cuh"
#include "specx/speckd.h"
#include "specx/speckd_gate.h"

namespace specx::speckd_cuda {

constexpr int kThreads = 256;

struct RowMax {
  float max_s;
  int arg_s;  // lowest index of the student maximum
  float max_t;
};
struct RowSums {
  float sum_s;
  float sum_t;
  float acc;  // sum of the unnormalised fkl / rkl integrand
  int count;  // teacher logits strictly above t[argmax s]
};
// The spec gate's fixed-point masses of the student and the teacher: an exchange of their own, so
// the other gates' sums and warp partials stay at 16 bytes (see the kernel's shared memory).
struct SpecMasses {
  unsigned long long zq;
  unsigned long long zp;
};
// Pass 3's two sums u and v (see MixtureBase2).
struct RowMix {
  float u;
  float v;
};

__device__ __forceinline__ RowMax combine(RowMax a, RowMax b) {
  RowMax r;
  const bool take_b = b.max_s > a.max_s || (b.max_s == a.max_s && b.arg_s < a.arg_s);
  r.max_s = take_b ? b.max_s : a.max_s;
  r.arg_s = take_b ? b.arg_s : a.arg_s;
  r.max_t = fmaxf(a.max_t, b.max_t);
  return r;
}
__device__ __forceinline__ RowSums combine(RowSums a, RowSums b) {
  return {a.sum_s + b.sum_s, a.sum_t + b.sum_t, a.acc + b.acc, a.count + b.count};
}
__device__ __forceinline__ SpecMasses combine(SpecMasses a, SpecMasses b) { return {a.zq + b.zq, a.zp + b.zp}; }
__device__ __forceinline__ RowMix combine(RowMix a, RowMix b) { return {a.u + b.u, a.v + b.v}; }

// for_each_pair_by_warp with the values converted to float.
template <typename T, typename F>
__device__ __forceinline__ void for_each_float_pair_by_warp(const T* s, const T* t, int len, bool vec, F&& f) {
  for_each_pair_by_warp<kThreads>(s, t, len, vec, [&](int i, T a, T b) { f(i, to_float(a), to_float(b)); });
}

// The spec gate's proposals that land in this block's slice (student masses from block_start on,
// warp_zq[w] of them in warp w's chunk): true in a thread that accepted one. Each warp walks its
// chunk once, 32 units a round, for all the proposals in it; the lane whose unit holds one walks
// that unit's elements.
template <typename T>
__device__ bool spec_block_accepts(const SpecKDParams& prm, int64_t row, const T* rs, const T* rt, int len, bool vec,
                                   MassScale scale_q, MassScale scale_p, unsigned long long zq, unsigned long long zp,
                                   unsigned long long block_start, const unsigned long long* warp_zq) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned long long warp_from = block_start;
  for (int w = 0; w < warp; ++w) warp_from += warp_zq[w];
  const WarpChunk c = warp_chunk<kThreads, T>(len, vec, warp);
  const int units = c.units();
  bool accepted = false;
  for (int i0 = 0; i0 < prm.k; i0 += 32) {
    // Lane j draws proposal i0 + j once for the warp; `rel`: its mass into this warp's chunk.
    const ProposalDraw draw = proposal_draw(prm.seed, static_cast<uint64_t>(prm.row_offset + row), i0 + lane);
    const unsigned long long rel = proposal_target(draw.pick, zq) - warp_from;
    unsigned pending = __ballot_sync(0xffffffffu, i0 + lane < prm.k && rel < warp_zq[warp]);
    unsigned long long base = 0;
    for (int u0 = 0; pending != 0 && u0 < units; u0 += 32) {
      unsigned long long mass = 0;
      if (u0 + lane < units)
        visit_unit(rs, rt, c, u0 + lane, [&](int, T s, T) { mass += spec_mass(to_float(s), scale_q); });
      unsigned long long incl = mass;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += up;
      }
      const unsigned long long round = __shfl_sync(0xffffffffu, incl, 31);
      unsigned hits = __ballot_sync(0xffffffffu, (pending >> lane & 1u) != 0 && rel < base + round);
      pending &= ~hits;
      while (hits != 0) {
        const int j = __ffs(hits) - 1;
        hits &= hits - 1;
        const unsigned long long target = __shfl_sync(0xffffffffu, rel, j);
        const double coin = __shfl_sync(0xffffffffu, draw.coin, j);
        // The first lane whose inclusive prefix passes the target holds the proposal.
        if (lane == __ffs(__ballot_sync(0xffffffffu, target < base + incl)) - 1) {
          unsigned long long run = base + incl - mass;
          const int a = c.lo + (u0 + lane) * c.unit, b = min(c.hi, a + c.unit);
          for (int x = a; x < b; ++x) {
            const uint32_t q_mass = spec_mass(to_float(rs[x]), scale_q);
            run += q_mass;
            if (run > target) {
              accepted |= proposal_accepted(coin, spec_mass(to_float(rt[x]), scale_p), zp, q_mass, zq);
              break;
            }
          }
        }
      }
      base += round;
    }
  }
  return accepted;
}

// Writes grad[i] = f(s_i, t_i) over a slice (in the gradient's own dtype TG), one 16-byte
// input pack at a time where aligned.
template <typename T, typename TG, typename F>
__device__ __forceinline__ void write_grad(TG* out, const T* s, const T* t, int len, bool vec, F&& f) {
  constexpr int kN = Pack<T>::kN;
  struct alignas(kN * sizeof(TG)) OutPack {
    TG v[kN];
  };
  int scalar_from = 0;
  if (vec) {
    const int nvec = len / kN;
    for (int v = threadIdx.x; v < nvec; v += kThreads) {
      float a[kN], b[kN];
      pack_to_floats<T>(reinterpret_cast<const uint4*>(s)[v], a);
      pack_to_floats<T>(reinterpret_cast<const uint4*>(t)[v], b);
      OutPack o;
#pragma unroll
      for (int e = 0; e < kN; ++e) o.v[e] = from_float<TG>(f(a[e], b[e]));
      reinterpret_cast<OutPack*>(out)[v] = o;
    }
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads)
    out[i] = from_float<TG>(f(to_float(s[i]), to_float(t[i])));
}

// The block's maximum of `v`, in every thread. `scratch` (one float per warp) must serve this
// call only: with no later reuse, one barrier is enough.
__device__ __forceinline__ float block_max_all(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) v = fmaxf(v, scratch[w]);
  return v;
}

// The spec gate's verdict of a thread, a block or a row: whether any proposal was accepted.
struct Accepted {
  int any;
};
__device__ __forceinline__ Accepted combine(Accepted a, Accepted b) { return {a.any | b.any}; }

// jsd / skl / srkl in base 2. Per element, lq2 = log2 q and lp2 = log2 p cost a multiply-add and an
// add each, lm2 = log2 m one lg2 (m = w_p p + w_q q, the mixture; srkl swaps the weights), and ln 2 is
// applied to the row sums. Pass 3 sums u and v, from which the row's D and G = sum_j q_j g_j follow:
//   jsd:  u = sum p (lp2 - lm2), v = sum q (lq2 - lm2);  D = ln2 (w_p u + w_q v);  G = w_q ln2 v
//   skl:  u = sum p (lp2 - lm2), v = sum q p / m;        D = ln2 u;                G = -w_q v
//   srkl: u = sum q (lq2 - lm2), v = sum q q / m;        D = ln2 u;                G = ln2 u - w_q v
// m is kept at least FLT_MIN, and a log ratio that multiplies a probability at least -FLT_MAX (a
// -inf logit makes it -inf or NaN; fmaxf drops a NaN), so that an element with p = 0 or q = 0
// adds nothing where 0 log 0 = 0 says so. rkl's gradient takes its exponents from here too.
template <Divergence kDiv>
struct MixtureBase2 {
  float c;           // log2(e) / T
  ExpOffset kq, kp;  // lq2 = fmaf(s, c, -kq.k) - kq.err, lp2 likewise
  float wp, wq;

  struct Point {
    float lq2, lp2, q, p, m;
  };
  static __device__ __forceinline__ float log_ratio(float la2, float lb2) { return fmaxf(la2 - lb2, -FLT_MAX); }
  __device__ __forceinline__ Point at(float s, float t) const {
    Point x;
    x.lq2 = fmaf(s, c, -kq.k) - kq.err;
    x.lp2 = fmaf(t, c, -kp.k) - kp.err;
    x.q = fast_exp2(x.lq2);
    x.p = fast_exp2(x.lp2);
    x.m = fmaxf(fmaf(wp, x.p, wq * x.q), FLT_MIN);
    return x;
  }
  __device__ __forceinline__ RowMix sums_term(float s, float t) const {
    const Point x = at(s, t);
    const float lm2 = fast_log2(x.m);
    if constexpr (kDiv == Divergence::kJSD) {
      return {x.p * log_ratio(x.lp2, lm2), x.q * log_ratio(x.lq2, lm2)};
    } else if constexpr (kDiv == Divergence::kSKL) {
      const float dp = log_ratio(x.lp2, lm2);
      return {x.p * dp, x.q * fast_exp2(dp)};
    } else {
      const float dq = log_ratio(x.lq2, lm2);
      return {x.q * dq, x.q * fast_exp2(dq)};
    }
  }
  // The row's D and G from the cluster's sums.
  struct Row {
    float d, g;
  };
  __device__ __forceinline__ Row row(RowMix uv) const {
    if constexpr (kDiv == Divergence::kJSD) return {kLn2 * (wp * uv.u + wq * uv.v), wq * kLn2 * uv.v};
    if constexpr (kDiv == Divergence::kSKL) return {kLn2 * uv.u, -wq * uv.v};
    return {kLn2 * uv.u, kLn2 * uv.u - wq * uv.v};
  }
  // d D / d s_j times T: q_j (g_j - G).
  __device__ __forceinline__ float grad(float s, float t, float g_row) const {
    const Point x = at(s, t);
    float g;
    if constexpr (kDiv == Divergence::kSKL) {
      g = -wq * x.p * fast_rcp(x.m);
    } else {
      const float dq = log_ratio(x.lq2, fast_log2(x.m));
      g = kDiv == Divergence::kJSD ? wq * kLn2 * dq : fmaf(kLn2, dq, -wq * fast_exp2(dq));
    }
    return x.q * (g - g_row);
  }
};

// T: the logits' dtype; TG: the gradient's (T, or bf16 / fp16 for fp32 logits).
template <typename T, typename TG, Divergence kDiv>
__global__ void __launch_bounds__(kThreads, 3)
    speckd_rows_kernel(const SpecKDParams prm, const int slice_len, const bool cached) {
  const int64_t V = prm.vocab;
  const auto [nblocks, rank, row, begin, len] = this_row_slice(V, slice_len);
  const T* gs = static_cast<const T*>(prm.student) + row * V + begin;
  const T* gt = static_cast<const T*>(prm.teacher) + row * V + begin;
  TG* grad = prm.grad ? static_cast<TG*>(prm.grad) + row * V + begin : nullptr;
  const bool global_vec = aligned16(gs, gt) && (grad == nullptr || aligned16(grad));

  // Every block of the cluster reads the same label, so they all leave here together.
  if (prm.labels != nullptr && prm.labels[row] == prm.ignore_index) {
    if (grad) write_grad(grad, gs, gt, len, global_vec, [](float, float) { return 0.0f; });
    if (rank == 0 && threadIdx.x == 0) {
      prm.row_divergence[row] = 0.0f;
      prm.row_accepted[row] = false;
    }
    return;
  }

  // At vocab 151936 (bf16) three 74.2 KB slices share an SM only if everything else of a block
  // fits in 832 bytes of static shared memory.
  extern __shared__ __align__(16) unsigned char slice_smem[];
  __shared__ ClusterExchange<RowMax> max_exchange;
  __shared__ ClusterExchange<RowSums> sums_exchange;
  __shared__ ClusterExchange<SpecMasses> masses_exchange;
  __shared__ ClusterExchange<RowMix> mix_exchange;
  __shared__ ClusterExchange<Accepted> accept_exchange;
  // The spec gate's per-warp student masses; before that, the warps' maxima (as floats).
  __shared__ unsigned long long warp_zq[kThreads / 32];
  __shared__ ExchangeScratch<kThreads, 16> scratch;
  int turn = 0;  // which scratch buffer the next exchange takes
  const bool spec = prm.gate == Gate::kSpec;
  if (threadIdx.x == 0) {
    max_exchange.init();
    sums_exchange.init();
    if (kDiv != Divergence::kFKL && kDiv != Divergence::kRKL) mix_exchange.init();
    if (spec) {
      masses_exchange.init();
      accept_exchange.init();
    }
  }
  cluster_arrive_started();
  __shared__ uint64_t slice_arrived;

  // Pass 1: bring the slice in (once), tracking the maxima pairwise on the raw packs.
  T* cs = cached ? reinterpret_cast<T*>(slice_smem) : nullptr;
  T* ct = cached ? cs + slice_len : nullptr;
  PackMax<T> pack_max_s, pack_max_t;
  float tail_max_s = -INFINITY, tail_max_t = -INFINITY;
  auto tail_max = [&](int, T s, T t) {
    tail_max_s = fmaxf(tail_max_s, to_float(s));
    tail_max_t = fmaxf(tail_max_t, to_float(t));
  };
  if (cached && global_vec) {
    bulk_load_slice_pair<kThreads>(gs, gt, cs, ct, len, &slice_arrived);
    for_each_pack_pair<kThreads>(
        cs, ct, len, true,
        [&](int, const uint4& a, const uint4& b) {
          pack_max_s.add(a);
          pack_max_t.add(b);
        },
        tail_max);
  } else {
    load_slice_batches<kThreads, 4>(
        gs, gt, cs, ct, len, cached, global_vec,
        [&](int, int count, const uint4(&a)[4], const uint4(&b)[4]) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            if (u < count) {
              pack_max_s.add(a[u]);
              pack_max_t.add(b[u]);
            }
          }
        },
        tail_max);
  }
  const T* rs = cached ? cs : gs;
  const T* rt = cached ? ct : gt;
  // The student argmax: the block's maximum first, then only the threads holding it look for its
  // lowest index among their own elements.
  const float thread_max_s = fmaxf(pack_max_s.value(), tail_max_s);
  const float block_max_s = block_max_all(thread_max_s, reinterpret_cast<float*>(warp_zq));
  const int arg =
      thread_max_s == block_max_s ? first_index_of<kThreads>(rs, len, global_vec, block_max_s) : INT_MAX;
  const RowMax local{block_max_s, arg == INT_MAX ? INT_MAX : static_cast<int>(begin) + arg,
                     fmaxf(pack_max_t.value(), tail_max_t)};
  cluster_wait_started();
  const RowMax rmax = max_exchange.allreduce<kThreads>(local, scratch.take<RowMax>(turn));
  const bool vec = cached || global_vec;
  const float inv_t = prm.inv_temperature;

  // Pass 2: partition functions, the fkl / rkl integrand, the top-k gate's count, and the spec
  // gate's fixed-point masses (each warp over a contiguous chunk, so proposals can be located).
  const int64_t y = rmax.arg_s < V ? rmax.arg_s : 0;  // all -inf: torch.argmax's answer, 0
  const float t_at_y = to_float(static_cast<const T*>(prm.teacher)[row * V + y]);
  const MassScale scale_q = mass_scale(rmax.max_s, inv_t), scale_p = mass_scale(rmax.max_t, inv_t);
  const float c = scale_q.c;  // log2(e) / T
  const ExpOffset off_s = exp_offset(rmax.max_s, c), off_t = exp_offset(rmax.max_t, c);
  SpecMasses masses{0, 0};
  auto pass2 = [&](auto gate) {
    constexpr Gate kGate = decltype(gate)::value;
    RowSums sums{0.0f, 0.0f, 0.0f, 0};
    // d: the exponents' difference, c ((t - max_t) - (s - max_s)) up to the offsets' errors.
    // A -inf logit (a masked token) gives an infinite or NaN d where its own exp is 0; the clamp
    // makes that term 0 (fmaxf / fminf drop a NaN), as 0 log 0 = 0 wants.
    auto add = [&](float es, float et, float d) {
      sums.sum_s += es;
      sums.sum_t += et;
      if constexpr (kDiv == Divergence::kFKL) sums.acc = fmaf(et, fmaxf(d, -FLT_MAX), sums.acc);
      if constexpr (kDiv == Divergence::kRKL) sums.acc = fmaf(-es, fminf(d, FLT_MAX), sums.acc);
    };
    if constexpr (kGate == Gate::kSpec) {
      // The masses' exponents, shared with the sums.
      for_each_float_pair_by_warp(rs, rt, len, vec, [&](int, float s, float t) {
        const float ys = mass_exponent(s, scale_q), yt = mass_exponent(t, scale_p);
        add(fast_exp2(ys), fast_exp2(yt), yt - ys);
        masses.zq += mass_of_exponent(ys);
        masses.zp += mass_of_exponent(yt);
      });
    } else {
      // One multiply-add per exponent; their difference is c (dt - ds) + err_t - err_s, and the
      // errors' share is taken out after the reduction.
      for_each_float_pair<kThreads>(rs, rt, len, vec, [&](int, float s, float t) {
        const float xs = fmaf(s, c, -off_s.k), xt = fmaf(t, c, -off_t.k);
        add(fast_exp2(xs), fast_exp2(xt), xt - xs);
        if constexpr (kGate == Gate::kTopK) sums.count += t > t_at_y;
      });
    }
    return sums;
  };
  const RowSums sums = spec                        ? pass2(std::integral_constant<Gate, Gate::kSpec>{})
                       : prm.gate == Gate::kTopK ? pass2(std::integral_constant<Gate, Gate::kTopK>{})
                                                 : pass2(std::integral_constant<Gate, Gate::kNone>{});
  if (spec) {
    unsigned long long wq = masses.zq;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) wq += __shfl_xor_sync(0xffffffffu, wq, off);
    if (threadIdx.x % 32 == 0) warp_zq[threadIdx.x / 32] = wq;
  }
  // The spec gate's masses go out before waiting for the sums: one round trip for both.
  const auto sums_sent = sums_exchange.push<kThreads>(sums, scratch.take<RowSums>(turn));
  const auto masses_sent = spec ? masses_exchange.push<kThreads>(masses, scratch.take<SpecMasses>(turn))
                                : decltype(masses_exchange)::Sent{masses};
  const RowSums rsum = sums_exchange.wait(sums_sent);
  const SpecMasses rmass = spec ? masses_exchange.wait(masses_sent) : masses;
  // Base-2 log-sums relative to the maxima (the spec gate's sums carry no offset factor).
  const float lse_s2 = log2f(rsum.sum_s) - (spec ? 0.0f : off_s.err);
  const float lse_t2 = log2f(rsum.sum_t) - (spec ? 0.0f : off_t.err);
  const float lse_s = lse_s2 * kLn2, lse_t = lse_t2 * kLn2;
  // The offsets' share of every exponent difference in acc (c (dt - ds) + err_d).
  const float err_d = spec ? 0.0f : off_t.err - off_s.err;

  bool accepted = true;
  if (prm.gate == Gate::kTopK) {
    accepted = rsum.count < prm.k;
  } else if (spec) {
    // The blocks' totals were pushed here: the masses before this block.
    unsigned long long block_start = 0;
    for (int r = 0; r < rank; ++r) block_start += masses_exchange.slots[r].zq;
    const bool mine = rmass.zq > 0 && spec_block_accepts(prm, row, rs, rt, len, vec, scale_q, scale_p, rmass.zq,
                                                          rmass.zp, block_start, warp_zq);
    accepted = accept_exchange.allreduce<kThreads>(Accepted{mine}, scratch.take<Accepted>(turn)).any != 0;
  }

  // Pass 3 (jsd / skl / srkl): D and sum_k q_k g_k need normalised p and q.
  float div_d, div_g = 0.0f;
  const float mix_wp = kDiv == Divergence::kSRKL ? 1.0f - prm.mix : prm.mix;
  const MixtureBase2<kDiv> mixture{c, exp_split(off_s.k, off_s.err + lse_s2), exp_split(off_t.k, off_t.err + lse_t2),
                                   mix_wp, 1.0f - mix_wp};
  if constexpr (kDiv == Divergence::kFKL) {
    div_d = kLn2 * (rsum.acc / rsum.sum_t - err_d) + lse_s - lse_t;
  } else if constexpr (kDiv == Divergence::kRKL) {
    div_d = kLn2 * (rsum.acc / rsum.sum_s + err_d) + lse_t - lse_s;
    div_g = div_d;
  } else {
    RowMix uv{0.0f, 0.0f};
    for_each_float_pair<kThreads>(rs, rt, len, vec,
                                  [&](int, float s, float t) { uv = combine(uv, mixture.sums_term(s, t)); });
    const auto rdiv = mixture.row(mix_exchange.allreduce<kThreads>(uv, scratch.take<RowMix>(turn)));
    div_d = rdiv.d;
    div_g = rdiv.g;
  }

  if (rank == 0 && threadIdx.x == 0) {
    prm.row_divergence[row] = div_d;
    prm.row_accepted[row] = accepted;
  }

  // Pass 4: the gradient wrt the student logits, from the cached slice.
  if (grad) {
    const float weight = accepted ? 1.0f : prm.reject_weight;
    const float coef = (prm.grad_scale ? *prm.grad_scale : 1.0f) * weight * inv_t;
    if (coef == 0.0f) {
      write_grad(grad, rs, rt, len, vec && global_vec, [](float, float) { return 0.0f; });
    } else {
      // fkl needs only coef * (q - p): q = 2^(s c - max_s c - lse_s2), written around k_s = max_s c
      // rounded so each of q and p costs one multiply-add and one exp.
      const ExpNorm nq = exp_norm(off_s.k, off_s.err + lse_s2, coef), np = exp_norm(off_t.k, off_t.err + lse_t2, coef);
      write_grad(grad, rs, rt, len, vec && global_vec, [&](float s, float t) {
        if constexpr (kDiv == Divergence::kFKL) {
          return fmaf(nq.scale, fast_exp2(fmaf(s, c, -nq.k)), -np.scale * fast_exp2(fmaf(t, c, -np.k)));
        } else if constexpr (kDiv == Divergence::kRKL) {
          const auto x = mixture.at(s, t);  // its exponents; p and m go unused
          return coef * x.q * fmaf(kLn2, mixture.log_ratio(x.lq2, x.lp2), -div_g);
        } else {
          return coef * mixture.grad(s, t, div_g);
        }
      });
    }
  }
  // Every exchange waited for all the pushes into this block, so it may exit without a barrier.
}

}  // namespace specx::speckd_cuda
