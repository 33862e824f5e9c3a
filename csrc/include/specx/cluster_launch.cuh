// Planning and launch of the cluster-per-row kernels: each row is split into equal slices, one
// per block of a thread-block cluster, cached in shared memory when they fit.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace specx {

// The largest slice a block caches: an SM's 227 KB of shared memory less the kernels' own.
constexpr int64_t kMaxCachedSliceBytes = 200 * 1024;

struct SlicePlan {
  int cluster;       // blocks per row
  int64_t slice;     // elements per block (a multiple of `align`)
  bool cached;       // the slice fits in shared memory
  size_t smem_bytes;
};

// The smallest cluster (a power of two up to max_cluster) whose slice, at bytes_per_element,
// fits preferred_bytes; grown further while fewer than min_blocks blocks would run, as long as
// slices keep at least min_slice elements.
inline SlicePlan plan_row_slices(int64_t row_len, int64_t rows, int64_t bytes_per_element, int64_t align,
                                 int64_t preferred_bytes, int64_t max_bytes, int max_cluster,
                                 int64_t min_blocks = 0, int64_t min_slice = 0) {
  auto slice_for = [&](int c) { return ((row_len + c - 1) / c + align - 1) / align * align; };
  int cluster = 1;
  while (cluster < max_cluster && slice_for(cluster) * bytes_per_element > preferred_bytes) cluster *= 2;
  while (cluster < max_cluster && rows * cluster < min_blocks && slice_for(cluster) > min_slice) cluster *= 2;
  const int64_t slice = slice_for(cluster);
  const bool cached = slice * bytes_per_element <= max_bytes;
  return {cluster, slice, cached, cached ? static_cast<size_t>(slice * bytes_per_element) : 0};
}

// Launches `kernel` on `rows` clusters of plan.cluster blocks.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_row_clusters(void (*kernel)(KernelArgs...), int64_t rows, const SlicePlan& plan, int threads,
                                cudaStream_t stream, Args&&... args) {
  const int cluster = plan.cluster;
  const size_t smem_bytes = plan.smem_bytes;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (err == cudaSuccess && cluster > 8)  // beyond the portable size
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * cluster));
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace specx
