// Pack and unpack a strided dim into contiguous communication buffers.
//
// The array is viewed as (outer, n, c, inner) with element strides (s_outer, s_dim, s_inner):
// dim D of size n * c split into the n chunks that go to (or come from) the n ranks.  The packed
// buffer is (n, outer, c, inner), contiguous, so chunk j is one run that NCCL or a peer copy can
// move as is.  all_gather unpacks what it received, psum_scatter and all_to_all pack what they
// send, on any dim, without first making the array contiguous.  Only the element size matters,
// so the kernels are instantiated on unsigned types of 1 to 16 bytes, and on 32-bit indices
// where the sizes allow (64-bit division is several times slower).
#include "common.cuh"

namespace spmd {

template <typename T, typename I>
__global__ void pack_chunks(const T* __restrict__ src, T* __restrict__ dst, I outer, I n, I c,
                            I inner, I s_outer, I s_dim, I s_inner) {
  const I total = n * outer * c * inner;
  for (I t = static_cast<I>(global_thread()); t < total; t += static_cast<I>(grid_threads()))
    dst[t] = src[chunk_offset<I>(t, outer, c, inner, s_outer, s_dim, s_inner)];
}

template <typename T, typename I>
__global__ void unpack_chunks(const T* __restrict__ src, T* __restrict__ dst, I outer, I n, I c,
                              I inner, I s_outer, I s_dim, I s_inner) {
  const I total = n * outer * c * inner;
  for (I t = static_cast<I>(global_thread()); t < total; t += static_cast<I>(grid_threads()))
    dst[chunk_offset<I>(t, outer, c, inner, s_outer, s_dim, s_inner)] = src[t];
}

}  // namespace spmd
