// Times torch.ops.specx.speckd_loss's CUDA row kernel without torch, on the benchmark's shape
// (rows 8192, bf16 logits, gradient written). Teacher logits are 2 * N(0, 1), the student's the
// teacher's plus N(0, 1) noise. Prints a checksum of the per-row divergences and gates that a
// variant must reproduce. See build.sh.
//   speckd [vocab] [divergence] [gate] [k]   (defaults 128256 fkl topk 5; divergence fkl, rkl,
//                                             jsd, skl, srkl; gate none, topk, spec)
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "specx/speckd.h"
#include "timing.cuh"

// student = teacher + noise, from two hashed normal streams.
__global__ void fill(__nv_bfloat16* student, __nv_bfloat16* teacher, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float t = 2.0f * kernel_timing::hashed_normal(i);
    teacher[i] = __float2bfloat16(t);
    student[i] = __float2bfloat16(t + kernel_timing::hashed_normal(i + n));
  }
}

template <typename E>
bool parse(const char* arg, const char* const* names, int count, E& out) {
  for (int i = 0; i < count; ++i) {
    if (std::strcmp(arg, names[i]) == 0) {
      out = static_cast<E>(i);
      return true;
    }
  }
  printf("unknown '%s'\n", arg);
  return false;
}

int main(int argc, char** argv) {
  const char* divergences[] = {"fkl", "rkl", "jsd", "skl", "srkl"};
  const char* gates[] = {"none", "topk", "spec"};
  const long long rows = 8192, vocab = argc > 1 ? atoll(argv[1]) : 128256;
  specx::SpecKDParams prm{};
  prm.divergence = specx::Divergence::kFKL;
  prm.gate = specx::Gate::kTopK;
  if (argc > 2 && !parse(argv[2], divergences, 5, prm.divergence)) return 2;
  if (argc > 3 && !parse(argv[3], gates, 3, prm.gate)) return 2;
  prm.k = argc > 4 ? atoi(argv[4]) : 5;
  __nv_bfloat16 *student, *teacher, *grad;
  float* row_divergence;
  bool* row_accepted;
  cudaMalloc(&student, rows * vocab * 2);
  cudaMalloc(&teacher, rows * vocab * 2);
  cudaMalloc(&grad, rows * vocab * 2);
  cudaMalloc(&row_divergence, rows * 4);
  cudaMalloc(&row_accepted, rows);
  fill<<<4096, 256>>>(student, teacher, rows * vocab);
  prm.student = student;
  prm.teacher = teacher;
  prm.ignore_index = -100;
  prm.grad = grad;
  prm.row_divergence = row_divergence;
  prm.row_accepted = row_accepted;
  prm.rows = rows;
  prm.vocab = vocab;
  prm.dtype = specx::DType::kBFloat16;
  prm.grad_dtype = specx::DType::kBFloat16;
  prm.reject_weight = 0.1f;
  prm.inv_temperature = 1.0f;
  prm.mix = 0.5f;
  prm.seed = 7;
  const kernel_timing::Timing time =
      kernel_timing::time_launches([&] { return specx::speckd_rows_cuda(prm, nullptr); }, 3, 20);
  if (!time.ok) return 1;
  std::vector<float> d(rows);
  std::vector<unsigned char> a(rows);
  cudaMemcpy(d.data(), row_divergence, rows * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(a.data(), row_accepted, rows, cudaMemcpyDeviceToHost);
  double total = 0.0;
  long long accepted = 0;
  for (long long r = 0; r < rows; ++r) total += d[r], accepted += a[r];
  printf("speckd %lld x %lld bf16 %s/%s k=%d: median %.3f ms (min %.3f); divergence sum %.6e, accepted %lld; %s\n",
         rows, vocab, divergences[static_cast<int>(prm.divergence)], gates[static_cast<int>(prm.gate)], prm.k,
         time.median_ms, time.min_ms, total, accepted, cudaGetErrorString(cudaGetLastError()));
  return 0;
}
