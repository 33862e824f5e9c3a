// Host emulation of the few CUDA features the build_tree kernel uses: one std::thread per CUDA thread.
#pragma once
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __align__(x) alignas(x)
struct Dim { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim threadIdx, blockIdx;
inline Dim blockDim{0, 1, 1};  // set to the kernel's kThreads by main.cpp
struct BlockCtx {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> wbar;
  std::vector<uint64_t> xchg;
  unsigned char* smem;
  std::atomic<long> syncs{0};
};
inline thread_local BlockCtx* g_ctx;
inline void __syncthreads() {
  if (threadIdx.x == 0) g_ctx->syncs++;
  g_ctx->bar->arrive_and_wait();
}
inline void warp_sync() { g_ctx->wbar[threadIdx.x / 32]->arrive_and_wait(); }
inline uint64_t xchg_get(int lane) { return g_ctx->xchg[threadIdx.x / 32 * 32 + lane]; }
// Every lane of the warp publishes v, then reads lane src's value.
template <class T>
T warp_exchange(T v, int src) {
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  g_ctx->xchg[threadIdx.x] = u;
  warp_sync();
  const uint64_t o = xchg_get(src);
  warp_sync();
  T r;
  std::memcpy(&r, &o, sizeof(T));
  return r;
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int m) {
  return warp_exchange(v, (threadIdx.x % 32) ^ m);
}
template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return warp_exchange(v, src);
}
inline unsigned __ballot_sync(unsigned, bool p) {
  g_ctx->xchg[threadIdx.x] = p;
  warp_sync();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= unsigned(xchg_get(l) != 0) << l;
  warp_sync();
  return m;
}
inline int __reduce_add_sync(unsigned, int v) {
  g_ctx->xchg[threadIdx.x] = uint64_t(int64_t(v));
  warp_sync();
  int s = 0;
  for (int l = 0; l < 32; ++l) s += int(int64_t(xchg_get(l)));
  warp_sync();
  return s;
}
inline int __popc(unsigned x) { return std::popcount(x); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  std::atomic_ref<unsigned> a(*p);
  unsigned cur = a.load();
  while (v > cur && !a.compare_exchange_weak(cur, v)) {}
  return cur;
}
inline int atomicMin(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {}
  return cur;
}
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
