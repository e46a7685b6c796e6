// All-reduce over peer memory for small messages on one node (below NCCL's latency floor).
//
// Every rank owns one buffer of `packs` 16-byte packs and one flag array, both in memory the
// other ranks have mapped (CUDA IPC handles of a raw cudaMalloc, or peer access in one process);
// bufs[j] and flags[j] are rank j's, as mapped here.  Ranks meet at per-block flag barriers:
// block b of every rank signals block b of every other rank, so no grid-wide sync is needed, and
// every phase walks each slice with the same slice-relative grid-stride loop, so block b only
// ever reads what block b of its peers wrote before the barrier they shared.
//
// one_shot:  copy in -> my buffer | barrier | out = op over all buffers | barrier
// two_shot:  copy in -> my buffer | barrier | reduce my slice into my buffer | barrier |
//            gather every slice from its owner into out | barrier
// The last barrier keeps a fast rank from overwriting its buffer (next call) while a peer still
// reads it.  `epoch` grows by one per call (the host counts), so flags never need resetting.
#include "common.cuh"

namespace spmd {

static_assert(BARRIER_PHASES == 3, "two_shot meets at three barriers");

__device__ __forceinline__ void block_barrier(unsigned* const* flags, int n, int rank, int phase,
                                              unsigned epoch) {
  __syncthreads();  // this block's writes happen before the release below (cumulativity)
  if (threadIdx.x < n) {
    store_release_sys(flags[threadIdx.x] + flag_slot(phase, blockIdx.x, rank), epoch);
    const unsigned* mine = flags[rank] + flag_slot(phase, blockIdx.x, threadIdx.x);
    while (static_cast<int>(load_acquire_sys(mine) - epoch) < 0) {
    }
  }
  __syncthreads();
}

// Copy packs [lo, hi) of `in` into my buffer with the slice-relative loop the later phases use.
template <typename T>
__device__ __forceinline__ void stage_input(const Pack<T>* in, Pack<T>* mine, i64 lo, i64 hi) {
  for (i64 t = lo + global_thread(); t < hi; t += grid_threads()) mine[t] = in[t];
}

template <typename T, typename Op>
__global__ void allreduce_one_shot(const Pack<T>* in, Pack<T>* out,
                       Pack<T>* const* bufs, unsigned* const* flags, int n, int rank, i64 packs,
                       unsigned epoch, double scale, int use_scale) {
  const typename Acc<T>::type s = static_cast<typename Acc<T>::type>(scale);
  stage_input<T>(in, bufs[rank], 0, packs);
  block_barrier(flags, n, rank, 0, epoch);
  const Pack<T>* const* peers = const_cast<const Pack<T>* const*>(bufs);
  for (i64 t = global_thread(); t < packs; t += grid_threads())
    out[t] = reduce_packs<T, Op>(peers, n, t, s, use_scale);
  block_barrier(flags, n, rank, 1, epoch);
}

template <typename T, typename Op>
__global__ void allreduce_two_shot(const Pack<T>* in, Pack<T>* out,
                       Pack<T>* const* bufs, unsigned* const* flags, int n, int rank, i64 packs,
                       unsigned epoch, double scale, int use_scale) {
  const typename Acc<T>::type s = static_cast<typename Acc<T>::type>(scale);
  i64 lo, hi;
  for (int owner = 0; owner < n; ++owner) {
    owned_slice(packs, n, owner, 1, &lo, &hi);
    stage_input<T>(in, bufs[rank], lo, hi);
  }
  block_barrier(flags, n, rank, 0, epoch);
  owned_slice(packs, n, rank, 1, &lo, &hi);
  const Pack<T>* const* peers = const_cast<const Pack<T>* const*>(bufs);
  Pack<T>* mine = bufs[rank];
  for (i64 t = lo + global_thread(); t < hi; t += grid_threads())
    mine[t] = reduce_packs<T, Op>(peers, n, t, s, use_scale);
  block_barrier(flags, n, rank, 1, epoch);
  for (int owner = 0; owner < n; ++owner) {
    owned_slice(packs, n, owner, 1, &lo, &hi);
    const Pack<T>* theirs = bufs[owner];
    for (i64 t = lo + global_thread(); t < hi; t += grid_threads()) out[t] = theirs[t];
  }
  block_barrier(flags, n, rank, 2, epoch);
}

}  // namespace spmd
