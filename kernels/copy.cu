// Many independent copies in one launch (ppermute pairs, all_to_all chunks, peer copies):
// blockIdx.y picks the copy, the x blocks stride over its elements.  V is the widest unsigned
// type that every pointer and byte count of the batch is aligned to (chosen on the host).
#include "common.cuh"

namespace spmd {

template <typename V>
__global__ void copy_batched(const V* const* __restrict__ srcs, V* const* __restrict__ dsts,
                             const i64* __restrict__ counts) {
  const V* __restrict__ s = srcs[blockIdx.y];
  V* __restrict__ d = dsts[blockIdx.y];
  const i64 n = counts[blockIdx.y];
  for (i64 t = global_thread(); t < n; t += grid_threads()) d[t] = s[t];
}

}  // namespace spmd
