// Tree attention kernel for Hopper (sm_90a): warpgroup MMA (wgmma) tensor cores.
//
// Same inputs, outputs and mask rules as tree_attention_kernel, which it replaces on sm_90 for
// blocks of more than 64 query rows. Each warpgroup (4 warps) owns 64 query rows of one
// (sequence, KV head), node-major as in the mma.sync kernel, so every K/V tile the block brings
// into shared memory serves all its rows. S = Q K^T is wgmma m64n64k16 with Q and K read from
// shared memory through descriptors; O += P V is wgmma m64n{head_dim}k16 with P and V read from
// shared memory, V transposed by the tensor core. The S accumulator of a warp has the layout of
// mma.m16n8k16's C fragments. The online softmax, the mask (only on tiles reaching past the
// prefix), the cp.async loads by all threads and the KV-length split are the mma.sync kernel's.
//
// A warpgroup issues tile t's Q K^T and then tile t-1's P V, and computes tile t's softmax while
// the tensor cores run that P V (so V is loaded one tile behind K). P goes through shared memory:
// in registers, the P of tile t-1 held for its wgmma next to tile t's S needs 16 registers more
// than the 128 that two blocks per SM allow (ptxas spilled, then serialized the wgmma). On an H200
// (B16 L4096 T64 / B1 / B64 L2048 T32): 197 / 31.2 / 226 us before, 187 / 30.1 / 201 after.
//
// Shared-memory tiles use the 128-byte swizzle wgmma reads: a tile of R rows is stored as column
// halves of 64 elements (128 bytes per row), 8-row groups 1024 bytes apart, and the 16-byte chunk
// c of row r sits at chunk position c ^ (r % 8) within its row; every tile starts 1024-byte
// aligned. The device code exists only in the sm_90a build (__CUDA_ARCH_FEAT_SM90_ALL); the
// launcher picks this kernel only on a compute capability 9.0 device of such a build.
#pragma once
#include "specx/tree_attention_kernel.cuh"

namespace specx::tree_attn_cuda {

// kWarpgroups warpgroups of 64 rows; kStages K/V tiles of kBlockN keys in flight; kMinBlocks
// blocks per SM, which __launch_bounds__ turns into the register cap.
template <int kWarpgroups_, int kStages_, int kMinBlocks_>
struct WgmmaTileConfig {
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kBlockN = 64;
  static constexpr int kRows = kWarpgroups * 64;
  static constexpr int kThreads = kWarpgroups * 128;
};
// Blocks of 128 rows, two per SM (128 registers; their shared memory fills the SM's 228 KiB):
// a (sequence, KV head) with more rows takes several blocks, which read its K/V tiles together
// through L2. Two independent blocks per SM overlap one's softmax with the other's tensor-core
// work, where one block of four warpgroups meets at every tile's barrier: 229 vs 247 us at B16
// L4096 T64 (group 4, 256 rows) on an H200, before P V overlapped the softmax.
using WgmmaTile = WgmmaTileConfig<2, 2, 2>;

// Q tile, the K/V stages and the P tile, plus slack to align the base to 1024 bytes (the swizzle
// pattern repeats every 1024 bytes of shared address, and the descriptors assume it starts at 0).
template <typename Cfg, int kHeadDim>
constexpr int wgmma_smem_bytes() {
  return ((Cfg::kRows + 2 * Cfg::kStages * Cfg::kBlockN) * kHeadDim + Cfg::kRows * Cfg::kBlockN) * 2 /*bytes*/ + 1024;
}
static_assert(WgmmaTile::kMinBlocks * (wgmma_smem_bytes<WgmmaTile, 128>() + 1024) <= 228 * 1024);

// Byte offset of 16-byte chunk `chunk` of row `row` in a 128-byte-swizzled tile of kRows rows.
template <int kRows>
__device__ __forceinline__ uint32_t sw128_offset(int row, int chunk) {
  return (chunk / 8) * (kRows * 128) + row * 128 + (((chunk % 8) ^ (row % 8)) << 4);
}

// wgmma shared-memory descriptor with the 128-byte swizzle: start address, leading byte offset
// (K-major: unused, 16; MN-major: between 64-element column halves), stride byte offset 1024
// (between 8-row groups), base offset 0. Addresses and offsets are stored in 16-byte units, so a
// later byte offset x is added to the descriptor as x >> 4.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t leading_bytes) {
  return uint64_t{(addr & 0x3FFFFu) >> 4} | uint64_t{leading_bytes >> 4} << 16 | uint64_t{1024 >> 4} << 32 |
         uint64_t{1} << 62;
}

// Copies keys [key0, key0 + kBlockN) of one KV head into swizzled tiles; keys >= n become 0.
// Thread x copies chunk x % kChunks of rows x / kChunks + i * kRowsPerPass, so its source steps
// by a fixed pointer stride and its destination by immediates (the row's swizzle is constant).
template <typename Cfg, typename T, int kHeadDim>
struct KvTileLoader {
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kRowsPerPass = Cfg::kThreads / kChunks;
  static_assert(Cfg::kThreads % kChunks == 0 && Cfg::kBlockN % kRowsPerPass == 0 && kRowsPerPass % 8 == 0);
  const T* src;     // this thread's chunk of key 0
  int64_t seq_stride;
  int first_row;
  uint32_t dst;     // this thread's chunk of row first_row, relative to a tile
  __device__ __forceinline__ KvTileLoader(const T* head_base, int64_t seq_stride_) : seq_stride(seq_stride_) {
    const int chunk = threadIdx.x % kChunks;
    first_row = threadIdx.x / kChunks;
    src = head_base + chunk * 8;
    dst = sw128_offset<Cfg::kBlockN>(first_row, chunk);
  }
  __device__ __forceinline__ void operator()(uint32_t tile, int key0, int n) const {
    const T* row_src = src + (key0 + first_row) * seq_stride;
#pragma unroll
    for (int i = 0; i < Cfg::kBlockN / kRowsPerPass; ++i) {
      const bool valid = key0 + first_row + i * kRowsPerPass < n;
      cp_async_16(tile + dst + i * kRowsPerPass * 128, valid ? row_src : src, valid ? 16 : 0);
      row_src += kRowsPerPass * seq_stride;
    }
  }
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

// cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t x) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>  // waits until at most kPending of the warpgroup's wgmma groups are in flight
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Pins registers an in-flight wgmma reads or writes to this point of the program: the compiler
// sees the asm as finished when issued, so without it the registers could be read before the
// wait or reused while the tensor cores still read them.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

#define SPECX_F4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define SPECX_F32(d, i) \
  SPECX_F4(d, i), SPECX_F4(d, i + 4), SPECX_F4(d, i + 8), SPECX_F4(d, i + 12), SPECX_F4(d, i + 16), \
      SPECX_F4(d, i + 20), SPECX_F4(d, i + 24), SPECX_F4(d, i + 28)
#define SPECX_D32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SPECX_D64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// s (+)= Q K^T over 16 dims: A and B both K-major in shared memory; accumulate == 0 overwrites s.
#define SPECX_WGMMA_QK(ty)                                                                         \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." ty "." ty " " SPECX_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n" \
      : SPECX_F32(s, 0)                                                                            \
      : "l"(desc_q), "l"(desc_k), "r"(accumulate))
template <typename T>
__device__ __forceinline__ void wgmma_qk(float (&s)[32], uint64_t desc_q, uint64_t desc_k, int accumulate) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    SPECX_WGMMA_QK("bf16");
  } else {
    SPECX_WGMMA_QK("f16");
  }
}
#undef SPECX_WGMMA_QK

// o += P V over 16 keys: P K-major and V MN-major (imm-trans-b = 1), both in shared memory.
#define SPECX_WGMMA_PV(shape, ty, d_regs, a_and_b, ...)                                                \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                \
               "wgmma.mma_async.sync.aligned." shape ".f32." ty "." ty " " d_regs ", " a_and_b ", p, 1, 1, 0, 1;\n}\n" \
               : __VA_ARGS__                                                                              \
               : "l"(desc_p), "l"(desc_v))
template <typename T, int kHeadDim>
__device__ __forceinline__ void wgmma_pv(float (&o)[kHeadDim / 2], uint64_t desc_p, uint64_t desc_v) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kHeadDim == 64) {
    if constexpr (kBf16) {
      SPECX_WGMMA_PV("m64n64k16", "bf16", SPECX_D32, "%32, %33", SPECX_F32(o, 0));
    } else {
      SPECX_WGMMA_PV("m64n64k16", "f16", SPECX_D32, "%32, %33", SPECX_F32(o, 0));
    }
  } else {
    static_assert(kHeadDim == 128);
    if constexpr (kBf16) {
      SPECX_WGMMA_PV("m64n128k16", "bf16", SPECX_D64, "%64, %65", SPECX_F32(o, 0), SPECX_F32(o, 32));
    } else {
      SPECX_WGMMA_PV("m64n128k16", "f16", SPECX_D64, "%64, %65", SPECX_F32(o, 0), SPECX_F32(o, 32));
    }
  }
}
#undef SPECX_WGMMA_PV
#undef SPECX_D64
#undef SPECX_D32
#undef SPECX_F32
#undef SPECX_F4

#endif  // sm_90a

template <typename Cfg, typename T, int kHeadDim>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    tree_attention_wgmma_kernel(const TreeAttentionParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kStages = Cfg::kStages;
  static_assert(kStages >= 2);
  constexpr int kDSteps = kHeadDim / 16;  // k-steps of Q K^T
  constexpr int kKSteps = kBlockN / 16;   // k-steps of P V
  constexpr int kNTiles = kBlockN / 8;    // 8-key column tiles of S
  constexpr int kOTiles = kHeadDim / 8;   // 8-wide column tiles of O
  constexpr uint32_t kTileBytes = kBlockN * kHeadDim * 2;
  constexpr uint32_t kHalfBytes = kBlockN * 128;  // one 64-element column half of a K/V tile
  extern __shared__ unsigned char smem_raw[];
  const uint32_t q_tile = (shared_address(smem_raw) + 1023) & ~1023u;  // [kRows][kHeadDim], swizzled halves
  const uint32_t k_tiles = q_tile + Cfg::kRows * kHeadDim * 2;          // [kStages][kBlockN][kHeadDim]
  const uint32_t v_tiles = k_tiles + kStages * kTileBytes;              // [kStages][kBlockN][kHeadDim]
  const uint32_t p_tile = v_tiles + kStages * kTileBytes;               // [kRows][kBlockN], swizzled

  const BlockWork w = block_work<Cfg::kRows, kBlockN>(p);
  const int tile_begin = w.tile_begin, tile_end = w.tile_end, n = w.n;
  // Q rows, in the first cp.async group with K tile 0.
  load_q_rows<Cfg::kRows, Cfg::kThreads, T, kHeadDim>(p, w, q_tile, [](int row, int chunk) {
    return sw128_offset<Cfg::kRows>(row, chunk);
  });
  const KvTileLoader<Cfg, T, kHeadDim> load_k(
      static_cast<const T*>(p.k) + w.b * p.kv_batch_stride[0] + w.kv_head * kHeadDim, p.kv_seq_stride[0]);
  const KvTileLoader<Cfg, T, kHeadDim> load_v(
      static_cast<const T*>(p.v) + w.b * p.kv_batch_stride[1] + w.kv_head * kHeadDim, p.kv_seq_stride[1]);
  // cp.async group i holds K_{tile_begin + i} and V_{tile_begin + i - 1}; kStages - 1 groups ahead.
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (tile_begin + i < tile_end) load_k(k_tiles + i * kTileBytes, (tile_begin + i) * kBlockN, n);
    if (i > 0 && tile_begin + i - 1 < tile_end)
      load_v(v_tiles + (i - 1) * kTileBytes, (tile_begin + i - 1) * kBlockN, n);
    cp_async_commit();
  }

  const int warpgroup = threadIdx.x / 128, warp_in_group = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
  const int quad_row = lane / 4;
  const int wg_row0 = warpgroup * 64;  // first of this warpgroup's rows within the block
  // This thread's first row within the block (accumulator half 0; half 1 is 8 rows further).
  const int first_row = wg_row0 + warp_in_group * 16 + quad_row;

  // Q as the A operand: the warpgroup's 64 rows; k-step ks is 16 dims of column half ks / 4.
  const uint64_t q_desc = sw128_desc(q_tile + wg_row0 * 128, 16);
  // P of the tile whose P V is next, the A operand: the warpgroup's 64 rows of 64 keys.
  const uint64_t p_desc = sw128_desc(p_tile + wg_row0 * 128, 16);

  const float scale_log2 = p.scale * kLog2e;
  float o_acc[kHeadDim / 2];  // element 4t + e: O tile t's C fragment element e (mma.m16n8 layout)
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) o_acc[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // max in the log2 domain
  float row_sum[2] = {0.f, 0.f};              // this thread's share of the sum

  // The wgmma are issued and awaited outside any branch a warpgroup could take alone (ptxas
  // serializes them otherwise), so a warpgroup past the last row computes on Q's zero rows and
  // writes nothing.
  // Iteration i (tile t = tile_begin + i) waits for cp.async group i (K_t and V_{t-1}), then
  // loads K_{t + kStages - 1} and V_{t + kStages - 2} over the slots of K_{t-1} and V_{t-2}.
  auto next_tile = [&](int tile) {
    cp_async_wait<kStages - 2>();
    fence_proxy_async();  // this thread's copies, before wgmma reads them
    __syncthreads();      // K_t and V_{t-1} visible to all; Q K_{t-1}^T and P_{t-2} V_{t-2} completed
    const int i = tile - tile_begin;
    const int k_ahead = tile + kStages - 1, v_ahead = tile + kStages - 2;
    if (k_ahead < tile_end) load_k(k_tiles + (i + kStages - 1) % kStages * kTileBytes, k_ahead * kBlockN, n);
    if (v_ahead < tile_end) load_v(v_tiles + (i + kStages - 2) % kStages * kTileBytes, v_ahead * kBlockN, n);
    cp_async_commit();
  };
  float s[32];
  // S = Q K^T: kDSteps wgmma of 16 dims; a k-step inside a column half moves 32 bytes.
  auto issue_qk = [&](int tile) {
    const uint64_t k_desc = sw128_desc(k_tiles + (tile - tile_begin) % kStages * kTileBytes, 16);
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
      const uint32_t q_step = ((ks / 4) * Cfg::kRows * 128 + (ks % 4) * 32) >> 4;
      const uint32_t k_step = ((ks / 4) * kHalfBytes + (ks % 4) * 32) >> 4;
      wgmma_qk<T>(s, q_desc + q_step, k_desc + k_step, ks > 0);
    }
    wgmma_commit();
  };
  // O += P V: V as the MN-major B operand, column halves kHalfBytes apart, a k-step 16 keys.
  auto issue_pv = [&](int tile) {
    const uint64_t v_desc = sw128_desc(v_tiles + (tile - tile_begin) % kStages * kTileBytes, kHalfBytes);
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk)
      wgmma_pv<T, kHeadDim>(o_acc, p_desc + ((kk * 32) >> 4), v_desc + ((kk * 16 * 128) >> 4));
    wgmma_commit();
  };
  // Masks and exponentiates S (tile t); returns the rows' rescale of O.
  auto softmax = [&](int tile, float(&alphas)[2]) {
    pin(s);
    const int key0 = tile * kBlockN;
    auto& s_tiles = reinterpret_cast<float(&)[kNTiles][4]>(s);
    mask_tile(s_tiles, p, w, first_row, key0, key0 + kBlockN > w.len, scale_log2);
    return softmax_tile(s_tiles, row_max, row_sum, alphas);
  };
  // P into shared memory, 128-byte swizzled: keys 8 t + 2 quad_col + {0, 1} of row `row` are
  // word quad_col of chunk t (a warp's stores hit 32 different banks).
  auto store_p = [&] {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = first_row + 8 * h;
      const uint32_t row_addr = p_tile + row * 128 + (lane % 4) * 4;
#pragma unroll
      for (int t = 0; t < kNTiles; ++t)
        st_shared_b32(row_addr + ((t ^ (row % 8)) << 4), pack2<T>(s[4 * t + 2 * h], s[4 * t + 2 * h + 1]));
    }
  };

  if (tile_begin < tile_end) {
    next_tile(tile_begin);
    wgmma_fence();
    issue_qk(tile_begin);
    wgmma_wait<0>();
    float alphas[2];
    softmax(tile_begin, alphas);  // O is still zero: nothing to rescale
    store_p();
    for (int tile = tile_begin + 1; tile < tile_end; ++tile) {
      next_tile(tile);
      wgmma_fence();  // O rescaled by ordinary instructions before the wgmma accumulates into it
      issue_qk(tile);
      issue_pv(tile - 1);
      wgmma_wait<1>();
      const bool moved = softmax(tile, alphas);
      // Once the row maxima settle no row of the warp moves and the rescale is skipped. The wait
      // for P V sits in both branches: ptxas hoists a wait to the top of its basic block, which
      // would put it before the softmax.
      if (__any_sync(0xffffffffu, moved)) {
        wgmma_wait<0>();
        pin(o_acc);
#pragma unroll
        for (int i = 0; i < kHeadDim / 2; ++i) o_acc[i] *= alphas[(i >> 1) & 1];
      } else {
        wgmma_wait<0>();
        pin(o_acc);
      }
      store_p();
    }
    next_tile(tile_end);
    wgmma_fence();
    issue_pv(tile_end - 1);
    wgmma_wait<0>();
    pin(o_acc);
  }
  cp_async_wait<0>();  // nothing may stay in flight when the block exits

  // Epilogue: normalise, write the output (or this split's partial) and the log-sum-exp.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    write_row<T>(p, w, first_row + 8 * r, r, reinterpret_cast<const float(&)[kOTiles][4]>(o_acc), row_sum[r],
                 row_max[r]);
  }
#endif  // sm_90a
}

}  // namespace specx::tree_attn_cuda
