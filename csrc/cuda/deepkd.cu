// Launcher of the fused DeepKD row kernel: picks the cluster size (each block caches a slice of
// both logits) and dispatches on dtype. No torch headers here.
#include <cuda_runtime.h>

#include "specx/cluster_launch.cuh"
#include "specx/deepkd_kernel.cuh"

namespace specx {
namespace {

// 64 KiB slices (plus the select's 18 KiB) let two blocks share an SM.
constexpr int64_t kPreferredSliceBytes = 64 * 1024;
constexpr int64_t kMaxSliceBytes = 200 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size

template <typename T>
cudaError_t launch_typed(const DeepKDParams& prm, cudaStream_t stream) {
  constexpr int64_t kAlign = 16 / sizeof(T);
  const int64_t elem_pair = 2 * static_cast<int64_t>(sizeof(T));
  auto slice_for = [&](int c) { return ((prm.classes + c - 1) / c + kAlign - 1) / kAlign * kAlign; };
  int cluster = 1;
  while (cluster < kMaxCluster && slice_for(cluster) * elem_pair > kPreferredSliceBytes) cluster *= 2;
  const int64_t slice = slice_for(cluster);
  const bool cached = slice * elem_pair <= kMaxSliceBytes;
  const size_t smem = cached ? static_cast<size_t>(slice * elem_pair) : 0;

  return launch_row_clusters(deepkd_cuda::deepkd_rows_kernel<T>, prm.rows, cluster, deepkd_cuda::kThreads, smem, stream,
                             prm, static_cast<int>(slice), cached);
}

}  // namespace

int deepkd_rows_cuda(const DeepKDParams& prm, void* stream) {
  if (prm.rows == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaErrorInvalidValue;
  switch (prm.dtype) {
    case DType::kFloat32: err = launch_typed<float>(prm, s); break;
    case DType::kFloat16: err = launch_typed<__half>(prm, s); break;
    case DType::kBFloat16: err = launch_typed<__nv_bfloat16>(prm, s); break;
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  return static_cast<int>(err);
}

}  // namespace specx
