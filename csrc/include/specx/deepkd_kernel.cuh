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
// Every sum over N is an online (running max, sum) pair relative to N's own maximum, taken while
// the slice loads. The part of K above the threshold is summed in the same pass under the same
// maxima (K is a subset of N, so it costs no exps of its own). The ties with the threshold are
// listed first and their counts exchanged across the cluster during that pass; a block then keeps
// none of its ties, all, or (one block per row at most) its lowest-index ones, and sums those it
// keeps. K's teacher sum holds N's teacher maximum whenever K is not empty; its student
// sum may underflow when all of K's student logits lie far below N's, and then K is summed again
// under its own maxima. Passes: load, then the gradients.
#pragma once
#include <cfloat>

#include "specx/cluster_exchange.cuh"
#include "specx/exp2_offsets.cuh"
#include "specx/topk_threshold_kernel.cuh"

namespace specx::deepkd_cuda {

constexpr int kThreads = topk_cuda::kThreads;

// sum_j exp(x_j - m) over a set, m its running maximum; empty: m = -FLT_MAX (finite, so that no
// exp argument is NaN), s = 0.
struct ExpSum {
  float m;
  float s;
  // Moves the sum to a maximum `to` > m.
  __device__ __forceinline__ void raise(float to) {
    s *= fast_exp2((m - to) * kLog2e);
    m = to;
  }
  __device__ __forceinline__ void add(float x) {
    if (x > m) {
      raise(x);
      s += 1.0f;
    } else {
      s += fast_exp2((x - m) * kLog2e);
    }
  }
  __device__ __forceinline__ float lse() const { return m + logf(s); }  // -inf when empty
};
// The same, plus acc = sum_j exp(x_j - m) w_j (here w_j = t_j - s_j: T (b_j - a_j)).
struct ExpSumAcc {
  float m;
  float s;
  float acc;
  __device__ __forceinline__ void raise(float to) {
    const float f = fast_exp2((m - to) * kLog2e);
    s *= f;
    acc *= f;
    m = to;
  }
  __device__ __forceinline__ void add(float x, float w) {
    if (x > m) {
      raise(x);
      s += 1.0f;
      acc += w;
    } else {
      const float e = fast_exp2((x - m) * kLog2e);
      s += e;
      acc += e * w;
    }
  }
  __device__ __forceinline__ float lse() const { return m + logf(s); }
};

// A thread's running sum over N of exp2((x - m) scale), x a raw logit and m their running maximum
// (raise moves it to a larger one), that also sums, under the same maximum, over N's classes above
// the top-k threshold. The exps' arguments are differences of logits, scaled: exact enough
// whatever the logits' magnitude.
struct ExpSumAbove {
  float m;
  float s;
  float s_above;
  __device__ __forceinline__ void raise(float to, float scale) {
    const float f = fast_exp2((m - to) * scale);
    s *= f;
    s_above *= f;
    m = to;
  }
  __device__ __forceinline__ void add(float x, float scale, bool above) {
    if (x > m) {
      raise(x, scale);
      s += 1.0f;
      s_above += above ? 1.0f : 0.0f;
    } else {
      const float e = fast_exp2((x - m) * scale);
      s += e;
      s_above += above ? e : 0.0f;
    }
  }
};
// The same for an ExpSumAcc.
struct ExpSumAccAbove {
  float m;
  float s;
  float acc;
  float s_above;
  float acc_above;
  __device__ __forceinline__ void raise(float to, float scale) {
    const float f = fast_exp2((m - to) * scale);
    s *= f;
    acc *= f;
    s_above *= f;
    acc_above *= f;
    m = to;
  }
  __device__ __forceinline__ void add(float x, float w, float scale, bool above) {
    if (x > m) {
      raise(x, scale);
      s += 1.0f;
      acc += w;
      s_above += above ? 1.0f : 0.0f;
      acc_above += above ? w : 0.0f;
    } else {
      const float e = fast_exp2((x - m) * scale), ew = e * w;
      s += e;
      acc += ew;
      s_above += above ? e : 0.0f;
      acc_above += above ? ew : 0.0f;
    }
  }
};

// Below this, K's student sum relative to N's student maximum may have lost flushed terms.
constexpr float kKSumGuard = 0x1p-60f;

// Ties with the threshold that a block lists while loading; a block with more finds its kept ones
// again (keep_lowest_ties).
constexpr int kTieCapacity = kThreads;
struct Tie {
  int i;    // local index
  float s;  // student logit
};

// Elements of a 16-byte pack equal to v as values (-0 == +0; NaN equals nothing): per 16-bit
// element, 0xffff where equal; per float, 1.
template <typename T>
__device__ __forceinline__ uint32_t equal_bits(uint32_t word, T v) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(word) == v;
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    return __heq2_mask(*reinterpret_cast<const T2*>(&word), T2{v, v});
  }
}
template <typename T>
__device__ __forceinline__ unsigned count_equal(const uint4& pack, T v) {
  const unsigned bits = __popc(equal_bits(pack.x, v)) + __popc(equal_bits(pack.y, v)) + __popc(equal_bits(pack.z, v)) +
                        __popc(equal_bits(pack.w, v));
  return std::is_same_v<T, float> ? bits : bits / 16;
}
template <typename T>
__device__ __forceinline__ bool any_equal(const uint4& pack, T v) {
  return (equal_bits(pack.x, v) | equal_bits(pack.y, v) | equal_bits(pack.z, v) | equal_bits(pack.w, v)) != 0;
}

// A block's count of ties with the threshold.
struct TieCount {
  unsigned n;
};
__device__ __forceinline__ TieCount combine(TieCount a, TieCount b) { return {a.n + b.n}; }

// Sums of one row.
struct RowSums {
  ExpSum s1;     // s over all classes
  ExpSum nt_a;   // a over N
  ExpSumAcc nt_b;  // b over N, acc: w = t - s
  ExpSum k_a;    // a over K
  ExpSumAcc k_b;   // b over K, acc: w = t - s
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

// A block that keeps its `keep` lowest-index ties with the threshold value thr_value (0 < keep <=
// its ties): calls add_kept(i, s) on each kept one (local index, student logit), and returns the
// local index of the last kept one, in every thread. Warp w's chunk holds its ties in index order
// after the lower warps' (see WarpChunk): the warps wholly below the cut add all of theirs, and the
// warp holding it walks its chunk 32 units a round to find the exact place. The ties are counted
// a pack at a time; only the lanes that hold some look at single elements.
template <typename T, typename AddKept>
__device__ int keep_lowest_ties(const T* rs, const T* rt, int len, bool vec, T thr_value, unsigned keep,
                                AddKept&& add_kept, unsigned* warp_totals, int* found) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const WarpChunk c = warp_chunk<kThreads, T>(len, vec, warp);
  const int units = c.units();
  const float thr = to_float(thr_value);
  auto ties_in = [&](int u) {
    const int at = c.lo + u * c.unit;
    if (c.unit == Pack<T>::kN && c.hi - at >= c.unit)
      return count_equal<T>(*reinterpret_cast<const uint4*>(rt + at), thr_value);
    unsigned n = 0;
    for (int i = at; i < min(c.hi, at + c.unit); ++i) n += to_float(rt[i]) == thr;
    return n;
  };
  // Adds the first `left` ties of unit u (all of them when left >= its count); the index of the
  // left-th when it is reached there, else -1.
  auto keep_in = [&](int u, unsigned left) {
    int last = -1;
    visit_unit(rs, rt, c, u, [&](int i, T sv, T tv) {
      if (left == 0 || !(to_float(tv) == thr)) return;
      if (--left == 0) last = i;
      add_kept(i, to_float(sv));
    });
    return last;
  };
  unsigned mine = 0;
  for (int u = lane; u < units; u += 32) mine += ties_in(u);
  const unsigned warp_ties = __reduce_add_sync(~0u, mine);
  if (lane == 0) warp_totals[warp] = warp_ties;
  __syncthreads();
  unsigned before = 0;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  if (before + warp_ties < keep) {
    if (mine > 0)
      for (int u = lane; u < units; u += 32) keep_in(u, ~0u);
  } else if (before < keep) {
    unsigned need = keep - before;  // >= 1 ties of this chunk, in index order
    for (int u0 = 0; u0 < units; u0 += 32) {
      const unsigned n = u0 + lane < units ? ties_in(u0 + lane) : 0u;
      unsigned incl = n;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned up = __shfl_up_sync(~0u, incl, off);
        if (lane >= off) incl += up;
      }
      if (n > 0 && incl - n < need) {
        const int last = keep_in(u0 + lane, need - (incl - n));
        if (incl >= need) *found = last;  // the one lane that holds the need-th
      }
      const unsigned round = __shfl_sync(~0u, incl, 31);
      if (round >= need) break;
      need -= round;
    }
  }
  __syncthreads();
  return *found;
}

// Writes the three gradients of a slice: f(i, s, t) -> float3 (s, t as floats), 16 bytes at a time
// where `vec`.
template <typename T, typename F>
__device__ __forceinline__ void write_grads(T* g0, T* g1, T* g2, const T* s, const T* t, int len, bool vec, F&& f) {
  constexpr int kN = Pack<T>::kN;
  int scalar_from = 0;
  if (vec) {
    const int nvec = len / kN;
    for (int v = threadIdx.x; v < nvec; v += kThreads) {
      float a[kN], b[kN];
      pack_to_floats<T>(reinterpret_cast<const uint4*>(s)[v], a);
      pack_to_floats<T>(reinterpret_cast<const uint4*>(t)[v], b);
      Pack<T> o0, o1, o2;
#pragma unroll
      for (int e = 0; e < kN; ++e) {
        const float3 g = f(v * kN + e, a[e], b[e]);
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
    const float3 g = f(i, to_float(s[i]), to_float(t[i]));
    g0[i] = from_float<T>(g.x);
    g1[i] = from_float<T>(g.y);
    g2[i] = from_float<T>(g.z);
  }
}

// kTopK: k < classes (the launcher decides): K is the teacher top-k minus the target; else K = N.
template <typename T, bool kTopK>
__global__ void __launch_bounds__(kThreads, 3)
    deepkd_rows_kernel(const DeepKDParams prm, const int slice_len, const bool cached) {
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
      write_grads(g_ce, g_tc, g_nc, gs, gt, len, global_vec,
                  [](int, float, float) { return make_float3(0.f, 0.f, 0.f); });
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
  // The sums may be exchanged twice.
  __shared__ ClusterExchange<RowSums> sums_exchange, resummed_exchange;
  __shared__ ClusterExchange<TieCount> tie_exchange;
  __shared__ ExchangeScratch<kThreads, sizeof(RowSums)> scratch;
  int turn = 0;  // which scratch buffer the next exchange takes
  if (threadIdx.x == 0) {
    sums_exchange.init();
    if (kTopK) {
      resummed_exchange.init();
      tie_exchange.init();
    }
  }
  cluster_arrive_started();
  __shared__ unsigned tie_count, warp_totals[kThreads / 32];
  __shared__ int tie_found;
  __shared__ Tie ties_listed[kTieCapacity];
  __shared__ uint64_t slice_arrived;

  const float inv_t = 1.0f / prm.temperature;
  const float s_y = to_float(static_cast<const T*>(prm.student)[row * C + y]);
  const float t_y = to_float(static_cast<const T*>(prm.teacher)[row * C + y]);
  T* cs = cached ? reinterpret_cast<T*>(slice_smem) : nullptr;
  T* ct = cached ? cs + slice_len : nullptr;
  // Per-element tests in slice-local 32-bit indices: y's place in this slice (-1 when elsewhere).
  const int y_at = y >= begin && y < begin + len ? static_cast<int>(y - begin) : -1;
  // Kept (with a top-k): values above the threshold, and ties up to local index tie_at. Apart from
  // NaN, key order is float order (-0 == +0), so the test is two float compares on the value the
  // passes convert anyway. (A row with a NaN teacher logit has NaN losses whatever is kept.)
  const T thr_value = kTopK ? static_cast<const T*>(prm.threshold)[row] : T(0.0f);
  const float thr = to_float(thr_value), b_thr = thr * inv_t;
  int tie_at = len;
  auto kept = [&](int i, float t) { return t > thr || (t == thr && i <= tie_at); };
  if (kTopK && threadIdx.x == 0) tie_count = 0;
  if (kTopK) __syncthreads();

  // Pass 1: stream the slice in (once): the sums over all classes, over N and (with a top-k) over
  // N above the threshold, and the list of ties with the threshold (the target included: the tie
  // rule ranks the whole row). Each thread's running maxima move once per batch of packs, so every
  // class costs three exps and no branch; only the batch holding the target takes the per-class
  // path.
  constexpr ExpSum kEmpty{-FLT_MAX, 0.0f};
  constexpr ExpSumAcc kEmptyAcc{-FLT_MAX, 0.0f, 0.0f};
  RowSums sums{kEmpty, kEmpty, kEmptyAcc, kEmpty, kEmptyAcc};
  ExpSumAbove nt_a{-FLT_MAX, 0.0f, 0.0f};
  ExpSumAccAbove nt_b{-FLT_MAX, 0.0f, 0.0f, 0.0f, 0.0f};
  unsigned ties_seen = 0;  // this thread's ties with the threshold
  auto list_tie = [&](int i, float s) {
    ++ties_seen;
    const unsigned slot = atomicAdd(&tie_count, 1u);
    if (slot < kTieCapacity) ties_listed[slot] = {i, s};
  };
  constexpr int kN = Pack<T>::kN, kUnroll = 4;
  const float c = inv_t * kLog2e;  // exp((x - m) / T) = exp2((x - m) c)
  auto add_class = [&](int i, float s, float t) {
    sums.s1.add(s);
    if (i != y_at) {
      nt_a.add(s, c, kTopK && t > thr);
      nt_b.add(t, t - s, c, kTopK && t > thr);
    }
  };
  auto add_listed_class = [&](int i, float s, float t) {
    if (kTopK && t == thr) list_tie(i, s);
    add_class(i, s, t);
  };
  // The tie counts go out as soon as the block has listed its ties (push's barrier completes the
  // list); the sums pass hides the round trip.
  typename ClusterExchange<TieCount>::Sent tie_sent{};
  auto send_tie_counts = [&] {
    cluster_wait_started();
    if constexpr (kTopK) tie_sent = tie_exchange.push<kThreads>(TieCount{ties_seen}, scratch.take<TieCount>(turn));
  };
  const int y_pack = y_at >= 0 && y_at / kN % kThreads == static_cast<int>(threadIdx.x) ? y_at / kN : -1;
  auto add_batch = [&](int first, int count, const uint4(&ps)[kUnroll], const uint4(&pt)[kUnroll]) {
    if (y_pack >= first && y_pack < first + count * kThreads) {
      for_each_in_batch<kThreads, T>(first, count, ps, pt, add_listed_class);
      return;
    }
    PackMax<T> batch_max_s, batch_max_t;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (u < count) {
        batch_max_s.add(ps[u]);
        batch_max_t.add(pt[u]);
      }
    }
    const float max_s = batch_max_s.value(), max_t = batch_max_t.value();
    if (max_s > sums.s1.m) sums.s1.raise(max_s);
    if (max_s > nt_a.m) nt_a.raise(max_s, c);
    if (max_t > nt_b.m) nt_b.raise(max_t, c);
    for_each_in_batch<kThreads, T>(first, count, ps, pt, [&](int i, float s, float t) {
      sums.s1.s += fast_exp2((s - sums.s1.m) * kLog2e);
      const float ea = fast_exp2((s - nt_a.m) * c), eb = fast_exp2((t - nt_b.m) * c), ew = eb * (t - s);
      nt_a.s += ea;
      nt_b.s += eb;
      nt_b.acc += ew;
      if constexpr (kTopK) {
        if (t > thr) {
          nt_a.s_above += ea;
          nt_b.s_above += eb;
          nt_b.acc_above += ew;
        }
        if (t == thr) list_tie(i, s);
      }
    });
  };
  if (cached && global_vec) {
    // The slice comes in by bulk copies; then each thread takes the maxima of its classes of N and
    // sums under them, every exp one multiply-add around the maximum's rounded product (exp_offset;
    // its exact error scales each sum once, at the end). The pack holding the target, the tail, and
    // a thread whose logits reach 2^64 in magnitude take the per-class path instead.
    bulk_load_slice_pair<kThreads>(gs, gt, cs, ct, len, &slice_arrived);
    PackMax<T> pack_max_s, pack_max_t;
    float other_max_s = -INFINITY, other_max_t = -INFINITY;
    auto other_max = [&](int i, float s, float t) {
      if (kTopK && t == thr) list_tie(i, s);
      if (i == y_at) return;
      other_max_s = fmaxf(other_max_s, s);
      other_max_t = fmaxf(other_max_t, t);
    };
    for_each_pack_pair<kThreads>(
        cs, ct, len, true,
        [&](int v, const uint4& a, const uint4& b) {
          if (v != y_pack) {
            pack_max_s.add(a);
            pack_max_t.add(b);
            if (kTopK && any_equal<T>(b, thr_value)) {
              float fs[kN], ft[kN];
              pack_to_floats<T>(a, fs);
              pack_to_floats<T>(b, ft);
#pragma unroll
              for (int e = 0; e < kN; ++e)
                if (ft[e] == thr) list_tie(v * kN + e, fs[e]);
            }
            return;
          }
          float fs[kN], ft[kN];
          pack_to_floats<T>(a, fs);
          pack_to_floats<T>(b, ft);
#pragma unroll
          for (int e = 0; e < kN; ++e) other_max(v * kN + e, fs[e], ft[e]);
        },
        [&](int i, T s, T t) { other_max(i, to_float(s), to_float(t)); });
    send_tie_counts();
    const float m_s = fmaxf(pack_max_s.value(), other_max_s), m_t = fmaxf(pack_max_t.value(), other_max_t);
    const bool fast = fabsf(m_s) < 0x1p64f && fabsf(m_t) < 0x1p64f;  // false for an empty or all -inf N
    const ExpOffset o1 = exp_offset(m_s, kLog2e), oa = exp_offset(m_s, c), ob = exp_offset(m_t, c);
    float f1 = 0.0f, fa = 0.0f, fb = 0.0f, facc = 0.0f, fa_above = 0.0f, fb_above = 0.0f, facc_above = 0.0f;
    auto per_class = [&](int v, const float (&fs)[kN], const float (&ft)[kN]) {
#pragma unroll
      for (int e = 0; e < kN; ++e) add_class(v * kN + e, fs[e], ft[e]);
    };
    for_each_pack_pair<kThreads>(
        cs, ct, len, true,
        [&](int v, const uint4& a, const uint4& b) {
          float fs[kN], ft[kN];
          pack_to_floats<T>(a, fs);
          pack_to_floats<T>(b, ft);
          if (!fast || v == y_pack) {
            per_class(v, fs, ft);
            return;
          }
#pragma unroll
          for (int e = 0; e < kN; ++e) {
            const float s = fs[e], t = ft[e];
            const float e1 = fast_exp2(fmaf(s, kLog2e, -o1.k));
            const float ea = fast_exp2(fmaf(s, c, -oa.k)), eb = fast_exp2(fmaf(t, c, -ob.k));
            f1 += e1;
            fa += ea;
            fb += eb;
            facc = fmaf(eb, t - s, facc);
            if constexpr (kTopK) {
              if (t > thr) {
                fa_above += ea;
                fb_above += eb;
                facc_above = fmaf(eb, t - s, facc_above);
              }
            }
          }
        },
        [&](int i, T s, T t) { add_class(i, to_float(s), to_float(t)); });
    if (fast) {
      // Into the running sums, which hold the per-class classes: exact sums under m_s, m_t first.
      const float x1 = fast_exp2(-o1.err), xa = fast_exp2(-oa.err), xb = fast_exp2(-ob.err);
      if (m_s > sums.s1.m) sums.s1.raise(m_s);
      sums.s1.s = fmaf(f1 * x1, fast_exp2((m_s - sums.s1.m) * kLog2e), sums.s1.s);
      if (m_s > nt_a.m) nt_a.raise(m_s, c);
      const float ga = xa * fast_exp2((m_s - nt_a.m) * c);
      nt_a.s = fmaf(fa, ga, nt_a.s);
      nt_a.s_above = fmaf(fa_above, ga, nt_a.s_above);
      if (m_t > nt_b.m) nt_b.raise(m_t, c);
      const float gb = xb * fast_exp2((m_t - nt_b.m) * c);
      nt_b.s = fmaf(fb, gb, nt_b.s);
      nt_b.acc = fmaf(facc, gb, nt_b.acc);
      nt_b.s_above = fmaf(fb_above, gb, nt_b.s_above);
      nt_b.acc_above = fmaf(facc_above, gb, nt_b.acc_above);
    }
  } else {
    load_slice_batches<kThreads, kUnroll>(gs, gt, cs, ct, len, cached, global_vec, add_batch,
                                          [&](int i, T s, T t) { add_listed_class(i, to_float(s), to_float(t)); });
    send_tie_counts();
  }
  sums.nt_a = {nt_a.m * inv_t, nt_a.s};
  sums.nt_b = {nt_b.m * inv_t, nt_b.s, nt_b.acc};
  const T* rs = cached ? cs : gs;
  const T* rt = cached ? ct : gt;
  const bool vec = cached || global_vec;

  if (kTopK) {
    sums.k_a = {nt_a.m * inv_t, nt_a.s_above};
    sums.k_b = {nt_b.m * inv_t, nt_b.s_above, nt_b.acc_above};
    // The ties kept are the (k - greater) lowest-index ones. The slices are in index order, so this
    // block keeps its `keep` lowest-index ties, after the lower blocks' ties; tie_at is the last
    // of them (-1 when none is).
    const unsigned all_ties = tie_exchange.wait(tie_sent).n;
    const unsigned ties = nblocks == 1 ? all_ties : tie_exchange.slots[rank].n;
    unsigned lower_ties = 0;
    for (int r = 0; r < rank; ++r) lower_ties += tie_exchange.slots[r].n;
    const auto remaining = static_cast<unsigned>(prm.k - prm.count_greater[row]);
    const unsigned keep = remaining <= lower_ties ? 0u : min(ties, remaining - lower_ties);
    ExpSum kept_a = kEmpty;
    ExpSumAcc kept_b = kEmptyAcc;
    auto add_kept_tie = [&](int i, float s) {  // into K: every kept tie but the target
      if (i == y_at) return;
      kept_a.add(s * inv_t);
      kept_b.add(b_thr, thr - s);
    };
    if (keep == 0) {
      tie_at = -1;
    } else if (ties <= kTieCapacity) {
      // Entry j is kept when fewer than `keep` listed ties have a lower index.
      if (threadIdx.x < ties) {
        const Tie mine = ties_listed[threadIdx.x];
        unsigned lower = 0;
        if (keep < ties) {
          for (unsigned j = 0; j < ties; ++j) lower += ties_listed[j].i < mine.i;
          if (lower == keep - 1) tie_found = mine.i;
        }
        if (lower < keep) add_kept_tie(mine.i, mine.s);
      }
      if (keep < ties) {
        __syncthreads();
        tie_at = tie_found;
      }
    } else {
      const int last = keep_lowest_ties(rs, rt, len, vec, thr_value, keep, add_kept_tie, warp_totals, &tie_found);
      if (keep < ties) tie_at = last;
    }
    sums.k_a = combine(sums.k_a, kept_a);
    sums.k_b = combine(sums.k_b, kept_b);
  }
  RowSums r = sums_exchange.allreduce<kThreads>(sums, scratch.take<RowSums>(turn));
  if (kTopK && r.k_b.s > 0.0f && r.k_a.s < kKSumGuard) {  // the same in every block of the cluster
    sums.k_a = kEmpty;
    sums.k_b = kEmptyAcc;
    for_each_pair<kThreads>(rs, rt, len, vec, [&](int i, T sv, T tv) {
      const float s = to_float(sv), t = to_float(tv);
      if (i == y_at || !kept(i, t)) return;
      sums.k_a.add(s * inv_t);
      sums.k_b.add(t * inv_t, t - s);
    });
    r = resummed_exchange.allreduce<kThreads>(sums, scratch.take<RowSums>(turn));
  }
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
  const float nckd = r.k_b.s > 0.0f ? temp2 * (inv_t * r.k_b.acc / r.k_b.s - lse_k_t + lse_k_s) : 0.0f;
  if (rank == 0 && threadIdx.x == 0) {
    prm.row_losses[3 * row] = lse1 - s_y;
    prm.row_losses[3 * row + 1] = tckd;
    prm.row_losses[3 * row + 2] = nckd;
  }

  // Pass 3: the three gradients, from the cached slice. Each exp is one multiply-add around a row
  // constant, the constant's rounding moved into a row factor (exp_norm_of). The loop treats every
  // class as a non-target one; the target's three entries are written after it.
  if (with_grad) {
    const float scale = *prm.grad_scale;
    const float coef_tc = temp * scale * (ps - pt);
    const float coef_nc = temp * scale;
    // softmax_K(a) = softmax_N(a) exp(lse_N(a) - lse_K(a)): no exp of its own unless that factor is
    // large enough for softmax_N(a) to have flushed to 0 where softmax_K(a) would not.
    const float k_ratio = kTopK && lse_nt_s - lse_k_s < 20.0f ? fast_exp2((lse_nt_s - lse_k_s) * kLog2e) : 0.0f;
    const bool own_k_exp = kTopK && !(k_ratio > 0.0f);
    const ExpNorm ce = exp_norm_of(lse1, kLog2e, scale);  // d ce: ce.scale 2^(s log2(e) - ce.k)
    const ExpNorm nt = exp_norm_of(lse_nt_s, kLog2e, 1.0f);  // softmax_N(a) = nt.scale 2^(s c - nt.k)
    const float coef_nt = -coef_tc * nt.scale;
    const ExpNorm kt = exp_norm_of(lse_k_t, kLog2e, coef_nc);  // coef_nc softmax_K(b)
    const ExpNorm ks = own_k_exp ? exp_norm_of(lse_k_s, kLog2e, coef_nc)  // coef_nc softmax_K(a)
                                 : ExpNorm{nt.k, coef_nc * (kTopK ? k_ratio : 1.0f) * nt.scale};
    // kTieMode: 0, no tie with the threshold is kept in this slice; 1, all are; 2, some (or K's
    // student sum needs its own exp): the full test.
    auto grads = [&](auto tie_mode) {
      constexpr int kTieMode = decltype(tie_mode)::value;
      write_grads(g_ce, g_tc, g_nc, rs, rt, len, vec && global_vec, [&](int i, float s, float t) {
        const float e_nt = fast_exp2(fmaf(s, c, -nt.k));
        const float e_ks = kTieMode == 2 && own_k_exp ? fast_exp2(fmaf(s, c, -ks.k)) : e_nt;
        const float nc = fmaf(ks.scale, e_ks, -kt.scale * fast_exp2(fmaf(t, c, -kt.k)));
        bool keep = true;
        if constexpr (kTopK) keep = kTieMode == 0 ? t > thr : kTieMode == 1 ? t >= thr : kept(i, t);
        return make_float3(ce.scale * fast_exp2(fmaf(s, kLog2e, -ce.k)), coef_nt * e_nt, keep ? nc : 0.0f);
      });
    };
    if (!kTopK || (!own_k_exp && tie_at >= len - 1)) {
      grads(std::integral_constant<int, 1>{});
    } else if (!own_k_exp && tie_at < 0) {
      grads(std::integral_constant<int, 0>{});
    } else {
      grads(std::integral_constant<int, 2>{});
    }
    if (y_at >= 0) {  // the same in every thread of the block
      __syncthreads();  // after the loop's stores to y_at
      if (threadIdx.x == 0) {
        g_ce[y_at] = from_float<T>(scale * (fast_exp2((s_y - lse1) * kLog2e) - 1.0f));
        g_tc[y_at] = from_float<T>(coef_tc);
        g_nc[y_at] = from_float<T>(0.0f);  // y is never in K
      }
    }
  }
}

}  // namespace specx::deepkd_cuda
