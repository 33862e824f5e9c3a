// Times torch.ops.specx.tree_attention's CUDA launcher without torch, on the benchmark's shapes
// (heads 32 / 8, head_dim 128, bf16 q, k, v of N(0, 1), random trees, every prefix the same
// length). The time per call is that of 20 back-to-back calls between two events, so a launch's
// host cost does not count. Prints a hash of the output's bits that a variant must reproduce, and
// the output's sum. See build.sh.
//   tree_attention [splits]   (default 0: the launcher's choice)
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "specx/tree_attention.h"
#include "timing.cuh"

__global__ void fill_normal(__nv_bfloat16* x, long long n, long long seed) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(kernel_timing::hashed_normal(i + seed));
}

// Ancestor bits [batch, T, ceil(T / 32)] of random trees: node i's parent uniform in [0, i).
std::vector<int32_t> random_tree_mask(int batch, int size) {
  const int words = (size + 31) / 32;
  std::vector<int32_t> mask(static_cast<size_t>(batch) * size * words, 0);
  uint32_t state = 12345;
  for (int b = 0; b < batch; ++b) {
    int32_t* rows = mask.data() + static_cast<size_t>(b) * size * words;
    for (int i = 0; i < size; ++i) {
      if (i > 0) {
        state = state * 1664525u + 1013904223u;
        const int parent = static_cast<int>((state >> 8) % static_cast<uint32_t>(i));
        std::copy(rows + parent * words, rows + (parent + 1) * words, rows + i * words);
      }
      rows[i * words + i / 32] |= static_cast<int32_t>(1u << (i % 32));
    }
  }
  return mask;
}

struct Shape {
  int batch, kv_len, tree_size;
};

int main(int argc, char** argv) {
  const int requested_splits = argc > 1 ? atoi(argv[1]) : 0;
  constexpr int kHeadsQ = 32, kHeadsKv = 8, kHeadDim = 128, kCalls = 20;
  for (const Shape s : {Shape{16, 4096, 64}, Shape{1, 4096, 64}, Shape{64, 2048, 32}, Shape{4, 4096, 64},
                        Shape{16, 1024, 64}}) {
    const long long max_len = s.kv_len + s.tree_size;
    const long long q_elems = 1LL * s.batch * s.tree_size * kHeadsQ * kHeadDim;
    const long long kv_elems = 1LL * s.batch * max_len * kHeadsKv * kHeadDim;
    __nv_bfloat16 *q, *k, *v, *out;
    int32_t *lens, *mask;
    float *lse, *partial;
    cudaMalloc(&q, q_elems * 2);
    cudaMalloc(&k, kv_elems * 2);
    cudaMalloc(&v, kv_elems * 2);
    cudaMalloc(&out, q_elems * 2);
    cudaMalloc(&lse, q_elems / kHeadDim * 4);
    fill_normal<<<1024, 256>>>(q, q_elems, 0);
    fill_normal<<<1024, 256>>>(k, kv_elems, 1LL << 40);
    fill_normal<<<1024, 256>>>(v, kv_elems, 2LL << 40);
    const std::vector<int32_t> lens_host(s.batch, s.kv_len);
    const std::vector<int32_t> mask_host = random_tree_mask(s.batch, s.tree_size);
    cudaMalloc(&lens, s.batch * 4);
    cudaMalloc(&mask, mask_host.size() * 4);
    cudaMemcpy(lens, lens_host.data(), s.batch * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(mask, mask_host.data(), mask_host.size() * 4, cudaMemcpyHostToDevice);

    specx::TreeAttentionParams p{};
    p.q = q;
    p.k = k;
    p.v = v;
    p.kv_batch_stride[0] = p.kv_batch_stride[1] = max_len * kHeadsKv * kHeadDim;
    p.kv_seq_stride[0] = p.kv_seq_stride[1] = kHeadsKv * kHeadDim;
    p.cache_lens = lens;
    p.tree_mask = mask;
    p.out = out;
    p.lse = lse;
    p.batch = s.batch;
    p.tree_size = s.tree_size;
    p.max_len = max_len;
    p.heads_q = kHeadsQ;
    p.heads_kv = kHeadsKv;
    p.head_dim = kHeadDim;
    p.mask_words = (s.tree_size + 31) / 32;
    p.scale = 1.0f / sqrtf(static_cast<float>(kHeadDim));
    p.dtype = specx::DType::kBFloat16;
    p.splits = specx::tree_attention_cuda_splits(p, requested_splits);
    cudaMalloc(&partial, p.splits * (q_elems + q_elems / kHeadDim) * 4);
    p.partial_out = partial;
    p.partial_lse = partial + p.splits * q_elems;

    const kernel_timing::Timing t = kernel_timing::time_launches(
        [&] {
          for (int call = 0; call < kCalls; ++call)
            if (const int err = specx::tree_attention_cuda(p, nullptr)) return err;
          return 0;
        },
        3, 30);
    std::vector<uint16_t> bits(q_elems);
    cudaMemcpy(bits.data(), out, q_elems * 2, cudaMemcpyDeviceToHost);
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over the output's 16-bit words
    double sum = 0.0;
    for (const uint16_t x : bits) {
      hash = (hash ^ x) * 1099511628211ull;
      sum += __bfloat162float(__nv_bfloat16_raw{x});
    }
    printf("B%d L%d T%d splits %d: %.1f us per call (min %.1f); out hash %016llx sum %.6e; %s\n", s.batch, s.kv_len,
           s.tree_size, p.splits, t.ok ? t.median_ms * 1e3 / kCalls : 0.0, t.min_ms * 1e3 / kCalls,
           static_cast<unsigned long long>(hash), sum, cudaGetErrorString(cudaGetLastError()));
    for (void* ptr : {static_cast<void*>(q), static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(out),
                      static_cast<void*>(lens), static_cast<void*>(mask), static_cast<void*>(lse),
                      static_cast<void*>(partial)})
      cudaFree(ptr);
  }
  return 0;
}
