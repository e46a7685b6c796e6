// Index math shared by the kernels.  Every function here has a NumPy twin in
// spmd/gpu/index_math.py, and tests/test_kernels.py compiles this header as plain C++ on the
// CPU and compares the two, so a change to one without the other fails in CPU-only CI.
#pragma once

#ifndef SPMD_HD
#define SPMD_HD __host__ __device__ __forceinline__
#endif

namespace spmd {

typedef long long i64;

// Limits of the peer-memory all-reduce: flags are laid out for this many blocks and ranks.
constexpr int MAX_BLOCKS = 64;
constexpr int MAX_RANKS = 8;
constexpr int BARRIER_PHASES = 3;

// A strided dim split into n chunks of c elements, viewed as (outer, n, c, inner) with element
// strides (s_outer, s_dim, s_inner).  The packed buffer is contiguous (n, outer, c, inner), so
// chunk j (what rank j sends or receives) is one contiguous run of outer * c * inner elements.
// Returns the strided offset of packed element t.
template <typename I>
SPMD_HD I chunk_offset(I t, I outer, I c, I inner, I s_outer, I s_dim, I s_inner) {
  const I i = t % inner;
  t /= inner;
  const I e = t % c;
  t /= c;
  const I o = t % outer;
  const I j = t / outer;
  return o * s_outer + (j * c + e) * s_dim + i * s_inner;
}

// Elements [lo, hi) of a count-element buffer that rank r owns in the two-shot all-reduce:
// n nearly equal slices, each boundary a multiple of align (the vector width).
SPMD_HD void owned_slice(i64 count, int n, int r, i64 align, i64* lo, i64* hi) {
  const i64 units = (count + align - 1) / align;
  const i64 base = units / n, extra = units % n;
  const i64 start = r * base + (r < extra ? r : extra);
  const i64 len = base + (r < extra ? 1 : 0);
  *lo = start * align < count ? start * align : count;
  const i64 end = (start + len) * align;
  *hi = end < count ? end : count;
}

// The slot in a rank's flag array where rank `from` signals block `block` of barrier `phase`.
SPMD_HD int flag_slot(int phase, int block, int from) {
  return (phase * MAX_BLOCKS + block) * MAX_RANKS + from;
}

}  // namespace spmd
