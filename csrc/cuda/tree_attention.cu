// Launcher of the tree attention kernels: picks the kernel (wgmma on Hopper, mma.sync elsewhere)
// and its tile configuration and the KV-length split, dispatches on dtype and head_dim, and
// merges the splits. No torch headers here.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "specx/device_info.h"
#include "specx/tree_attention_kernel.cuh"
#include "specx/tree_attention_wgmma.cuh"

namespace specx {
namespace {

using tree_attn_cuda::LargeTile;
using tree_attn_cuda::MediumTile;
using tree_attn_cuda::SmallTile;
using tree_attn_cuda::WgmmaTile;

constexpr int kMaxSplits = 64;
// Split cost model, in units of one K/V tile's work: a block's start (Q load, pipeline fill,
// epilogue) and the merge pass.
constexpr int64_t kStartTiles = 1;
constexpr int64_t kMergeTiles = 2;

int64_t group_rows(const TreeAttentionParams& p) { return p.tree_size * (p.heads_q / p.heads_kv); }

template <typename Cfg>
constexpr bool is_wgmma = std::is_same_v<Cfg, WgmmaTile>;

// The wgmma kernel exists in builds for sm_90a (SPECX_HAS_SM90A, set by CMake) and runs on
// compute capability 9.0 only; SPECX_TREE_ATTN_WGMMA=0 forces the mma.sync kernel (read on
// every call, for A/B timing).
bool use_wgmma() {
#ifdef SPECX_HAS_SM90A
  const char* env = std::getenv("SPECX_TREE_ATTN_WGMMA");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return compute_capability() == 90;
#else
  return false;
#endif
}

// Calls f(Cfg{}) with the tile configuration: wgmma on Hopper once a KV head has more than 64
// rows (a warpgroup's m64), else the smallest mma.sync block that covers them.
template <typename F>
auto with_tile_config(const TreeAttentionParams& p, F&& f) {
  const int64_t rows = group_rows(p);
  if (rows > SmallTile::kRows && use_wgmma()) return f(WgmmaTile{});
  if (rows > MediumTile::kRows) return f(LargeTile{});
  if (rows > SmallTile::kRows) return f(MediumTile{});
  return f(SmallTile{});
}

template <typename Cfg>
int64_t row_blocks(const TreeAttentionParams& p) {
  return (group_rows(p) + Cfg::kRows - 1) / Cfg::kRows;
}

template <typename Cfg>
int64_t max_tiles(const TreeAttentionParams& p) {
  return std::max<int64_t>(1, (p.max_len + Cfg::kBlockN - 1) / Cfg::kBlockN);
}

// The split count that minimises the modelled time: the busiest SM runs ceil(blocks / SMs)
// blocks, which share it once there are more than kMinBlocks, each costing its tiles plus a
// start; splitting adds a merge.
template <typename Cfg>
int auto_splits(const TreeAttentionParams& p, int sms) {
  const int64_t blocks = p.batch * p.heads_kv * row_blocks<Cfg>(p);
  const int64_t tiles = max_tiles<Cfg>(p);
  int best = 1;
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  for (int s = 1; s <= std::min<int64_t>(kMaxSplits, tiles); ++s) {
    const int64_t per_sm = std::max<int64_t>(Cfg::kMinBlocks, (blocks * s + sms - 1) / sms);
    const int64_t cost = per_sm * ((tiles + s - 1) / s + kStartTiles) + (s > 1 ? kMergeTiles * Cfg::kMinBlocks : 0);
    if (cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

template <typename Cfg, typename T, int kHeadDim>
cudaError_t launch_typed(const TreeAttentionParams& p, cudaStream_t stream) {
  auto kernel = [] {
    if constexpr (is_wgmma<Cfg>) return tree_attn_cuda::tree_attention_wgmma_kernel<Cfg, T, kHeadDim>;
    else return tree_attn_cuda::tree_attention_kernel<Cfg, T, kHeadDim>;
  }();
  constexpr int smem = is_wgmma<Cfg> ? tree_attn_cuda::wgmma_smem_bytes<Cfg, kHeadDim>()
                                     : tree_attn_cuda::smem_bytes<Cfg, kHeadDim>();
  static std::atomic<uint64_t> smem_set;
  cudaError_t err = set_max_dynamic_smem_once(reinterpret_cast<const void*>(kernel), smem, smem_set);
  if (err != cudaSuccess) return err;
  // Row blocks of one (sequence, KV head) are neighbours in launch order, so they share the
  // K/V tiles through L2.
  const dim3 grid(static_cast<unsigned>(row_blocks<Cfg>(p) * p.splits), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(p);
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
  return with_tile_config(p, [&](auto cfg) {
    using Cfg = decltype(cfg);
    switch (p.head_dim) {
      case 64: return launch_typed<Cfg, T, 64>(p, stream);
      case 128: return launch_typed<Cfg, T, 128>(p, stream);
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace

int tree_attention_cuda_splits(const TreeAttentionParams& p, int requested) {
  return with_tile_config(p, [&](auto cfg) {
    using Cfg = decltype(cfg);
    const int64_t tiles = max_tiles<Cfg>(p);
    if (requested > 0) return static_cast<int>(std::min<int64_t>({requested, tiles, kMaxSplits}));
    const int sms = sm_count();
    if (p.batch * p.heads_kv <= 0 || sms <= 0) return 1;
    return auto_splits<Cfg>(p, sms);
  });
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
