// Tree attention over a KV cache: torch-free interface shared by the torch glue and the CUDA launcher.
#pragma once
#include <cstdint>

#include "specx/common.h"
#include "specx/speckd.h"  // DType

namespace specx {

// Sequence b owns keys 0 .. len-1 (its prefix, len = cache_lens[b]) and, right after them,
// the K/V of its T tree nodes at len .. len+T-1. Query node i sees the whole prefix, and
// tree node j iff bit j of its ancestor-mask row is set (tree_mask) or j <= i (no mask).
struct TreeAttentionParams {
  const void* q;              // [batch, T, heads_q, head_dim], contiguous
  const void* k;              // [batch, max_len, heads_kv, head_dim]: the last two dims contiguous
  const void* v;              // same layout as k
  int64_t kv_batch_stride[2]; // elements between sequences, for k and v
  int64_t kv_seq_stride[2];   // elements between positions, for k and v
  const void* cache_lens;     // [batch], int32 or int64
  bool lens_int64;
  const int32_t* tree_mask;   // [batch, T, mask_words] ancestor bits, or null: causal over the T nodes
  void* out;                  // [batch, T, heads_q, head_dim], the dtype of q
  float* lse;                 // [batch, heads_q, T], natural log; -inf for a row that sees no key
  float* partial_out;         // [splits, batch, T, heads_q, head_dim] when splits > 1
  float* partial_lse;         // [splits, batch, T, heads_q] when splits > 1
  int64_t batch;
  int64_t tree_size;          // T
  int64_t max_len;
  int64_t heads_q;
  int64_t heads_kv;
  int64_t head_dim;
  int64_t mask_words;         // ceil(T / 32)
  float scale;
  int splits;                 // KV-length splits (flash-decoding); 1 writes out directly
  DType dtype;
};

SPECX_HD bool tree_mask_bit(const int32_t* row_words, int64_t j) {
  return (static_cast<uint32_t>(row_words[j >> 5]) >> (j & 31)) & 1u;
}

// The number of KV-length splits the CUDA kernel will use: `requested` if > 0, else the count
// that a cost model of batch x heads_kv x row blocks against the SM count finds fastest.
int tree_attention_cuda_splits(const TreeAttentionParams& params, int requested);
// Launches the kernel(s) on `stream` (a cudaStream_t). Returns a CUDA error code.
int tree_attention_cuda(const TreeAttentionParams& params, void* stream);

}  // namespace specx
