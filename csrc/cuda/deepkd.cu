// Launcher of the fused DeepKD row kernel: picks the cluster size (each block caches a slice of
// both logits) and dispatches on dtype. No torch headers here.
#include <cuda_runtime.h>

#include "specx/cluster_launch.cuh"
#include "specx/deepkd_kernel.cuh"

namespace specx {
namespace {

// 64 KiB slices (plus the select's 33 KiB) let two blocks share an SM.
constexpr int64_t kPreferredSliceBytes = 64 * 1024;
constexpr int64_t kMaxSliceBytes = 200 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size

template <typename T>
cudaError_t launch_typed(const DeepKDParams& prm, cudaStream_t stream) {
  const SlicePlan plan = plan_row_slices(prm.classes, prm.rows, 2 * static_cast<int64_t>(sizeof(T)),
                                         16 / sizeof(T), kPreferredSliceBytes, kMaxSliceBytes, kMaxCluster);
  return launch_row_clusters(deepkd_cuda::deepkd_rows_kernel<T>, prm.rows, plan, deepkd_cuda::kThreads, stream, prm,
                             static_cast<int>(plan.slice), plan.cached);
}

}  // namespace

int deepkd_rows_cuda(const DeepKDParams& prm, void* stream) {
  if (prm.rows == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = dispatch_dtype(prm.dtype, [&](auto zero) { return launch_typed<decltype(zero)>(prm, s); });
  if (err == cudaSuccess) err = cudaGetLastError();
  return static_cast<int>(err);
}

}  // namespace specx
