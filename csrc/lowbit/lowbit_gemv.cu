// Low-bit decode GEMV:  out[M, N] = x[M, K] @ dequant(W)^T (+ bias),  M = 1..16, for every packed
// format of efficient_ops.formats.lowbit, and for a "mixed" weight of two packed segments (PTQ1.61).
//
// Packed formats (fixed; efficient_ops.formats.lowbit produces them; its module docstring is the specification)
// ------------------------------------------------------------------------------------------------
//   w[n, k] = (q[n, k] - z[n, k / group]) * s[n, k / group],  q an unsigned level.
//   qweight  int32 [N, words], row-major contiguous, 16-byte aligned; K padded to K_pad (a multiple of
//            k_align); columns k in [K, K_pad) hold levels that are never multiplied with anything
//            (x is only K long and is never read beyond K).
//     w4       k_align 128, K_pad/8 words: word w holds k = 8w + j in bits [4j, 4j + 4).
//     w3       k_align 128, 3 K_pad/32 words: per 128-column block b (12 words at 12b), word 12b + w
//              (w < 8) holds the low 2 bits of k = 128b + 16w + j in bits [2j, 2j + 2), and word
//              12b + 8 + v (v < 4) holds bit 2 of k = 128b + 32v + j in bit j.
//     w2       k_align 128, K_pad/16 words: word w holds k = 16w + j in bits [2j, 2j + 2).
//     ternary  k_align 160, K_pad/20 words: per 160-column block u (32 bytes at byte 32u, little-endian
//              in words), byte i is sum_j t_j 3^j with t_j (0..2) the level of k = 160u + 32j + i.
//     w1       k_align 128, K_pad/32 words: word w holds k = 32w + j in bit j.
//   scales   [N, ceil(K_pad / group)] float16 | bfloat16, contiguous; group a multiple of 32 (K_pad for
//            one scale per row; for ternary group need not divide K_pad).
//   zeros    same shape and dtype as scales; any float (seq and binary grids use 1.5, 0.5, 0.5 - mu/2a).
//   bias     [N] in x's dtype, optional.
//   out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in float32, rounded once to x's dtype.
// Every aligned run of 32 columns lies in one 16-byte vector (w3: one 48-byte block, ternary: one
// 32-byte block) and in one group, so the kernel's atom is a "sub-chunk": 32 columns, one scale, one
// zero point. A lane's load unit (16, 32 or 48 bytes) holds 1 (w4), 2 (w2), 4 (w1, w3) or 5 (ternary)
// sub-chunks.
//
// Mixed weights: a second segment B with its own format, qweight, scales, zeros, K and group, and a
// column permutation perm (int32 [K_a + K_b]): column j of A reads x[m, perm[j]], column j of B reads
// x[m, perm[K_a + j]], and both accumulate into the same outputs in one launch. perm values are
// clamped into [0, K_a + K_b) before use, so a corrupt perm reads wrong columns, never out of bounds.
//
// Kernel design
// -------------
// Decode GEMV is memory bound at M = 1 if dequantization is lean enough: at 3.35 TB/s an H100 SXM
// leaves about 1.1 * bits instructions per weight per lane (4.4 for w4, 1.8 for ternary, 1.1 for w1).
//   * A warp owns R adjacent output rows (R = 4 for M <= 2, else 2), so every x element is loaded and
//     converted once for R rows. Lane l takes load units l, l + 32, ... of every row.
//   * The weights go global -> shared memory with cp.async.cg (L2 only; L1 stays with x, which every
//     warp re-reads) into a per-lane ring of kStages unit slots, so kStages - 1 units per row are in
//     flight while one is computed, at no register cost. Each lane reads back only its own slots, so
//     the ring needs no barriers, only cp.async.wait_group. A sub-chunk reads just the words it
//     decodes from the ring, so a unit never has to sit in registers whole (ternary excepted: its 8
//     words carry the digit state from plane to plane).
//   * Dequantization without int->float conversions (I2F is quarter rate): each format's decoder
//     lines levels up at bits [7 - width, 7) of every byte with shifts and masks, and a byte permute
//     moves a byte into bits 16..23 of a float whose exponent makes it exactly M + q, M = 2^width.
//     One magic per format, so the magic and the zero point come out per sub-chunk, not per weight:
//         dq[m][r] = sum_k x[m, k] * (M + q[r, k]),  xs[m] = sum_k x[m, k]   (xs shared by the R rows)
//         acc[m][r] += s[r] * (dq[m][r] - (M + z[r]) * xs[m])
//     Exact algebra; in float32 it costs a few bits (the sums run over M + q instead of q - z: at
//     most (2M + |z|) / |q - z| times larger magnitudes), far below the float16 / bfloat16 output
//     rounding, and fractional or huge zero points need no second pass. All math is float32, no
//     fast-math.
//   * Decode instructions per weight (shifts/masks + one byte permute per weight; then one FFMA per
//     row of x): w4 1.5, w3 2.0, w2 1.5, w1 1.5, ternary 3.3 (base-3 digits by fixed-point multiplies,
//     see FormatTernary). With the x side (16-byte load, convert and add to xs: ~2.1 per x element,
//     shared by R rows) and the per-sub-chunk epilogue, M = 1 costs about 3.2 (w4, w2, w1), 3.7 (w3)
//     and 5.0 (ternary) instructions per weight, so (estimates, not yet measured) w4 should run at DRAM
//     bandwidth and w3 close to it, while w2, w1 and ternary are issue bound at M = 1 (roughly 70%,
//     35% and 35% of H100 bandwidth). Mixed weights add ~1.2 per weight at M = 1 for the element-wise
//     gather of x through perm.
//   * M is templated on the tile MT (smallest of 1, 2, 4, 8 >= M), so accumulators live in registers
//     with compile-time indices; rows m >= M of a tile re-read row M - 1 (always in bounds,
//     branch-free) and are not stored. Larger M loops over tiles (M = 9..16: two tiles of 8), each
//     re-reading the weights from L2.
//   * Two kernel families, one template. Vector kernels (one per format): x read in order with 16-byte
//     loads, when x is 16-byte aligned, its row stride a multiple of 8 elements and K of 8 (checked
//     on the host). Element kernels (a warp-uniform run-time switch over all five formats, once per
//     segment): x read element by element, through perm if given, every load guarded by k < K; they
//     serve mixed weights (every format pair), misaligned x and K % 8 != 0, and stop at MT = 4 (M > 4
//     loops over tiles of 4) because an MT = 8 element kernel alone would be a quarter of the module.
//   * A segment's last unit may hold columns, octets or whole sub-chunks past K: they still decode
//     (ternary's digit state runs through all five planes) but read no x and add nothing (their
//     scales may be padding).
//   * Warp-shuffle reduction; lane 0 adds the bias and writes.
// The per-warp work (warp_tile) is __host__ __device__, so a CPU can emulate the kernels lane by lane.

#include "lowbit_gemv.h"

#include "../common/device_helpers.cuh"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace efficient_ops {
namespace lowbit_gemv_detail {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;  // 128 threads: small blocks spread N evenly over the SMs
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kSubChunk = 32;      // columns per sub-chunk (one scale, one zero point)

// Output rows per warp: more rows amortize x loads/conversions and per-sub-chunk bookkeeping; with
// large M tiles the accumulators need the registers instead.
template <int MT>
constexpr int kRowsPerWarp = MT <= 2 ? 4 : 2;

// Register budget per M tile, as resident 128-thread blocks per SM for __launch_bounds__:
// 4 -> <= 128 registers, 3 -> <= 168, 2 -> <= 255. Chosen so that no variant spills on sm_80 or
// sm_90a with nvcc 13.0 (check: EFFICIENT_OPS_PTXAS_VERBOSE=1).
template <int MT>
constexpr int kMinBlocksPerSM = MT == 1 ? 4 : MT <= 4 ? 3 : 2;

// ---- portable helpers (the host versions exist for the CPU emulation) ----------------------
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

// v << n for n >= 0, v >> -n otherwise (n is a compile-time constant after unrolling).
EO_HD uint32_t shift_left(uint32_t v, int n) { return n >= 0 ? v << n : v >> -n; }

EO_HD uint4 load_u128(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(static_cast<const uint4*>(p));
#else
  return *static_cast<const uint4*>(p);
#endif
}

EO_HD int load_i32(const int* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

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

// ---- kernel arguments, prepared once on the host (make_args) -------------------------------

struct Segment {
  const uint4* qweight;
  const uint16_t* scales;
  const uint16_t* zeros;
  const int* perm;         // &perm[first column of this segment], or nullptr: x read in order
  int K;                   // real columns
  int units;               // ceil(K / columns per unit): units holding at least one column < K
  int vecs_per_row;        // 16-byte vectors per packed row
  int groups_per_row;      // ceil(K_pad / group); N * groups_per_row < 2^31 (host-checked)
  uint32_t group_magic;    // ceil(2^31 / (group / 32)): sub-chunk -> group without a division
  LowbitFormat format;
};

struct Args {
  const void* x;
  const void* bias;
  void* out;
  int M, N;
  int x_row_stride;        // elements; (M - 1) * x_row_stride + x_cols < 2^31 (host-checked)
  int64_t out_row_stride;  // elements
  int x_cols;              // columns of x (the perm clamp bound)
  bool scale_bf16;
  int num_segments;        // 1 or 2
  Segment seg[2];
};

// Quantization group of sub-chunk c (columns 32c .. 32c + 32): floor(c / subs_per_group) as
// mulhi(2c, ceil(2^31 / subs_per_group)). Exact while c * subs_per_group < 2^31, which K_pad <= 2^20
// and group <= 2^20 (c, subs_per_group <= 2^15) guarantee.
EO_HD int group_of(const Segment& s, int c) { return int(mul_hi(uint32_t(c) << 1, s.group_magic)); }

EO_HD float scale_to_float(uint16_t u, bool bf16) {
  return bf16 ? bf16_bits_to_float(u) : half_bits_to_float(u);
}

// ---- weight ring ----------------------------------------------------------------------------------

// Per-lane ring of kStages slots of one load unit (kVecs 16-byte vectors) per row, filled by cp.async.
// Reads take single words, pairs or vectors of a slot, so a sub-chunk reads only the words it decodes.
template <int R, int kStages, int kVecs>
struct WeightRing {
#ifdef __CUDA_ARCH__
  uint32_t lane_base;  // shared-memory address of this lane's vector (stage 0, row 0, vector 0)

  // warp_slots: [kStages][R][kVecs][kWarp] vectors: a warp's 16-byte accesses are contiguous.
  __device__ __forceinline__ WeightRing(uint4* warp_slots, int lane)
      : lane_base(static_cast<uint32_t>(__cvta_generic_to_shared(warp_slots + lane))) {}
  // Address of word `word` (0 .. 4 kVecs) of row r's unit in `stage`.
  __device__ __forceinline__ uint32_t address(int stage, int r, int word) const {
    return lane_base + uint32_t(((stage * R + r) * kVecs + word / 4) * kWarp * sizeof(uint4) + word % 4 * 4);
  }
  // Copies unit u of every row into `stage`; .cg caches in L2 only (the weights are read once).
  __device__ __forceinline__ void issue(int stage, const uint4* const (&rows)[R], int u) const {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < kVecs; ++v)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address(stage, r, 4 * v)),
                     "l"(rows[r] + u * kVecs + v)
                     : "memory");
  }
  __device__ __forceinline__ void commit() const { asm volatile("cp.async.commit_group;" ::: "memory"); }
  // Returns once at most kStages - 1 groups are pending, i.e. the oldest one has landed.
  __device__ __forceinline__ void wait_oldest() const {
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1) : "memory");
  }
  // (volatile + "memory": the reads must stay after wait_oldest, which the compiler cannot see through.
  // A warp's word or pair read at the lanes' 16-byte stride costs 4 shared-memory wavefronts, like a
  // vector read: a few per sub-chunk, far from the shared-memory bandwidth.)
  __device__ __forceinline__ uint4 read4(int stage, int r, int word) const {
    uint4 x;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                 : "r"(address(stage, r, word))
                 : "memory");
    return x;
  }
  __device__ __forceinline__ uint2 read2(int stage, int r, int word) const {
    uint2 x;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(x.x), "=r"(x.y) : "r"(address(stage, r, word)) : "memory");
    return x;
  }
  __device__ __forceinline__ uint32_t read1(int stage, int r, int word) const {
    uint32_t x;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(address(stage, r, word)) : "memory");
    return x;
  }
#else  // CPU emulation of one lane, with cp.async's asynchrony: copies land only at wait_oldest().
  struct Copy {
    int stage;
    uint32_t data[R][4 * kVecs];
  };
  uint32_t slots[kStages][R][4 * kVecs];
  Copy pending[2 * kStages];  // committed groups not yet landed (ring buffer)
  bool pending_used[2 * kStages] = {};
  int head = 0, tail = 0;      // pending groups [head, tail)
  Copy open_group{};           // the group being assembled
  bool open_used = false;

  WeightRing(uint4*, int) {
    std::memset(slots, 0xFF, sizeof(slots));  // garbage until a copy lands
  }
  void issue(int stage, const uint4* const (&rows)[R], int u) {
    open_group.stage = stage;
    for (int r = 0; r < R; ++r) std::memcpy(open_group.data[r], rows[r] + u * kVecs, sizeof(open_group.data[r]));
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
        std::memcpy(slots[g.stage], g.data, sizeof(g.data));
      }
      ++head;
    }
  }
  // The device reads need 16-, 8- and 4-byte aligned words; the emulation checks that too.
  uint32_t read1(int stage, int r, int word) const {
    if (word < 0 || word >= 4 * kVecs) std::abort();
    return slots[stage][r][word];
  }
  uint2 read2(int stage, int r, int word) const {
    if (word % 2 != 0) std::abort();
    return make_uint2(read1(stage, r, word), read1(stage, r, word + 1));
  }
  uint4 read4(int stage, int r, int word) const {
    if (word % 4 != 0) std::abort();
    return make_uint4(read1(stage, r, word), read1(stage, r, word + 1), read1(stage, r, word + 2),
                      read1(stage, r, word + 3));
  }
#endif
};

// ---- packed formats ----------------------------------------------------------------------------
//
// Each format: kKAlign (K_pad is a multiple), kVecs (16-byte vectors per load unit), kSubs (sub-chunks
// per unit), kWords (words a sub-chunk decodes from), sub_column(s) (first column of the s-th
// sub-chunk processed, relative to the unit), fetch() (reads sub-chunk s's words from the ring) and
// decode(), which turns octet j (columns 8j .. 8j + 8 of sub-chunk s, in column order) into floats
// M + q. Sub-chunks run s = 0, 1, ... and octets j = 0..3 in order, once each per unit.

// The float M + q from byte i of `prepared`, which holds q at bits [7 - kWidth, 7), zeros below, and
// bit 7 equal to the magic's exponent LSB (the permute puts the byte at float bits 16..23).
template <int kWidth_>
struct LevelFloat {
  static constexpr int kWidth = kWidth_;
  static constexpr uint32_t kMagicBits = uint32_t(127 + kWidth) << 23;  // the float 2^kWidth
  static constexpr float kMagic = float(1 << kWidth);
  // The magic's exponent LSB as bit 7 of every byte (set for even widths).
  static constexpr uint32_t kExpBytes = (kMagicBits >> 16) & 0x80u ? 0x80808080u : 0u;
  // byte_perm(magic, prepared, 0x3?10): bytes 0, 1 and 3 from the magic word, byte 2 = byte i of
  // `prepared`. (Magic word first, selector last: SASS PRMT then takes the selector as an immediate
  // and keeps the magic word in a register.)
  EO_HD static float level(uint32_t prepared, int i) {
    return as_float(byte_perm(kMagicBits, prepared, 0x3010u | (4u + i) << 8));
  }
};

struct FormatW4 : LevelFloat<4> {
  static constexpr LowbitFormat kId = LowbitFormat::kW4;
  static constexpr int kKAlign = 128, kVecs = 1, kSubs = 1, kWords = 4;
  EO_HD static int sub_column(int) { return 0; }
  template <class Ring>
  EO_HD static void fetch(const Ring& ring, int stage, int r, int, uint32_t (&w)[kWords]) {
    const uint4 v = ring.read4(stage, r, 0);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  }
  // Word j holds columns 8j .. 8j + 8: one shift + LOP3 per 4 levels (the even, then the odd nibbles
  // of the 4 bytes moved to bits 3..6), then a permute per level: 1.5 instructions per weight.
  EO_HD static void decode(uint32_t (&w)[kWords], int, int j, float (&f)[8]) {
    const uint32_t even = ((w[j] << 3) & 0x78787878u) | kExpBytes;
    const uint32_t odd = ((w[j] >> 1) & 0x78787878u) | kExpBytes;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = level(even, i);
      f[2 * i + 1] = level(odd, i);
    }
  }
};

struct FormatW2 : LevelFloat<2> {
  static constexpr LowbitFormat kId = LowbitFormat::kW2;
  static constexpr int kKAlign = 128, kVecs = 1, kSubs = 2, kWords = 2;
  EO_HD static int sub_column(int s) { return kSubChunk * s; }
  template <class Ring>
  EO_HD static void fetch(const Ring& ring, int stage, int r, int s, uint32_t (&w)[kWords]) {
    const uint2 v = ring.read2(stage, r, 2 * s);  // words 2s, 2s + 1
    w[0] = v.x, w[1] = v.y;
  }
  // A word holds 16 columns, 4 per byte; octet j is half of word j / 2. Field t (bits 2t, 2t + 1 of
  // every byte) is moved to bits 5..6 by one shift + LOP3 for 4 levels (shared by both octets of the
  // word), then a permute per level: 1.5 instructions per weight.
  EO_HD static void decode(uint32_t (&w)[kWords], int, int j, float (&f)[8]) {
    const int byte0 = 2 * (j & 1);  // the octet's first byte in the word
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t field = (shift_left(w[j >> 1], 5 - 2 * t) & 0x60606060u) | kExpBytes;
      f[t] = level(field, byte0);
      f[4 + t] = level(field, byte0 + 1);
    }
  }
};

struct FormatW1 : LevelFloat<1> {
  static constexpr LowbitFormat kId = LowbitFormat::kW1;
  static constexpr int kKAlign = 128, kVecs = 1, kSubs = 4, kWords = 1;
  EO_HD static int sub_column(int s) { return kSubChunk * s; }
  template <class Ring>
  EO_HD static void fetch(const Ring& ring, int stage, int r, int s, uint32_t (&w)[kWords]) {
    w[0] = ring.read1(stage, r, s);
  }
  // The word holds 32 columns; octet j is byte j. Bit t of every byte is moved to bit 6 by one shift +
  // LOP for 4 levels (shared by the word's 4 octets), then a permute per level: 1.5 per weight.
  EO_HD static void decode(uint32_t (&w)[kWords], int, int j, float (&f)[8]) {
#pragma unroll
    for (int t = 0; t < 8; ++t) f[t] = level(shift_left(w[0], 6 - t) & 0x40404040u, j);
  }
};

struct FormatW3 : LevelFloat<3> {
  static constexpr LowbitFormat kId = LowbitFormat::kW3;
  static constexpr int kKAlign = 128, kVecs = 3, kSubs = 4, kWords = 3;
  EO_HD static int sub_column(int s) { return kSubChunk * s; }
  template <class Ring>
  EO_HD static void fetch(const Ring& ring, int stage, int r, int s, uint32_t (&w)[kWords]) {
    const uint2 low = ring.read2(stage, r, 2 * s);  // low bits: words 2s, 2s + 1
    w[0] = low.x, w[1] = low.y;
    w[2] = ring.read1(stage, r, 8 + s);             // high bits: word 8 + s
  }
  // Low word j / 2 holds 16 columns, 4 per byte (bits 2t, 2t + 1 of byte b: column 4b + t); their high
  // bits are 16 bits of the high word, a nibble per low byte. One permute spreads those nibbles over
  // the bytes (x byte b, bits 0..3 = high bits of columns 4b .. 4b + 3); then per field t (4 levels):
  // low bits to bits 4..5 and high bit to bit 6 (2 shifts, LOP, LOP3), and a permute per level:
  // about 2.0 instructions per weight. Other bits shifted along stay outside the masks: every shift
  // is by less than 8 and fills the masked bits of a byte from that same byte.
  EO_HD static void decode(uint32_t (&w)[kWords], int, int j, float (&f)[8]) {
    const uint32_t low = w[j >> 1], high = w[2];
    const uint32_t h = 2 * (j >> 1);  // first byte of `high` for this low word
    // x = [high.b(h), (high >> 4).b(h), high.b(h + 1), (high >> 4).b(h + 1)]
    const uint32_t x = byte_perm(high, high >> 4, h | (4 + h) << 4 | (h + 1) << 8 | (5 + h) << 12);
    const int byte0 = 2 * (j & 1);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const uint32_t field = (shift_left(low, 4 - 2 * t) & 0x30303030u) | (shift_left(x, 6 - t) & 0x40404040u);
      f[t] = level(field, byte0);
      f[4 + t] = level(field, byte0 + 1);
    }
  }
};

// Ternary: byte v = sum_j t_j 3^j holds the trits of columns 32j + i, j = 0..4, so sub-chunk = trit
// plane. Digits come out most significant first by fixed-point arithmetic: with
// f = ceil(256 v / 243) (0..255, f / 256 = v / 243 + less than 1/243), the top digit is
// floor(3 f / 256) and f <- 3 f mod 256 moves to the next, exactly for all 243 byte values (the
// emulation test checks all of them). So the sub-chunks run planes 4, 3, 2, 1, 0, and the unit's 8
// words hold the state f of every byte from one plane to the next.
struct FormatTernary : LevelFloat<2> {
  static constexpr LowbitFormat kId = LowbitFormat::kTernary;
  static constexpr int kKAlign = 160, kVecs = 2, kSubs = 5, kWords = 8;
  static constexpr uint32_t kInv243 = 17674763u;  // ceil(2^32 / 243)
  EO_HD static int sub_column(int s) { return kSubChunk * (4 - s); }
  // The whole unit, once (s = 0), as states: byte v -> f = ceil(256 v / 243)
  // = ceil(256 v * ceil(2^32 / 243) / 2^32): a permute puts 256 v in a register, one wide multiply-add
  // leaves f in the high word, 3 permutes per word repack: 0.55 instructions per trit. Bytes
  // 243..255 (no valid encoding) decode to unspecified trits.
  template <class Ring>
  EO_HD static void fetch(const Ring& ring, int stage, int r, int s, uint32_t (&w)[kWords]) {
    if (s != 0) return;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const uint4 x = ring.read4(stage, r, 4 * v);
      w[4 * v] = x.x, w[4 * v + 1] = x.y, w[4 * v + 2] = x.z, w[4 * v + 3] = x.w;
    }
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      uint32_t f[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t v256 = byte_perm(w[k], 0u, 0x4404u | uint32_t(i) << 4);  // byte i of w[k] at bits 8..15
        f[i] = uint32_t((uint64_t(v256) * kInv243 + 0xFFFFFFFFu) >> 32);
      }
      w[k] = byte_perm(byte_perm(f[0], f[1], 0x5140u), byte_perm(f[2], f[3], 0x5140u), 0x5410u);
    }
  }
  // Octet j is bytes 8j .. 8j + 8 = words 2j, 2j + 1. Per word: split the 4 states into two registers
  // of 16-bit lanes and multiply by 3 (the digit lands in bits 8..9 of each lane, the next state in
  // bits 0..7), repack states and digits (2 permutes), move the digits to bits 5..6 with the exponent
  // bit (one multiply-add), a permute per trit: 2.75 instructions per trit.
  EO_HD static void decode(uint32_t (&w)[kWords], int, int j, float (&f)[8]) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      uint32_t& state = w[2 * j + q];
      const uint32_t even = (state & 0x00FF00FFu) * 3u;         // lanes: 3 * bytes 0 and 2
      const uint32_t odd = byte_perm(state, 0u, 0x4341u) * 3u;  // lanes: 3 * bytes 1 and 3
      state = byte_perm(even, odd, 0x6240u);                    // byte i: the next state of byte i
      const uint32_t trits = byte_perm(even, odd, 0x7351u);     // byte i: the digit of byte i
      const uint32_t field = trits * 32u + kExpBytes;           // digit at bits 5..6
#pragma unroll
      for (int i = 0; i < 4; ++i) f[4 * q + i] = level(field, i);
    }
  }
};

// Weight ring depth: enough stages that (kStages - 1) units in flight per row carry at least as many
// bytes as 2 (4 rows) or 3 (2 rows) 16-byte vectors: w4/w2/w1 3 or 4 stages, ternary 2 or 3, w3 2.
template <class F, int R>
constexpr int kRingStages = 1 + ((R == 4 ? 2 : 3) + F::kVecs - 1) / F::kVecs;

constexpr int max_of(std::initializer_list<int> values) {
  int n = 0;
  for (int v : values) n = n > v ? n : v;
  return n;
}

template <class... Fs>
struct FormatList {
  // Calls fn(F{}) for the listed format F with F::kId == id (a single-format list skips the test).
  template <class Fn>
  EO_HD static void visit(LowbitFormat id, Fn&& fn) {
    if constexpr (sizeof...(Fs) == 1) {
      (fn(Fs{}), ...);
    } else {
      ((id == Fs::kId ? fn(Fs{}) : void()), ...);
    }
  }
  // 16-byte vectors per warp of the largest weight ring among the formats.
  template <int R>
  static constexpr int kRingVecsPerWarp = max_of({kRingStages<Fs, R> * R * Fs::kVecs * kWarp...});
};
using AllFormats = FormatList<FormatW4, FormatW3, FormatW2, FormatTernary, FormatW1>;

// ---- the per-lane work ------------------------------------------------------------------------

// How x is read: with 16-byte loads (the vector kernels: x read in order, aligned, K a multiple of 8,
// so that every octet lies entirely below or entirely past K), or element by element, directly or
// through perm (the element kernels: mixed weights, misaligned x, K % 8 != 0).
enum class XLoad { kVec16, kElement };

// Element offset of x's row m; tile rows >= M re-read row M - 1.
EO_HD int x_row_offset(const Args& a, int m) { return (m < a.M ? m : a.M - 1) * a.x_row_stride; }

// Element-wise x: the columns of x that segment columns k .. k + 8 read, and whether they exist
// (k + e < K). perm is read below K only, and clamped (unsigned min) into [0, x_cols).
EO_HD void x_columns(const Args& a, const Segment& seg, int k, int (&cols)[8], bool (&live)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    live[e] = k + e < seg.K;
    cols[e] = k + e;
  }
  if (seg.perm != nullptr) {
#pragma unroll
    for (int e = 0; e < 8; ++e)
      cols[e] = live[e] ? int(min(uint32_t(load_i32(seg.perm + k + e)), uint32_t(a.x_cols - 1))) : 0;
  }
}

// x[m, col(k + e)] for e = 0..7 as floats (0 past K), where xrow = &x[m, 0]; `cols` and `live` come
// from x_columns (kElement only).
template <typename T, XLoad kLoad>
EO_HD void load_x8(const T* xrow, int k, const int (&cols)[8], const bool (&live)[8], float (&v)[8]) {
  using X = XType<T>;
  if constexpr (kLoad == XLoad::kVec16) {
    const uint4 raw = load_u128(xrow + k);
#pragma unroll
    for (int i = 0; i < 4; ++i) X::to_float2(word_of(raw, i), v[2 * i], v[2 * i + 1]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = live[e] ? X::to_float(load_u16(xrow + cols[e])) : 0.f;
  }
}

// One sub-chunk (columns k0 .. k0 + 32 of the segment, one group) for the warp's R rows:
// acc[m][r] += s[r] * (sum_k x[m, k] * (M + q[r, k]) - c[r] * sum_k x[m, k]),  c = M + z.
template <class F, int MT, int R, typename T, XLoad kLoad>
EO_HD void dot_sub_chunk(const Args& a, const Segment& seg, uint32_t (&w)[R][F::kWords], int s, int k0,
                         const float (&scale)[R], const float (&c)[R], float (&acc)[MT][R]) {
  float dq[MT][R], xs[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    xs[m] = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) dq[m][r] = 0.f;
  }
  const T* x = static_cast<const T*>(a.x);
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // octet j: columns k0 + 8j .. k0 + 8j + 8
    const int k = k0 + 8 * j;
    float f[8];
    // Octets past K (in a segment's last unit) read nothing, but ternary's digit states must still
    // advance. The branch also keeps the compiler from hoisting every octet's x loads to the top of
    // the sub-chunk: straight-line octets spill (element-wise: 8 * MT loads per octet).
    if (k >= seg.K) {
#pragma unroll
      for (int r = 0; r < R; ++r) F::decode(w[r], s, j, f);
      continue;
    }
    int cols[8] = {};  // element-wise: x columns and k < K, shared by the tile's rows
    bool live[8] = {};
    if (kLoad == XLoad::kElement) x_columns(a, seg, k, cols, live);
    float fr[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) F::decode(w[r], s, j, fr[r]);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      load_x8<T, kLoad>(x + x_row_offset(a, m), k, cols, live, f);
#pragma unroll
      for (int e = 0; e < 8; ++e) xs[m] += f[e];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int e = 0; e < 8; ++e) dq[m][r] = fmaf(f[e], fr[r][e], dq[m][r]);
    }
  }
  if (k0 < seg.K) {  // else: past K (a segment's last unit), no x was read and the scale may be padding
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = fmaf(scale[r], fmaf(-c[r], xs[m], dq[m][r]), acc[m][r]);
  }
}

// Scale and M + zero point of the sub-chunk at column `col` for the warp's rows.
template <class F, int R>
EO_HD void load_scale_c(const Args& a, const Segment& seg, const int (&sz_row)[R], int col, float (&s)[R],
                        float (&c)[R]) {
  const int g = group_of(seg, col / kSubChunk);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    s[r] = scale_to_float(load_u16(seg.scales + (sz_row[r] + g)), a.scale_bf16);
    c[r] = F::kMagic + scale_to_float(load_u16(seg.zeros + (sz_row[r] + g)), a.scale_bf16);
  }
}

// Unit u (in ring slot `stage`) for the warp's rows. s, c hold the first sub-chunk's scales on entry
// and the next unit's (if more_units) on exit: they are prefetched one sub-chunk ahead.
template <class F, int MT, int R, typename T, XLoad kLoad, class Ring>
EO_HD void accumulate_unit(const Args& a, const Segment& seg, const Ring& ring, int stage, int u, bool more_units,
                           const int (&sz_row)[R], float (&s)[R], float (&c)[R], float (&acc)[MT][R]) {
  constexpr int kCols = F::kSubs * kSubChunk;  // columns per unit
  uint32_t w[R][F::kWords];                    // (ternary: the digit states, carried across sub-chunks)
#pragma unroll 1  // sub-chunks differ only in which words they read: unrolling would only add code
  for (int sub = 0; sub < F::kSubs; ++sub) {
#pragma unroll
    for (int r = 0; r < R; ++r) F::fetch(ring, stage, r, sub, w[r]);
    float s_next[R] = {}, c_next[R] = {};
    if (sub + 1 < F::kSubs)
      load_scale_c<F>(a, seg, sz_row, u * kCols + F::sub_column(sub + 1), s_next, c_next);
    else if (more_units)
      load_scale_c<F>(a, seg, sz_row, (u + kWarp) * kCols + F::sub_column(0), s_next, c_next);
    dot_sub_chunk<F, MT, R, T, kLoad>(a, seg, w, sub, u * kCols + F::sub_column(sub), s, c, acc);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      s[r] = s_next[r];
      c[r] = c_next[r];
    }
  }
}

// This lane's partial sums of one segment for rows n0 .. n0 + R - 1 (before the warp reduction).
template <class F, int MT, int R, typename T, XLoad kLoad>
EO_HD void lane_accumulate(const Args& a, const Segment& seg, uint4* ring_memory, int n0, int lane,
                           float (&acc)[MT][R]) {
  constexpr int kStages = kRingStages<F, R>;
  constexpr int kCols = F::kSubs * kSubChunk;
  WeightRing<R, kStages, F::kVecs> ring(ring_memory, lane);

  const uint4* wrow[R];
  int sz_row[R];  // element offset of the row in scales / zeros
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n0 + r < a.N ? n0 + r : a.N - 1;  // the last warp may re-read a valid row
    wrow[r] = seg.qweight + int64_t(n) * seg.vecs_per_row;
    sz_row[r] = n * seg.groups_per_row;
  }
  const int count = lane < seg.units ? (seg.units - lane + kWarp - 1) / kWarp : 0;  // this lane's units

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {  // prologue: fill all stages but one
    if (i < count) ring.issue(i, wrow, lane + i * kWarp);
    ring.commit();  // (empty groups are fine and keep the group count uniform)
  }
  float s[R] = {}, c[R] = {};
  if (count > 0) load_scale_c<F>(a, seg, sz_row, lane * kCols + F::sub_column(0), s, c);

#pragma unroll 1  // the ring provides the overlap; unrolling would only add registers
  for (int i = 0; i < count; ++i) {
    const int u = lane + i * kWarp;
    // Refill the stage consumed in the previous iteration (its data is already in registers).
    const int ahead = i + kStages - 1;
    if (ahead < count) ring.issue(ahead % kStages, wrow, lane + ahead * kWarp);
    ring.commit();
    ring.wait_oldest();
    accumulate_unit<F, MT, R, T, kLoad>(a, seg, ring, i % kStages, u, i + 1 < count, sz_row, s, c, acc);
  }
}

// The warp's rows n0 .. n0 + R - 1 over every segment: this lane's partial sums.
template <class Formats, int MT, int R, typename T, XLoad kLoad>
EO_HD void warp_tile(const Args& a, uint4* ring_memory, int n0, int lane, float (&acc)[MT][R]) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
#pragma unroll 1
  for (int i = 0; i < a.num_segments; ++i) {
    const Segment seg = i == 0 ? a.seg[0] : a.seg[1];  // a select, not a dynamically indexed array
    Formats::visit(seg.format, [&](auto format) {
      lane_accumulate<decltype(format), MT, R, T, kLoad>(a, seg, ring_memory, n0, lane, acc);
    });
  }
}

// The arguments as seen by the tile of x rows m0 .. m0 + MT.
template <int MT, typename T>
EO_HD Args tile_args(const Args& args, int m0) {
  Args a = args;
  a.M = args.M - m0 < MT ? args.M - m0 : MT;
  a.x = static_cast<const T*>(args.x) + m0 * args.x_row_stride;
  a.out = static_cast<T*>(args.out) + m0 * args.out_row_stride;
  return a;
}

// M > MT: the warp repeats its rows for each tile of MT rows of x (M = 9..16 with MT = 8 in the vector
// kernels, M = 5..16 with MT = 4 in the element kernels). The repeat reads the same weights again,
// from L2 since this warp has just streamed them.
template <int MT, typename T, class Fn>
EO_HD void for_each_tile(const Args& args, Fn&& fn) {
#pragma unroll 1
  for (int m0 = 0; m0 < args.M; m0 += MT) fn(tile_args<MT, T>(args, m0));
}

// Adds the bias and writes the tile's outputs (lane 0, after the warp reduction).
template <int MT, int R, typename T>
EO_HD void store_tile(const Args& a, int n0, const float (&acc)[MT][R]) {
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

template <class Formats, int MT, typename T, XLoad kLoad>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<MT>) lowbit_gemv_kernel(const Args args) {
  constexpr int R = kRowsPerWarp<MT>;
  __shared__ uint4 ring_slots[kWarpsPerBlock][Formats::template kRingVecsPerWarp<R>];

  const int lane = threadIdx.x % kWarp;
  const int warp_in_block = threadIdx.x / kWarp;
  const int n0 = (blockIdx.x * kWarpsPerBlock + warp_in_block) * R;
  if (n0 >= args.N) return;  // warp-uniform: whole warps exit together; there are no block barriers

  for_each_tile<MT, T>(args, [&](const Args& a) {
    float acc[MT][R];
    warp_tile<Formats, MT, R, T, kLoad>(a, ring_slots[warp_in_block], n0, lane, acc);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int offset = kWarp / 2; offset > 0; offset /= 2)
          acc[m][r] += __shfl_xor_sync(0xFFFFFFFFu, acc[m][r], offset);
    if (lane == 0) store_tile<MT, R, T>(a, n0, acc);
  });
}

// ---- dispatch, shared by the launcher and the CPU emulation ----------------------------------
//
// Calls fn(Formats{}, MT, Tag<T>{}, kLoad) (MT and kLoad as std::integral_constant) for the kernel
// that serves `p`. M tiles: 1, 2, 4, 8 (vector kernels) or 1, 2, 4 (element kernels); an MT = 16 tile
// needs ~200 registers and spills on sm_80, for no gain: at M > 8 the kernel is bound by FMA issue,
// not by DRAM, and the repeated weight reads hit L2.

template <typename T>
struct Tag {
  using type = T;
};

template <class Formats, XLoad kLoad, typename T, class Fn>
cudaError_t dispatch_m(int M, Fn&& fn) {
  using L = std::integral_constant<XLoad, kLoad>;
  if (M <= 1) return fn(Formats{}, std::integral_constant<int, 1>{}, Tag<T>{}, L{});
  if (M <= 2) return fn(Formats{}, std::integral_constant<int, 2>{}, Tag<T>{}, L{});
  if constexpr (kLoad == XLoad::kElement) {
    return fn(Formats{}, std::integral_constant<int, 4>{}, Tag<T>{}, L{});
  } else {
    if (M <= 4) return fn(Formats{}, std::integral_constant<int, 4>{}, Tag<T>{}, L{});
    return fn(Formats{}, std::integral_constant<int, 8>{}, Tag<T>{}, L{});
  }
}

template <class Formats, XLoad kLoad, class Fn>
cudaError_t dispatch_type(const LowbitGemvArgs& p, Fn&& fn) {
  return p.x_dtype == DType::kBFloat16 ? dispatch_m<Formats, kLoad, __nv_bfloat16>(int(p.M), fn)
                                       : dispatch_m<Formats, kLoad, __half>(int(p.M), fn);
}

// 16-byte x loads need x read in order, a 16-byte aligned base, (for M > 1) a row stride of 8, and K a
// multiple of 8 (no octet straddles K, so the vector kernels need no element-wise path).
inline bool x_vectorizable(const LowbitGemvArgs& p) {
  return p.perm == nullptr && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && (p.M == 1 || p.x_row_stride % 8 == 0) &&
         p.a.K % 8 == 0;
}

template <class Fn>
cudaError_t dispatch(const LowbitGemvArgs& p, Fn&& fn) {
  if (!x_vectorizable(p)) return dispatch_type<AllFormats, XLoad::kElement>(p, fn);
  switch (p.a.format) {
    case LowbitFormat::kW4: return dispatch_type<FormatList<FormatW4>, XLoad::kVec16>(p, fn);
    case LowbitFormat::kW3: return dispatch_type<FormatList<FormatW3>, XLoad::kVec16>(p, fn);
    case LowbitFormat::kW2: return dispatch_type<FormatList<FormatW2>, XLoad::kVec16>(p, fn);
    case LowbitFormat::kTernary: return dispatch_type<FormatList<FormatTernary>, XLoad::kVec16>(p, fn);
    case LowbitFormat::kW1: return dispatch_type<FormatList<FormatW1>, XLoad::kVec16>(p, fn);
    default: return cudaErrorInvalidValue;
  }
}

// ---- host-side preparation, shared by the launcher and the CPU emulation -----------------------

struct FormatInfo {
  int k_align, cols_per_unit, vecs_per_unit;
};

template <class F>
constexpr FormatInfo info_of() {
  return {F::kKAlign, F::kSubs * kSubChunk, F::kVecs};
}

inline bool format_info(LowbitFormat format, FormatInfo& info) {
  switch (format) {
    case LowbitFormat::kW4: info = info_of<FormatW4>(); return true;
    case LowbitFormat::kW3: info = info_of<FormatW3>(); return true;
    case LowbitFormat::kW2: info = info_of<FormatW2>(); return true;
    case LowbitFormat::kTernary: info = info_of<FormatTernary>(); return true;
    case LowbitFormat::kW1: info = info_of<FormatW1>(); return true;
    default: return false;
  }
}

inline Segment make_segment(const LowbitSegment& s, const int* perm) {
  FormatInfo info{};
  format_info(s.format, info);
  const int64_t k_pad = lowbit_k_pad(s.format, s.K);
  Segment seg;
  seg.qweight = static_cast<const uint4*>(s.qweight);
  seg.scales = static_cast<const uint16_t*>(s.scales);
  seg.zeros = static_cast<const uint16_t*>(s.zeros);
  seg.perm = perm;
  seg.K = int(s.K);
  seg.units = int((s.K + info.cols_per_unit - 1) / info.cols_per_unit);
  seg.vecs_per_row = int(k_pad / info.cols_per_unit * info.vecs_per_unit);
  seg.groups_per_row = int((k_pad + s.group_size - 1) / s.group_size);
  const uint64_t subs_per_group = uint64_t(s.group_size / kSubChunk);
  seg.group_magic = uint32_t(((uint64_t(1) << 31) + subs_per_group - 1) / subs_per_group);
  seg.format = s.format;
  return seg;
}

inline Args make_args(const LowbitGemvArgs& p) {
  Args a;
  a.x = p.x;
  a.bias = p.bias;
  a.out = p.out;
  a.M = int(p.M);
  a.N = int(p.N);
  a.x_row_stride = int(p.x_row_stride);
  a.out_row_stride = p.out_row_stride;
  a.scale_bf16 = p.scale_dtype == DType::kBFloat16;
  const int* perm = static_cast<const int*>(p.perm);
  a.num_segments = p.b.format == LowbitFormat::kNone ? 1 : 2;
  a.seg[0] = make_segment(p.a, perm);
  a.seg[1] = a.num_segments == 2 ? make_segment(p.b, perm == nullptr ? nullptr : perm + p.a.K) : a.seg[0];
  a.x_cols = int(p.a.K + (a.num_segments == 2 ? p.b.K : 0));
  return a;
}

}  // namespace lowbit_gemv_detail

int64_t lowbit_k_pad(LowbitFormat format, int64_t K) {
  lowbit_gemv_detail::FormatInfo info{};
  if (K < 0 || !lowbit_gemv_detail::format_info(format, info)) return -1;
  return (K + info.k_align - 1) / info.k_align * info.k_align;
}

namespace {

bool misaligned(const void* p, uintptr_t alignment) { return reinterpret_cast<uintptr_t>(p) % alignment != 0; }

// Checks one segment; `b` selects the argument names in the messages.
const char* check_segment(const LowbitSegment& s, int64_t N, bool b) {
  const int64_t k_pad = lowbit_k_pad(s.format, s.K);
  if (k_pad < 0 || k_pad > kLowbitGemvMaxKPad)
    return b ? "k_b must be in [0, 2^20] after padding to the format's k_align"
             : "k_a must be in [0, 2^20] after padding to the format's k_align";
  if (s.group_size < 32 || s.group_size % 32 != 0 || s.group_size > kLowbitGemvMaxKPad)
    return b ? "group_b must be a multiple of 32 in [32, 2^20]" : "group_a must be a multiple of 32 in [32, 2^20]";
  if (N * ((k_pad + s.group_size - 1) / s.group_size) >= (int64_t(1) << 31))
    return b ? "too many quantization groups in segment b (N * groups >= 2^31)"
             : "too many quantization groups in segment a (N * groups >= 2^31)";
  if (misaligned(s.qweight, 16)) return b ? "qweight_b must be 16-byte aligned" : "qweight_a must be 16-byte aligned";
  if (misaligned(s.scales, 2) || misaligned(s.zeros, 2))
    return b ? "scales_b and zeros_b must be 2-byte aligned" : "scales_a and zeros_a must be 2-byte aligned";
  if (N > 0 && (!s.qweight || !s.scales || !s.zeros))
    return b ? "qweight_b, scales_b and zeros_b must not be null" : "qweight_a, scales_a and zeros_a must not be null";
  return nullptr;
}

bool valid_format(LowbitFormat f) { return lowbit_k_pad(f, 0) == 0; }

}  // namespace

const char* lowbit_gemv_check(const LowbitGemvArgs& p) {
  if (p.M < 1 || p.M > kLowbitGemvMaxM) return "M must be in 1..16";
  if (p.N < 0 || p.N >= (int64_t(1) << 31)) return "N must be in [0, 2^31)";
  if ((p.x_dtype != DType::kFloat16 && p.x_dtype != DType::kBFloat16) ||
      (p.scale_dtype != DType::kFloat16 && p.scale_dtype != DType::kBFloat16))
    return "x_dtype and scale_dtype must be float16 or bfloat16";
  if (!valid_format(p.a.format)) return "fmt_a must be one of w4, w3, w2, ternary, w1";
  const bool two = p.b.format != LowbitFormat::kNone;
  if (two && !valid_format(p.b.format)) return "fmt_b must be one of w4, w3, w2, ternary, w1, or empty";
  if (two && p.perm == nullptr) return "a second segment (fmt_b) needs perm";
  if (!two && (p.b.qweight || p.b.scales || p.b.zeros || p.b.K || p.b.group_size))
    return "qweight_b, scales_b, zeros_b, k_b and group_b need fmt_b";
  if (const char* problem = check_segment(p.a, p.N, false)) return problem;
  if (two)
    if (const char* problem = check_segment(p.b, p.N, true)) return problem;
  if (misaligned(p.perm, 4)) return "perm must be 4-byte aligned";
  const int64_t x_cols = p.a.K + (two ? p.b.K : 0);
  if (p.x_row_stride < 0 || (p.M - 1) * p.x_row_stride + x_cols >= (int64_t(1) << 31))
    return "x_row_stride out of range ((M - 1) * x_row_stride + K must be < 2^31)";
  if (p.out_row_stride < 0 || (p.M > 1 && p.out_row_stride < p.N)) return "out_row_stride must be >= N";
  if (misaligned(p.x, 2) || misaligned(p.out, 2) || misaligned(p.bias, 2))
    return "x, out and bias must be 2-byte aligned";
  if (p.N > 0 && (!p.x || !p.out)) return "x and out must not be null";
  return nullptr;
}

// The CPU emulation (tests/csrc/lowbit_gemv_emulation.cu) includes this file for its host side and
// defines EFFICIENT_OPS_LOWBIT_HOST_ONLY: compiling every kernel into its sanitizer build would take
// minutes, and it launches none.
#ifndef EFFICIENT_OPS_LOWBIT_HOST_ONLY
cudaError_t lowbit_gemv(const LowbitGemvArgs& p, cudaStream_t stream) {
  using namespace lowbit_gemv_detail;
  if (lowbit_gemv_check(p) != nullptr) return cudaErrorInvalidValue;
  if (p.N == 0) return cudaSuccess;
  const Args a = make_args(p);
  return dispatch(p, [&](auto formats, auto mt, auto t, auto load) {
    constexpr int MT = decltype(mt)::value;
    constexpr int kRowsPerBlock = kWarpsPerBlock * kRowsPerWarp<MT>;
    const int blocks = (a.N + kRowsPerBlock - 1) / kRowsPerBlock;
    lowbit_gemv_kernel<decltype(formats), MT, typename decltype(t)::type, decltype(load)::value>
        <<<blocks, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  });
}
#endif

}  // namespace efficient_ops
