// W4A16 decode GEMV:  out[M, N] = x[M, K] @ dequant(qweight)^T (+ bias),  M = 1..16.
//
// Packed format (fixed; efficient_ops.quant produces it)
// ------------------------------------------------------
//   qweight  int32 [N, K_pad / 8], row-major contiguous, 16-byte aligned; K_pad % 128 == 0, K_pad >= K.
//            Word w of row n holds k = 8 * w + j in bits [4j, 4j + 4) (j = 0 is the least significant
//            nibble); values are unsigned 0..15. Columns k in [K, K_pad) hold arbitrary values and
//            contribute nothing (x is only K long and is never read beyond K).
//   scales   [N, K_pad / group_size] float16 | bfloat16, contiguous.
//   zeros    same shape and dtype as scales; any float (usually integers 0..15, but 1.5 is fine).
//   group_size  a positive multiple of 32 dividing K_pad (per-channel quantization: group_size = K_pad).
//   bias     [N] in x's dtype, optional.
//
//   out[m, n] = sum_{k < K} x[m, k] * (q[n, k] - z[n, k / group_size]) * s[n, k / group_size] (+ bias[n])
//   accumulated in float32 and rounded once to x's dtype.
//
// Kernel design
// -------------
// Decode GEMV is memory bound: the job is to stream the 4-bit weights at DRAM bandwidth. At
// 3.3-4.8 TB/s that leaves only ~3.5-5 instructions per weight nibble, so dequantization and
// bookkeeping must be lean.
//   * A warp owns R adjacent output rows (R = 4 for M <= 2, else 2), so every x element is loaded
//     and converted once for R rows. A "chunk" is one 16-byte weight vector per row: 32 nibbles =
//     32 consecutive k, always inside one quantization group since group_size % 32 == 0. Lane l
//     takes chunks l, l + 32, ..., so a warp streams 512 contiguous bytes of each row per step.
//   * The weights go global -> shared memory with cp.async.cg (L2 only; L1 stays with x, which
//     every warp re-reads) into a per-lane ring of kStages slots, so kStages - 1 chunks per row are
//     in flight while one is computed, at no register cost. Each lane reads back only its own
//     slots, so the ring needs no barriers, only cp.async.wait_group.
//   * Dequantization without int->float conversions (I2F is quarter rate): a byte permute drops a
//     nibble into the low mantissa bits of a float whose exponent makes one mantissa step worth 1,
//     giving exactly 2^23 + q (low nibble of a byte) or 2^19 + q (high nibble: its bits sit 4 higher,
//     so the exponent is 4 lower). One FADD of (2^23 + zi) resp. (2^19 + zi) leaves q - zi exactly
//     for an integer zero point zi: 2 LOP3 + 8 PRMT + 8 FADD per 8 nibbles.
//   * Per chunk: dot[m][r] = sum_k x[m, k] * (q - zi), then acc[m][r] += s * dot[m][r], so the scale
//     costs one FMA per chunk. All math is float32 (no fast-math). A zero point with a fractional
//     part z = zi + zf (rare) is corrected exactly by a second pass, acc -= s * zf * sum(x).
//   * M is templated on the tile MT in {1, 2, 4, 8} (smallest >= M; M = 9..16 loops over two tiles
//     of 8), so acc/dot live in registers with compile-time indices; rows m >= M re-read row M - 1
//     (always in bounds, branch-free) and are not stored.
//   * x is read with 16-byte loads when its base and row stride allow (checked once on the host,
//     template flag), otherwise element-wise; the last K % 32 columns always go element-wise with
//     a k < K guard.
//   * Warp-shuffle reduction; lane 0 adds the bias and writes.
// The per-lane work (lane_accumulate) is __host__ __device__, so a CPU can emulate the kernel.

#include "lowbit_gemv.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace efficient_ops {
namespace lowbit_gemv_detail {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // 128 threads: small blocks spread N evenly over the SMs
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kChunk = 32;         // k per 16-byte weight vector

// Output rows per warp: more rows amortize x loads/conversions and per-chunk bookkeeping; with
// large M tiles the accumulators need the registers instead.
template <int MT>
constexpr int kRowsPerWarp = MT <= 2 ? 4 : 2;

// Weight ring depth: 3 chunks per row in flight (2 with 4 rows), 16-24 KiB shared memory per block.
template <int R>
constexpr int kRingStages = R == 4 ? 3 : 4;

// Register budget per M tile, as resident 128-thread blocks per SM for __launch_bounds__:
// 4 -> <= 128 registers, 3 -> <= 168, 2 -> <= 255. Chosen so that no variant spills on sm_80 or
// sm_90a with nvcc 13.0 (check: EFFICIENT_OPS_PTXAS_VERBOSE=1).
template <int MT>
constexpr int kMinBlocksPerSM = MT == 1 ? 4 : MT <= 4 ? 3 : 2;

#define EO_HD __host__ __device__ __forceinline__

// ---- portable helpers (the host versions exist for the CPU emulation) ----------------------

EO_HD float as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

EO_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t selector) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, selector);
#else
  const uint64_t bytes = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
#endif
}

EO_HD uint32_t mul_hi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return uint32_t((uint64_t(a) * b) >> 32);
#endif
}

// Direct weight load (only the K % 32 tail chunk): read-only path, no L1 allocation.
EO_HD uint4 load_weights(const uint4* p) {
#ifdef __CUDA_ARCH__
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
#else
  return *p;
#endif
}

EO_HD uint4 load_u128(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(static_cast<const uint4*>(p));
#else
  return *static_cast<const uint4*>(p);
#endif
}

EO_HD uint16_t load_u16(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(static_cast<const unsigned short*>(p));
#else
  return *static_cast<const uint16_t*>(p);
#endif
}

EO_HD float half_bits_to_float(uint16_t u) {
  __half_raw raw;
  raw.x = u;
  return __half2float(__half(raw));
}

EO_HD float bf16_bits_to_float(uint16_t u) { return as_float(uint32_t(u) << 16); }

EO_HD uint32_t word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// Activation / output element types.
template <typename T>
struct XType;

template <>
struct XType<__half> {
  EO_HD static float to_float(uint16_t u) { return half_bits_to_float(u); }
  EO_HD static void to_float2(uint32_t u, float& lo, float& hi) {
    lo = half_bits_to_float(uint16_t(u));
    hi = half_bits_to_float(uint16_t(u >> 16));
  }
  EO_HD static __half from_float(float f) { return __float2half_rn(f); }
};

template <>
struct XType<__nv_bfloat16> {
  EO_HD static float to_float(uint16_t u) { return bf16_bits_to_float(u); }
  EO_HD static void to_float2(uint32_t u, float& lo, float& hi) {
    lo = as_float(u << 16);  // widening bf16 -> f32 is a shift, not a conversion
    hi = as_float(u & 0xFFFF0000u);
  }
  EO_HD static __nv_bfloat16 from_float(float f) { return __float2bfloat16_rn(f); }
};

// Kernel arguments, prepared once on the host (make_args).
struct Args {
  const void* x;
  const uint4* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  const void* bias;
  void* out;
  int M, N, K;
  int x_row_stride;        // elements; (M - 1) * x_row_stride < 2^31 (host-checked)
  int64_t out_row_stride;  // elements
  int full_chunks;         // K / 32: chunks whose 32 columns all lie below K
  int chunks_per_row;      // K_pad / 32: 16-byte vectors per weight row
  int groups_per_row;      // K_pad / group_size; N * groups_per_row < 2^31 (host-checked)
  uint32_t group_magic;    // ceil(2^31 / (group_size / 32)): chunk -> group without a division
  bool scale_bf16;
};

// Quantization group of chunk c: floor(c / chunks_per_group) as mulhi(2c, ceil(2^31 / cpg)).
// Exact while c * cpg < 2^31, which K_pad <= 2^20 (c, cpg <= 2^15) guarantees.
EO_HD int group_of(const Args& a, int c) { return int(mul_hi(uint32_t(c) << 1, a.group_magic)); }

EO_HD float scale_to_float(uint16_t u, bool bf16) {
  return bf16 ? bf16_bits_to_float(u) : half_bits_to_float(u);
}

// Integer part used for the exact dequant: zi with |zi| <= 2^16 keeps 2^23 + zi exact.
EO_HD float integer_part(float z) { return fabsf(z) < 65536.f ? rintf(z) : 0.f; }

enum class XLoad { kVec16, kScalar };  // kScalar guards k < K: misaligned x and the K % 32 tail

// x[m, k0 + j8 .. k0 + j8 + 8) as floats, where xc = &x[m, k0] and k_left = K - k0. j8 is a
// compile-time constant after unrolling, so the loads of a chunk share one address register.
template <typename T, XLoad kLoad>
EO_HD void load_x8(const T* xc, int j8, int k_left, float (&v)[8]) {
  using X = XType<T>;
  if constexpr (kLoad == XLoad::kVec16) {
    const uint4 raw = load_u128(xc + j8);
#pragma unroll
    for (int i = 0; i < 4; ++i) X::to_float2(word_of(raw, i), v[2 * i], v[2 * i + 1]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = (j8 + e < k_left) ? X::to_float(load_u16(xc + j8 + e)) : 0.f;
  }
}

// Element offset of x's row m; tile rows >= M re-read row M - 1.
EO_HD int x_row_offset(const Args& a, int m) { return (m < a.M ? m : a.M - 1) * a.x_row_stride; }

// One chunk (columns k0 .. k0 + 32, one quantization group) for the warp's R rows:
// acc[m][r] += s[r] * sum_k x[m, k] * (q[r, k] - zi[r]). Returns whether a zero point has a
// fractional part, in which case fix_fractional_zeros() must run for this lane.
template <int MT, int R, typename T, XLoad kLoad>
EO_HD bool dot_chunk(const Args& a, const uint4 (&w)[R], const float (&s)[R], const float (&z)[R], int k0,
                     float (&acc)[MT][R]) {
  const T* xc = static_cast<const T*>(a.x) + k0;  // &x[0, k0]

  float c_lo[R], c_hi[R];
  bool frac = false;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float zi = integer_part(z[r]);
    frac |= z[r] != zi;        // also true for NaN / Inf zero points, which the fix-up propagates
    c_lo[r] = 8388608.f + zi;  // 2^23 + zi, exact
    c_hi[r] = 524288.f + zi;   // 2^19 + zi, exact
  }

  float dot[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) dot[m][r] = 0.f;

  // Element-wise x (cold paths): one word per iteration, or the scheduler hoists 32 * MT scalar
  // loads and runs out of registers.
  constexpr int kUnrollWords = kLoad == XLoad::kVec16 ? 4 : 1;
#pragma unroll kUnrollWords
  for (int j = 0; j < 4; ++j) {  // 32-bit word j: columns k0 + 8j .. k0 + 8j + 8
    float q[R][8];               // q - zi, in column order
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const uint32_t word = word_of(w[r], j);
      const uint32_t lo = word & 0x0F0F0F0Fu;  // byte i: nibble 2i   (column 8j + 2i)
      const uint32_t hi = word & 0xF0F0F0F0u;  // byte i: nibble 2i+1 (column 8j + 2i + 1), times 16
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // byte_perm(0x4B00, v, 0x1004 + i) = 0x4B000000 | (byte i of v): the float 2^23 + byte.
        // With 0x49 the float is 2^19 + byte / 16, so a high nibble (byte = 16 q) reads as q.
        // (Magic word first, selector last: SASS PRMT then takes the selector as an immediate and
        // keeps the two magic words in registers.)
        q[r][2 * i] = as_float(byte_perm(0x4B00u, lo, 0x1004u + i)) - c_lo[r];
        q[r][2 * i + 1] = as_float(byte_perm(0x4900u, hi, 0x1004u + i)) - c_hi[r];
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float xv[8];
      load_x8<T, kLoad>(xc + x_row_offset(a, m), 8 * j, a.K - k0, xv);
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e) dot[m][r] = fmaf(xv[e], q[r][e], dot[m][r]);
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = fmaf(s[r], dot[m][r], acc[m][r]);
  return frac;
}

// Rare path: acc[m][r] -= s[r] * zf[r] * sum_k x[m, k] over one chunk, for zero points with a
// fractional part zf. Kept out of dot_chunk: a branch there keeps the chunk's x live in registers
// and more than doubles register use.
template <int MT, int R, typename T, XLoad kLoad>
EO_HD void fix_fractional_zeros(const Args& a, const float (&s)[R], const float (&z)[R], int k0, float (&acc)[MT][R]) {
  float szf[R];
  bool frac = false;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float zf = z[r] - integer_part(z[r]);
    frac |= zf != 0.f;
    szf[r] = s[r] * zf;
  }
  if (!frac) return;
  const T* xc = static_cast<const T*>(a.x) + k0;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float xs = 0.f;
#pragma unroll 1
    for (int j = 0; j < 4; ++j) {
      float xv[8];
      load_x8<T, kLoad>(xc + x_row_offset(a, m), 8 * j, a.K - k0, xv);
#pragma unroll
      for (int e = 0; e < 8; ++e) xs += xv[e];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = fmaf(-szf[r], xs, acc[m][r]);
  }
}

// Per-lane ring of kStages weight slots (one 16-byte vector per row each), filled by cp.async.
template <int R, int kStages>
struct WeightRing {
#ifdef __CUDA_ARCH__
  uint32_t lane_base;  // shared-memory address of this lane's vector in slot (stage 0, row 0)

  __device__ __forceinline__ WeightRing(uint4* warp_slots, int lane)  // warp_slots: [kStages][R][kWarp]
      : lane_base(static_cast<uint32_t>(__cvta_generic_to_shared(warp_slots + lane))) {}
  __device__ __forceinline__ uint32_t slot(int stage, int r) const {
    return lane_base + uint32_t((stage * R + r) * kWarp * sizeof(uint4));
  }
  // Copies chunk c of every row into `stage`; .cg caches in L2 only (the weights are read once).
  __device__ __forceinline__ void issue(int stage, const uint4* const (&rows)[R], int c) const {
#pragma unroll
    for (int r = 0; r < R; ++r)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(slot(stage, r)), "l"(rows[r] + c) : "memory");
  }
  __device__ __forceinline__ void commit() const { asm volatile("cp.async.commit_group;" ::: "memory"); }
  // Returns once at most kStages - 1 groups are pending, i.e. the oldest one has landed.
  __device__ __forceinline__ void wait_oldest() const {
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1) : "memory");
  }
  __device__ __forceinline__ uint4 read(int stage, int r) const {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(slot(stage, r))
                 : "memory");
    return v;
  }
#else  // CPU emulation of one lane, with cp.async's asynchrony: copies land only at wait_oldest().
  struct Copy {
    int stage;
    uint4 data[R];
  };
  uint4 slots[kStages][R];
  Copy pending[2 * kStages];  // committed groups not yet landed (ring buffer)
  bool pending_used[2 * kStages] = {};
  int head = 0, tail = 0;      // pending groups [head, tail)
  Copy open_group{};           // the group being assembled
  bool open_used = false;

  WeightRing() {
    std::memset(slots, 0xFF, sizeof(slots));  // garbage until a copy lands
  }
  WeightRing(uint4*, int) : WeightRing() {}
  void issue(int stage, const uint4* const (&rows)[R], int c) {
    open_group.stage = stage;
    for (int r = 0; r < R; ++r) open_group.data[r] = rows[r][c];
    open_used = true;
  }
  void commit() {
    pending[tail % (2 * kStages)] = open_group;
    pending_used[tail % (2 * kStages)] = open_used;
    ++tail;
    open_used = false;
  }
  void wait_oldest() {
    while (tail - head > kStages - 1) {
      if (pending_used[head % (2 * kStages)]) {
        const Copy& g = pending[head % (2 * kStages)];
        for (int r = 0; r < R; ++r) slots[g.stage][r] = g.data[r];
      }
      ++head;
    }
  }
  uint4 read(int stage, int r) const { return slots[stage][r]; }
#endif
};

template <int R>
EO_HD void load_scale_zero(const Args& a, const int (&sz_row)[R], int c, float (&s)[R], float (&z)[R]) {
  const int g = group_of(a, c);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    s[r] = scale_to_float(load_u16(a.scales + (sz_row[r] + g)), a.scale_bf16);
    z[r] = scale_to_float(load_u16(a.zeros + (sz_row[r] + g)), a.scale_bf16);
  }
}

// This lane's partial sums for rows n0 .. n0 + R - 1 (before the warp reduction).
template <int MT, int R, typename T, bool kVecX, typename Ring>
EO_HD void lane_accumulate(const Args& a, Ring& ring, int n0, int lane, float (&acc)[MT][R]) {
  constexpr int kStages = kRingStages<R>;
  constexpr XLoad kMainLoad = kVecX ? XLoad::kVec16 : XLoad::kScalar;

  const uint4* wrow[R];
  int sz_row[R];  // element offset of the row in scales / zeros
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n0 + r < a.N ? n0 + r : a.N - 1;  // the last warp may re-read a valid row
    wrow[r] = a.qweight + int64_t(n) * a.chunks_per_row;
    sz_row[r] = n * a.groups_per_row;
  }

  // Chunks in the pipelined loop: with 16-byte x loads only whole chunks (k0 + 32 <= K); with
  // element-wise x loads the partial last chunk too, since that loader guards k < K anyway.
  const int chunks = kVecX ? a.full_chunks : (a.K + kChunk - 1) / kChunk;
  const int count = lane < chunks ? (chunks - lane + kWarp - 1) / kWarp : 0;  // this lane's chunks

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {  // prologue: fill all stages but one
    if (i < count) ring.issue(i, wrow, lane + i * kWarp);
    ring.commit();  // (empty groups are fine and keep the group count uniform)
  }
  float s[R] = {}, z[R] = {};
  if (count > 0) load_scale_zero(a, sz_row, lane, s, z);
  bool any_frac = false;

#pragma unroll 1  // the ring provides the overlap; unrolling would only add registers
  for (int i = 0; i < count; ++i) {
    const int c = lane + i * kWarp;
    // Refill the stage consumed in the previous iteration (its data is already in registers).
    const int ahead = i + kStages - 1;
    if (ahead < count) ring.issue(ahead % kStages, wrow, lane + ahead * kWarp);
    ring.commit();
    // Scales and zeros are small: prefetch them one chunk ahead in registers.
    float s_next[R] = {}, z_next[R] = {};
    if (i + 1 < count) load_scale_zero(a, sz_row, c + kWarp, s_next, z_next);

    ring.wait_oldest();
    uint4 w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = ring.read(i % kStages, r);
    any_frac |= dot_chunk<MT, R, T, kMainLoad>(a, w, s, z, c * kChunk, acc);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s[r] = s_next[r];
      z[r] = z_next[r];
    }
  }

  // 16-byte x path: the last K % 32 columns form one partial chunk, read element-wise (k < K).
  const bool tail = kVecX && a.K % kChunk != 0 && lane == a.full_chunks % kWarp;
  if (tail) {
    const int c = a.full_chunks;
    uint4 w[R];
#pragma unroll
    for (int r = 0; r < R; ++r) w[r] = load_weights(wrow[r] + c);
    load_scale_zero(a, sz_row, c, s, z);
    any_frac |= dot_chunk<MT, R, T, XLoad::kScalar>(a, w, s, z, c * kChunk, acc);
  }

  // Zero points with a fractional part (rare): a second pass over this lane's chunks re-reads
  // scales, zeros and x (cache hits) and applies -s * zf * sum(x) per chunk.
  if (any_frac) {
#pragma unroll 1
    for (int i = 0; i < count; ++i) {
      const int c = lane + i * kWarp;
      load_scale_zero(a, sz_row, c, s, z);
      fix_fractional_zeros<MT, R, T, kMainLoad>(a, s, z, c * kChunk, acc);
    }
    if (tail) {
      load_scale_zero(a, sz_row, a.full_chunks, s, z);
      fix_fractional_zeros<MT, R, T, XLoad::kScalar>(a, s, z, a.full_chunks * kChunk, acc);
    }
  }
}

template <int MT, typename T, bool kVecX>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<MT>) lowbit_gemv_w4_kernel(const Args args) {
  constexpr int R = kRowsPerWarp<MT>;
  constexpr int kStages = kRingStages<R>;
  __shared__ uint4 ring_slots[kWarpsPerBlock][kStages * R * kWarp];

  const int lane = threadIdx.x % kWarp;
  const int warp_in_block = threadIdx.x / kWarp;
  const int n0 = (blockIdx.x * kWarpsPerBlock + warp_in_block) * R;
  if (n0 >= args.N) return;  // warp-uniform: whole warps exit together; there are no block barriers

  // M > MT (only M = 9..16 with MT = 8): the warp repeats its rows for each tile of MT rows of x.
  // The repeat reads the same weights again, from L2 since this warp has just streamed them.
  constexpr int kMaxTiles = (kLowbitGemvMaxM + MT - 1) / MT == 2 ? 2 : 1;  // 2 for MT = 8, else 1
#pragma unroll 1
  for (int m0 = 0; m0 < args.M && m0 < kMaxTiles * MT; m0 += MT) {
    Args a = args;
    a.M = min(MT, args.M - m0);
    a.x = static_cast<const T*>(args.x) + m0 * args.x_row_stride;
    a.out = static_cast<T*>(args.out) + m0 * args.out_row_stride;

    float acc[MT][R];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

    WeightRing<R, kStages> ring(ring_slots[warp_in_block], lane);
    lane_accumulate<MT, R, T, kVecX>(a, ring, n0, lane, acc);

#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int offset = kWarp / 2; offset > 0; offset /= 2)
          acc[m][r] += __shfl_xor_sync(0xFFFFFFFFu, acc[m][r], offset);

    if (lane == 0) {
      using X = XType<T>;
      const uint16_t* bias = static_cast<const uint16_t*>(a.bias);
      T* out = static_cast<T*>(a.out);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int n = n0 + r;
        if (n >= a.N) break;
        const float b = bias != nullptr ? X::to_float(load_u16(bias + n)) : 0.f;
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (m < a.M) out[int64_t(m) * a.out_row_stride + n] = X::from_float(acc[m][r] + b);
      }
    }
  }
}

template <int MT, typename T, bool kVecX>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kWarpsPerBlock * kRowsPerWarp<MT>;
  const int blocks = (a.N + kRowsPerBlock - 1) / kRowsPerBlock;
  lowbit_gemv_w4_kernel<MT, T, kVecX><<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

// M tiles 1, 2, 4, 8; M = 9..16 runs the MT = 8 kernel, which loops over two row tiles. (An MT = 16
// tile needs ~200 registers and spills on sm_80, for no gain: at M > 8 the kernel is bound by
// FMA issue, not by DRAM, and the repeated weight reads hit L2.)
template <typename T, bool kVecX>
cudaError_t launch_for_m(const Args& a, cudaStream_t stream) {
  if (a.M <= 1) return launch<1, T, kVecX>(a, stream);
  if (a.M <= 2) return launch<2, T, kVecX>(a, stream);
  if (a.M <= 4) return launch<4, T, kVecX>(a, stream);
  return launch<8, T, kVecX>(a, stream);
}

// Host-side preparation, shared by the launcher and the CPU emulation.
inline Args make_args(const LowbitGemvW4Args& p) {
  Args a;
  a.x = p.x;
  a.qweight = static_cast<const uint4*>(p.qweight);
  a.scales = static_cast<const uint16_t*>(p.scales);
  a.zeros = static_cast<const uint16_t*>(p.zeros);
  a.bias = p.bias;
  a.out = p.out;
  a.M = int(p.M);
  a.N = int(p.N);
  a.K = int(p.K);
  a.x_row_stride = int(p.x_row_stride);
  a.out_row_stride = p.out_row_stride;
  a.full_chunks = int(p.K / kChunk);
  a.chunks_per_row = int(p.K_pad / kChunk);
  a.groups_per_row = int(p.K_pad / p.group_size);
  const uint64_t chunks_per_group = uint64_t(p.group_size / kChunk);
  a.group_magic = uint32_t(((uint64_t(1) << 31) + chunks_per_group - 1) / chunks_per_group);
  a.scale_bf16 = p.scale_dtype == DType::kBFloat16;
  return a;
}

// 16-byte x loads need a 16-byte aligned base and (for M > 1) a row stride of 8 elements.
inline bool x_vectorizable(const LowbitGemvW4Args& p) {
  return reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && (p.M == 1 || p.x_row_stride % 8 == 0);
}

template <typename T>
cudaError_t launch_for_layout(const Args& a, bool vec_x, cudaStream_t stream) {
  return vec_x ? launch_for_m<T, true>(a, stream) : launch_for_m<T, false>(a, stream);
}

}  // namespace lowbit_gemv_detail

const char* lowbit_gemv_w4_check(const LowbitGemvW4Args& p) {
  if (p.M < 1 || p.M > kLowbitGemvMaxM) return "M must be in 1..16";
  if (p.N < 0 || p.N >= (int64_t(1) << 31)) return "N must be in [0, 2^31)";
  if (p.K_pad < 0 || p.K_pad % 128 != 0 || p.K_pad > (int64_t(1) << 20))
    return "K_pad must be a multiple of 128 in [0, 2^20]";
  if (p.K < 0 || p.K > p.K_pad) return "K must be in [0, K_pad]";
  if (p.group_size <= 0 || p.group_size % 32 != 0 || p.K_pad % p.group_size != 0)
    return "group_size must be a positive multiple of 32 that divides K_pad";
  if (p.N * (p.K_pad / p.group_size) >= (int64_t(1) << 31)) return "too many quantization groups (N * groups >= 2^31)";
  if (p.x_row_stride < 0 || (p.M - 1) * p.x_row_stride >= (int64_t(1) << 31)) return "x_row_stride out of range";
  if (p.M > 1 && p.out_row_stride < p.N) return "out_row_stride must be >= N";
  if (reinterpret_cast<uintptr_t>(p.qweight) % 16 != 0) return "qweight must be 16-byte aligned";
  if ((reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.out) | reinterpret_cast<uintptr_t>(p.scales) |
       reinterpret_cast<uintptr_t>(p.zeros) | reinterpret_cast<uintptr_t>(p.bias)) % 2 != 0)
    return "x, out, scales, zeros and bias must be 2-byte aligned";
  if (p.N > 0 && (!p.x || !p.qweight || !p.scales || !p.zeros || !p.out)) return "null pointer";
  return nullptr;
}

cudaError_t lowbit_gemv_w4(const LowbitGemvW4Args& p, cudaStream_t stream) {
  using namespace lowbit_gemv_detail;
  if (lowbit_gemv_w4_check(p) != nullptr) return cudaErrorInvalidValue;
  if (p.N == 0) return cudaSuccess;
  const Args a = make_args(p);
  const bool vec_x = x_vectorizable(p);
  return p.x_dtype == DType::kBFloat16 ? launch_for_layout<__nv_bfloat16>(a, vec_x, stream)
                                       : launch_for_layout<__half>(a, vec_x, stream);
}

}  // namespace efficient_ops
