// DeepKD optimizer update: torch-free, shared by the CUDA multi-tensor kernel and the CPU glue.
//
// The paper's equations (arXiv 2505.15133), per parameter p with task / target-class /
// non-target-class gradients g0, g1, g2 and momentum buffers v0, v1, v2:
//   v0 <- (m + delta) v0 + g0 + weight_decay p     (L2 weight decay joins the task gradient)
//   v1 <- (m - delta) v1 + g1
//   v2 <- (m + delta) v2 + g2
//   p  <- p - lr (v0 + v1 + v2)
// The released DeepKD code differs: its task buffer decays with the target-class momentum, and it
// adds weight decay in the target-class pass only. We follow the paper.
#pragma once
#include <cstdint>

#include "specx/common.h"
#include "specx/speckd.h"  // DType

namespace specx {

struct DeepKDSgdCoefs {
  float lr;
  float decay[3];  // m + delta, m - delta, m + delta
  float weight_decay;
};

SPECX_HD void deepkd_sgd_update(float& param, const float (&grad)[3], float (&buffer)[3], const DeepKDSgdCoefs& c) {
  buffer[0] = c.decay[0] * buffer[0] + (grad[0] + c.weight_decay * param);
  buffer[1] = c.decay[1] * buffer[1] + grad[1];
  buffer[2] = c.decay[2] * buffer[2] + grad[2];
  param = param - c.lr * (buffer[0] + buffer[1] + buffer[2]);
}

// One parameter tensor of a fused launch: all pointers contiguous, of `numel` elements, in the
// launch's dtype; a null gradient reads as zero.
struct DeepKDSgdTensor {
  void* param;
  const void* grad[3];
  void* buffer[3];
  int64_t numel;
};

// A block's share of the work: `chunk` of `chunk_size` elements of tensor `tensor`.
struct DeepKDSgdChunk {
  int32_t tensor;
  int32_t chunk;
};

constexpr int64_t kDeepKDSgdChunkSize = 32768;

// `tensors` and `chunks` are device arrays. One launch.
int deepkd_sgd_step_cuda(const DeepKDSgdTensor* tensors, const DeepKDSgdChunk* chunks, int64_t num_chunks,
                         DType dtype, const DeepKDSgdCoefs& coefs, void* stream);

}  // namespace specx
