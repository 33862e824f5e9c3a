// Shared pieces of the kernel timing binaries: reproducible normal data and a launch timer.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

namespace kernel_timing {

__device__ __forceinline__ unsigned mix_bits(unsigned h) {
  h ^= h >> 15;
  h *= 0x2c1b3c6du;
  h ^= h >> 12;
  h *= 0x297a2d39u;
  h ^= h >> 15;
  return h;
}

// A standard normal value from two hashes of i (Box-Muller): the same data on every run.
__device__ __forceinline__ float hashed_normal(long long i) {
  const unsigned h = mix_bits(static_cast<unsigned>(i) * 2654435761u ^ 1234u);
  const unsigned h2 = mix_bits(h * 0x9E3779B9u + 0x7F4A7C15u);
  const float u1 = (h >> 8) * (1.0f / 16777216.0f) + 1e-7f, u2 = (h2 >> 8) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

struct Timing {
  bool ok;
  float median_ms, min_ms;
};

// CUDA-event times of launch() (0 or a CUDA error code): `warmup` runs, then the median and the
// minimum of `reps`.
template <typename F>
Timing time_launches(F&& launch, int warmup, int reps) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> ms;
  for (int rep = 0; rep < warmup + reps; ++rep) {
    cudaEventRecord(start);
    if (launch() != 0) {
      printf("launch failed: %s\n", cudaGetErrorString(cudaGetLastError()));
      return {false, 0.0f, 0.0f};
    }
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float t;
    cudaEventElapsedTime(&t, start, stop);
    if (rep >= warmup) ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return {true, ms[ms.size() / 2], ms.front()};
}

}  // namespace kernel_timing
