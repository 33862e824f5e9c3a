// Fused DeepKD kernel: CE, TCKD and top-k-masked NCKD of one row and their three separate
// gradients wrt the student logits. One thread-block cluster owns one row and caches its slice of
// both logits in shared memory (read from HBM once); the teacher's top-k threshold is found by
// radix select on the cached teacher slice, so the mask is never materialised.
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
// Every sum over N or K is taken relative to that set's own maximum, so no sum underflows to 0.
#pragma once
#include "specx/speckd_kernel.cuh"  // cluster_allreduce, kLog2e
#include "specx/topk_threshold_kernel.cuh"

namespace specx::deepkd_cuda {

namespace cg = cooperative_groups;
using speckd_cuda::kLog2e;
using topk_cuda::key_of;
using topk_cuda::kKeyBits;

constexpr int kThreads = topk_cuda::kThreads;

struct NonTargetMax {
  float s;  // max of s over N
  float t;  // max of t over N
};
// Sums of one row; the student's kept-set sum is an online (running max, sum) pair.
struct RowSums {
  float sum_s1;    // sum_j exp(s_j - M1), M1 = max s
  float sum_nt_s;  // sum_N exp(a_j - Ms), Ms = max_N a
  float sum_nt_t;  // sum_N exp(b_j - Mt), Mt = max_N b
  float sum_k_t;   // sum_K exp(b_j - Mt)   (max_K b = Mt whenever K is not empty)
  float acc;       // sum_K exp(b_j - Mt) ((b_j - Mt) - (a_j - Ms))
  float max_k_s;   // max_K a
  float sum_k_s;   // sum_K exp(a_j - max_K a)
  float pad;
};

__device__ __forceinline__ NonTargetMax combine(NonTargetMax x, NonTargetMax y) {
  return {fmaxf(x.s, y.s), fmaxf(x.t, y.t)};
}
__device__ __forceinline__ RowSums combine(RowSums x, RowSums y) {
  RowSums r;
  r.sum_s1 = x.sum_s1 + y.sum_s1;
  r.sum_nt_s = x.sum_nt_s + y.sum_nt_s;
  r.sum_nt_t = x.sum_nt_t + y.sum_nt_t;
  r.sum_k_t = x.sum_k_t + y.sum_k_t;
  r.acc = x.acc + y.acc;
  r.max_k_s = fmaxf(x.max_k_s, y.max_k_s);
  r.sum_k_s = 0.0f;
  if (x.sum_k_s > 0.0f) r.sum_k_s += x.sum_k_s * fast_exp2((x.max_k_s - r.max_k_s) * kLog2e);
  if (y.sum_k_s > 0.0f) r.sum_k_s += y.sum_k_s * fast_exp2((y.max_k_s - r.max_k_s) * kLog2e);
  r.pad = 0.0f;
  return r;
}

__device__ __forceinline__ float log_add_exp(float x, float y) {
  const float hi = fmaxf(x, y), lo = fminf(x, y);
  if (lo == -INFINITY) return hi;
  return hi + log1pf(expf(lo - hi));
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

template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
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
  const bool global_vec = reinterpret_cast<uintptr_t>(gs) % 16 == 0 && reinterpret_cast<uintptr_t>(gt) % 16 == 0 &&
                          (!with_grad || (reinterpret_cast<uintptr_t>(g_ce) % 16 == 0 &&
                                          reinterpret_cast<uintptr_t>(g_tc) % 16 == 0 &&
                                          reinterpret_cast<uintptr_t>(g_nc) % 16 == 0));

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
  __shared__ topk_cuda::SelectShared select_shared;
  __shared__ NonTargetMax slot_max, res_max;
  __shared__ RowSums slot_sums, res_sums;
  __shared__ alignas(16) unsigned char scratch[kThreads / 32 * sizeof(RowSums)];

  const bool select = prm.k < C;
  const float inv_t = 1.0f / prm.temperature;
  const float s_y = to_float(static_cast<const T*>(prm.student)[row * C + y]);
  const float t_y = to_float(static_cast<const T*>(prm.teacher)[row * C + y]);
  T* cs = cached ? reinterpret_cast<T*>(slice_smem) : nullptr;
  T* ct = cached ? cs + slice_len : nullptr;
  topk_cuda::RadixSelect sel;
  if (select) {
    topk_cuda::clear_histograms(&select_shared);
    sel.init(&select_shared, kKeyBits<T>, static_cast<unsigned long long>(prm.k), 0);
  }

  // Pass 1: stream the slice in (once): the non-target maxima and the first select digit.
  NonTargetMax local{-INFINITY, -INFINITY};
  {
    auto visit = [&](int i, T s, T t) {
      if (begin + i != y) {
        local.s = fmaxf(local.s, to_float(s));
        local.t = fmaxf(local.t, to_float(t));
      }
      if (select) sel.add(key_of(t));
    };
    load_slice_pair<kThreads, 2>(gs, gt, cs, ct, len, cached, global_vec, visit);
  }
  const T* rs = cached ? cs : gs;
  const T* rt = cached ? ct : gt;
  const bool vec = cached || global_vec;

  // The rest of the teacher's top-k select, then the index select that resolves ties.
  uint32_t thr_key = 0;
  int64_t tie_last = C - 1;  // with thr_key 0 every class is kept
  if (select) {
    bool done = sel.resolve(cluster);
    while (!done) {
      for_each_pair<kThreads>(rs, rt, len, vec, [&](int, T, T t) { sel.add(key_of(t)); });
      done = sel.resolve(cluster);
    }
    thr_key = sel.prefix;
    if (sel.tie_count > sel.remaining) {
      // The remaining-th lowest index among the ties is the remaining-th largest of C-1-j.
      topk_cuda::RadixSelect tie;
      tie.init(&select_shared, index_bits(C), sel.remaining, sel.pass);
      bool tie_done = false;
      while (!tie_done) {
        for_each_pair<kThreads>(rs, rt, len, vec, [&](int i, T, T t) {
          if (key_of(t) == thr_key) tie.add(static_cast<uint32_t>(C - 1 - (begin + i)));
        });
        tie_done = tie.resolve(cluster);
      }
      tie_last = C - 1 - static_cast<int64_t>(tie.prefix);
    }
  }
  const NonTargetMax rmax = speckd_cuda::cluster_allreduce(local, &slot_max, &res_max,
                                                           reinterpret_cast<NonTargetMax*>(scratch));
  const float m1 = fmaxf(s_y, rmax.s);
  const float ms = rmax.s * inv_t, mt = rmax.t * inv_t;

  // Pass 2: the sums.
  RowSums sums{0.f, 0.f, 0.f, 0.f, 0.f, -INFINITY, 0.f, 0.f};
  for_each_pair<kThreads>(rs, rt, len, vec, [&](int i, T sv, T tv) {
    const int64_t j = begin + i;
    const float s = to_float(sv);
    sums.sum_s1 += fast_exp2((s - m1) * kLog2e);
    if (j == y) return;
    const float da = s * inv_t - ms, db = to_float(tv) * inv_t - mt;
    sums.sum_nt_s += fast_exp2(da * kLog2e);
    const float et = fast_exp2(db * kLog2e);
    sums.sum_nt_t += et;
    if (topk_kept(key_of(tv), j, thr_key, tie_last)) {
      sums.sum_k_t += et;
      sums.acc += et * (db - da);
      const float a = s * inv_t;
      if (a > sums.max_k_s) {
        sums.sum_k_s = sums.sum_k_s * fast_exp2((sums.max_k_s - a) * kLog2e) + 1.0f;
        sums.max_k_s = a;
      } else {
        sums.sum_k_s += fast_exp2((a - sums.max_k_s) * kLog2e);
      }
    }
  });
  const RowSums r = speckd_cuda::cluster_allreduce(sums, &slot_sums, &res_sums, reinterpret_cast<RowSums*>(scratch));

  const float temp = prm.temperature, temp2 = temp * temp;
  const float lse1 = m1 + logf(r.sum_s1);
  const float a_y = s_y * inv_t, b_y = t_y * inv_t;
  const float lse_nt_s = ms + logf(r.sum_nt_s), lse_nt_t = mt + logf(r.sum_nt_t);  // -inf when N is empty
  const float lse_s = log_add_exp(a_y, lse_nt_s), lse_t = log_add_exp(b_y, lse_nt_t);
  const float log_ps = a_y - lse_s, log_1mps = lse_nt_s - lse_s;
  const float log_pt = b_y - lse_t, log_1mpt = lse_nt_t - lse_t;
  const float ps = expf(log_ps), pt = expf(log_pt), one_m_pt = expf(log_1mpt);
  float tckd = 0.0f;
  if (pt > 0.0f) tckd += pt * (log_pt - log_ps);
  if (one_m_pt > 0.0f) tckd += one_m_pt * (log_1mpt - log_1mps);
  tckd *= temp2;
  const bool kept_any = r.sum_k_t > 0.0f;
  const float log_sum_k_t = logf(r.sum_k_t), log_sum_k_s = logf(r.sum_k_s);
  const float nckd = kept_any ? temp2 * (r.acc / r.sum_k_t + r.max_k_s - ms - log_sum_k_t + log_sum_k_s) : 0.0f;
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
    // log-space offsets: softmax_N(a)_j = exp(a_j - lse_nt_s), softmax_K(a)_j = exp(a_j - lse_k_s).
    const float lse_k_s = r.max_k_s + log_sum_k_s, lse_k_t = mt + log_sum_k_t;
    write_grads(g_ce, g_tc, g_nc, rs, rt, len, vec && global_vec, [&](int i, T sv, T tv) {
      const int64_t j = begin + i;
      const float s = to_float(sv);
      float3 g;
      g.x = scale * (fast_exp2((s - lse1) * kLog2e) - (j == y ? 1.0f : 0.0f));
      if (j == y) {
        g.y = coef_tc;
        g.z = 0.0f;
        return g;
      }
      const float a = s * inv_t;
      g.y = -coef_tc * fast_exp2((a - lse_nt_s) * kLog2e);
      g.z = topk_kept(key_of(tv), j, thr_key, tie_last)
                ? coef_nc * (fast_exp2((a - lse_k_s) * kLog2e) - fast_exp2((to_float(tv) * inv_t - lse_k_t) * kLog2e))
                : 0.0f;
      return g;
    });
  }
  // No block may leave while another can still read its shared memory.
  cluster.sync();
}

}  // namespace specx::deepkd_cuda
