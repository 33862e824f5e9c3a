// Launcher of the top-k threshold kernel: picks the cluster size (each block caches a slice of the
// row) and dispatches on dtype. No torch headers here.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include "specx/cluster_launch.cuh"
#include "specx/device_info.h"
#include "specx/topk_threshold_kernel.cuh"
#include "specx/topk_threshold_row_kernel.cuh"

namespace specx {
namespace {

// Slices of 64 KiB (plus the select's 24 KiB) let two blocks share an SM, one loading while the
// other runs its passes. Halving the slices (three blocks per SM, clusters of 8) measured 9 %
// slower at k = 64 and 64128 (equal at 6413), 8192 x 128256 bf16 on the H200: each block pays the
// select's fixed cost per row.
constexpr int64_t kPreferredSliceBytes = 64 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size
// 16-bit rows at least this long take the one-block-per-row kernel (its sample needs 1024 keys).
constexpr int64_t kRowKernelMinCols = 16384;

constexpr int kRowKernelSmem = static_cast<int>(sizeof(topk_cuda::RowSelectShared));

// The current device's SM count, or 0 where it cannot give a block the row kernel's 88 KB of
// shared memory (a block of 88 KB fits every GPU of compute capability 8.0 or later).
int row_kernel_sms() { return max_smem_per_block() >= kRowKernelSmem ? sm_count() : 0; }

template <typename T>
cudaError_t launch_row_kernel(const TopKThresholdParams& prm, int sms, cudaStream_t stream) {
  auto* kernel = topk_cuda::topk_threshold_row_kernel<T>;
  static std::atomic<uint64_t> smem_set;
  const cudaError_t err = set_max_dynamic_smem_once(reinterpret_cast<const void*>(kernel), kRowKernelSmem, smem_set);
  if (err != cudaSuccess) return err;
  // kRowBlocksPerSM blocks per SM, each looping over rows.
  const int64_t grid = std::min<int64_t>(prm.rows, int64_t{sms} * topk_cuda::kRowBlocksPerSM);
  kernel<<<static_cast<unsigned>(grid), topk_cuda::kRowThreads, kRowKernelSmem, stream>>>(prm);
  return cudaSuccess;
}

}  // namespace

int topk_threshold_cuda(const TopKThresholdParams& prm, void* stream) {
  return launch_by_dtype(prm.dtype, prm.rows, [&](auto zero) {
    using T = decltype(zero);
    if constexpr (sizeof(T) == 2) {
      const int sms = prm.cols >= kRowKernelMinCols ? row_kernel_sms() : 0;
      if (sms > 0) return launch_row_kernel<T>(prm, sms, static_cast<cudaStream_t>(stream));
    }
    const SlicePlan plan = plan_row_slices(prm.cols, prm.rows, static_cast<int64_t>(sizeof(T)), 16 / sizeof(T),
                                           kPreferredSliceBytes, kMaxCachedSliceBytes, kMaxCluster);
    return launch_row_clusters(topk_cuda::topk_threshold_kernel<T>, prm.rows, plan, topk_cuda::kThreads,
                               static_cast<cudaStream_t>(stream), prm, static_cast<int>(plan.slice), plan.cached);
  });
}

}  // namespace specx
