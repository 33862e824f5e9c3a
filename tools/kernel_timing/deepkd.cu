// Times torch.ops.specx.deepkd_losses's CUDA work without torch, on the benchmark's shape (rows 8192,
// bf16 logits, the three gradients written): the teacher's top-k threshold launcher, the row kernel,
// and both in sequence. Teacher logits are 2 * N(0, 1), the student's the teacher's plus N(0, 1)
// noise. Prints per-loss checksums that a variant must reproduce. See build.sh.
//   deepkd [k] [vocab]   (defaults 6413 128256; k 0 keeps every class, DKD)
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "specx/topk_threshold.h"
#include "timing.cuh"

// student = teacher + noise from two hashed normal streams; targets from a third.
__global__ void fill(__nv_bfloat16* student, __nv_bfloat16* teacher, int64_t* target, long long rows,
                     long long vocab) {
  const long long n = rows * vocab;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float t = 2.0f * kernel_timing::hashed_normal(i);
    teacher[i] = __float2bfloat16(t);
    student[i] = __float2bfloat16(t + kernel_timing::hashed_normal(i + n));
    if (i < rows) target[i] = kernel_timing::mix_bits(static_cast<unsigned>(i) ^ 0xdeed) % vocab;
  }
}

int main(int argc, char** argv) {
  const long long rows = 8192, k_arg = argc > 1 ? atoll(argv[1]) : 6413;
  const long long vocab = argc > 2 ? atoll(argv[2]) : 128256;
  const long long k = k_arg > 0 ? k_arg : vocab;
  __nv_bfloat16 *student, *teacher, *grads, *threshold;
  int64_t *target, *greater;
  float *row_losses, *scale;
  cudaMalloc(&student, rows * vocab * 2);
  cudaMalloc(&teacher, rows * vocab * 2);
  cudaMalloc(&grads, 3 * rows * vocab * 2);
  cudaMalloc(&threshold, rows * 2);
  cudaMalloc(&target, rows * 8);
  cudaMalloc(&greater, rows * 8);
  cudaMalloc(&row_losses, rows * 3 * 4);
  cudaMalloc(&scale, 4);
  const float inv_rows = 1.0f / rows;
  cudaMemcpy(scale, &inv_rows, 4, cudaMemcpyHostToDevice);
  fill<<<4096, 256>>>(student, teacher, target, rows, vocab);
  const specx::TopKThresholdParams sel{teacher, threshold, greater, rows, vocab, k, specx::DType::kBFloat16};
  specx::DeepKDParams prm{};
  prm.student = student;
  prm.teacher = teacher;
  prm.target = target;
  prm.ignore_index = -100;
  prm.grad_ce = grads;
  prm.grad_tckd = grads + rows * vocab;
  prm.grad_nckd = grads + 2 * rows * vocab;
  prm.grad_scale = scale;
  prm.row_losses = row_losses;
  prm.rows = rows;
  prm.classes = vocab;
  prm.k = k;
  prm.threshold = k < vocab ? threshold : nullptr;
  prm.count_greater = k < vocab ? greater : nullptr;
  prm.temperature = 4.0f;
  prm.dtype = specx::DType::kBFloat16;
  auto select = [&] { return k < vocab ? specx::topk_threshold_cuda(sel, nullptr) : 0; };
  const kernel_timing::Timing t_select = kernel_timing::time_launches(select, 3, 20);
  const kernel_timing::Timing t_rows =
      kernel_timing::time_launches([&] { return specx::deepkd_rows_cuda(prm, nullptr); }, 3, 20);
  const kernel_timing::Timing t_both = kernel_timing::time_launches(
      [&] { return select() != 0 ? 1 : specx::deepkd_rows_cuda(prm, nullptr); }, 3, 20);
  if (!t_select.ok || !t_rows.ok || !t_both.ok) return 1;
  std::vector<float> losses(rows * 3);
  cudaMemcpy(losses.data(), row_losses, rows * 3 * 4, cudaMemcpyDeviceToHost);
  double sum[3] = {0.0, 0.0, 0.0};
  for (long long r = 0; r < rows; ++r)
    for (int j = 0; j < 3; ++j) sum[j] += losses[3 * r + j];
  printf("deepkd %lld x %lld bf16 k=%lld: select %.3f ms, rows %.3f ms, both %.3f ms (min %.3f); "
         "loss sums ce %.6e tckd %.6e nckd %.6e; %s\n",
         rows, vocab, k, t_select.median_ms, t_rows.median_ms, t_both.median_ms, t_both.min_ms, sum[0], sum[1], sum[2],
         cudaGetErrorString(cudaGetLastError()));
  return 0;
}
