// Thread-block clusters (Hopper on): a block's rank in its cluster, its peers' shared memory, the cluster
// barrier. Before Hopper a cluster is one block and these reduce to it.
#pragma once
#include <cooperative_groups.h>

namespace decima {

__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return (int)cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

template <typename P> __device__ __forceinline__ P* cluster_peer(P* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}

// The cluster barrier in halves, so that the wait costs nothing by the time it is needed: a block may write
// a peer's shared memory only once the peer has started, which every block announces on entry (arrive) and
// checks before its first remote write (wait).
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#endif
}

}  // namespace decima
