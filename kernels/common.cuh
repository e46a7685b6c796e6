// Element types, reduction operators and memory-ordering helpers for the communication kernels.
//
// No CUDA header is included: 16-bit floats are converted with PTX instructions, so the kernels
// compile the same whichever CUDA headers (if any) sit next to the NVRTC that CuPy finds.
#pragma once

#include "index_math.cuh"

namespace spmd {

// 16-bit floats travel as their bits; arithmetic happens in float.
struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

// Data movement only needs the element size; 16-byte elements (complex128) are 8-aligned.
struct alignas(8) b128 { unsigned long long lo, hi; };

// Acc<T>::type is what a reduction accumulates in; load/store convert to and from T.
template <typename T> struct Acc {
  typedef T type;
  static __device__ __forceinline__ T load(T x) { return x; }
  static __device__ __forceinline__ T store(T x) { return x; }
};

// Device code converts with PTX.  The #else branches let tests/test_kernels.py run these same
// kernels as host C++ on the CPU (host_shim.h stands in for the CUDA built-ins); NVRTC never
// sees them.
template <> struct Acc<half_t> {
  typedef float type;
  static __device__ __forceinline__ float load(half_t x) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#else
    return host_half_to_float(x.bits);
#endif
  }
  static __device__ __forceinline__ half_t store(float f) {
    half_t x;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x.bits) : "f"(f));
#else
    x.bits = host_float_to_half(f);
#endif
    return x;
  }
};

template <> struct Acc<bf16_t> {
  typedef float type;
  static __device__ __forceinline__ float load(bf16_t x) {
    return __uint_as_float(static_cast<unsigned>(x.bits) << 16);
  }
  static __device__ __forceinline__ bf16_t store(float f) {
    bf16_t x;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x.bits) : "f"(f));  // sm_80 and newer
#else
    x.bits = host_float_to_bf16(f);
#endif
    return x;
  }
};

// Reduction operators.  Max and min propagate NaN, as numpy.maximum and numpy.minimum do.
struct Sum {
  template <typename A> static __device__ __forceinline__ A apply(A a, A b) { return a + b; }
};
struct Max {
  template <typename A> static __device__ __forceinline__ A apply(A a, A b) {
    return (a != a || a > b) ? a : b;
  }
};
struct Min {
  template <typename A> static __device__ __forceinline__ A apply(A a, A b) {
    return (a != a || a < b) ? a : b;
  }
};

// 16 bytes of T: the unit of vectorised loads and stores.
template <typename T> struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// out = scale * (a[0] op a[1] op ... op a[n-1]), element by element, in a fixed rank order so
// that every rank computes bitwise the same result.
template <typename T, typename Op>
__device__ __forceinline__ Pack<T> reduce_packs(const Pack<T>* const* srcs, int n, i64 t,
                                                 typename Acc<T>::type scale, bool use_scale) {
  typedef typename Acc<T>::type A;
  A acc[Pack<T>::N];
  Pack<T> p = srcs[0][t];
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) acc[k] = Acc<T>::load(p.v[k]);
  for (int j = 1; j < n; ++j) {
    p = srcs[j][t];
#pragma unroll
    for (int k = 0; k < Pack<T>::N; ++k) acc[k] = Op::apply(acc[k], Acc<T>::load(p.v[k]));
  }
#pragma unroll
  for (int k = 0; k < Pack<T>::N; ++k) p.v[k] = Acc<T>::store(use_scale ? acc[k] * scale : acc[k]);
  return p;
}

__device__ __forceinline__ void store_release_sys(unsigned* addr, unsigned v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(v) : "memory");
#else
  __atomic_store_n(addr, v, __ATOMIC_RELEASE);
#endif
}

__device__ __forceinline__ unsigned load_acquire_sys(const unsigned* addr) {
#ifdef __CUDA_ARCH__
  unsigned v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(addr) : "memory");
  return v;
#else
  host_spin_pause();
  return __atomic_load_n(addr, __ATOMIC_ACQUIRE);
#endif
}

// Grid-stride loop bounds.
__device__ __forceinline__ i64 global_thread() {
  return static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ i64 grid_threads() {
  return static_cast<i64>(gridDim.x) * blockDim.x;
}

}  // namespace spmd
