// Executors for block programs: kernel bodies written once, as __host__ __device__ code, that run on the GPU
// and, for the CPU emulations (tests/csrc/*_emulation.cu), on the host.
//
// A block program is a sequence of phases separated by barriers:
//   ex.each([&](int t) { ... })  a block-wide phase: per-thread code for thread t;
//   ex.sync()                    a barrier (__syncthreads on the device, a phase boundary on the host);
//   ex.warp([&](int w) { ... })  a warp phase: per-warp code for warp w, whose per-lane code runs in
//                                for_lanes([&](int l) { ... }) and whose warp collectives are the helpers
//                                of warp_mma.cuh (each with a host version for the whole warp at once);
//   ex.ballot(pred, result)      a ballot phase: pred(t) for every thread, then result(t, bits) with the
//                                ballot of t's warp (bit l: pred of lane l), as __ballot_sync over the warp.
// Per-thread state that outlives a phase ("registers") lives in `typename Exec::template PerThread<S>`,
// indexed by thread: one S per thread on the device, an array of kThreads of them on the host.
//
// DeviceExec runs each phase for the calling thread / warp only. HostBlockExec<kThreads> runs each
// block-wide phase for threads 0 .. kThreads - 1 in turn and each warp phase for every warp in turn, so a
// barrier needs no code: the next phase starts after every thread finished the previous one.
// Used by csrc/speculative/tree_attention.cu, csrc/sparse_attention/*.cu and csrc/rsparse/rsparse_gemv.cu
// (namespace common_detail).
#pragma once

#include "device_helpers.cuh"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include <cuda_runtime.h>

namespace efficient_ops {
namespace common_detail {

constexpr int kWarp = 32;

// Runs f(lane) for this thread's lane (device) or for every lane in turn (host), inside a warp phase.
template <class F>
EO_HD void for_lanes(F&& f) {
#ifdef __CUDA_ARCH__
  f(int(threadIdx.x) % kWarp);
#else
  for (int l = 0; l < kWarp; ++l) f(l);
#endif
}

struct DeviceExec {
  template <class S>
  struct PerThread {
    S s;
    __device__ __forceinline__ S& operator[](int) { return s; }
  };
  template <class F>
  __device__ __forceinline__ void each(F&& f) const {
    f(int(threadIdx.x));
  }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  template <class F>
  __device__ __forceinline__ void warp(F&& f) const {
    f(int(threadIdx.x) / kWarp);
  }
  template <class P, class Q>
  __device__ __forceinline__ void ballot(P&& pred, Q&& result) const {
    const int t = int(threadIdx.x);
    result(t, __ballot_sync(0xFFFFFFFFu, pred(t)));
  }
};

// CPU emulation of a block of kThreads threads: each phase runs for threads 0 .. kThreads - 1 (or warps
// 0 .. kThreads / 32 - 1) in turn; a barrier is a phase boundary. Per-thread state starts as garbage (0xFF
// bytes: NaN floats), as registers would. Each family names its block size: using HostExec =
// HostBlockExec<kThreads>. Host code only (never instantiated in a kernel), so it needs no
// #ifndef __CUDA_ARCH__ guard.
template <int kThreads>
struct HostBlockExec {
  static_assert(kThreads % kWarp == 0, "whole warps");
  static constexpr int kWarps = kThreads / kWarp;
  template <class S>
  struct PerThread {
    std::unique_ptr<S[]> s{new S[kThreads]};
    PerThread() { std::memset(static_cast<void*>(s.get()), 0xFF, sizeof(S) * kThreads); }  // garbage registers
    S& operator[](int t) {
      if (t < 0 || t >= kThreads) std::abort();
      return s[t];
    }
  };
  template <class F>
  void each(F&& f) const {
    for (int t = 0; t < kThreads; ++t) f(t);
  }
  void sync() const {}
  template <class F>
  void warp(F&& f) const {
    for (int w = 0; w < kWarps; ++w) f(w);
  }
  template <class P, class Q>
  void ballot(P&& pred, Q&& result) const {
    for (int w = 0; w < kWarps; ++w) {
      uint32_t bits = 0;
      for (int l = 0; l < kWarp; ++l) bits |= uint32_t(bool(pred(w * kWarp + l))) << l;
      for (int l = 0; l < kWarp; ++l) result(w * kWarp + l, bits);
    }
  }
};

}  // namespace common_detail
}  // namespace efficient_ops
