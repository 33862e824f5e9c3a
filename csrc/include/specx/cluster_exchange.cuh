// Cluster-wide reductions of the cluster-per-row kernels (SpecKD, DeepKD). Each block pushes its
// partial into every peer's shared memory with st.async, and the stores themselves complete the
// receiver's mbarrier: a block waits only for the bytes it needs, with no cluster barrier and no
// GPU-scope fence per exchange, and may exit as soon as it has them.
#pragma once
#include <cooperative_groups.h>

#include <cstdint>

#include "specx/reduce.cuh"
#include "specx/slice.cuh"  // shared_address, peer_address, wait_phase0

namespace specx {

// The most blocks a row's cluster has: the portable cluster size.
constexpr int kMaxClusterBlocks = 8;

// One reduction of a P over the cluster. Lives in shared memory; each is used at most once per
// kernel (one mbarrier phase).
template <typename P>
struct ClusterExchange {
  static_assert(sizeof(P) % 4 == 0, "pushed structs are made of 32-bit words");
  P slots[kMaxClusterBlocks];  // slot r: block r's partial
  uint64_t arrived;            // completes when all nblocks partials have landed

  // Thread 0, before cluster_arrive_started, so that no peer pushes into an uninitialised barrier.
  // The expected bytes are posted only by push: an exchange a kernel skips leaves no pending
  // transaction behind (the peers' stores may land first; the phase still needs this block's arrival).
  __device__ __forceinline__ void init() {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(&arrived)) : "memory");
  }

  // The combination of every thread's `v` over the cluster, in every thread, bit-identical in every
  // block (the slots are combined in rank order). `warp_scratch` holds one P per warp; consecutive
  // exchanges must alternate between two such buffers (see ExchangeScratch).
  template <int kThreads>
  __device__ __forceinline__ P allreduce(P v, P* warp_scratch) { return wait(push<kThreads>(v, warp_scratch)); }

  // allreduce in two halves, so that two exchanges make one round trip: push both, then wait for
  // both. What push leaves for wait is the block's value where the block is the whole cluster (not
  // a cluster launch, where st.async has no peer to address), in registers: a later push may
  // overwrite the warp partials before this wait.
  struct Sent {
    P local;
  };
  template <int kThreads>
  __device__ __forceinline__ Sent push(P v, P* warp_scratch) {
    gather_warps(v, warp_scratch);
    if (num_blocks() == 1) return {block_value<kThreads>(warp_scratch)};
    send<kThreads>(warp_scratch);
    return {v};
  }
  __device__ __forceinline__ P wait(const Sent& sent) { return num_blocks() == 1 ? sent.local : combine_slots(); }

 private:
  static __device__ __forceinline__ unsigned num_blocks() { return cooperative_groups::this_cluster().num_blocks(); }

  // Each warp's combination into warp_scratch, then a block barrier.
  static __device__ __forceinline__ void gather_warps(P v, P* warp_scratch) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = combine(v, shfl_xor_struct(v, off));
    if (threadIdx.x % 32 == 0) warp_scratch[threadIdx.x / 32] = v;
    __syncthreads();
  }
  template <int kThreads>
  static __device__ __forceinline__ P block_value(const P* warp_scratch) {
    P block = warp_scratch[0];
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) block = combine(block, warp_scratch[w]);
    return block;
  }
  // Lane r of warp 0 stores the block's value into block r's slot, completing r's barrier.
  template <int kThreads>
  __device__ __forceinline__ void send(const P* warp_scratch) {
    const unsigned nblocks = num_blocks(), rank = cooperative_groups::this_cluster().block_rank();
    if (threadIdx.x == 0) {
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(&arrived)),
                   "r"(static_cast<uint32_t>(nblocks * sizeof(P)))
                   : "memory");
    }
    if (threadIdx.x < nblocks) {
      const P block = block_value<kThreads>(warp_scratch);
      const uint32_t dst = peer_address(shared_address(&slots[rank]), threadIdx.x);
      const uint32_t bar = peer_address(shared_address(&arrived), threadIdx.x);
      const uint32_t* words = reinterpret_cast<const uint32_t*>(&block);
#pragma unroll
      for (int w = 0; w < static_cast<int>(sizeof(P) / 4); ++w) {
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(dst + 4 * w),
                     "r"(words[w]), "r"(bar)
                     : "memory");
      }
    }
  }
  __device__ __forceinline__ P combine_slots() {
    const unsigned nblocks = num_blocks();
    wait_phase0<true>(shared_address(&arrived));
    P acc = slots[0];
    for (unsigned r = 1; r < nblocks; ++r) acc = combine(acc, slots[r]);
    return acc;
  }
};

// Two buffers of warp partials, taken in turn by a kernel's successive exchanges: warp 0 may
// still read exchange i's partials after other warps have passed its wait, and exchange i + 1's
// block barrier keeps them from writing exchange i + 2's until it has.
template <int kThreads, int kBytes>
struct ExchangeScratch {
  alignas(16) unsigned char buffers[2][kThreads / 32 * kBytes];

  template <typename P>
  __device__ __forceinline__ P* take(int& turn) {
    static_assert(sizeof(P) <= kBytes, "a warp partial must fit its scratch entry");
    return reinterpret_cast<P*>(buffers[turn++ & 1]);
  }
};

// Thread 0 first initialises the block's exchanges; every block then arrives here when it starts
// (relaxed, after the release fence of the mbarrier inits), and waits in cluster_wait_started
// before its first push, so no store lands in a block that has not started.
__device__ __forceinline__ void cluster_arrive_started() {
  if (threadIdx.x == 0) asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait_started() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

}  // namespace specx
