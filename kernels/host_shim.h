// Run the kernels of this folder as host C++ on the CPU, for tests/test_kernels.py (never
// shipped, never seen by NVRTC).  It stands in for the CUDA built-ins the kernels use:
// threadIdx/blockIdx/blockDim/gridDim are thread-local, __syncthreads() is a std::barrier per
// block, and a launch runs each CUDA thread either in turn (kernels without __syncthreads:
// grid-stride loops do not care about order) or as its own std::thread (the peer all-reduce,
// whose ranks and blocks wait on each other's flags).  Memory is host memory; a "peer pointer"
// is an address in this process.
#pragma once

#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local std::barrier<>* host_block_barrier = nullptr;

inline void __syncthreads() {
  if (host_block_barrier) host_block_barrier->arrive_and_wait();
}

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void host_spin_pause() { std::this_thread::yield(); }

inline float host_half_to_float(unsigned short bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

inline unsigned short host_float_to_half(float f) {
  _Float16 h = static_cast<_Float16>(f);
  unsigned short bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

inline unsigned short host_float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  unsigned u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<unsigned short>(u >> 16);
}

// Every CUDA thread of the grid in turn.
template <typename Kernel>
void host_launch(dim3 grid, dim3 block, Kernel kernel) {
  gridDim = grid;
  blockDim = block;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x)
      for (unsigned t = 0; t < block.x; ++t) {
        blockIdx = {x, y, 1};
        threadIdx = {t, 1, 1};
        kernel();
      }
}

// `ranks` grids at once, every CUDA thread its own std::thread; kernel(rank).
template <typename Kernel>
void host_launch_concurrent(int ranks, dim3 grid, dim3 block, Kernel kernel) {
  std::vector<std::unique_ptr<std::barrier<>>> barriers;
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    for (unsigned x = 0; x < grid.x; ++x) {
      barriers.push_back(std::make_unique<std::barrier<>>(block.x));
      std::barrier<>* bar = barriers.back().get();
      for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([=] {
          gridDim = grid;
          blockDim = block;
          blockIdx = {x, 1, 1};
          threadIdx = {t, 1, 1};
          host_block_barrier = bar;
          kernel(r);
        });
    }
  for (auto& th : threads) th.join();
}
