// Launch of a cluster-per-row kernel: `rows` clusters of `cluster` blocks each.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace specx {

template <typename... KernelArgs, typename... Args>
cudaError_t launch_row_clusters(void (*kernel)(KernelArgs...), int64_t rows, int cluster, int threads,
                                size_t smem_bytes, cudaStream_t stream, Args&&... args) {
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
