// Element types and the row-slice loader shared by the cluster-per-row kernels (SpecKD,
// DeepKD, top-k threshold): torch-free.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <type_traits>

#include "specx/common.h"

namespace specx {

// Calls f(T()) with T the CUDA element type of `dtype` and returns its result.
template <typename F>
auto dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half());
    case DType::kBFloat16: return f(__nv_bfloat16());
    default: return f(float());
  }
}

// The entry of a launcher over `rows` rows: nothing to launch for none, one dtype dispatch of
// launch(T()), then the launch's own error.
template <typename F>
int launch_by_dtype(DType dtype, int64_t rows, F&& launch) {
  if (rows == 0) return cudaSuccess;
  cudaError_t err = dispatch_dtype(dtype, launch);
  if (err == cudaSuccess) err = cudaGetLastError();
  return static_cast<int>(err);
}

// Whether every pointer allows 16-byte vector access.
template <typename... Ptr>
__device__ __forceinline__ bool aligned16(const Ptr*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x for normal x, without __fdividef's rescaling of tiny operands.
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 16 bytes of T: the unit of every global and shared-memory access on the fast path.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// The float values of a 16-byte pack. A bf16 is the top half of its float, so each 32-bit word
// splits with one shift and one mask (element by element takes a third instruction per pair).
template <typename T>
__device__ __forceinline__ void pack_to_floats(const uint4& raw, float (&f)[Pack<T>::kN]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = __uint_as_float(w[j] << 16);
      f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  } else {
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(&raw);
#pragma unroll
    for (int e = 0; e < Pack<T>::kN; ++e) f[e] = to_float(p.v[e]);
  }
}

// Running maximum over 16-byte packs: fp16 / bf16 two elements per instruction on the raw 32-bit
// words, fp32 one at a time. NaN is skipped, as fmaxf does.
template <typename T>
struct PackMax {
  static constexpr bool kPaired = !std::is_same_v<T, float>;
  // -inf in both halves, or as a float.
  uint32_t m = kPaired ? (std::is_same_v<T, __half> ? 0xfc00fc00u : 0xff80ff80u) : 0xff800000u;

  __device__ __forceinline__ void add(const uint4& pack) {
    const uint32_t w[4] = {pack.x, pack.y, pack.z, pack.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        asm("max.bf16x2 %0, %0, %1;" : "+r"(m) : "r"(w[j]));
      } else if constexpr (std::is_same_v<T, __half>) {
        asm("max.f16x2 %0, %0, %1;" : "+r"(m) : "r"(w[j]));
      } else {
        m = __float_as_uint(fmaxf(__uint_as_float(m), __uint_as_float(w[j])));
      }
    }
  }
  __device__ __forceinline__ float value() const {
    if constexpr (!kPaired) {
      return __uint_as_float(m);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return fmaxf(__uint_as_float(m << 16), __uint_as_float(m & 0xffff0000u));
    } else {
      return fmaxf(__half2float(__ushort_as_half(static_cast<unsigned short>(m))),
                   __half2float(__ushort_as_half(static_cast<unsigned short>(m >> 16))));
    }
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy into shared memory; src_bytes == 0 fills the destination with zeros.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>  // waits until at most kPending of this thread's groups are in flight
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// The same shared-memory object in block `rank` of the cluster.
__device__ __forceinline__ uint32_t peer_address(uint32_t local, unsigned rank) {
  uint32_t out;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(local), "r"(rank));
  return out;
}

// Returns once phase 0 of the mbarrier at `bar` has completed, acquiring what completed it: at
// cluster scope for other blocks' stores, at CTA scope for this block's bulk copies.
template <bool kClusterScope>
__device__ __forceinline__ void wait_phase0(uint32_t bar) {
  uint32_t done;
  do {
    if constexpr (kClusterScope) {
      asm volatile(
          "{\n"
          ".reg .pred p;\n"
          "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;\n"
          "selp.u32 %0, 1, 0, p;\n"
          "}\n"
          : "=r"(done)
          : "r"(bar)
          : "memory");
    } else {
      asm volatile(
          "{\n"
          ".reg .pred p;\n"
          "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n"
          "selp.u32 %0, 1, 0, p;\n"
          "}\n"
          : "=r"(done)
          : "r"(bar)
          : "memory");
    }
  } while (!done);
}

// The part of a row that this block of a cluster-per-row launch owns: row blockIdx.x / cluster
// size, elements [begin, begin + len) of it.
struct RowSlice {
  int nblocks;
  int rank;
  int64_t row;
  int64_t begin;
  int len;
};

__device__ __forceinline__ RowSlice this_row_slice(int64_t row_len, int slice_len) {
  const cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  RowSlice r;
  r.nblocks = static_cast<int>(cluster.num_blocks());
  r.rank = static_cast<int>(cluster.block_rank());
  r.row = blockIdx.x / r.nblocks;
  r.begin = static_cast<int64_t>(r.rank) * slice_len;
  const int64_t left = row_len - r.begin;
  r.len = left <= 0 ? 0 : static_cast<int>(left < slice_len ? left : slice_len);
  return r;
}

// Calls visit_pack(pack index, s pack, t pack) (raw 16 bytes each) on every whole 16-byte pack of a slice already in
// memory (shared or global) where `vectorized`, and visit(local index, s, t) on the other elements.
template <int kThreads, typename T, typename FPack, typename F>
__device__ __forceinline__ void for_each_pack_pair(const T* s, const T* t, int len, bool vectorized,
                                                   FPack&& visit_pack, F&& visit) {
  constexpr int kN = Pack<T>::kN;
  int scalar_from = 0;
  if (vectorized) {
    const int nvec = len / kN;
    for (int v = threadIdx.x; v < nvec; v += kThreads)
      visit_pack(v, reinterpret_cast<const uint4*>(s)[v], reinterpret_cast<const uint4*>(t)[v]);
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads) visit(i, s[i], t[i]);
}

// Calls visit(local index, s, t) on every element of a slice already in memory (shared or
// global), 16 bytes at a time where `vectorized`.
template <int kThreads, typename T, typename F>
__device__ __forceinline__ void for_each_pair(const T* s, const T* t, int len, bool vectorized, F&& visit) {
  for_each_pack_pair<kThreads>(
      s, t, len, vectorized,
      [&](int v, const uint4& raw_a, const uint4& raw_b) {
        const Pack<T> a = *reinterpret_cast<const Pack<T>*>(&raw_a), b = *reinterpret_cast<const Pack<T>*>(&raw_b);
#pragma unroll
        for (int e = 0; e < Pack<T>::kN; ++e) visit(v * Pack<T>::kN + e, a.v[e], b.v[e]);
      },
      visit);
}

// for_each_pair with the values handed over as floats.
template <int kThreads, typename T, typename F>
__device__ __forceinline__ void for_each_float_pair(const T* s, const T* t, int len, bool vectorized, F&& visit) {
  for_each_pack_pair<kThreads>(
      s, t, len, vectorized,
      [&](int v, const uint4& a, const uint4& b) {
        float fa[Pack<T>::kN], fb[Pack<T>::kN];
        pack_to_floats<T>(a, fa);
        pack_to_floats<T>(b, fb);
#pragma unroll
        for (int e = 0; e < Pack<T>::kN; ++e) visit(v * Pack<T>::kN + e, fa[e], fb[e]);
      },
      [&](int i, T a, T b) { visit(i, to_float(a), to_float(b)); });
}

// The part of a slice that warp `warp` of a kThreads-thread block owns: elements [lo, hi), visited
// in units of `unit` elements (a 16-byte pack, or 1 where the slice is unaligned), lane l taking
// units l, l + 32, ... Chunks are contiguous and in warp order, so a prefix sum over the warps,
// then over the units of one warp, locates any element.
struct WarpChunk {
  int lo, hi, unit;
  __device__ __forceinline__ int units() const { return (hi - lo + unit - 1) / unit; }
};

template <int kThreads, typename T>
__device__ __forceinline__ WarpChunk warp_chunk(int len, bool vectorized, int warp) {
  constexpr int kWarps = kThreads / 32;
  const int unit = vectorized ? Pack<T>::kN : 1;
  const int per = ((len + kWarps - 1) / kWarps + unit - 1) / unit * unit;
  const int lo = min(len, warp * per);
  return {lo, min(len, lo + per), unit};
}

// Calls visit(local index, s, t) on the elements of unit u of chunk c, 16 bytes at a time when
// the unit is a whole pack.
template <typename T, typename F>
__device__ __forceinline__ void visit_unit(const T* s, const T* t, const WarpChunk& c, int u, F&& visit) {
  constexpr int kN = Pack<T>::kN;
  const int a = c.lo + u * c.unit, b = min(c.hi, a + c.unit);
  if (c.unit == kN && b - a == kN) {
    const Pack<T> pa = *reinterpret_cast<const Pack<T>*>(s + a);
    const Pack<T> pb = *reinterpret_cast<const Pack<T>*>(t + a);
#pragma unroll
    for (int e = 0; e < kN; ++e) visit(a + e, pa.v[e], pb.v[e]);
  } else {
    for (int i = a; i < b; ++i) visit(i, s[i], t[i]);
  }
}

// Calls visit(local index, s, t) on every element of a slice already in memory, each warp over
// its own chunk (see WarpChunk).
template <int kThreads, typename T, typename F>
__device__ __forceinline__ void for_each_pair_by_warp(const T* s, const T* t, int len, bool vectorized,
                                                      F&& visit) {
  const WarpChunk c = warp_chunk<kThreads, T>(len, vectorized, threadIdx.x / 32);
  const int units = c.units();
  for (int u = threadIdx.x % 32; u < units; u += 32) visit_unit(s, t, c, u, visit);
}

// Streams a block's slice of two rows (len elements from gs and gt) in once and copies it to
// shared memory (cs, ct) when `cached`. Each thread loads kUnroll 16-byte packs per tensor before
// the first use and hands them to visit_batch(first, count, s_packs, t_packs): packs first,
// first + kThreads, ... of which the first `count` hold data. Elements past the last whole pack
// (or all of them when not `vectorized`) go to visit(local index, s, t). Each thread sees its
// elements in increasing index order.
template <int kThreads, int kUnroll, typename T, typename FBatch, typename F>
__device__ __forceinline__ void load_slice_batches(const T* gs, const T* gt, T* cs, T* ct, int len, bool cached,
                                                   bool vectorized, FBatch&& visit_batch, F&& visit) {
  constexpr int kN = Pack<T>::kN;
  int scalar_from = 0;
  if (vectorized) {
    const int nvec = len / kN;
    const uint4* vs = reinterpret_cast<const uint4*>(gs);
    const uint4* vt = reinterpret_cast<const uint4*>(gt);
    for (int base = threadIdx.x; base < nvec; base += kUnroll * kThreads) {
      uint4 a[kUnroll], b[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int v = base + u * kThreads;
        if (v < nvec) {
          a[u] = __ldcs(vs + v);
          b[u] = __ldcs(vt + v);
        }
      }
      const int count = min(kUnroll, (nvec - base + kThreads - 1) / kThreads);
      if (cached) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (u < count) {
            reinterpret_cast<uint4*>(cs)[base + u * kThreads] = a[u];
            reinterpret_cast<uint4*>(ct)[base + u * kThreads] = b[u];
          }
        }
      }
      visit_batch(base, count, a, b);
    }
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads) {
    const T s = gs[i], t = gt[i];
    if (cached) {
      cs[i] = s;
      ct[i] = t;
    }
    visit(i, s, t);
  }
}

// Copies a block's slice of two rows into shared memory with bulk copies (the TMA engine) for the
// whole 16-byte packs, and element by element past the last pack; every thread returns once all of
// it has arrived. The whole slice is in flight at once, which a per-thread loader cannot afford in
// registers. gs and gt must be 16-byte aligned; `arrived` is a __shared__ word for the barrier.
template <int kThreads, typename T>
__device__ __forceinline__ void bulk_load_slice_pair(const T* gs, const T* gt, T* cs, T* ct, int len,
                                                     uint64_t* arrived) {
  constexpr int kN = Pack<T>::kN;
  constexpr uint32_t kChunkBytes = 8192;  // per copy, spread over the lanes of warp 0
  const int nvec = len / kN;
  const uint32_t bytes = static_cast<uint32_t>(nvec) * 16u;
  const uint32_t bar = shared_address(arrived);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    if (threadIdx.x == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(2 * bytes) : "memory");
    __syncwarp();
    const uint32_t chunks = (bytes + kChunkBytes - 1) / kChunkBytes;
    for (uint32_t c = threadIdx.x; c < 2 * chunks; c += 32) {
      const bool teacher = c >= chunks;
      const uint32_t offset = (teacher ? c - chunks : c) * kChunkBytes;
      const uint32_t size = min(kChunkBytes, bytes - offset);
      const char* src = reinterpret_cast<const char*>(teacher ? gt : gs) + offset;
      const uint32_t dst = shared_address(teacher ? ct : cs) + offset;
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(dst), "l"(src), "r"(size), "r"(bar)
                   : "memory");
    }
  }
  for (int i = nvec * kN + threadIdx.x; i < len; i += kThreads) {
    cs[i] = gs[i];
    ct[i] = gt[i];
  }
  wait_phase0<false>(bar);
}

// The lowest local index among this thread's elements of a load_slice_batches pass (the same
// packs, then the same tail) whose value equals v, or INT_MAX.
template <int kThreads, typename T>
__device__ __forceinline__ int first_index_of(const T* s, int len, bool vectorized, float v) {
  constexpr int kN = Pack<T>::kN;
  int scalar_from = 0;
  if (vectorized) {
    const int nvec = len / kN;
    for (int p = threadIdx.x; p < nvec; p += kThreads) {
      float f[kN];
      pack_to_floats<T>(reinterpret_cast<const uint4*>(s)[p], f);
#pragma unroll
      for (int e = 0; e < kN; ++e)
        if (f[e] == v) return p * kN + e;
    }
    scalar_from = nvec * kN;
  }
  for (int i = scalar_from + threadIdx.x; i < len; i += kThreads)
    if (to_float(s[i]) == v) return i;
  return INT_MAX;
}

// Calls visit(local index, s, t) on every element of a batch from load_slice_batches, the values
// as floats.
template <int kThreads, typename T, int kUnroll, typename F>
__device__ __forceinline__ void for_each_in_batch(int first, int count, const uint4 (&a)[kUnroll],
                                                  const uint4 (&b)[kUnroll], F&& visit) {
  constexpr int kN = Pack<T>::kN;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) {
      float fa[kN], fb[kN];
      pack_to_floats<T>(a[u], fa);
      pack_to_floats<T>(b[u], fb);
#pragma unroll
      for (int e = 0; e < kN; ++e) visit((first + u * kThreads) * kN + e, fa[e], fb[e]);
    }
  }
}

}  // namespace specx
