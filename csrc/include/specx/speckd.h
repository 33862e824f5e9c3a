// SpecKD row kernel interface: torch-free, shared by the CUDA launcher and the torch glue.
#pragma once
#include <cmath>
#include "specx/common.h"

namespace specx {

struct SpecKDParams {
  const void* student;        // [rows, vocab], contiguous
  const void* teacher;        // [rows, vocab], contiguous, same dtype as student
  const int64_t* labels;      // [rows] or null: rows with labels == ignore_index are skipped
  int64_t ignore_index;
  void* grad;                 // [rows, vocab] in grad_dtype, or null (no gradient)
  const float* grad_scale;    // device scalar multiplying the gradient, or null for 1
  float* row_divergence;      // [rows]: D of each row (0 where ignored)
  bool* row_accepted;         // [rows]: the gate a (false where ignored)
  int64_t rows;
  int64_t vocab;
  int64_t row_offset;         // global index of row 0, keys the spec gate's random numbers
  DType dtype;                // of both logits
  DType grad_dtype;           // dtype, or bf16 / fp16 for fp32 logits
  Divergence divergence;
  Gate gate;
  int k;
  float reject_weight;
  float inv_temperature;
  float mix;                  // jsd_beta for jsd, skew for skl / srkl
  uint64_t seed;
};

// Launches the fused row kernel on `stream` (a cudaStream_t). Returns a CUDA error code.
int speckd_rows_cuda(const SpecKDParams& params, void* stream);
// grad[r, :] *= scale[per_row ? r : 0]; a single scale equal to 1 returns without touching grad.
int scale_rows_cuda(void* grad, DType dtype, int64_t rows, int64_t vocab, const float* scale, bool per_row,
                    void* stream);

}  // namespace specx
