// The DeepKD optimizer's multi-tensor update: one launch covers every parameter of a dtype; each
// block updates one chunk of one tensor, found through device arrays of tensor descriptors and
// chunks. No torch headers here.
#include <cuda_runtime.h>

#include "specx/deepkd_optimizer.h"
#include "specx/slice.cuh"

namespace specx {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    deepkd_sgd_kernel(const DeepKDSgdTensor* tensors, const DeepKDSgdChunk* chunks, const DeepKDSgdCoefs coefs) {
  const DeepKDSgdChunk chunk = chunks[blockIdx.x];
  const DeepKDSgdTensor t = tensors[chunk.tensor];
  const int64_t begin = static_cast<int64_t>(chunk.chunk) * kDeepKDSgdChunkSize;
  const int64_t end = begin + kDeepKDSgdChunkSize < t.numel ? begin + kDeepKDSgdChunkSize : t.numel;
  T* param = static_cast<T*>(t.param);
  const T* grad[3] = {static_cast<const T*>(t.grad[0]), static_cast<const T*>(t.grad[1]),
                      static_cast<const T*>(t.grad[2])};
  T* buffer[3] = {static_cast<T*>(t.buffer[0]), static_cast<T*>(t.buffer[1]), static_cast<T*>(t.buffer[2])};
  for (int64_t base = begin + threadIdx.x; base < end; base += kUnroll * kThreads) {
    float p[kUnroll], g[kUnroll][3], b[kUnroll][3];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        p[u] = to_float(param[i]);
#pragma unroll
        for (int c = 0; c < 3; ++c) {
          g[u][c] = grad[c] ? to_float(grad[c][i]) : 0.0f;
          b[u][c] = to_float(buffer[c][i]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < end) {
        deepkd_sgd_update(p[u], g[u], b[u], coefs);
        param[i] = from_float<T>(p[u]);
#pragma unroll
        for (int c = 0; c < 3; ++c) buffer[c][i] = from_float<T>(b[u][c]);
      }
    }
  }
}

}  // namespace

int deepkd_sgd_step_cuda(const DeepKDSgdTensor* tensors, const DeepKDSgdChunk* chunks, int64_t num_chunks,
                         DType dtype, const DeepKDSgdCoefs& coefs, void* stream) {
  if (num_chunks == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(num_chunks));
  dispatch_dtype(dtype, [&](auto zero) {
    deepkd_sgd_kernel<decltype(zero)><<<grid, kThreads, 0, s>>>(tensors, chunks, coefs);
    return 0;
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace specx
