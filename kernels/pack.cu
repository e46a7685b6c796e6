// Pack and unpack strided views into contiguous communication buffers.
//
// The view has the rank dim first (n chunks, stride s_rank) and its other dims collapsed into
// (d0, d1, d2) with strides (s0, s1, s2); the packed buffer is contiguous (n, d0, d1, d2), so
// chunk j is one run.  psum_scatter and all_to_all pack what they send, all_gather unpacks what
// it received, on any dim, without a transpose-then-copy.  Only the element size matters, so
// the kernels are instantiated on unsigned types of 1 to 16 bytes, and on 32-bit indices where
// the sizes allow (64-bit division costs several times more).
#include "common.cuh"

namespace spmd {

template <typename T, typename I>
__global__ void pack_chunks(const T* __restrict__ src, T* __restrict__ dst, I n, I d0, I d1,
                            I d2, I s_rank, I s0, I s1, I s2) {
  const I total = n * d0 * d1 * d2;
  for (I t = static_cast<I>(global_thread()); t < total; t += static_cast<I>(grid_threads()))
    dst[t] = src[strided_offset<I>(t, d0, d1, d2, s_rank, s0, s1, s2)];
}

template <typename T, typename I>
__global__ void unpack_chunks(const T* __restrict__ src, T* __restrict__ dst, I n, I d0, I d1,
                              I d2, I s_rank, I s0, I s1, I s2) {
  const I total = n * d0 * d1 * d2;
  for (I t = static_cast<I>(global_thread()); t < total; t += static_cast<I>(grid_threads()))
    dst[strided_offset<I>(t, d0, d1, d2, s_rank, s0, s1, s2)] = src[t];
}

}  // namespace spmd
