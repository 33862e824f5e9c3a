// Launcher of the top-k threshold kernel: picks the cluster size (each block caches a slice of the
// row) and dispatches on dtype. No torch headers here.
#include <cuda_runtime.h>

#include "specx/cluster_launch.cuh"
#include "specx/topk_threshold_kernel.cuh"

namespace specx {
namespace {

// Slices this small (plus the select's 33 KiB) let three blocks share an SM, so one block's loads
// overlap the others' passes and about 48 KiB of loads per SM are in flight.
constexpr int64_t kPreferredSliceBytes = 32 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size

}  // namespace

int topk_threshold_cuda(const TopKThresholdParams& prm, void* stream) {
  return launch_by_dtype(prm.dtype, prm.rows, [&](auto zero) {
    using T = decltype(zero);
    const SlicePlan plan = plan_row_slices(prm.cols, prm.rows, static_cast<int64_t>(sizeof(T)), 16 / sizeof(T),
                                           kPreferredSliceBytes, kMaxCachedSliceBytes, kMaxCluster);
    return launch_row_clusters(topk_cuda::topk_threshold_kernel<T>, prm.rows, plan, topk_cuda::kThreads,
                               static_cast<cudaStream_t>(stream), prm, static_cast<int>(plan.slice), plan.cached);
  });
}

}  // namespace specx
