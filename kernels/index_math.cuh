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

// The packed buffer of a collective is contiguous (n, d0, d1, d2): chunk j is what rank j sends
// or receives, one contiguous run NCCL or a peer copy moves as is.  The array it comes from (or
// goes to) is any strided view with the rank dim first (a dim split into n chunks and moved to
// the front, as all_gather, psum_scatter and all_to_all do) whose other dims collapse into at
// most three strided runs.  Returns the strided offset of packed element t.
template <typename I>
SPMD_HD I strided_offset(I t, I d0, I d1, I d2, I s_rank, I s0, I s1, I s2) {
  const I c = t % d2;
  t /= d2;
  const I b = t % d1;
  t /= d1;
  const I a = t % d0;
  const I j = t / d0;
  return j * s_rank + a * s0 + b * s1 + c * s2;
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
