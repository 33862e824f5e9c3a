// Fused DeepKD kernel: CE, TCKD and top-k-masked NCKD of one row and their three separate
// gradients wrt the student logits. One thread-block cluster owns one row and caches its slice of
// both logits in shared memory (read from HBM once). The teacher's top-k threshold and the count
// above it come from the top-k threshold kernel, run first; the mask is never materialised.
//
// Per row, with a = s / T, b = t / T, y the target, N = the non-target classes and K the kept set
// (teacher top-k by raw logit, ties by lowest index, minus y):
//   ce   = logsumexp(s) - s_y
//   tckd = T^2 KL([p_t, 1 - p_t] || [p_s, 1 - p_s]),  p_s = softmax(a)_y, p_t = softmax(b)_y
//   nckd = T^2 KL(softmax_K(b) || softmax_K(a))        (0 when K is empty)
// gradients (times the 1 / rows scale):
//   d ce / d s_j   = softmax(s)_j - [j = y]
//   d tckd / d s_j = T (p_s - p_t) ([j = y] - [j in N] softmax_N(a)_j)
//   d nckd / d s_j = T [j in K] (softmax_K(a)_j - softmax_K(b)_j)
// Every sum over N or K is an online (running max, sum) pair relative to that set's own maximum,
// so no sum underflows to 0 and the sums over N (and K = N without a top-k) are done while the
// slice loads. Passes: load (+ counting this slice's ties with the threshold), one pass for the
// sums over K (with a top-k only), then the gradients.
#pragma once
#include <cfloat>

#include "specx/speckd_kernel.cuh"  // cluster_allreduce, kLog2e
#include "specx/topk_threshold_kernel.cuh"

namespace specx::deepkd_cuda {

namespace cg = cooperative_groups;
using speckd_cuda::kLog2e;
using topk_cuda::key_of;

constexpr int kThreads = topk_cuda::kThreads;

// sum_j exp(x_j - m) over a set, m its running maximum; empty: m = -FLT_MAX (finite, so that no
// exp argument is NaN), s = 0.
struct ExpSum {
  float m;
  float s;
  __device__ __forceinline__ void add(float x) {
    if (x > m) {
      s = s * fast_exp2((m - x) * kLog2e) + 1.0f;
      m = x;
    } else {
      s += fast_exp2((x - m) * kLog2e);
    }
  }
  __device__ __forceinline__ float lse() const { return m + logf(s); }  // -inf when empty
};
// The same, plus acc = sum_j exp(x_j - m) w_j.
struct ExpSumAcc {
  float m;
  float s;
  float acc;
  __device__ __forceinline__ void add(float x, float w) {
    if (x > m) {
      const float f = fast_exp2((m - x) * kLog2e);
      s = s * f + 1.0f;
      acc = acc * f + w;
      m = x;
    } else {
      const float e = fast_exp2((x - m) * kLog2e);
      s += e;
      acc += e * w;
    }
  }
  __device__ __forceinline__ float lse() const { return m + logf(s); }
};

// Sums of one row.
struct RowSums {
  ExpSum s1;     // s over all classes
  ExpSum nt_a;   // a over N
  ExpSumAcc nt_b;  // b over N, acc: w = b - a
  ExpSum k_a;    // a over K
  ExpSumAcc k_b;   // b over K, acc: w = b - a
};

// The factor that moves a sum relative to m to one relative to `to` (>= m); 0 for an empty set.
__device__ __forceinline__ float rescale(float s, float m, float to) {
  return s > 0.0f ? fast_exp2((m - to) * kLog2e) : 0.0f;
}
__device__ __forceinline__ ExpSum combine(ExpSum x, ExpSum y) {
  const float m = fmaxf(x.m, y.m);
  return {m, x.s * rescale(x.s, x.m, m) + y.s * rescale(y.s, y.m, m)};
}
__device__ __forceinline__ ExpSumAcc combine(ExpSumAcc x, ExpSumAcc y) {
  const float m = fmaxf(x.m, y.m), fx = rescale(x.s, x.m, m), fy = rescale(y.s, y.m, m);
  return {m, x.s * fx + y.s * fy, x.acc * fx + y.acc * fy};
}
__device__ __forceinline__ RowSums combine(RowSums x, RowSums y) {
  return {combine(x.s1, y.s1), combine(x.nt_a, y.nt_a), combine(x.nt_b, y.nt_b), combine(x.k_a, y.k_a),
          combine(x.k_b, y.k_b)};
}

__device__ __forceinline__ float log_add_exp(float x, float y) {
  const float hi = fmaxf(x, y), lo = fminf(x, y);
  if (lo == -INFINITY) return hi;
  return hi + log1pf(expf(lo - hi));
}

// The local index of the n-th (1-based, n <= their count) element of x[0, len) whose key is `key`,
// in index order. Called by all threads of the block; each thread counts 8 consecutive elements of
// a tile, and a scan over the threads finds the one holding the n-th.
template <typename T>
__device__ int nth_equal_index(const T* x, int len, uint32_t key, unsigned n, unsigned* warp_totals, int* found) {
  constexpr int kPer = 8;
  if (threadIdx.x == 0) *found = -1;
  for (int base = 0; base < len; base += kThreads * kPer) {
    const int lo = min(len, base + static_cast<int>(threadIdx.x) * kPer), hi = min(len, lo + kPer);
    unsigned mine = 0;
    for (int i = lo; i < hi; ++i) mine += key_of(x[i]) == key;
    const BlockScan<unsigned> scan = block_scan(mine, warp_totals);  // its barriers publish *found = -1
    unsigned before = scan.before;
    if (before < n && n <= before + mine) {
      for (int i = lo; i < hi; ++i) {
        if (key_of(x[i]) == key && ++before == n) {
          *found = i;
          break;
        }
      }
    }
    __syncthreads();
    if (*found >= 0) return *found;
    n -= scan.total;
  }
  return len - 1;  // not reached when n is in range
}

// Writes the three gradients of a slice: f(i, s, t) -> float3, 16 bytes at a time where `vec`.
template <typename T, typename F>
__device__ __forceinline__ void write_grads(T* g0, T* g1, T* g2, const T* s, const T* t, int len, bool vec, F&& f) {
  constexpr int kN = Pack<T>::kN;
  int scalar_from = 0;
  if (vec) {
    const int nvec = len / kN;
    for (int v = threadIdx.x; v < nvec; v += kThreads) {
      const Pack<T> a = reinterpret_cast<const Pack<T>*>(s)[v];
      const Pack<T> b = reinterpret_cast<const Pack<T>*>(t)[v];
      Pack<T> o0, o1, o2;
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        const float3 g = f(v * kN + e, a.v[e], b.v[e]);
        o0.v[e] = from_float<T>(g.x);
        o1.v[e] = from_float<T>(g.y);
        o2.v[e] = from_float<T>(g.z);
      }
      __stcs(reinterpret_cast<uint4*>(g0) + v, *reinterpret_cast<const uint4*>(&o0));
      __stcs(reinterpret_cast<uint4*>(g1) + v, *reinterpret_cast<const uint4*>(&o1));
      __stcs(reinterpret_cast<uint4*>(g2) + v, *reinterpret_cast<const uint4*>(&o2));
    }
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads) {
    const float3 g = f(i, s[i], t[i]);
    g0[i] = from_float<T>(g.x);
    g1[i] = from_float<T>(g.y);
    g2[i] = from_float<T>(g.z);
  }
}

// kTopK: k < classes (the launcher decides): K is the teacher top-k minus the target; else K = N.
template <typename T, bool kTopK>
__global__ void __launch_bounds__(kThreads, 3)
    deepkd_rows_kernel(const DeepKDParams prm, const int slice_len, const bool cached) {
  cg::cluster_group cluster = cg::this_cluster();
  const int64_t C = prm.classes;
  const auto [nblocks, rank, row, begin, len] = this_row_slice(C, slice_len);
  const T* gs = static_cast<const T*>(prm.student) + row * C + begin;
  const T* gt = static_cast<const T*>(prm.teacher) + row * C + begin;
  const bool with_grad = prm.grad_ce != nullptr;
  T* g_ce = with_grad ? static_cast<T*>(prm.grad_ce) + row * C + begin : nullptr;
  T* g_tc = with_grad ? static_cast<T*>(prm.grad_tckd) + row * C + begin : nullptr;
  T* g_nc = with_grad ? static_cast<T*>(prm.grad_nckd) + row * C + begin : nullptr;
  const bool global_vec = aligned16(gs, gt) && (!with_grad || aligned16(g_ce, g_tc, g_nc));

  // Every block of the cluster reads the same target, so they all leave here together.
  const int64_t y = prm.target[row];
  if (y == prm.ignore_index || y < 0 || y >= C) {
    if (with_grad) {
      write_grads(g_ce, g_tc, g_nc, gs, gt, len, global_vec, [](int, T, T) { return make_float3(0.f, 0.f, 0.f); });
    }
    if (rank == 0 && threadIdx.x == 0) {
      const float v = y == prm.ignore_index ? 0.0f : __int_as_float(0x7fc00000);  // a bad target reads NaN
      prm.row_losses[3 * row] = v;
      prm.row_losses[3 * row + 1] = v;
      prm.row_losses[3 * row + 2] = v;
    }
    return;
  }

  extern __shared__ __align__(16) unsigned char slice_smem[];
  __shared__ RowSums slot_sums, res_sums;
  __shared__ unsigned slot_ties, warp_totals[kThreads / 32];
  __shared__ int tie_found;
  __shared__ alignas(16) unsigned char scratch[kThreads / 32 * sizeof(RowSums)];

  const float inv_t = 1.0f / prm.temperature;
  const float s_y = to_float(static_cast<const T*>(prm.student)[row * C + y]);
  const float t_y = to_float(static_cast<const T*>(prm.teacher)[row * C + y]);
  T* cs = cached ? reinterpret_cast<T*>(slice_smem) : nullptr;
  T* ct = cached ? cs + slice_len : nullptr;
  // Per-element tests in slice-local 32-bit indices: y's place in this slice (-1 when elsewhere).
  const int y_at = y >= begin && y < begin + len ? static_cast<int>(y - begin) : -1;
  // Kept: keys above thr_key, and ties up to local index tie_at. Keys are never 0, so thr_key 0
  // (no top-k) keeps every class.
  const uint32_t thr_key = kTopK ? key_of(static_cast<const T*>(prm.threshold)[row]) : 0u;
  unsigned local_ties = 0;

  // Pass 1: stream the slice in (once): the sums over all classes and over N, and the ties.
  constexpr ExpSum kEmpty{-FLT_MAX, 0.0f};
  constexpr ExpSumAcc kEmptyAcc{-FLT_MAX, 0.0f, 0.0f};
  RowSums sums{kEmpty, kEmpty, kEmptyAcc, kEmpty, kEmptyAcc};
  load_slice_pair<kThreads, 4>(gs, gt, cs, ct, len, cached, global_vec, [&](int i, T sv, T tv) {
    const float s = to_float(sv);
    sums.s1.add(s);
    if (i != y_at) {
      const float a = s * inv_t, b = to_float(tv) * inv_t;
      sums.nt_a.add(a);
      sums.nt_b.add(b, b - a);
    }
    if (kTopK) local_ties += key_of(tv) == thr_key;
  });
  const T* rs = cached ? cs : gs;
  const T* rt = cached ? ct : gt;
  const bool vec = cached || global_vec;

  // The sums over K.
  int tie_at = len;
  if (kTopK) {
    // The ties kept are the (k - greater) lowest-index ones. The slices are in index order, so this
    // block keeps those of its own ties that rank within that many after the lower blocks' ties:
    // tie_at is this block's last kept tie (-1 when none is).
    const unsigned ties = block_scan(local_ties, warp_totals).total;
    if (threadIdx.x == 0) slot_ties = ties;
    cluster.sync();
    unsigned lower_ties = 0;
    for (unsigned r = 0; r < rank; ++r) lower_ties += *cluster.map_shared_rank(&slot_ties, r);
    const auto remaining = static_cast<unsigned>(prm.k - prm.count_greater[row]);
    if (remaining <= lower_ties) {
      tie_at = -1;
    } else if (remaining < lower_ties + ties) {
      tie_at = nth_equal_index(rt, len, thr_key, remaining - lower_ties, warp_totals, &tie_found);
    }
    for_each_pair<kThreads>(rs, rt, len, vec, [&](int i, T sv, T tv) {
      if (i == y_at || !topk_kept(key_of(tv), i, thr_key, tie_at)) return;
      const float a = to_float(sv) * inv_t, b = to_float(tv) * inv_t;
      sums.k_a.add(a);
      sums.k_b.add(b, b - a);
    });
  }
  RowSums r = speckd_cuda::cluster_allreduce(sums, &slot_sums, &res_sums, reinterpret_cast<RowSums*>(scratch));
  // This block is done with the other blocks' shared memory; it waits for them before leaving.
  cluster.barrier_arrive();
  if (!kTopK) {  // K = N
    r.k_a = r.nt_a;
    r.k_b = r.nt_b;
  }

  const float temp = prm.temperature, temp2 = temp * temp;
  const float lse1 = r.s1.lse();
  const float a_y = s_y * inv_t, b_y = t_y * inv_t;
  const float lse_nt_s = r.nt_a.lse(), lse_nt_t = r.nt_b.lse();  // -inf when N is empty
  const float lse_s = log_add_exp(a_y, lse_nt_s), lse_t = log_add_exp(b_y, lse_nt_t);
  const float log_ps = a_y - lse_s, log_1mps = lse_nt_s - lse_s;
  const float log_pt = b_y - lse_t, log_1mpt = lse_nt_t - lse_t;
  const float ps = expf(log_ps), pt = expf(log_pt), one_m_pt = expf(log_1mpt);
  float tckd = 0.0f;
  if (pt > 0.0f) tckd += pt * (log_pt - log_ps);
  if (one_m_pt > 0.0f) tckd += one_m_pt * (log_1mpt - log_1mps);
  tckd *= temp2;
  const float lse_k_s = r.k_a.lse(), lse_k_t = r.k_b.lse();
  // KL(softmax_K(b) || softmax_K(a)) = sum_K softmax_K(b)_j (b_j - a_j) - lse_K(b) + lse_K(a).
  const float nckd = r.k_b.s > 0.0f ? temp2 * (r.k_b.acc / r.k_b.s - lse_k_t + lse_k_s) : 0.0f;
  if (rank == 0 && threadIdx.x == 0) {
    prm.row_losses[3 * row] = lse1 - s_y;
    prm.row_losses[3 * row + 1] = tckd;
    prm.row_losses[3 * row + 2] = nckd;
  }

  // Pass 3: the three gradients, from the cached slice.
  if (with_grad) {
    const float scale = *prm.grad_scale;
    const float coef_tc = temp * scale * (ps - pt);
    const float coef_nc = temp * scale;
    write_grads(g_ce, g_tc, g_nc, rs, rt, len, vec && global_vec, [&](int i, T sv, T tv) {
      const float s = to_float(sv);
      float3 g;
      g.x = scale * (fast_exp2((s - lse1) * kLog2e) - (i == y_at ? 1.0f : 0.0f));
      if (i == y_at) {
        g.y = coef_tc;
        g.z = 0.0f;
        return g;
      }
      const float a = s * inv_t;
      const float q_nt = fast_exp2((a - lse_nt_s) * kLog2e);  // softmax_N(a)_j
      g.y = -coef_tc * q_nt;
      if (!topk_kept(key_of(tv), i, thr_key, tie_at)) {
        g.z = 0.0f;
        return g;
      }
      // Without a top-k, K = N and softmax_K(a) is softmax_N(a): one exp less per class.
      const float q_k = kTopK ? fast_exp2((a - lse_k_s) * kLog2e) : q_nt;
      g.z = coef_nc * (q_k - fast_exp2((to_float(tv) * inv_t - lse_k_t) * kLog2e));
      return g;
    });
  }
  cluster.barrier_wait();
}

}  // namespace specx::deepkd_cuda
