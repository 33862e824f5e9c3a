// Times torch.ops.specx.topk_threshold's CUDA launcher without torch: built with nvcc on any
// machine (static cudart), run on the GPU in seconds, no package build there. Every row's result
// is checked (count above < k <= count at or above). See build.sh.
//   topk_threshold <k> [data]   data: 0 normal (sd 2), 1 constant rows, 2 rows ascending along the row,
//                            3 normal with an outlier at every 128th element (misleads a strided sample)
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>

#include "specx/topk_threshold.h"
#include "timing.cuh"

__global__ void fill(__nv_bfloat16* x, long long n, long long cols, int data) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float z = 2.0f * kernel_timing::hashed_normal(i);
    const float v = data == 1 ? 1.0f : data == 2 ? (i % cols) * 1e-3f : data == 3 && i % 128 == 0 ? 100.0f + z : z;
    x[i] = __float2bfloat16(v);
  }
}

// One block per row: counts above and at-or-above the threshold; bad rows counted in *bad.
__global__ void check(const __nv_bfloat16* x, long long cols, const __nv_bfloat16* threshold, const int64_t* greater,
                      long long k, int* bad) {
  __shared__ unsigned above, at_or_above;
  if (threadIdx.x == 0) above = at_or_above = 0;
  __syncthreads();
  const float t = __bfloat162float(threshold[blockIdx.x]);
  unsigned a = 0, b = 0;
  for (long long i = threadIdx.x; i < cols; i += blockDim.x) {
    const float v = __bfloat162float(x[blockIdx.x * cols + i]);
    a += v > t;
    b += v >= t;
  }
  atomicAdd(&above, a);
  atomicAdd(&at_or_above, b);
  __syncthreads();
  if (threadIdx.x == 0 && !(above == greater[blockIdx.x] && above < k && k <= at_or_above)) atomicAdd(bad, 1);
}

int main(int argc, char** argv) {
  const long long rows = 8192, cols = 128256, k = argc > 1 ? atoll(argv[1]) : 6413;
  const int data = argc > 2 ? atoi(argv[2]) : 0;
  __nv_bfloat16 *x, *threshold;
  int64_t* greater;
  int* bad;
  cudaMalloc(&x, rows * cols * 2);
  cudaMalloc(&threshold, rows * 2);
  cudaMalloc(&greater, rows * 8);
  cudaMalloc(&bad, 4);
  fill<<<4096, 256>>>(x, rows * cols, cols, data);
  const specx::TopKThresholdParams prm{x, threshold, greater, rows, cols, k, specx::DType::kBFloat16};
  const kernel_timing::Timing time =
      kernel_timing::time_launches([&] { return specx::topk_threshold_cuda(prm, nullptr); }, 3, 20);
  if (!time.ok) return 1;
  cudaMemset(bad, 0, 4);
  check<<<rows, 256>>>(x, cols, threshold, greater, k, bad);
  int wrong = 0;
  cudaMemcpy(&wrong, bad, 4, cudaMemcpyDeviceToHost);
  printf("%lld x %lld bf16, data %d, k=%lld: median %.3f ms (min %.3f); wrong rows %d; %s\n", rows, cols, data, k,
         time.median_ms, time.min_ms, wrong, cudaGetErrorString(cudaGetLastError()));
  return wrong != 0;
}
