// Launcher of the fused DeepKD row kernel: picks the cluster size (each block caches a slice of
// both logits) and dispatches on dtype. No torch headers here.
#include <cuda_runtime.h>

#include "specx/cluster_launch.cuh"
#include "specx/deepkd_kernel.cuh"

namespace specx {
namespace {

// 64 KiB slices (both logits) let three blocks share an SM.
constexpr int64_t kPreferredSliceBytes = 64 * 1024;
constexpr int kMaxCluster = kMaxClusterBlocks;  // the exchanges' slot arrays: the portable size

}  // namespace

int deepkd_rows_cuda(const DeepKDParams& prm, void* stream) {
  return launch_by_dtype(prm.dtype, prm.rows, [&](auto zero) {
    using T = decltype(zero);
    const SlicePlan plan = plan_row_slices(prm.classes, prm.rows, 2 * static_cast<int64_t>(sizeof(T)),
                                           16 / sizeof(T), kPreferredSliceBytes, kMaxCachedSliceBytes, kMaxCluster);
    const auto kernel = prm.k < prm.classes ? deepkd_cuda::deepkd_rows_kernel<T, true>
                                            : deepkd_cuda::deepkd_rows_kernel<T, false>;
    return launch_row_clusters(kernel, prm.rows, plan, deepkd_cuda::kThreads, static_cast<cudaStream_t>(stream), prm,
                               static_cast<int>(plan.slice), plan.cached);
  });
}

}  // namespace specx
