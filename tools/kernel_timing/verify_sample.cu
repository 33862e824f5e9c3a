// Times torch.ops.specx.verify_sample's CUDA launcher without torch, on the benchmark's shape
// (batch 16, 64 nodes, vocab 128256, bf16 logits 3 * N(0, 1), temperature 0.8, random parents,
// each node's token the argmax of its parent's logits). Built with nvcc on any machine (static
// cudart), run on the GPU in seconds, no package build there. The results are exact, so a variant
// must print the same checksum as the committed kernel. See build.sh.
//   verify_sample [top_p]   (default 0.9)
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "specx/verify.h"
#include "specx/verify_kernel.cuh"
#include "timing.cuh"

__global__ void fill_logits(__nv_bfloat16* x, long long n) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(3.0f * kernel_timing::hashed_normal(i));
}

// parents[b, i] uniform in [0, i) (the root's is -1).
__global__ void fill_parents(int64_t* parents, int size) {
  const int b = blockIdx.x, i = threadIdx.x;
  if (i >= size) return;
  const unsigned h = kernel_timing::mix_bits(b * 7919u + i * 104729u + 17u);
  parents[b * size + i] = i == 0 ? -1 : static_cast<int64_t>(h % i);
}

// The argmax (lowest index among equals) of each row, one block per row: the sampling verify's own.
__global__ void argmax_rows(const __nv_bfloat16* x, long long cols, int64_t* out) {
  __shared__ specx::verify_cuda::ArgMax scratch[33];
  const specx::verify_cuda::ArgMax best = specx::verify_cuda::row_argmax(x + blockIdx.x * cols, cols, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = best.index;
}

// A node's token: the argmax of its parent's row (the root keeps its own).
__global__ void tokens_from_parents(const int64_t* parents, const int64_t* argmax, int64_t* tokens, int n, int size) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) tokens[i] = parents[i] < 0 ? argmax[i] : argmax[i - i % size + parents[i]];
}

int main(int argc, char** argv) {
  const int batch = 16, size = 64;
  const long long vocab = 128256, rows = static_cast<long long>(batch) * size;
  const double top_p = argc > 1 ? atof(argv[1]) : 0.9;
  __nv_bfloat16* logits;
  int64_t *parents, *argmax, *tokens, *accepted, *accept_len, *next_token;
  cudaMalloc(&logits, rows * vocab * 2);
  cudaMalloc(&parents, rows * 8);
  cudaMalloc(&argmax, rows * 8);
  cudaMalloc(&tokens, rows * 8);
  cudaMalloc(&accepted, rows * 8);
  cudaMalloc(&accept_len, batch * 8);
  cudaMalloc(&next_token, batch * 8);
  fill_logits<<<4096, 256>>>(logits, rows * vocab);
  fill_parents<<<batch, size>>>(parents, size);
  argmax_rows<<<rows, 256>>>(logits, vocab, argmax);
  tokens_from_parents<<<(rows + 255) / 256, 256>>>(parents, argmax, tokens, static_cast<int>(rows), size);
  specx::VerifyParams prm{};
  prm.node_tokens = tokens;
  prm.parents = parents;
  prm.logits = logits;
  prm.accepted_nodes = accepted;
  prm.accept_len = accept_len;
  prm.next_token = next_token;
  prm.batch = batch;
  prm.size = size;
  prm.vocab = vocab;
  prm.dtype = specx::DType::kBFloat16;
  prm.inv_temperature = 1.0f / 0.8f;
  prm.top_p = top_p;
  prm.seed = 42;
  const kernel_timing::Timing time =
      kernel_timing::time_launches([&] { return specx::verify_sample_cuda(prm, nullptr); }, 3, 50);
  if (!time.ok) return 1;
  std::vector<int64_t> len(batch), next(batch);
  cudaMemcpy(len.data(), accept_len, batch * 8, cudaMemcpyDeviceToHost);
  cudaMemcpy(next.data(), next_token, batch * 8, cudaMemcpyDeviceToHost);
  unsigned long long checksum = 1469598103934665603ull, depth = 0;
  for (int b = 0; b < batch; ++b) {
    checksum = (checksum ^ static_cast<unsigned long long>(len[b])) * 1099511628211ull;
    checksum = (checksum ^ static_cast<unsigned long long>(next[b])) * 1099511628211ull;
    depth += len[b];
  }
  printf("verify_sample %d x %d x %lld bf16, top_p %.2f: median %.1f us (min %.1f); mean accepted %.2f; "
         "checksum %016llx; %s\n",
         batch, size, vocab, top_p, 1000.0f * time.median_ms, 1000.0f * time.min_ms, double(depth) / batch, checksum,
         cudaGetErrorString(cudaGetLastError()));
  return 0;
}
