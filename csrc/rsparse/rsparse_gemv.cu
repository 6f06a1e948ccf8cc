// R-Sparse decode GEMV: rank-aware activation sparsity for M = 1..8 rows of x, in ONE launch.
//
//   active[m][i] = fabsf(float(x[m][i])) * col_norms[i] > threshold          (float32; NaN -> inactive)
//   z[m][j]      = sum_{i: !active[m][i]} x[m][i] * v[i][j]                   (low-rank down-projection)
//   y[m][n]      = sum_{i: active[m][i]} x[m][i] * weight_t[i][n] + sum_j z[m][j] * us_t[j][n] + bias[n]
//   out[m][n]    = T(y[m][n])                                                  (float32 sums, one rounding)
// (rsparse_gemv.h documents the arguments; efficient_ops.reference is the specification.)
//
// Kernel design
// -------------
// Decode is memory bound, so the kernel reads every weight_t row that is active for at least one row
// of x, every v row that is inactive for at least one row, and all of us_t, each exactly once, and
// nothing else of size. The grid is split into three roles by linear block index:
//
//   [0, B)          role B, low-rank down-projection: (rank tile of v's columns) x (channel split).
//                   Thresholds its x chunk, streams only the v rows inactive for some row of x, and
//                   adds its partial z [M, rank tile] into the float32 workspace z with float atomics;
//                   then releases one increment of the counter b_done.
//   [B, B + A)      role A, sparse part: (N tile) x (channel split). Thresholds its x chunk, streams only
//                   the weight_t rows active for some row of x, adds its partial y [M, N tile] into the
//                   float32 workspace y with float atomics, then arrives at its N tile's counter.
//   [B + A, end)    role C, up-projection: (N tile) x (rank split). Prefetches its us_t slice into L2,
//                   spin-waits (acquire) until b_done == B, reads its z slice from L2 (ld.cg), streams
//                   its us_t rows and adds z @ us_t into y, then arrives at its N tile's counter.
//   The block that arrives last at an N tile (atomic add returning a_splits + c_splits - 1) adds the
//   bias, rounds, and writes out[:, tile]. The workspace (y, z, counters) is zeroed by the caller.
//
// Dispatch-order assumption: role C blocks spin on role B blocks. That cannot deadlock as long as a
// block with a lower linear index is dispatched (made resident) no later than any block with a higher
// index: then every B block is resident or finished before the first C block occupies a slot, and B
// blocks never wait. Current NVIDIA GPUs dispatch a 1-D grid in increasing block order; CUDA does not
// promise it (the same assumption as "decoupled look-back" scans, e.g. CUB's). The wait sleeps
// (__nanosleep) between polls.
//
// Memory ordering: every thread of a producing block fences (__threadfence) after its float atomics;
// a __syncthreads then orders all of them before thread 0's counter update, which is a gpu-scope
// release (b_done) or acq_rel (tile counters) RMW. The consumer's thread 0 acquires (ld.acquire /
// the acq_rel RMW), a __syncthreads orders the rest of the block after it, and the consumer reads
// z and y with ld.global.cg (L2, never a stale L1 line); the finishing block also fences first.
//
// Work split (block = 256 threads, tile width W = 8 x lanes columns, lanes = 8, 16 or 32 from the
// matrix width so that narrow N or R do not idle lanes; 256 / lanes row groups per block):
//   * A thread owns 8 adjacent columns (one 16-byte load per row) and walks the block's compacted
//     row list in steps of the group count, with 4 independent row loads in flight (64 KB per SM at
//     M <= 2 with 4 resident blocks; 8 loads would spill at the 64-register budget).
//     Loads use ld.global.nc.L1::no_allocate (read once); rows that are misaligned for 16-byte loads
//     (N or R not a multiple of 8, or a base pointer not 16-byte aligned) take a guarded scalar path.
//   * Channel splits per tile: enough for ~2 blocks per SM per role (from the SM count, cached per
//     device), with 64 .. 512 channels (ranks, for C) per block. Llama-3-8B at 132 SMs: (K, N) =
//     (4096, 4096): A 16 tiles x 17 splits; (4096, 14336): 56 x 8; (14336, 4096): 16 x 28.
//   * The x chunk is thresholded with one thread per channel (two for 257..512 channels); channels
//     this role reads are compacted in channel order (warp ballots + per-warp totals) into a shared
//     list together with their masked x values [entry][MT] (A: x where active else 0; B: x where
//     inactive else 0; C: z). Rows of a tile m >= M hold zeros and are never stored.
//   * Per row m, the groups' partial sums are reduced in shared memory (double-buffered, one barrier
//     per row) and each column gets one float atomicAdd (RED) into the workspace: M x W atomics per
//     block against tens of KB of weights read.
// Bytes read per call: A: (weight_t rows active for some row) x N x 2; B: (v rows inactive for some
//   row) x R x 2; C: R x N x 2; plus x and col_norms once per tile (tiny), z once per N tile from L2,
//   and M x N floats of y from L2 to finish.
// Numerics: float32 FMAs; float atomics reduce the splits in an unspecified order. Global float
//   atomics flush subnormal results to zero (irrelevant at float16 / bfloat16 output precision). A
//   non-finite weight in a row read for another row of x multiplies a zero there (NaN for inf * 0),
//   as a masked dense product would.
// The per-block program (run_block) is __host__ __device__ and written against the executors of
// csrc/common/block_exec.cuh, which run each phase for "this thread" on the GPU and for all 256 threads
// in turn on a CPU, with barriers and ballots at phase boundaries, so tests/csrc/rsparse_gemv_emulation.cu
// runs the kernel's own code block by block under AddressSanitizer.

#include "rsparse_gemv.h"

#include "../common/block_exec.cuh"
#include "../common/device_helpers.cuh"
#include "../common/warp_mma.cuh"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace efficient_ops {
namespace rsparse_gemv_detail {

using common_detail::DeviceExec;     // the block executors (block_exec.cuh), with ballot phases
using common_detail::Elem;           // float16 / bfloat16 bits <-> float (warp_mma.cuh)
using common_detail::HostBlockExec;
using common_detail::kWarp;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kVec = 8;                  // columns per thread: one 16-byte vector of T
constexpr int kChunkMax = 2 * kThreads;  // channels (A, B) or ranks (C) per block at most
constexpr int kChunkMin = 64;            // ... and at least, unless the matrix is smaller
constexpr int kBlocksPerSMTarget = 2;    // per role, on the shapes that are big enough

// Resident blocks per SM for __launch_bounds__: 4 -> <= 64 registers, 3 -> <= 80, 2 -> <= 128.
template <int MT>
constexpr int kMinBlocksPerSM = MT <= 2 ? 4 : MT == 4 ? 3 : 2;
// Row loads in flight per thread (8 for M <= 2 would need more than 64 registers and spill).
template <int MT>
constexpr int kUnroll = 4;

// ---- portable memory helpers (host versions for the CPU emulation) ---------------------------

EO_HD float ld_f32(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// A weight row's 16 bytes, read once: non-coherent path, no L1 allocation.
EO_HD uint4 ld_stream_u128(const uint16_t* p) {
#ifdef __CUDA_ARCH__
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "rsparse emulation: misaligned 16-byte load\n");
    std::abort();
  }
  uint4 r;
  std::memcpy(&r, p, sizeof(r));
  return r;
#endif
}

// Workspace reads after the producers' release: from L2 (ld.global.cg), never from L1.
EO_HD float ld_cg(const float* p) {
#ifdef __CUDA_ARCH__
  return __ldcg(p);
#else
  return *p;
#endif
}

EO_HD void red_add_f32(float* p, float v) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, v);  // result unused: compiles to RED.ADD.F32
#else
  *p += v;
#endif
}

EO_HD void fence_gpu() {
#ifdef __CUDA_ARCH__
  __threadfence();
#endif
}

EO_HD unsigned atom_add_acq_rel(unsigned* p, unsigned v) {
#ifdef __CUDA_ARCH__
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
#else
  const unsigned old = *p;
  *p = old + v;
  return old;
#endif
}

EO_HD void red_add_release(unsigned* p, unsigned v) {
#ifdef __CUDA_ARCH__
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#else
  *p += v;
#endif
}

// Returns once *counter >= target (acquire). The emulation runs blocks in dispatch order, so there the
// counter must already be complete.
EO_HD void wait_at_least(const unsigned* counter, unsigned target) {
#ifdef __CUDA_ARCH__
  for (;;) {
    unsigned seen;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    if (seen >= target) break;
    __nanosleep(256);
  }
#else
  if (*counter < target) {
    std::fprintf(stderr, "rsparse emulation: role C would wait for a block dispatched after it\n");
    std::abort();
  }
#endif
}

EO_HD void prefetch_l2(const void* p) {
#ifdef __CUDA_ARCH__
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

EO_HD int popc(uint32_t v) {
#ifdef __CUDA_ARCH__
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// ---- kernel arguments, prepared on the host (make_params) ---------------------------------------

struct Params {
  const uint16_t* x;
  const uint16_t* w;   // weight_t [K, N]
  const float* col_norms;
  const uint16_t* v;   // [K, R]
  const uint16_t* us;  // us_t [R, N]
  const uint16_t* bias;
  uint16_t* out;
  float* y;                 // workspace [M, N]
  float* z;                 // workspace [M, R]
  unsigned* b_done;         // role B blocks finished
  unsigned* tile_arrivals;  // [tiles_n] role A + C blocks finished per N tile
  int64_t x_row_stride, out_row_stride;
  float threshold;
  int M, K, N, R;
  // Layout (make_layout): N tiles of 8 * lanes_n columns, shared by roles A and C.
  int lanes_n, tiles_n, a_splits, a_chunk, c_splits, c_chunk;
  int lanes_r, tiles_r, b_splits, b_chunk;  // role B: rank tiles of 8 * lanes_r columns
  int blocks_b, blocks_a, blocks_c;         // grid = [B | A | C]
  bool w_vec, v_vec, us_vec;                // 16-byte loads possible (aligned base, width % 8 == 0)
};

// ---- shared memory and per-thread state -------------------------------------------------------

template <int MT>
struct alignas(16) Smem {
  float xs[kChunkMax][MT];           // coefficient of list entry q for row m (masked x, or z for C)
  int list[kChunkMax];               // A, B: the channel of list entry q
  float red[2][kThreads * kVec];     // row reduction, double buffered: [groups][W] floats
  int warp_total[2 * kWarps];        // list entries per (half, warp) of the channel chunk
  int last;                          // this block finishes its N tile
};

template <int MT>
struct ThreadState {
  float val[2][MT];  // masked x of this thread's two channels
  bool keep[2];      // the channel is read by this role (for at least one row)
  uint32_t bits[2];  // the warp's ballot of keep
  float acc[MT][kVec];
};

// run_block's phases run on common_detail's executors (block_exec.cuh): DeviceExec in the kernel,
// HostExec in the CPU emulation.
using HostExec = HostBlockExec<kThreads>;

// ---- phases ------------------------------------------------------------------------------------

// Thresholds x[:, k0:k1) and compacts the channels this role reads (A: active for some row; B: inactive
// for some row), in channel order, into s.list with their masked x values in s.xs. Returns the list
// length (block-uniform). k1 - k0 <= kChunkMax.
template <int MT, bool kBF16, class Exec, class States>
EO_HD int gather_channels(const Params& p, Smem<MT>& s, const Exec& ex, States& st, bool low_rank, int k0, int k1) {
  using E = Elem<kBF16>;
  const int n = k1 - k0;
  ex.each([&](int t) {
    ThreadState<MT>& my = st[t];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = h * kThreads + t;
      my.keep[h] = false;
#pragma unroll
      for (int m = 0; m < MT; ++m) my.val[h][m] = 0.f;
      if (c < n) {
        const int i = k0 + c;
        const float norm = ld_f32(p.col_norms + i);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < p.M) {
            const float xv = E::to_float(load_u16(p.x + m * p.x_row_stride + i));
            const bool active = fabsf(xv) * norm > p.threshold;  // float32 product, then compare
            if (active != low_rank) {
              my.val[h][m] = xv;
              my.keep[h] = true;
            }
          }
        }
      }
    }
  });
  ex.ballot([&](int t) { return st[t].keep[0]; }, [&](int t, uint32_t b) { st[t].bits[0] = b; });
  ex.ballot([&](int t) { return st[t].keep[1]; }, [&](int t, uint32_t b) { st[t].bits[1] = b; });
  ex.each([&](int t) {
    if (t % kWarp == 0) {
      s.warp_total[t / kWarp] = popc(st[t].bits[0]);
      s.warp_total[kWarps + t / kWarp] = popc(st[t].bits[1]);
    }
  });
  ex.sync();
  int count = 0;  // (every thread computes the same sum)
#pragma unroll
  for (int q = 0; q < 2 * kWarps; ++q) count += s.warp_total[q];
  ex.each([&](int t) {
    ThreadState<MT>& my = st[t];
    const int lane = t % kWarp, warp = t / kWarp;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (my.keep[h]) {
        int pos = popc(my.bits[h] & ((1u << lane) - 1u));
        for (int q = 0; q < h * kWarps + warp; ++q) pos += s.warp_total[q];
        s.list[pos] = k0 + h * kThreads + t;
#pragma unroll
        for (int m = 0; m < MT; ++m) s.xs[pos][m] = my.val[h][m];
      }
    }
  });
  ex.sync();
  return count;
}

template <int MT>
EO_HD void load_xs(const float (&row)[MT], float (&xv)[MT]) {
#ifdef __CUDA_ARCH__
  if constexpr (MT % 4 == 0) {
#pragma unroll
    for (int i = 0; i < MT / 4; ++i) {
      const float4 f = reinterpret_cast<const float4*>(row)[i];
      xv[4 * i] = f.x, xv[4 * i + 1] = f.y, xv[4 * i + 2] = f.z, xv[4 * i + 3] = f.w;
    }
  } else if constexpr (MT == 2) {
    const float2 f = *reinterpret_cast<const float2*>(row);
    xv[0] = f.x, xv[1] = f.y;
  } else {
    xv[0] = row[0];
  }
#else
  for (int m = 0; m < MT; ++m) xv[m] = row[m];
#endif
}

// Up to 8 elements p[0 .. avail) of a row (scalar path), zero beyond, packed like a 16-byte load.
EO_HD uint4 ld_row_guarded(const uint16_t* p, int avail) {
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int e = 0; e < kVec; ++e)
    if (e < avail) w[e / 2] |= uint32_t(load_u16(p + e)) << (16 * (e % 2));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// This thread's 8 columns [col, col + 8) of matrix `mat` (row stride ld, width dim) over list entries
// q = g, g + G, ... < count (row s.list[q], or row0 + q when row0 >= 0), accumulated into acc.
// kVecPath: 16-byte loads (the caller guarantees dim % 8 == 0 and a 16-byte aligned base, so a thread's
// columns are all in bounds or all out).
template <int MT, bool kBF16, bool kVecPath>
EO_HD void stream_rows(const Smem<MT>& s, const uint16_t* mat, int64_t ld, int dim, int col, int row0, int count,
                       int g, int G, float (&acc)[MT][kVec]) {
  using E = Elem<kBF16>;
  constexpr int U = kUnroll<MT>;
  if (col >= dim) return;
  const uint16_t* base = mat + col;
  const int avail = dim - col;
#pragma unroll 1
  for (int p0 = g; p0 < count; p0 += U * G) {
    uint4 w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int q = p0 + u * G;
      w[u] = make_uint4(0u, 0u, 0u, 0u);
      if (q < count) {
        const int row = row0 >= 0 ? row0 + q : s.list[q];
        const uint16_t* rp = base + int64_t(row) * ld;
        w[u] = kVecPath ? ld_stream_u128(rp) : ld_row_guarded(rp, avail);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int q = p0 + u * G;
      if (q < count) {
        float xv[MT];
        load_xs<MT>(s.xs[q], xv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float lo, hi;
          E::to_float2(word_of(w[u], j), lo, hi);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            acc[m][2 * j] = fmaf(xv[m], lo, acc[m][2 * j]);
            acc[m][2 * j + 1] = fmaf(xv[m], hi, acc[m][2 * j + 1]);
          }
        }
      }
    }
  }
}

// Streams the block's rows into every thread's acc (zeroed first).
template <int MT, bool kBF16, class Exec, class States>
EO_HD void stream_phase(const Smem<MT>& s, const Exec& ex, States& st, bool vec, const uint16_t* mat, int64_t ld,
                        int dim, int lanes, int c0, int row0, int count) {
  ex.each([&](int t) {
    ThreadState<MT>& my = st[t];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int e = 0; e < kVec; ++e) my.acc[m][e] = 0.f;
    const int g = t / lanes, G = kThreads / lanes, col = c0 + kVec * (t % lanes);
    if (vec)
      stream_rows<MT, kBF16, true>(s, mat, ld, dim, col, row0, count, g, G, my.acc);
    else
      stream_rows<MT, kBF16, false>(s, mat, ld, dim, col, row0, count, g, G, my.acc);
  });
}

// Sums the groups' acc per column in shared memory and adds row m's result into dst[m * dim + c0 + ...]
// with one float atomic per column.
template <int MT, class Exec, class States>
EO_HD void reduce_to_global(const Params& p, Smem<MT>& s, const Exec& ex, States& st, int lanes, int c0, int dim,
                            float* dst) {
  const int width = lanes * kVec, groups = kThreads / lanes;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < p.M) {
      float* buf = s.red[m & 1];  // double buffer: the previous row's readers passed this row's barrier
      ex.each([&](int t) {
        float* slot = buf + (t / lanes) * width + (t % lanes) * kVec;
        const float(&a)[kVec] = st[t].acc[m];
#ifdef __CUDA_ARCH__
        reinterpret_cast<float4*>(slot)[0] = make_float4(a[0], a[1], a[2], a[3]);
        reinterpret_cast<float4*>(slot)[1] = make_float4(a[4], a[5], a[6], a[7]);
#else
        for (int e = 0; e < kVec; ++e) slot[e] = a[e];
#endif
      });
      ex.sync();
      ex.each([&](int t) {
        if (t < width && c0 + t < dim) {
          float sum = 0.f;
          for (int g = 0; g < groups; ++g) sum += buf[g * width + t];
          red_add_f32(dst + int64_t(m) * dim + c0 + t, sum);
        }
      });
    }
  }
}

// A and C blocks: arrive at the N tile; the last of its a_splits + c_splits blocks writes out[:, tile].
template <int MT, bool kBF16, class Exec>
EO_HD void arrive_and_finish_tile(const Params& p, Smem<MT>& s, const Exec& ex, int tile) {
  using E = Elem<kBF16>;
  ex.each([&](int) { fence_gpu(); });  // this thread's atomics on y, before the arrival
  ex.sync();
  ex.each([&](int t) {
    if (t == 0) {
      const unsigned expected = unsigned(p.a_splits + p.c_splits);
      s.last = atom_add_acq_rel(p.tile_arrivals + tile, 1u) == expected - 1u ? 1 : 0;
    }
  });
  ex.sync();
  if (!s.last) return;
  const int width = p.lanes_n * kVec, c0 = tile * width;
  ex.each([&](int t) {
    fence_gpu();
    const int n = c0 + t;
    if (t < width && n < p.N) {
      const float b = p.bias != nullptr ? E::to_float(load_u16(p.bias + n)) : 0.f;
      for (int m = 0; m < p.M; ++m)
        p.out[m * p.out_row_stride + n] = E::from_float(ld_cg(p.y + int64_t(m) * p.N + n) + b);
    }
  });
}

// ---- the block program ---------------------------------------------------------------------------

template <int MT, bool kBF16, class Exec>
EO_HD void run_block(const Params& p, int block, Smem<MT>& s, const Exec& ex) {
  typename Exec::template PerThread<ThreadState<MT>> st;
  if (block < p.blocks_b) {
    // Role B: z[:, rank tile] += x[:, chunk] * (1 - mask) @ v[chunk, rank tile].
    const int tile = block / p.b_splits, split = block % p.b_splits;
    const int k0 = split * p.b_chunk, k1 = k0 + p.b_chunk < p.K ? k0 + p.b_chunk : p.K;
    const int c0 = tile * p.lanes_r * kVec;
    const int count = gather_channels<MT, kBF16>(p, s, ex, st, true, k0, k1);
    if (count > 0) {
      stream_phase<MT, kBF16>(s, ex, st, p.v_vec, p.v, p.R, p.R, p.lanes_r, c0, -1, count);
      reduce_to_global<MT>(p, s, ex, st, p.lanes_r, c0, p.R, p.z);
    }
    ex.each([&](int) { fence_gpu(); });  // this thread's atomics on z, before the release
    ex.sync();
    ex.each([&](int t) {
      if (t == 0) red_add_release(p.b_done, 1u);
    });
  } else if (block < p.blocks_b + p.blocks_a) {
    // Role A: y[:, N tile] += x[:, chunk] * mask @ weight_t[chunk, N tile].
    const int a = block - p.blocks_b;
    const int tile = a / p.a_splits, split = a % p.a_splits;
    const int k0 = split * p.a_chunk, k1 = k0 + p.a_chunk < p.K ? k0 + p.a_chunk : p.K;
    const int c0 = tile * p.lanes_n * kVec;
    const int count = gather_channels<MT, kBF16>(p, s, ex, st, false, k0, k1);
    if (count > 0) {
      stream_phase<MT, kBF16>(s, ex, st, p.w_vec, p.w, p.N, p.N, p.lanes_n, c0, -1, count);
      reduce_to_global<MT>(p, s, ex, st, p.lanes_n, c0, p.N, p.y);
    }
    arrive_and_finish_tile<MT, kBF16>(p, s, ex, tile);
  } else {
    // Role C: y[:, N tile] += z[:, rank split] @ us_t[rank split, N tile], once role B is complete.
    const int c = block - p.blocks_b - p.blocks_a;
    const int tile = c / p.c_splits, split = c % p.c_splits;
    const int j0 = split * p.c_chunk, j1 = j0 + p.c_chunk < p.R ? j0 + p.c_chunk : p.R, count = j1 - j0;
    const int width = p.lanes_n * kVec, c0 = tile * width;
    const int end = c0 + width < p.N ? c0 + width : p.N;
    // us_t does not depend on z: start its slice on the way to L2 while role B finishes (a hint; the
    // slice's 128-byte lines start at c0, c0 + 64, ... elements; a misaligned tail line is skipped).
    ex.each([&](int t) {
      const int col = c0 + 64 * (t % 4);
      if (col < end)
        for (int q = t / 4; q < count; q += kThreads / 4) prefetch_l2(p.us + int64_t(j0 + q) * p.N + col);
    });
    ex.each([&](int t) {
      if (t == 0) wait_at_least(p.b_done, unsigned(p.blocks_b));
    });
    ex.sync();
    ex.each([&](int t) {
      fence_gpu();  // (thread 0 acquired; the barrier orders this thread after it; ld.cg reads L2)
      for (int q = t; q < count; q += kThreads)
#pragma unroll
        for (int m = 0; m < MT; ++m) s.xs[q][m] = m < p.M ? ld_cg(p.z + int64_t(m) * p.R + j0 + q) : 0.f;
    });
    ex.sync();
    stream_phase<MT, kBF16>(s, ex, st, p.us_vec, p.us, p.N, p.N, p.lanes_n, c0, j0, count);
    reduce_to_global<MT>(p, s, ex, st, p.lanes_n, c0, p.N, p.y);
    arrive_and_finish_tile<MT, kBF16>(p, s, ex, tile);
  }
}

#ifndef EFFICIENT_OPS_RSPARSE_HOST_ONLY
template <int MT, bool kBF16>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<MT>) rsparse_gemv_kernel(const Params p) {
  __shared__ Smem<MT> s;
  run_block<MT, kBF16>(p, int(blockIdx.x), s, DeviceExec{});
}
#endif

// ---- host-side preparation, shared by the launcher and the CPU emulation -----------------------

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t align256(int64_t bytes) { return cdiv(bytes, 256) * 256; }

// Lanes per row (8 columns each): narrow matrices use fewer, so that no lane idles.
inline int lanes_for(int64_t width) { return width <= 64 ? 8 : width <= 128 ? 16 : 32; }

struct Layout {
  int lanes_n, tiles_n, a_splits, a_chunk, c_splits, c_chunk;
  int lanes_r, tiles_r, b_splits, b_chunk;
  int64_t blocks_b, blocks_a, blocks_c;
};

// Splits len (channels or ranks) into chunks of kChunkMin .. kChunkMax (fewer if len is smaller) so that
// tiles x splits reaches `target` blocks where possible. len == 0: one empty split.
inline void split_range(int64_t len, int64_t tiles, int64_t target, int& splits, int& chunk) {
  if (len <= 0) {
    splits = 1;
    chunk = 0;
    return;
  }
  int64_t s = cdiv(target, tiles > 0 ? tiles : 1);
  if (s > cdiv(len, kChunkMin)) s = cdiv(len, kChunkMin);
  if (s < cdiv(len, kChunkMax)) s = cdiv(len, kChunkMax);
  if (s < 1) s = 1;
  const int64_t c = cdiv(len, s);
  chunk = int(c);
  splits = int(cdiv(len, c));  // every split non-empty
}

// sm_count only sets the target; the block count never exceeds the value for an unbounded sm_count.
inline Layout make_layout(int64_t K, int64_t N, int64_t R, int64_t sm_count) {
  Layout L{};
  const int64_t target = kBlocksPerSMTarget * (sm_count > 0 ? sm_count : 1);
  L.lanes_n = lanes_for(N);
  L.tiles_n = int(cdiv(N, L.lanes_n * kVec));
  split_range(K, L.tiles_n, target, L.a_splits, L.a_chunk);
  if (R > 0) {
    split_range(R, L.tiles_n, target, L.c_splits, L.c_chunk);
  } else {
    L.c_splits = L.c_chunk = 0;
  }
  L.lanes_r = lanes_for(R);
  L.tiles_r = int(cdiv(R, L.lanes_r * kVec));
  if (R > 0 && K > 0) {
    split_range(K, L.tiles_r, target, L.b_splits, L.b_chunk);
  } else {
    L.b_splits = L.b_chunk = 0;
  }
  L.blocks_a = int64_t(L.tiles_n) * L.a_splits;
  L.blocks_b = int64_t(L.tiles_r) * L.b_splits;
  L.blocks_c = int64_t(L.tiles_n) * L.c_splits;
  return L;
}

// Workspace parts (bytes from the start): y, z, counters.
struct WorkspaceLayout {
  int64_t z_offset, counters_offset, bytes;
};

inline WorkspaceLayout workspace_layout(int64_t M, int64_t N, int64_t R) {
  WorkspaceLayout w;
  const int64_t tiles_n = cdiv(N, lanes_for(N) * kVec);
  w.z_offset = align256(4 * M * N);
  w.counters_offset = w.z_offset + align256(4 * M * R);
  w.bytes = w.counters_offset + align256(4 * (1 + tiles_n));
  return w;
}

inline Params make_params(const RSparseGemvArgs& a, int64_t sm_count) {
  const Layout L = make_layout(a.K, a.N, a.R, sm_count);
  const WorkspaceLayout W = workspace_layout(a.M, a.N, a.R);
  const auto aligned16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  Params p{};
  p.x = static_cast<const uint16_t*>(a.x);
  p.w = static_cast<const uint16_t*>(a.weight_t);
  p.col_norms = a.col_norms;
  p.v = static_cast<const uint16_t*>(a.v);
  p.us = static_cast<const uint16_t*>(a.us_t);
  p.bias = static_cast<const uint16_t*>(a.bias);
  p.out = static_cast<uint16_t*>(a.out);
  char* ws = static_cast<char*>(a.workspace);
  p.y = reinterpret_cast<float*>(ws);
  p.z = reinterpret_cast<float*>(ws + W.z_offset);
  p.b_done = reinterpret_cast<unsigned*>(ws + W.counters_offset);
  p.tile_arrivals = p.b_done + 1;
  p.x_row_stride = a.x_row_stride;
  p.out_row_stride = a.out_row_stride;
  p.threshold = a.threshold;
  p.M = int(a.M);
  p.K = int(a.K);
  p.N = int(a.N);
  p.R = int(a.R);
  p.lanes_n = L.lanes_n;
  p.tiles_n = L.tiles_n;
  p.a_splits = L.a_splits;
  p.a_chunk = L.a_chunk;
  p.c_splits = L.c_splits;
  p.c_chunk = L.c_chunk;
  p.lanes_r = L.lanes_r;
  p.tiles_r = L.tiles_r;
  p.b_splits = L.b_splits;
  p.b_chunk = L.b_chunk;
  p.blocks_b = int(L.blocks_b);
  p.blocks_a = int(L.blocks_a);
  p.blocks_c = int(L.blocks_c);
  p.w_vec = a.N % kVec == 0 && aligned16(a.weight_t);
  p.v_vec = a.R % kVec == 0 && aligned16(a.v);
  p.us_vec = a.N % kVec == 0 && aligned16(a.us_t);
  return p;
}

// Calls fn(std::integral_constant<int, MT>, std::bool_constant<bf16>) for the kernel serving `a`.
template <class Fn>
cudaError_t dispatch(const RSparseGemvArgs& a, Fn&& fn) {
  const auto by_m = [&](auto bf16) {
    if (a.M <= 1) return fn(std::integral_constant<int, 1>{}, bf16);
    if (a.M <= 2) return fn(std::integral_constant<int, 2>{}, bf16);
    if (a.M <= 4) return fn(std::integral_constant<int, 4>{}, bf16);
    return fn(std::integral_constant<int, 8>{}, bf16);
  };
  return a.dtype == DType::kBFloat16 ? by_m(std::true_type{}) : by_m(std::false_type{});
}

}  // namespace rsparse_gemv_detail

int64_t rsparse_gemv_workspace_bytes(int64_t M, int64_t N, int64_t R) {
  if (M < 0 || M > kRSparseGemvMaxM || N < 0 || N > kRSparseGemvMaxDim || R < 0 || R > kRSparseGemvMaxDim)
    return -1;
  return rsparse_gemv_detail::workspace_layout(M, N, R).bytes;
}

namespace {

bool misaligned(const void* p, uintptr_t alignment) { return reinterpret_cast<uintptr_t>(p) % alignment != 0; }

}  // namespace

const char* rsparse_gemv_check(const RSparseGemvArgs& a) {
  using namespace rsparse_gemv_detail;
  if (a.M < 1 || a.M > kRSparseGemvMaxM) return "M must be in 1..8";
  if (a.K < 0 || a.K > kRSparseGemvMaxDim) return "K must be in [0, 2^30)";
  if (a.N < 0 || a.N > kRSparseGemvMaxDim) return "N must be in [0, 2^30)";
  if (a.R < 0 || a.R > kRSparseGemvMaxDim) return "R must be in [0, 2^30)";
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return "dtype must be float16 or bfloat16";
  constexpr int64_t kMaxStride = int64_t(1) << 40;
  if (a.x_row_stride < 0 || a.x_row_stride > kMaxStride || (a.M > 1 && a.x_row_stride < a.K))
    return "x_row_stride must be >= K (and < 2^40)";
  if (a.out_row_stride < 0 || a.out_row_stride > kMaxStride || (a.M > 1 && a.out_row_stride < a.N))
    return "out_row_stride must be >= N (and < 2^40)";
  if (misaligned(a.x, 2) || misaligned(a.weight_t, 2) || misaligned(a.v, 2) || misaligned(a.us_t, 2) ||
      misaligned(a.bias, 2) || misaligned(a.out, 2))
    return "x, weight_t, v, us_t, bias and out must be 2-byte aligned";
  if (misaligned(a.col_norms, 4)) return "col_norms must be 4-byte aligned";
  if (misaligned(a.workspace, 16)) return "workspace must be 16-byte aligned";
  if (a.N > 0) {  // N == 0: nothing is launched, nothing is read
    if (!a.out || !a.workspace) return "out and workspace must not be null";
    if (a.K > 0 && (!a.x || !a.weight_t || !a.col_norms)) return "x, weight_t and col_norms must not be null";
    if (a.R > 0 && !a.us_t) return "us_t must not be null when R > 0";
    if (a.R > 0 && a.K > 0 && !a.v) return "v must not be null when R > 0";
  }
  // Grid size: the layout for an unbounded SM count has the most blocks.
  const Layout L = make_layout(a.K, a.N, a.R, int64_t(1) << 40);
  if (L.blocks_a + L.blocks_b + L.blocks_c >= (int64_t(1) << 31) - 1) return "problem too large for one grid";
  return nullptr;
}

// The CPU emulation (tests/csrc/rsparse_gemv_emulation.cu) includes this file for its host side and
// defines EFFICIENT_OPS_RSPARSE_HOST_ONLY: it launches nothing, and its sanitizer build stays fast.
#ifndef EFFICIENT_OPS_RSPARSE_HOST_ONLY
namespace {

constexpr int kMaxCachedDevices = 64;
std::atomic<int> g_sm_count[kMaxCachedDevices];  // 0: not queried yet

cudaError_t sm_count_of_current_device(int& count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxCachedDevices) {
    count = g_sm_count[device].load(std::memory_order_relaxed);
    if (count > 0) return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxCachedDevices) g_sm_count[device].store(count, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace

cudaError_t rsparse_gemv(const RSparseGemvArgs& a, cudaStream_t stream) {
  using namespace rsparse_gemv_detail;
  if (rsparse_gemv_check(a) != nullptr) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  int sms = 0;
  const cudaError_t err = sm_count_of_current_device(sms);
  if (err != cudaSuccess) return err;
  const Params p = make_params(a, sms);
  const unsigned blocks = unsigned(p.blocks_b + p.blocks_a + p.blocks_c);  // >= 1: N > 0
  return dispatch(a, [&](auto mt, auto bf16) {
    rsparse_gemv_kernel<decltype(mt)::value, decltype(bf16)::value><<<blocks, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}
#endif

}  // namespace efficient_ops
