// Top-k threshold interface: torch-free, shared by the CUDA launcher, the CUDA
// kernels and the CPU glue.
//
// Order. Values are compared through an order-preserving unsigned key of their bits: with S the
// sign bit and m the other bits, a positive value's key is S | m and a negative value's is S - m, so
// -0.0 and +0.0 share the key S (they compare equal) and no key is 0. For non-NaN values key order
// is value order; NaNs sort above +inf (positive sign bit) or below -inf (negative sign bit). The
// form needs no special case, and two 16-bit keys can be made at once in one 32-bit word.
//
// Tie rule. The threshold is the k-th largest value counting multiplicity; `greater` counts the
// entries strictly above it (greater < k <= greater + ties). The kept top-k set (DeepKD's mask) is
// every entry above the threshold plus the lowest-index entries equal to it until k are kept:
// entry j is kept iff key_j > key_thr, or key_j == key_thr and j <= tie_last, where tie_last is the
// index of the (k - greater)-th entry equal to the threshold in index order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "specx/common.h"
#include "specx/speckd.h"  // DType

namespace specx {

SPECX_HD uint32_t ordered_key32(uint32_t bits) {
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  return (bits & 0x80000000u) ? 0x80000000u - magnitude : magnitude | 0x80000000u;
}
SPECX_HD uint32_t ordered_key16(uint32_t bits) {
  const uint32_t magnitude = bits & 0x7FFFu;
  return (bits & 0x8000u) ? 0x8000u - magnitude : magnitude | 0x8000u;
}
SPECX_HD uint32_t key_to_bits32(uint32_t key) {
  return (key & 0x80000000u) ? key & 0x7FFFFFFFu : 0x80000000u | (0x80000000u - key);
}
SPECX_HD uint32_t key_to_bits16(uint32_t key) { return (key & 0x8000u) ? key & 0x7FFFu : 0x8000u | (0x8000u - key); }

struct TopKSelection {
  uint32_t key;      // key of the k-th largest entry
  int64_t greater;   // entries with a larger key
  int64_t tie_last;  // index of the last kept entry equal to the threshold
};

// The CPU selection, by nth_element over the keys (the CUDA kernels reach the same answer by
// radix select, or for long 16-bit rows by counting the keys near a sampled estimate). `scratch`
// is reused between rows. Requires 1 <= k <= n.
inline TopKSelection select_topk_host(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& scratch) {
  scratch.assign(keys, keys + n);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<uint32_t>());
  const uint32_t thr = scratch[k - 1];
  int64_t greater = 0;
  for (int64_t j = 0; j < n; ++j) greater += keys[j] > thr;
  int64_t need = k - greater, tie_last = -1;
  for (int64_t j = 0; j < n && need > 0; ++j) {
    if (keys[j] == thr) {
      tie_last = j;
      --need;
    }
  }
  return {thr, greater, tie_last};
}

SPECX_HD bool topk_kept(uint32_t key, int64_t j, uint32_t thr_key, int64_t tie_last) {
  return key > thr_key || (key == thr_key && j <= tie_last);
}

struct TopKThresholdParams {
  const void* logits;      // [rows, cols], contiguous
  void* threshold;         // [rows], the logits dtype
  int64_t* count_greater;  // [rows]
  int64_t rows;
  int64_t cols;
  int64_t k;               // 1 <= k <= cols
  DType dtype;
};

// DeepKD per-row losses and gradients (see deepkd_kernel.cuh and csrc/deepkd.cpp for the math).
struct DeepKDParams {
  const void* student;     // [rows, classes], contiguous
  const void* teacher;     // [rows, classes], contiguous, same dtype
  const int64_t* target;   // [rows]
  int64_t ignore_index;
  void* grad_ce;           // [rows, classes] in the logits dtype, or null (no gradients)
  void* grad_tckd;
  void* grad_nckd;
  const float* grad_scale; // device scalar multiplying the gradients (1 / non-ignored rows)
  float* row_losses;       // [rows, 3]: ce, tckd, nckd of each row (0 where ignored, NaN for a bad target)
  int64_t rows;
  int64_t classes;
  int64_t k;               // teacher top-k kept for NCKD; k >= classes keeps every class
  const void* threshold;          // [rows]: the teacher's k-th largest value (logits dtype), when k < classes
  const int64_t* count_greater;   // [rows]: the teacher's entries above it
  float temperature;
  DType dtype;
};

int topk_threshold_cuda(const TopKThresholdParams& params, void* stream);
int deepkd_rows_cuda(const DeepKDParams& params, void* stream);

}  // namespace specx
