// Launcher of the fused SpecKD row kernel: picks the cluster size and the shared-memory
// slice, and dispatches on dtype and divergence. No torch headers here.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>

#include "specx/cluster_launch.cuh"
#include "specx/device_info.h"
#include "specx/speckd_kernel.cuh"

namespace specx {
namespace {

using speckd_cuda::kThreads;

// Slices of at most 72 KB let three blocks share an SM, so one block's loads overlap the
// arithmetic and cluster exchanges of the others. Clusters of 16 (non-portable) were 1.6x
// slower than 8 on the H200 at 8192 x 128256 (fewer whole clusters fit the GPCs), so clusters
// stop at the portable 8. SPECX_SPECKD_SLICE_KB and SPECX_SPECKD_MAX_CLUSTER (up to 8) override
// both for tuning.
int env_or(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && std::atoi(value) > 0 ? std::atoi(value) : fallback;
}
const int64_t kPreferredSliceBytes = int64_t{env_or("SPECX_SPECKD_SLICE_KB", 72)} * 1024;
const int kMaxCluster = std::min(kMaxClusterBlocks, env_or("SPECX_SPECKD_MAX_CLUSTER", kMaxClusterBlocks));

template <typename T, typename TG, Divergence kDiv>
cudaError_t launch_typed(const SpecKDParams& prm, cudaStream_t stream) {
  const int64_t elem_pair = 2 * static_cast<int64_t>(sizeof(T));
  const int sms = sm_count();

  // Few rows: spread each row over more SMs.
  const SlicePlan plan = plan_row_slices(prm.vocab, prm.rows, elem_pair, 16 / sizeof(T), kPreferredSliceBytes,
                                         kMaxCachedSliceBytes, kMaxCluster, 2 * sms, 4 * kThreads);
  return launch_row_clusters(speckd_cuda::speckd_rows_kernel<T, TG, kDiv>, prm.rows, plan, kThreads, stream, prm,
                             static_cast<int>(plan.slice), plan.cached);
}

template <typename T, typename TG>
cudaError_t launch_divergence(const SpecKDParams& prm, cudaStream_t stream) {
  switch (prm.divergence) {
    case Divergence::kFKL: return launch_typed<T, TG, Divergence::kFKL>(prm, stream);
    case Divergence::kRKL: return launch_typed<T, TG, Divergence::kRKL>(prm, stream);
    case Divergence::kJSD: return launch_typed<T, TG, Divergence::kJSD>(prm, stream);
    case Divergence::kSKL: return launch_typed<T, TG, Divergence::kSKL>(prm, stream);
    case Divergence::kSRKL: return launch_typed<T, TG, Divergence::kSRKL>(prm, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
__global__ void scale_rows_kernel(T* grad, int64_t rows, int64_t vocab, const float* scale, bool per_row) {
  if (!per_row && *scale == 1.0f) return;  // the common backward: d(loss) = 1
  const int64_t n = rows * vocab;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float f = scale[per_row ? i / vocab : 0];
    grad[i] = from_float<T>(to_float(grad[i]) * f);
  }
}

template <typename T>
cudaError_t launch_scale(void* grad, int64_t rows, int64_t vocab, const float* scale, bool per_row,
                         cudaStream_t stream) {
  const int sms = sm_count();
  const int64_t blocks = std::min<int64_t>((rows * vocab + 255) / 256, int64_t{sms} * 8);
  scale_rows_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<T*>(grad), rows, vocab, scale,
                                                                         per_row);
  return cudaGetLastError();
}

}  // namespace

int scale_rows_cuda(void* grad, DType dtype, int64_t rows, int64_t vocab, const float* scale, bool per_row,
                    void* stream) {
  if (rows * vocab == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto zero) {
    return launch_scale<decltype(zero)>(grad, rows, vocab, scale, per_row, s);
  });
}

int speckd_rows_cuda(const SpecKDParams& prm, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  // fp32 logits (fused-linear chunks) may hand their gradient straight to a bf16 / fp16 GEMM, so
  // they dispatch on the gradient's dtype; other logits write their own dtype.
  const bool fp32_logits = prm.dtype == DType::kFloat32;
  return launch_by_dtype(fp32_logits ? prm.grad_dtype : prm.dtype, prm.rows, [&](auto zero) {
    using T = decltype(zero);
    return fp32_logits ? launch_divergence<float, T>(prm, s) : launch_divergence<T, T>(prm, s);
  });
}

}  // namespace specx
