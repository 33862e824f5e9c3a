// Tree attention kernel (flash-attention style, mma.sync tensor cores).
//
// A block owns up to 256 query rows of one (sequence, KV head): the rows are the (node, head)
// pairs of the heads_q / heads_kv query heads that share that KV head, node-major, so every
// K/V tile brought into shared memory serves all of them; with T * group <= 256 rows (T = 64 at
// GQA group 4) each K/V byte leaves HBM once. Each warp keeps 16 or 32 rows (one or two
// m-tiles): every K/V fragment read from shared memory feeds both m-tiles, which halves the
// shared-memory traffic per mma. Q sits in shared memory (in registers it would push two m-tiles
// past 255), S = Q K^T and O += P V run through mma.m16n8k16 with ldmatrix, with an online
// softmax in fp32 registers. K/V tiles of 64 keys stream through a 2- or 3-stage cp.async ring.
// Only tiles that reach past the prefix evaluate the mask. With splits > 1 each block covers
// one slice of the keys and writes a partial output and log-sum-exp that
// tree_attention_combine_kernel merges.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "specx/exp2_offsets.cuh"  // kLog2e, kLn2
#include "specx/slice.cuh"         // shared_address, cp_async_16
#include "specx/tree_attention.h"

namespace specx::tree_attn_cuda {

// kWarps warps of kMTiles m-tiles (16 rows each); kStages K/V tiles of kBlockN keys in flight;
// the softmax steps through a tile kStepN keys at a time (32 keeps two m-tiles' S and O within
// 255 registers); kMinBlocks blocks per SM, which __launch_bounds__ turns into the register cap.
template <int kWarps_, int kMTiles_, int kStepN_, int kStages_, int kMinBlocks_>
struct TileConfig {
  static constexpr int kWarps = kWarps_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kStepN = kStepN_;
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kBlockN = 64;
  static constexpr int kRows = kWarps * kMTiles * 16;
  static constexpr int kThreads = kWarps * 32;
};
// T * group > 128 (trees at GQA group 4): one block per KV head up to 256 rows, alone on its SM.
using LargeTile = TileConfig<8, 2, 32, 3, 1>;
// 64 < T * group <= 128: two blocks per SM.
using MediumTile = TileConfig<4, 2, 32, 2, 2>;
// Decode and small trees: one m-tile per warp, two blocks per SM.
using SmallTile = TileConfig<4, 1, 64, 2, 2>;

// Q tile, then the K and V stages.
template <typename Cfg, int kHeadDim>
constexpr int smem_bytes() {
  return (Cfg::kRows + 2 * Cfg::kStages * Cfg::kBlockN) * kHeadDim * 2 /*bytes*/;
}
static_assert(smem_bytes<LargeTile, 128>() <= 227 * 1024);
static_assert(MediumTile::kMinBlocks * (smem_bytes<MediumTile, 128>() + 1024) <= 228 * 1024);
static_assert(SmallTile::kMinBlocks * (smem_bytes<SmallTile, 128>() + 1024) <= 228 * 1024);

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a (16x16, row-major) * b (16x8, column-major), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][kHeadDim] tile: the chunk
// index is XOR-swizzled with the row so that ldmatrix's 8 rows hit 8 different bank groups.
template <int kHeadDim>
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return (row * kHeadDim + ((chunk ^ (row & 7)) << 3)) * 2;
}

// ldmatrix.x4 of the 16x16 block at (row0, 16 * step) of a swizzled tile, matrices in the order
// (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15).
// Lane l addresses row (l / 8 % 2) * 8 + l % 8 and chunk 2 * step + l / 16, so its swizzled
// chunk is 8 * (step / 4) + ((2 * (step % 4)) ^ x) with x = l / 16 ^ l % 8: four per-thread
// offsets (step % 4) cover every step, the rest are immediates.
template <int kHeadDim>
struct FragOffsets {
  uint32_t off[4];
  __device__ __forceinline__ explicit FragOffsets(int lane) {
    const int row = ((lane >> 3) & 1) * 8 + (lane & 7);
    const int x = (lane >> 4) ^ (lane & 7);
#pragma unroll
    for (int j = 0; j < 4; ++j) off[j] = (row * kHeadDim + (((2 * j) ^ x) << 3)) * 2;
  }
  // Byte address of this lane's row for the block at (row0, 16 * step); row0 a multiple of 8.
  __device__ __forceinline__ uint32_t at(uint32_t tile, int row0, int step) const {
    return tile + off[step % 4] + row0 * kHeadDim * 2 + (step / 4) * 128;
  }
};

__device__ __forceinline__ int64_t load_len(const TreeAttentionParams& p, int64_t b) {
  const int64_t len = p.lens_int64 ? static_cast<const int64_t*>(p.cache_lens)[b]
                                   : static_cast<const int32_t*>(p.cache_lens)[b];
  return len < 0 ? 0 : (len > p.max_len ? p.max_len : len);
}

// Copies keys [key0, key0 + kBlockN) of one KV head into a swizzled tile; keys >= n become 0.
template <typename Cfg, typename T, int kHeadDim>
__device__ __forceinline__ void load_kv_tile(uint32_t tile, const T* head_base, int64_t seq_stride, int key0,
                                             int n) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert(Cfg::kBlockN * kChunks % Cfg::kThreads == 0);
#pragma unroll
  for (int i = 0; i < Cfg::kBlockN * kChunks / Cfg::kThreads; ++i) {
    const int c = i * Cfg::kThreads + threadIdx.x;
    const int row = c / kChunks, chunk = c % kChunks;
    const int key = key0 + row;
    const bool valid = key < n;
    const T* src = valid ? head_base + key * seq_stride + chunk * 8 : head_base;
    cp_async_16(tile + swizzle<kHeadDim>(row, chunk), src, valid ? 16 : 0);
  }
}

// What one block serves: rows [row0, row0 + kRows) of the (node, head) rows of KV head kv_head
// of sequence b, and key tiles [tile_begin, tile_end) (its split of the keys).
struct BlockWork {
  int group, tree_size, rows_total, row0, split, kv_head;
  int64_t b;
  int len, n;  // the prefix length; keys 0 .. n-1 exist (the prefix, then the tree nodes)
  int tile_begin, tile_end;
};
template <int kRows, int kBlockN>
__device__ __forceinline__ BlockWork block_work(const TreeAttentionParams& p) {
  BlockWork w;
  w.group = static_cast<int>(p.heads_q / p.heads_kv);
  w.tree_size = static_cast<int>(p.tree_size);
  w.rows_total = w.tree_size * w.group;
  const int row_blocks = (w.rows_total + kRows - 1) / kRows;
  w.row0 = (blockIdx.x % row_blocks) * kRows;
  w.split = blockIdx.x / row_blocks;
  w.kv_head = blockIdx.y;
  w.b = blockIdx.z;
  w.len = static_cast<int>(load_len(p, w.b));
  w.n = static_cast<int>(w.len + p.tree_size < p.max_len ? w.len + p.tree_size : p.max_len);
  const int tiles_total = (w.n + kBlockN - 1) / kBlockN;
  const int tiles_per_split = (tiles_total + p.splits - 1) / p.splits;
  w.tile_begin = w.split * tiles_per_split;
  w.tile_end = min(tiles_total, w.tile_begin + tiles_per_split);
  return w;
}

// Copies the block's Q rows (zeros past rows_total) into shared memory: 16-byte chunk `chunk` of
// row `row` to q_tile + offset(row, chunk).
template <int kRows, int kThreads, typename T, int kHeadDim, typename Offset>
__device__ __forceinline__ void load_q_rows(const TreeAttentionParams& p, const BlockWork& w, uint32_t q_tile,
                                            Offset&& offset) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert(kRows * kChunks % kThreads == 0);
  const T* q = static_cast<const T*>(p.q);
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int c = i * kThreads + threadIdx.x;
    const int row = c / kChunks, chunk = c % kChunks;
    const int grow = w.row0 + row;
    const bool valid = grow < w.rows_total;
    const int64_t q_row = (w.b * w.tree_size + grow / w.group) * p.heads_q + w.kv_head * w.group + grow % w.group;
    cp_async_16(q_tile + offset(row, chunk), valid ? q + q_row * kHeadDim + chunk * 8 : q, valid ? 16 : 0);
  }
}

// One 16-row m-tile of S for keys key0 .. key0 + 8 kNTiles - 1, as C fragments (this thread's
// rows of the block: first_row and first_row + 8): scales it into the log2 domain and, where
// `needs_mask`, hides the keys its rows do not see.
template <int kNTiles>
__device__ __forceinline__ void mask_tile(float (&s)[kNTiles][4], const TreeAttentionParams& p, const BlockWork& w,
                                          int first_row, int key0, bool needs_mask, float scale_log2) {
  const int quad_col = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    // The row's node, computed here rather than held in registers across the key loop.
    const int nd = needs_mask ? min((w.row0 + first_row + 8 * r) / w.group, w.tree_size - 1) : 0;
    const int32_t* mask_row = p.tree_mask != nullptr ? p.tree_mask + (w.b * w.tree_size + nd) * p.mask_words : nullptr;
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        float x = s[t][e] * scale_log2;
        if (needs_mask) {
          const int key = key0 + t * 8 + quad_col * 2 + (e & 1);
          bool visible = key < w.len;
          if (!visible && key < w.n) {
            const int j = key - w.len;
            visible = mask_row != nullptr ? tree_mask_bit(mask_row, j) : j <= nd;
          }
          if (!visible) x = -INFINITY;
        }
        s[t][e] = x;
      }
    }
  }
}

// The online-softmax step of a masked m-tile: new row maxima, rescaled running sums, S replaced
// by P = 2^(S - max), alphas each row's rescale of O. Returns whether a row's maximum moved.
template <int kNTiles>
__device__ __forceinline__ bool softmax_tile(float (&s)[kNTiles][4], float (&row_max)[2], float (&row_sum)[2],
                                             float (&alphas)[2]) {
  bool moved = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) tile_max = fmaxf(tile_max, fmaxf(s[t][2 * r], s[t][2 * r + 1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float new_max = fmaxf(row_max[r], tile_max);
    const float base = new_max == -INFINITY ? 0.f : new_max;  // a row that has seen no key yet
    const float alpha = fast_exp2(row_max[r] - base);
    row_max[r] = new_max;
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
      s[t][2 * r] = fast_exp2(s[t][2 * r] - base);
      s[t][2 * r + 1] = fast_exp2(s[t][2 * r + 1] - base);
      sum += s[t][2 * r] + s[t][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * alpha + sum;
    alphas[r] = alpha;
    moved |= alpha != 1.f;
  }
  return moved;
}

// Epilogue of accumulator half r of one m-tile (o: its C fragments over the head dims; `row`
// the thread's row of the block, `sum` its share of the running sum): normalises and writes the
// output row (or this split's partial) and the log-sum-exp. Every lane of the warp calls it.
template <typename T, int kOTiles>
__device__ __forceinline__ void write_row(const TreeAttentionParams& p, const BlockWork& w, int row, int r,
                                          const float (&o)[kOTiles][4], float sum, float row_max) {
  constexpr int kHeadDim = kOTiles * 8;
  const int quad_col = threadIdx.x % 4;
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  const int grow = w.row0 + row;
  if (grow >= w.rows_total) return;
  const int nd = grow / w.group;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const float lse = sum > 0.f ? (row_max + log2f(sum)) * kLn2 : -INFINITY;
  const int64_t head = w.kv_head * w.group + grow % w.group;
  const int64_t out_row = (w.b * w.tree_size + nd) * p.heads_q + head;  // (b, node, head)
  if (p.splits == 1) {
    T* out = static_cast<T*>(p.out) + out_row * kHeadDim;
#pragma unroll
    for (int t = 0; t < kOTiles; ++t) {
      *reinterpret_cast<uint32_t*>(out + t * 8 + quad_col * 2) = pack2<T>(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
    }
    if (quad_col == 0) p.lse[(w.b * p.heads_q + head) * w.tree_size + nd] = lse;
  } else {
    const int64_t rows_all = p.batch * w.tree_size * p.heads_q;
    float* out = p.partial_out + (w.split * rows_all + out_row) * kHeadDim;
#pragma unroll
    for (int t = 0; t < kOTiles; ++t) {
      *reinterpret_cast<float2*>(out + t * 8 + quad_col * 2) = make_float2(o[t][2 * r] * inv, o[t][2 * r + 1] * inv);
    }
    if (quad_col == 0) p.partial_lse[w.split * rows_all + out_row] = lse;
  }
}

template <typename Cfg, typename T, int kHeadDim>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) tree_attention_kernel(const TreeAttentionParams p) {

  constexpr int kMTiles = Cfg::kMTiles;
  constexpr int kBlockN = Cfg::kBlockN;
  constexpr int kStages = Cfg::kStages;
  constexpr int kDSteps = kHeadDim / 16;    // k-steps of Q K^T
  constexpr int kStepN = Cfg::kStepN;
  constexpr int kNTiles = kStepN / 8;       // 8-key column tiles of S
  constexpr int kOTiles = kHeadDim / 8;     // 8-wide column tiles of O
  constexpr uint32_t kTileBytes = kBlockN * kHeadDim * 2;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t q_tile = shared_address(smem_raw);                  // [kRows][kHeadDim]
  const uint32_t k_tiles = q_tile + Cfg::kRows * kHeadDim * 2;       // [kStages][kBlockN][kHeadDim]
  const uint32_t v_tiles = k_tiles + kStages * kTileBytes;           // [kStages][kBlockN][kHeadDim]

  const BlockWork w = block_work<Cfg::kRows, kBlockN>(p);
  const int tile_begin = w.tile_begin, tile_end = w.tile_end, n = w.n;
  // Q rows, in the first cp.async group with K/V tile 0.
  load_q_rows<Cfg::kRows, Cfg::kThreads, T, kHeadDim>(p, w, q_tile,
                                                      [](int row, int chunk) { return swizzle<kHeadDim>(row, chunk); });
  const T* k_head = static_cast<const T*>(p.k) + w.b * p.kv_batch_stride[0] + w.kv_head * kHeadDim;
  const T* v_head = static_cast<const T*>(p.v) + w.b * p.kv_batch_stride[1] + w.kv_head * kHeadDim;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (tile_begin + st < tile_end) {
      load_kv_tile<Cfg, T, kHeadDim>(k_tiles + st * kTileBytes, k_head, p.kv_seq_stride[0],
                                     (tile_begin + st) * kBlockN, n);
      load_kv_tile<Cfg, T, kHeadDim>(v_tiles + st * kTileBytes, v_head, p.kv_seq_stride[1],
                                     (tile_begin + st) * kBlockN, n);
    }
    cp_async_commit();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_row = lane / 4;
  const int warp_row0 = warp * kMTiles * 16;  // first of this warp's rows within the block
  const bool warp_has_rows = w.row0 + warp_row0 < w.rows_total;
  // Row (within the block) of accumulator half r of m-tile mt: g or g + 8 of the m-tile's 16.
  auto thread_row = [&](int mt, int r) { return warp_row0 + mt * 16 + r * 8 + quad_row; };

  const float scale_log2 = p.scale * kLog2e;
  float o_acc[kMTiles][kOTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int t = 0; t < kOTiles; ++t) o_acc[mt][t][0] = o_acc[mt][t][1] = o_acc[mt][t][2] = o_acc[mt][t][3] = 0.f;
  }
  float row_max[kMTiles][2], row_sum[kMTiles][2];  // max in the log2 domain; sum: this thread's share
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  const FragOffsets<kHeadDim> frag(lane);
  const uint32_t q_warp = q_tile + warp_row0 * kHeadDim * 2;

  int stage = 0, load_stage = kStages - 1;
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile is visible to all, and everyone is done with the stage refilled next
    if (tile + kStages - 1 < tile_end) {
      load_kv_tile<Cfg, T, kHeadDim>(k_tiles + load_stage * kTileBytes, k_head, p.kv_seq_stride[0],
                                     (tile + kStages - 1) * kBlockN, n);
      load_kv_tile<Cfg, T, kHeadDim>(v_tiles + load_stage * kTileBytes, v_head, p.kv_seq_stride[1],
                                     (tile + kStages - 1) * kBlockN, n);
    }
    cp_async_commit();
    const uint32_t k_tile = k_tiles + stage * kTileBytes;
    const uint32_t v_tile = v_tiles + stage * kTileBytes;
    stage = stage + 1 == kStages ? 0 : stage + 1;
    load_stage = load_stage + 1 == kStages ? 0 : load_stage + 1;
    if (!warp_has_rows) continue;  // it still loads and syncs, e.g. warps 1-3 at decode

    // Not unrolled: overlapping two steps would need a second set of S registers.
#pragma unroll 1
    for (int step = 0; step < kBlockN / kStepN; ++step) {
      // S = Q K^T for this warp's rows and the step's keys; each K fragment serves every m-tile.
      float s[kMTiles][kNTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int t = 0; t < kNTiles; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < kDSteps; ++ks) {
        uint32_t qa[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(frag.at(q_warp, mt * 16, ks), qa[mt]);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
          uint32_t kb[4];  // keys 0-7 and 8-15 of the pair, dims 0-7 then 8-15 of the step
          ldmatrix_x4(frag.at(k_tile, step * kStepN + np * 16, ks), kb);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_16816<T>(s[mt][2 * np], qa[mt], kb[0], kb[2]);
            mma_16816<T>(s[mt][2 * np + 1], qa[mt], kb[1], kb[3]);
          }
        }
      }

      const int key0 = tile * kBlockN + step * kStepN;
      const bool needs_mask = key0 + kStepN > w.len;
      float alphas[kMTiles][2];
      bool moved = false;
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) mask_tile(s[mt], p, w, thread_row(mt, 0), key0, needs_mask, scale_log2);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) moved |= softmax_tile(s[mt], row_max[mt], row_sum[mt], alphas[mt]);
      // Once the row maxima settle (after the first tiles) no row of the warp moves and the
      // rescale of O, as many multiplies as the mma's of a step, is skipped.
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int t = 0; t < kOTiles; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o_acc[mt][t][e] *= alphas[mt][e >> 1];
          }
        }
      }

      // O += P V: the S accumulators of two adjacent key tiles form one A fragment; each V
      // fragment serves every m-tile.
#pragma unroll
      for (int kk = 0; kk < kStepN / 16; ++kk) {
        uint32_t pa[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kOTiles / 2; ++dp) {
          uint32_t vb[4];  // transposed: keys 0-7 and 8-15 of dims 0-7, then of dims 8-15
          ldmatrix_x4_trans(frag.at(v_tile, step * kStepN + kk * 16, dp), vb);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma_16816<T>(o_acc[mt][2 * dp], pa[mt], vb[0], vb[1]);
            mma_16816<T>(o_acc[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // nothing may stay in flight when the block exits

  // Epilogue: normalise, write the output (or this split's partial) and the log-sum-exp.
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) write_row<T>(p, w, thread_row(mt, r), r, o_acc[mt], row_sum[mt][r], row_max[mt][r]);
  }
}

// Merges the splits' partial outputs: out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s.
// One thread per 4 output elements of one (b, node, head) row.
template <typename T, int kHeadDim>
__global__ void tree_attention_combine_kernel(const TreeAttentionParams p) {
  constexpr int kLanesPerRow = kHeadDim / 4;
  const int64_t rows_all = p.batch * p.tree_size * p.heads_q;
  const int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  const int64_t row = idx / kLanesPerRow;
  if (row >= rows_all) return;
  const int col = static_cast<int>(idx % kLanesPerRow) * 4;
  float max_lse = -INFINITY;
  for (int s = 0; s < p.splits; ++s) max_lse = fmaxf(max_lse, p.partial_lse[s * rows_all + row]);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  float total = 0.f;
  if (max_lse != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const float w = __expf(p.partial_lse[s * rows_all + row] - max_lse);
      const float4 part = *reinterpret_cast<const float4*>(p.partial_out + (s * rows_all + row) * kHeadDim + col);
      total += w;
      acc[0] += w * part.x;
      acc[1] += w * part.y;
      acc[2] += w * part.z;
      acc[3] += w * part.w;
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(p.out) + row * kHeadDim + col;
  const uint2 packed = make_uint2(pack2<T>(acc[0] * inv, acc[1] * inv), pack2<T>(acc[2] * inv, acc[3] * inv));
  *reinterpret_cast<uint2*>(out) = packed;
  if (col == 0) {
    const int64_t head = row % p.heads_q;
    const int64_t node = (row / p.heads_q) % p.tree_size;
    const int64_t b = row / (p.heads_q * p.tree_size);
    p.lse[(b * p.heads_q + head) * p.tree_size + node] = total > 0.f ? max_lse + __logf(total) : -INFINITY;
  }
}

}  // namespace specx::tree_attn_cuda
