// Fused SpecKD forward (+ gradient) kernel. One thread-block cluster owns one row: each
// block of the cluster keeps its slice of the student and teacher logits in shared memory
// (read from HBM exactly once), the row statistics are combined across the cluster through
// distributed shared memory, and the gradient is written straight from the cached slice.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>

#include "specx/reduce.cuh"
#include "specx/slice.cuh"
#include "specx/speckd.h"
#include "specx/speckd_gate.h"

namespace specx::speckd_cuda {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

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
struct RowMix {
  float d;
  float g;
};
struct FixedTotals {
  unsigned long long zq;
  unsigned long long zp;
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
__device__ __forceinline__ RowMix combine(RowMix a, RowMix b) { return {a.d + b.d, a.g + b.g}; }
__device__ __forceinline__ FixedTotals combine(FixedTotals a, FixedTotals b) {
  return {a.zq + b.zq, a.zp + b.zp};
}

// for_each_pair with the values converted to float.
template <typename T, typename F>
__device__ __forceinline__ void for_each_float_pair(const T* s, const T* t, int len, bool vec, F&& f) {
  for_each_pair<kThreads>(s, t, len, vec, [&](int i, T a, T b) { f(i, to_float(a), to_float(b)); });
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
      const Pack<T> a = reinterpret_cast<const Pack<T>*>(s)[v];
      const Pack<T> b = reinterpret_cast<const Pack<T>*>(t)[v];
      OutPack o;
#pragma unroll
      for (int e = 0; e < kN; ++e) o.v[e] = from_float<TG>(f(to_float(a.v[e]), to_float(b.v[e])));
      reinterpret_cast<OutPack*>(out)[v] = o;
    }
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads)
    out[i] = from_float<TG>(f(to_float(s[i]), to_float(t[i])));
}

// Reduces `v` over the block, then over the cluster in rank order (so every block of the
// cluster gets the bit-identical result). `slot` must be a __shared__ variable used for
// this exchange only: later exchanges use other slots, so no second barrier is needed.
template <typename P>
__device__ __forceinline__ P cluster_allreduce(P v, P* slot, P* result, P* warp_scratch) {
  cg::cluster_group cluster = cg::this_cluster();
  v = block_reduce(v, warp_scratch, [](P a, P b) { return combine(a, b); });
  if (threadIdx.x == 0) *slot = v;
  cluster.sync();
  if (threadIdx.x == 0) {
    P acc = *cluster.map_shared_rank(slot, 0);
    for (unsigned r = 1; r < cluster.num_blocks(); ++r) acc = combine(acc, *cluster.map_shared_rank(slot, r));
    *result = acc;
  }
  __syncthreads();
  return *result;
}

// T: the logits' dtype; TG: the gradient's (T, or bf16 / fp16 for fp32 logits).
template <typename T, typename TG, Divergence kDiv>
__global__ void __launch_bounds__(kThreads, 3)
    speckd_rows_kernel(const SpecKDParams prm, const int slice_len, const bool cached) {
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t V = prm.vocab;
  const auto [nblocks, rank, row, begin, len] = this_row_slice(V, slice_len);
  const T* gs = static_cast<const T*>(prm.student) + row * V + begin;
  const T* gt = static_cast<const T*>(prm.teacher) + row * V + begin;
  TG* grad = prm.grad ? static_cast<TG*>(prm.grad) + row * V + begin : nullptr;
  const bool global_vec = reinterpret_cast<uintptr_t>(gs) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(gt) % 16 == 0 &&
                          (grad == nullptr || reinterpret_cast<uintptr_t>(grad) % 16 == 0);

  // Every block of the cluster reads the same label, so they all leave here together.
  if (prm.labels != nullptr && prm.labels[row] == prm.ignore_index) {
    if (grad) write_grad(grad, gs, gt, len, global_vec, [](float, float) { return 0.0f; });
    if (rank == 0 && threadIdx.x == 0) {
      prm.row_divergence[row] = 0.0f;
      prm.row_accepted[row] = false;
    }
    return;
  }

  extern __shared__ __align__(16) unsigned char slice_smem[];
  __shared__ RowMax slot_max, res_max;
  __shared__ RowSums slot_sums, res_sums;
  __shared__ RowMix slot_mix, res_mix;
  __shared__ FixedTotals slot_fixed;
  __shared__ int slot_accept, res_accept;
  __shared__ alignas(16) unsigned char scratch[kThreads / 32 * sizeof(RowSums)];
  __shared__ unsigned long long thread_prefix[kThreads];

  // Pass 1: stream the slice in (once), tracking the maxima and the student argmax.
  T* cs = cached ? reinterpret_cast<T*>(slice_smem) : nullptr;
  T* ct = cached ? cs + slice_len : nullptr;
  RowMax local{-INFINITY, INT_MAX, -INFINITY};
  load_slice_pair<kThreads, 4>(gs, gt, cs, ct, len, cached, global_vec, [&](int i, T s_raw, T t_raw) {
    const float s = to_float(s_raw);
    if (s > local.max_s) {  // indices only grow within a thread: strict > keeps the lowest
      local.max_s = s;
      local.arg_s = static_cast<int>(begin) + i;
    }
    local.max_t = fmaxf(local.max_t, to_float(t_raw));
  });
  const RowMax rmax = cluster_allreduce(local, &slot_max, &res_max, reinterpret_cast<RowMax*>(scratch));
  const T* rs = cached ? cs : gs;
  const T* rt = cached ? ct : gt;
  const bool vec = cached || global_vec;
  const float inv_t = prm.inv_temperature;
  const float scale2 = inv_t * kLog2e;

  // Pass 2: partition functions, the fkl / rkl integrand, and the top-k gate's count.
  const int64_t y = rmax.arg_s < V ? rmax.arg_s : 0;  // all -inf: torch.argmax's answer, 0
  const float t_at_y = to_float(static_cast<const T*>(prm.teacher)[row * V + y]);
  RowSums sums{0.0f, 0.0f, 0.0f, 0};
  for_each_float_pair(rs, rt, len, vec, [&](int, float s, float t) {
    const float ds = s - rmax.max_s, dt = t - rmax.max_t;
    const float es = fast_exp2(ds * scale2), et = fast_exp2(dt * scale2);
    sums.sum_s += es;
    sums.sum_t += et;
    if constexpr (kDiv == Divergence::kFKL) sums.acc += et * (dt - ds);
    if constexpr (kDiv == Divergence::kRKL) sums.acc += es * (ds - dt);
    sums.count += t > t_at_y;
  });
  const RowSums rsum = cluster_allreduce(sums, &slot_sums, &res_sums, reinterpret_cast<RowSums*>(scratch));
  const float lse_s = logf(rsum.sum_s), lse_t = logf(rsum.sum_t);

  bool accepted = true;
  if (prm.gate == Gate::kTopK) {
    accepted = rsum.count < prm.k;
  } else if (prm.gate == Gate::kSpec) {
    // Deterministic fixed-point masses over contiguous per-thread ranges, so a prefix scan
    // over threads (then blocks) locates each proposal.
    const int per = (len + kThreads - 1) / kThreads;
    const int lo = min(len, static_cast<int>(threadIdx.x) * per), hi = min(len, lo + per);
    FixedTotals mine{0, 0};
    // Integer sums do not care about order: start each thread at a different offset of its
    // range, so a warp's shared-memory reads spread over the banks instead of colliding.
    for (int n = 0, i = lo + (hi > lo ? static_cast<int>(threadIdx.x) % (hi - lo) : 0); n < hi - lo; ++n) {
      mine.zq += det_weight(to_float(rs[i]), rmax.max_s, inv_t);
      mine.zp += det_weight(to_float(rt[i]), rmax.max_t, inv_t);
      if (++i == hi) i = lo;
    }
    const unsigned long long block_zq =
        block_exclusive_scan(mine.zq, thread_prefix, reinterpret_cast<unsigned long long*>(scratch));
    if (threadIdx.x == 0) slot_fixed = {block_zq, 0};
    FixedTotals block_tot = block_reduce(FixedTotals{0, mine.zp}, reinterpret_cast<FixedTotals*>(scratch),
                                         [](FixedTotals a, FixedTotals b) { return combine(a, b); });
    if (threadIdx.x == 0) slot_fixed.zp = block_tot.zp;
    if (threadIdx.x == 0) slot_accept = 0;
    cluster.sync();
    unsigned long long zq = 0, zp = 0, start = 0;
    for (int r = 0; r < nblocks; ++r) {
      const FixedTotals other = *cluster.map_shared_rank(&slot_fixed, r);
      if (r < rank) start += other.zq;
      zq += other.zq;
      zp += other.zp;
    }
    const unsigned long long my_lo = start + thread_prefix[threadIdx.x];
    const int lane = threadIdx.x % 32;
    for (int i = 0; i < prm.k; ++i) {
      const ProposalDraw draw = proposal_draw(prm.seed, static_cast<uint64_t>(prm.row_offset + row), i);
      const unsigned long long target = proposal_target(draw.pick, zq);
      const unsigned owners = __ballot_sync(0xffffffffu, target >= my_lo && target < my_lo + mine.zq);
      if (owners == 0) continue;
      // The owner's range is searched by its whole warp: each lane takes a contiguous piece,
      // and an inclusive scan of the pieces' masses finds the lane holding the target.
      const int owner = __ffs(owners) - 1;
      const int o_lo = __shfl_sync(0xffffffffu, lo, owner), o_hi = __shfl_sync(0xffffffffu, hi, owner);
      const unsigned long long o_base = __shfl_sync(0xffffffffu, my_lo, owner);
      const int piece = (o_hi - o_lo + 31) / 32;
      const int p_lo = min(o_hi, o_lo + lane * piece), p_hi = min(o_hi, p_lo + piece);
      unsigned long long mass = 0;
      for (int j = p_lo; j < p_hi; ++j) mass += det_weight(to_float(rs[j]), rmax.max_s, inv_t);
      unsigned long long incl = mass;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += up;
      }
      unsigned long long run = o_base + incl - mass;
      if (target >= run && target < o_base + incl) {
        for (int j = p_lo; j < p_hi; ++j) {
          run += det_weight(to_float(rs[j]), rmax.max_s, inv_t);
          if (run > target) {
            const double q_val = det_value(to_float(rs[j]), rmax.max_s, inv_t);
            const double p_val = det_value(to_float(rt[j]), rmax.max_t, inv_t);
            if (proposal_accepted(draw.coin, p_val, zp, q_val, zq)) atomicOr(&slot_accept, 1);
            break;
          }
        }
      }
    }
    cluster.sync();
    if (threadIdx.x == 0) {
      int any = 0;
      for (int r = 0; r < nblocks; ++r) any |= *cluster.map_shared_rank(&slot_accept, r);
      res_accept = any;
    }
    __syncthreads();
    accepted = res_accept != 0;
  }

  // Pass 3 (jsd / skl / srkl): D and sum_k q_k g_k need normalised p and q.
  float div_d, div_g = 0.0f;
  if constexpr (kDiv == Divergence::kFKL) {
    div_d = rsum.acc * inv_t / rsum.sum_t + lse_s - lse_t;
  } else if constexpr (kDiv == Divergence::kRKL) {
    div_d = rsum.acc * inv_t / rsum.sum_s + lse_t - lse_s;
    div_g = div_d;
  } else {
    RowMix mix{0.0f, 0.0f};
    for_each_float_pair(rs, rt, len, vec, [&](int, float s, float t) {
      const float lq = (s - rmax.max_s) * inv_t - lse_s, lp = (t - rmax.max_t) * inv_t - lse_t;
      const float q = fast_exp2(lq * kLog2e), p = fast_exp2(lp * kLog2e);
      const DivergenceTerms<float> term = mixture_terms<float>(kDiv, prm.mix, lp, lq, p, q);
      mix.d += term.d;
      mix.g += q * term.g;
    });
    const RowMix rmix = cluster_allreduce(mix, &slot_mix, &res_mix, reinterpret_cast<RowMix*>(scratch));
    div_d = rmix.d;
    div_g = rmix.g;
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
      write_grad(grad, rs, rt, len, vec && global_vec, [&](float s, float t) {
        const float lq = (s - rmax.max_s) * inv_t - lse_s, lp = (t - rmax.max_t) * inv_t - lse_t;
        const float q = fast_exp2(lq * kLog2e), p = fast_exp2(lp * kLog2e);
        if constexpr (kDiv == Divergence::kFKL) {
          return coef * (q - p);
        } else if constexpr (kDiv == Divergence::kRKL) {
          return coef * q * (lq - lp - div_g);
        } else {
          return coef * q * (mixture_terms<float>(kDiv, prm.mix, lp, lq, p, q).g - div_g);
        }
      });
    }
  }
  // No block may leave while another can still read its shared memory.
  cluster.sync();
}

}  // namespace specx::speckd_cuda
