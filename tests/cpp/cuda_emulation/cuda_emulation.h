// Just enough of CUDA to run linquant's linear kernels on the host, for tests on machines without
// a GPU. Blocks run one after another; the threads of a block run as std::threads, so
// __syncthreads is a barrier over the block and warp shuffles a barrier over the warp. __shared__
// variables become function statics, which is right because only one block runs at a time. WMMA
// (mma.h beside this file) keeps a whole 16x16 tile in every lane.
//
// What this checks: the kernels' indexing, bounds, split-K bookkeeping, ticket reduction, shared
// memory layout and the values they compute. What it cannot: timing, the memory model, bank
// conflicts, occupancy, or the real fragment layouts of the tensor cores.
#pragma once

// Code under test may emulate device instructions with the helpers below (gather).
#define LINQUANT_CUDA_EMULATION 1

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
// Streams are only named (cuda/linear_hopper.h's launch declaration); nothing emulated runs on one.
using cudaStream_t = struct CUstream_st*;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace cuda_emulation {

struct Warp {
  std::barrier<> sync{32};
  uint64_t slots[32];
  uint32_t table[32][8];  // gather's
};

struct Block {
  std::unique_ptr<std::barrier<>> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline Block* current_block = nullptr;

}  // namespace cuda_emulation

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() { cuda_emulation::current_block->sync->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace cuda_emulation {

// Every lane of the calling warp puts `v` in its slot; returns lane `src`'s value.
template <typename V>
V exchange(V v, int src) {
  Warp& w = *current_block->warps[threadIdx.x / 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  w.slots[threadIdx.x % 32] = bits;
  w.sync.arrive_and_wait();
  const uint64_t got = w.slots[src];
  w.sync.arrive_and_wait();
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}

// Every lane of the calling warp puts its N words in the warp's table; returns the table, by lane:
// what an emulated warp-wide instruction (mma.sync) needs from all the lanes, in one exchange
// rather than a shuffle per value (the tests' run time is mostly barriers).
template <int N>
std::array<std::array<uint32_t, N>, 32> gather(const uint32_t (&v)[N]) {
  static_assert(N <= 8, "a table row holds 8 words");
  Warp& w = *current_block->warps[threadIdx.x / 32];
  std::memcpy(w.table[threadIdx.x % 32], v, sizeof(v));
  w.sync.arrive_and_wait();
  std::array<std::array<uint32_t, N>, 32> all;
  for (int lane = 0; lane < 32; ++lane) std::memcpy(all[lane].data(), w.table[lane], sizeof(v));
  w.sync.arrive_and_wait();
  return all;
}

}  // namespace cuda_emulation

template <typename V>
V __shfl_sync(unsigned, V v, int src_lane) {
  return cuda_emulation::exchange(v, src_lane);
}

template <typename V>
V __shfl_xor_sync(unsigned, V v, int lane_mask) {
  return cuda_emulation::exchange(v, static_cast<int>(threadIdx.x % 32) ^ lane_mask);
}

inline bool __any_sync(unsigned, bool pred) {
  bool any = false;
  for (int lane = 0; lane < 32; ++lane) any |= cuda_emulation::exchange(pred, lane);
  return any;
}

template <typename V>
V __ldcs(const V* p) {
  return *p;
}
template <typename V>
V __ldcg(const V* p) {
  return *p;
}
template <typename V>
V __ldg(const V* p) {
  return *p;
}

inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }

namespace cuda_emulation {

// kernel<<<grid, block>>>(args...): blocks in order, each block's threads concurrently.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.sync = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) b.warps.push_back(std::make_unique<Warp>());
        current_block = &b;
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(bx, by, bz);
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
        current_block = nullptr;
      }
    }
  }
}

}  // namespace cuda_emulation
