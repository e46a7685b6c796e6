// Fused n-way reductions with an optional scale (pmean).
//
// reduce_axis: the stacked layout on one GPU (virtual devices): dst[o, m] = scale * op over j of
//   src[o * s_outer + j * s_n + m * s_inner], one pass over the input, no temporary.
// reduce_ptrs: n separate buffers (peer memory, or the chunks received by reduce-scatter):
//   dst[m] = scale * op over j of srcs[j][m], 16 bytes at a time where everything is aligned.
#include "common.cuh"

namespace spmd {

template <typename T, typename Op, typename I>
__global__ void reduce_axis(const T* __restrict__ src, T* __restrict__ dst, I outer, I n, I inner,
                            I s_outer, I s_n, I s_inner, double scale, int use_scale) {
  typedef typename Acc<T>::type A;
  const A s = static_cast<A>(scale);
  const I total = outer * inner;
  for (I t = static_cast<I>(global_thread()); t < total; t += static_cast<I>(grid_threads())) {
    const I o = t / inner, m = t % inner;
    const T* p = src + o * s_outer + m * s_inner;
    A acc = Acc<T>::load(p[0]);
    for (I j = 1; j < n; ++j) acc = Op::apply(acc, Acc<T>::load(p[j * s_n]));
    dst[t] = Acc<T>::store(use_scale ? acc * s : acc);
  }
}

template <typename T, typename Op>
__global__ void reduce_ptrs(const T* const* __restrict__ srcs, int n, T* __restrict__ dst,
                            i64 count, double scale, int use_scale, int vectorized) {
  typedef typename Acc<T>::type A;
  const A s = static_cast<A>(scale);
  i64 done = 0;
  if (vectorized) {  // every pointer 16-byte aligned
    const i64 packs = count / Pack<T>::N;
    const Pack<T>* const* vsrcs = reinterpret_cast<const Pack<T>* const*>(srcs);
    Pack<T>* vdst = reinterpret_cast<Pack<T>*>(dst);
    for (i64 t = global_thread(); t < packs; t += grid_threads())
      vdst[t] = reduce_packs<T, Op>(vsrcs, n, t, s, use_scale);
    done = packs * Pack<T>::N;
  }
  for (i64 t = done + global_thread(); t < count; t += grid_threads()) {
    A acc = Acc<T>::load(srcs[0][t]);
    for (int j = 1; j < n; ++j) acc = Op::apply(acc, Acc<T>::load(srcs[j][t]));
    dst[t] = Acc<T>::store(use_scale ? acc * s : acc);
  }
}

}  // namespace spmd
