// Tree attention kernel (flash-attention style, mma.sync tensor cores).
//
// One block owns 64 query rows of one (sequence, KV head): the rows are the (node, head) pairs
// of the heads_q / heads_kv query heads that share that KV head, node-major, so every K/V tile
// brought into shared memory serves all of them. Each of the 4 warps keeps 16 rows: Q as mma
// A fragments in registers, S = Q K^T and O += P V through mma.m16n8k16 with ldmatrix, an
// online softmax in fp32 registers. K/V tiles of 64 keys are double-buffered with cp.async.
// Only tiles that reach past the prefix evaluate the mask. With splits > 1 each block covers
// one slice of the keys and writes a partial output and log-sum-exp that
// tree_attention_combine_kernel merges.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "specx/tree_attention.h"

namespace specx::tree_attn_cuda {

constexpr int kBlockM = 64;  // query rows per block
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWarps = kBlockM / 16;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kHeadDim>
constexpr int smem_bytes() {
  return 2 /*K, V*/ * 2 /*stages*/ * kBlockN * kHeadDim * 2 /*bytes*/;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte copy; src_bytes == 0 fills the destination with zeros (keys past the end).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

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

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][kHeadDim] tile: the chunk
// index is XOR-swizzled with the row so that ldmatrix's 8 rows hit 8 different bank groups.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ int64_t load_len(const TreeAttentionParams& p, int64_t b) {
  const int64_t len = p.lens_int64 ? static_cast<const int64_t*>(p.cache_lens)[b]
                                   : static_cast<const int32_t*>(p.cache_lens)[b];
  return len < 0 ? 0 : (len > p.max_len ? p.max_len : len);
}

// Copies keys [key0, key0 + kBlockN) of one KV head into a swizzled tile; keys >= n become 0.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_tile(T* tile, const T* head_base, int64_t seq_stride, int key0, int n) {
  constexpr int kChunks = kHeadDim / 8;
#pragma unroll
  for (int c = threadIdx.x; c < kBlockN * kChunks; c += kThreads) {
    const int row = c / kChunks, chunk = c % kChunks;
    const int key = key0 + row;
    const bool valid = key < n;
    const T* src = valid ? head_base + key * seq_stride + chunk * 8 : head_base;
    cp_async_16(smem_addr(tile + swizzle<kHeadDim>(row, chunk)), src, valid ? 16 : 0);
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 2) tree_attention_kernel(const TreeAttentionParams p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_tiles = reinterpret_cast<T*>(smem_raw);            // [2][kBlockN][kHeadDim]
  T* v_tiles = k_tiles + 2 * kBlockN * kHeadDim;          // [2][kBlockN][kHeadDim]
  constexpr int kDSteps = kHeadDim / 16;                  // k-steps of Q K^T
  constexpr int kNTiles = kBlockN / 8;                    // 8-key column tiles of S
  constexpr int kOTiles = kHeadDim / 8;                   // 8-wide column tiles of O

  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int tree_size = static_cast<int>(p.tree_size);
  const int rows_total = tree_size * group;
  const int m_tiles = (rows_total + kBlockM - 1) / kBlockM;
  const int m_tile = blockIdx.x % m_tiles;
  const int split = blockIdx.x / m_tiles;
  const int kv_head = blockIdx.y;
  const int64_t b = blockIdx.z;

  const int len = static_cast<int>(load_len(p, b));
  const int n = static_cast<int>(len + p.tree_size < p.max_len ? len + p.tree_size : p.max_len);
  const int tiles_total = (n + kBlockN - 1) / kBlockN;
  const int tiles_per_split = (tiles_total + p.splits - 1) / p.splits;
  const int tile_begin = split * tiles_per_split;
  const int tile_end = min(tiles_total, tile_begin + tiles_per_split);

  const T* k_head = static_cast<const T*>(p.k) + b * p.kv_batch_stride[0] + kv_head * kHeadDim;
  const T* v_head = static_cast<const T*>(p.v) + b * p.kv_batch_stride[1] + kv_head * kHeadDim;
  if (tile_begin < tile_end) {
    load_tile<T, kHeadDim>(k_tiles, k_head, p.kv_seq_stride[0], tile_begin * kBlockN, n);
    load_tile<T, kHeadDim>(v_tiles, v_head, p.kv_seq_stride[1], tile_begin * kBlockN, n);
  }
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad_row = lane / 4, quad_col = lane % 4;
  // This thread's two accumulator rows (g and g + 8 of the warp's 16).
  int row[2], node[2];
  row[0] = m_tile * kBlockM + warp * 16 + quad_row;
  row[1] = row[0] + 8;
#pragma unroll
  for (int r = 0; r < 2; ++r) node[r] = min(row[r] / group, tree_size - 1);

  // Q as A fragments, straight from global memory (read once per block).
  uint32_t q_frag[kDSteps][4];
  {
    const uint32_t* q_row[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int head = kv_head * group + row[r] % group;
      q_row[r] = row[r] < rows_total
                     ? reinterpret_cast<const uint32_t*>(static_cast<const T*>(p.q) +
                                                         ((b * tree_size + node[r]) * p.heads_q + head) * kHeadDim)
                     : nullptr;
    }
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
      q_frag[ks][0] = q_row[0] ? q_row[0][ks * 8 + quad_col] : 0u;
      q_frag[ks][1] = q_row[1] ? q_row[1][ks * 8 + quad_col] : 0u;
      q_frag[ks][2] = q_row[0] ? q_row[0][ks * 8 + 4 + quad_col] : 0u;
      q_frag[ks][3] = q_row[1] ? q_row[1][ks * 8 + 4 + quad_col] : 0u;
    }
  }

  const float scale_log2 = p.scale * kLog2e;
  float o_acc[kOTiles][4];
#pragma unroll
  for (int t = 0; t < kOTiles; ++t) o_acc[t][0] = o_acc[t][1] = o_acc[t][2] = o_acc[t][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // log2 domain
  float row_sum[2] = {0.f, 0.f};              // this thread's share; summed over the quad at the end

  const int32_t* mask_row[2] = {nullptr, nullptr};
  if (p.tree_mask != nullptr) {
#pragma unroll
    for (int r = 0; r < 2; ++r) mask_row[r] = p.tree_mask + (b * tree_size + node[r]) * p.mask_words;
  }

  // ldmatrix lane roles: matrix lane / 8, row lane % 8 of it.
  const int ld_matrix = lane >> 3, ld_row = lane & 7;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int stage = (tile - tile_begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // the tile is visible to all, and everyone is done with the other stage
    if (tile + 1 < tile_end) {
      load_tile<T, kHeadDim>(k_tiles + (stage ^ 1) * kBlockN * kHeadDim, k_head, p.kv_seq_stride[0],
                             (tile + 1) * kBlockN, n);
      load_tile<T, kHeadDim>(v_tiles + (stage ^ 1) * kBlockN * kHeadDim, v_head, p.kv_seq_stride[1],
                             (tile + 1) * kBlockN, n);
    }
    cp_async_commit();
    const T* k_tile = k_tiles + stage * kBlockN * kHeadDim;
    const T* v_tile = v_tiles + stage * kBlockN * kHeadDim;

    // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
    float s[kNTiles][4];
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kDSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t kb[4];
        const int key = np * 16 + (ld_matrix >> 1) * 8 + ld_row;
        ldmatrix_x4(smem_addr(k_tile + swizzle<kHeadDim>(key, ks * 2 + (ld_matrix & 1))), kb);
        mma_16816<T>(s[2 * np], q_frag[ks], kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], q_frag[ks], kb[2], kb[3]);
      }
    }

    const int key0 = tile * kBlockN;
    const bool needs_mask = key0 + kBlockN > len;
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[t][e] * scale_log2;
        if (needs_mask) {
          const int r = e >> 1;
          const int key = key0 + t * 8 + quad_col * 2 + (e & 1);
          bool visible = key < len;
          if (!visible && key < n) {
            const int j = key - len;
            visible = mask_row[r] != nullptr ? tree_mask_bit(mask_row[r], j) : j <= node[r];
          }
          if (!visible) x = -INFINITY;
        }
        s[t][e] = x;
      }
    }

    // Online softmax: new row maxima, rescale the running sums and outputs, P = 2^(S - max).
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
#pragma unroll
      for (int t = 0; t < kOTiles; ++t) {
        o_acc[t][2 * r] *= alpha;
        o_acc[t][2 * r + 1] *= alpha;
      }
    }

    // O += P V: the S accumulators of two adjacent key tiles form one A fragment.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kOTiles / 2; ++dp) {
        uint32_t vb[4];
        const int key = kk * 16 + (ld_matrix & 1) * 8 + ld_row;
        ldmatrix_x4_trans(smem_addr(v_tile + swizzle<kHeadDim>(key, dp * 2 + (ld_matrix >> 1))), vb);
        mma_16816<T>(o_acc[2 * dp], a, vb[0], vb[1]);
        mma_16816<T>(o_acc[2 * dp + 1], a, vb[2], vb[3]);
      }
    }
  }
  cp_async_wait_all();  // nothing may stay in flight when the block exits

  // Epilogue: normalise, write the output (or this split's partial) and the log-sum-exp.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    if (row[r] >= rows_total) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const float lse = sum > 0.f ? (row_max[r] + log2f(sum)) * kLn2 : -INFINITY;
    const int64_t head = kv_head * group + row[r] % group;
    const int64_t out_row = (b * tree_size + node[r]) * p.heads_q + head;  // (b, node, head)
    if (p.splits == 1) {
      T* out = static_cast<T*>(p.out) + out_row * kHeadDim;
#pragma unroll
      for (int t = 0; t < kOTiles; ++t) {
        *reinterpret_cast<uint32_t*>(out + t * 8 + quad_col * 2) =
            pack2<T>(o_acc[t][2 * r] * inv, o_acc[t][2 * r + 1] * inv);
      }
      if (quad_col == 0) p.lse[(b * p.heads_q + head) * tree_size + node[r]] = lse;
    } else {
      const int64_t rows_all = p.batch * tree_size * p.heads_q;
      float* out = p.partial_out + (split * rows_all + out_row) * kHeadDim;
#pragma unroll
      for (int t = 0; t < kOTiles; ++t) {
        *reinterpret_cast<float2*>(out + t * 8 + quad_col * 2) =
            make_float2(o_acc[t][2 * r] * inv, o_acc[t][2 * r + 1] * inv);
      }
      if (quad_col == 0) p.partial_lse[split * rows_all + out_row] = lse;
    }
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
