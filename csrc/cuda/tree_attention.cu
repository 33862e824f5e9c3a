// Launcher of the tree attention kernels: picks the KV-length split, dispatches on dtype and
// head_dim, and merges the splits. No torch headers here.
#include <cuda_runtime.h>

#include <algorithm>

#include "specx/tree_attention_kernel.cuh"

namespace specx {
namespace {

using tree_attn_cuda::kBlockM;
using tree_attn_cuda::kBlockN;
using tree_attn_cuda::kThreads;

constexpr int kMaxSplits = 64;
constexpr int kMinTilesPerSplit = 4;  // below 256 keys a split costs more to merge than it saves

int64_t query_tiles(const TreeAttentionParams& p) {
  const int64_t rows = p.tree_size * (p.heads_q / p.heads_kv);
  return (rows + kBlockM - 1) / kBlockM;
}

template <typename T, int kHeadDim>
cudaError_t launch_typed(const TreeAttentionParams& p, cudaStream_t stream) {
  auto kernel = tree_attn_cuda::tree_attention_kernel<T, kHeadDim>;
  constexpr int smem = tree_attn_cuda::smem_bytes<kHeadDim>();
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // Query tiles of one (sequence, KV head) are neighbours in launch order, so they share the
  // K/V tiles through L2.
  const dim3 grid(static_cast<unsigned>(query_tiles(p) * p.splits), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  const int64_t threads = p.batch * p.tree_size * p.heads_q * (kHeadDim / 4);
  constexpr int kCombineThreads = 256;
  tree_attn_cuda::tree_attention_combine_kernel<T, kHeadDim>
      <<<static_cast<unsigned>((threads + kCombineThreads - 1) / kCombineThreads), kCombineThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_head_dim(const TreeAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_typed<T, 64>(p, stream);
    case 128: return launch_typed<T, 128>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int tree_attention_cuda_splits(const TreeAttentionParams& p, int requested) {
  const int64_t max_tiles = std::max<int64_t>(1, (p.max_len + kBlockN - 1) / kBlockN);
  if (requested > 0) return static_cast<int>(std::min<int64_t>({requested, max_tiles, kMaxSplits}));
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t blocks = p.batch * p.heads_kv * query_tiles(p);
  if (blocks <= 0 || blocks >= sms) return 1;
  // Aim at about two blocks per SM, each split keeping at least kMinTilesPerSplit tiles.
  const int64_t wanted = (2 * sms + blocks - 1) / blocks;
  const int64_t by_length = std::max<int64_t>(1, max_tiles / kMinTilesPerSplit);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, by_length, kMaxSplits})));
}

int tree_attention_cuda(const TreeAttentionParams& p, void* stream) {
  if (p.batch == 0 || p.tree_size == 0 || p.heads_q == 0) return cudaSuccess;
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat16: err = launch_head_dim<__half>(p, s); break;
    case DType::kBFloat16: err = launch_head_dim<__nv_bfloat16>(p, s); break;
    case DType::kFloat32: break;  // the glue routes float32 elsewhere
  }
  return static_cast<int>(err);
}

}  // namespace specx
