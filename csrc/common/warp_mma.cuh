// Warp-level tensor-core helpers shared by the attention kernel families (csrc/speculative/tree_attention.cu,
// csrc/sparse_attention/*.cu), in namespace efficient_ops::common_detail:
//   * Elem<kBF16> (float16 / bfloat16 bits <-> float; to_float2 widens both halves of a word, for
//     csrc/rsparse/rsparse_gemv.cu), pack2 (an mma operand word), unpack8;
//   * memory helpers: __ldg loads of indices, 16-byte shared / global accesses, cp.async (16 bytes, commit,
//     wait), 8-element row loads for rows that are not 16-byte aligned (copy_chunk16: either, per row);
//   * warp collectives: ldsm_x4 (ldmatrix.x4[.trans]), warp_mma (mma.sync m16n8k16, f32 accumulate), quad_max
//     / quad_sum (the 4 lanes of an accumulator row), warp_allreduce (xor butterfly over 32 lanes).
// Every helper has a host version, so that the CPU emulations (tests/csrc/*_emulation.cu) can run the
// kernels' own block programs (see block_exec.cuh): the warp collectives take per-lane accessors (lane ->
// address / fragment / value) and, on the host, act for the whole warp at once as the PTX fragment layouts
// define; the memory helpers check on the host the alignment the device instruction requires.
#pragma once

#include "block_exec.cuh"
#include "device_helpers.cuh"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace efficient_ops {
namespace common_detail {

// Softmax in the log2 domain: exp(x) = exp2(x * kLog2e), ln(l) = log2(l) * kLn2.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element type ------------------------------------------------------------------------------

template <bool kBF16>
struct Elem;

template <>
struct Elem<false> {  // float16
  EO_HD static float to_float(uint16_t u) { return half_bits_to_float(u); }
  EO_HD static void to_float2(uint32_t u, float& lo, float& hi) {  // lower index in the low half
    lo = to_float(uint16_t(u));
    hi = to_float(uint16_t(u >> 16));
  }
  EO_HD static uint16_t from_float(float f) {
    const __half_raw raw = __float2half_rn(f);
    return raw.x;
  }
};

template <>
struct Elem<true> {  // bfloat16: widening is a shift
  EO_HD static float to_float(uint16_t u) { return bf16_bits_to_float(u); }
  EO_HD static void to_float2(uint32_t u, float& lo, float& hi) {
    lo = as_float(u << 16);
    hi = as_float(u & 0xFFFF0000u);
  }
  EO_HD static uint16_t from_float(float f) {
    const __nv_bfloat16_raw raw = __float2bfloat16_rn(f);
    return raw.x;
  }
};

// Two floats rounded to the dtype, packed as an mma operand word (lower index in the low half).
template <bool kBF16>
EO_HD uint32_t pack2(float lo, float hi) {
  return uint32_t(Elem<kBF16>::from_float(lo)) | (uint32_t(Elem<kBF16>::from_float(hi)) << 16);
}

// The 8 elements of a 16-byte word, widened.
template <bool kBF16>
EO_HD void unpack8(const uint4& v, float (&f)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t w = word_of(v, j);
    f[2 * j] = Elem<kBF16>::to_float(uint16_t(w));
    f[2 * j + 1] = Elem<kBF16>::to_float(uint16_t(w >> 16));
  }
}

// ---- memory helpers (host versions for the CPU emulation) ---------------------------------------

// Aborts the CPU emulation (a misaligned access that the device instruction would fault on, etc.).
[[noreturn]] inline void emulation_fail(const char* what) {
  std::fprintf(stderr, "efficient_ops emulation: %s\n", what);
  std::abort();
}

EO_HD int64_t ld_i64(const int64_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const long long*>(p));
#else
  return *p;
#endif
}

EO_HD int ld_i32(const int32_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const int*>(p));
#else
  return *p;
#endif
}

// 16 bytes to a 16-byte aligned address (the host checks it; `misaligned_what` is the emulation's message).
EO_HD void st_u128(void* dst, uint4 v, const char* misaligned_what) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint4*>(dst) = v;
#else
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) emulation_fail(misaligned_what);
  std::memcpy(dst, &v, sizeof(v));
#endif
}

EO_HD void st_shared_u128(void* dst, uint4 v) { st_u128(dst, v, "misaligned 16-byte shared store"); }

EO_HD uint4 ld_shared_u128(const void* src) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const uint4*>(src);
#else
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emulation_fail("misaligned 16-byte shared load");
  uint4 v;
  std::memcpy(&v, src, sizeof(v));
  return v;
#endif
}

// 16 bytes global -> shared, asynchronously (cp.async.cg: L2 only, no L1 allocation; K/V tiles that several
// blocks read are shared through L2).
EO_HD void cp_async16(void* dst, const void* src) {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(uint32_t(__cvta_generic_to_shared(dst))),
               "l"(src)
               : "memory");
#else
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    emulation_fail("misaligned cp.async");
  std::memcpy(dst, src, 16);
#endif
}

EO_HD void cp_async_commit() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (the host copies at once).
template <int N>
EO_HD void cp_async_wait() {
#ifdef __CUDA_ARCH__
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// 8 elements of a row that may be misaligned for 16 bytes, packed like a 16-byte load.
EO_HD uint4 ld_row8_scalar(const uint16_t* p) {
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) w[e] = uint32_t(load_u16(p + 2 * e)) | (uint32_t(load_u16(p + 2 * e + 1)) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// One 16-byte chunk (8 elements) of a row, global -> shared: cp.async where the row is 16-byte aligned
// (`vec`), else 8 scalar loads and a 16-byte shared store.
EO_HD void copy_chunk16(uint16_t* dst, const uint16_t* src, bool vec) {
  if (vec)
    cp_async16(dst, src);
  else
    st_shared_u128(dst, ld_row8_scalar(src));
}

// 16 bytes to global memory (the address must be 16-byte aligned).
EO_HD void st_global_u128(uint16_t* dst, uint4 v) { st_u128(dst, v, "misaligned 16-byte global store"); }

// ---- warp collectives (host versions: the whole warp at once, from the PTX fragment layouts) -------

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane j supplies addr(j), the start of row j % 8 of
// matrix j / 8 (8 contiguous 16-bit elements, 16-byte aligned). Returns lane `lane`'s word of each matrix:
// without .trans the elements (row lane / 4, columns 2 (lane % 4), +1); with .trans (rows 2 (lane % 4), +1,
// column lane / 4); the lower index in the low half.
template <bool kTrans, class AddrF>
EO_HD uint4 ldsm_x4(int lane, AddrF&& addr) {
#ifdef __CUDA_ARCH__
  const uint32_t a = uint32_t(__cvta_generic_to_shared(addr(lane)));
  uint4 r;
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "r"(a));
  return r;
#else
  uint32_t w[4];
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 8; ++j)
      if (reinterpret_cast<uintptr_t>(addr(8 * i + j)) % 16 != 0) emulation_fail("misaligned ldmatrix row");
    if (kTrans) {
      const uint16_t* r0 = addr(8 * i + 2 * (lane % 4));
      const uint16_t* r1 = addr(8 * i + 2 * (lane % 4) + 1);
      w[i] = uint32_t(r0[lane / 4]) | (uint32_t(r1[lane / 4]) << 16);
    } else {
      const uint16_t* row = addr(8 * i + lane / 4);
      w[i] = uint32_t(row[2 * (lane % 4)]) | (uint32_t(row[2 * (lane % 4) + 1]) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C for the warp, with lane l (g = l / 4,
// c = 2 (l % 4)) holding A words {(g, c), (g + 8, c), (g, c + 8), (g + 8, c + 8)} (each two adjacent
// columns), B words {(k = c, n = g), (k = c + 8, n = g)} (two adjacent k) and C/D floats (g, c), (g, c + 1),
// (g + 8, c), (g + 8, c + 1). c_of(l) -> float (&)[4], a_of(l) -> uint4, b_of(l) -> uint2.
template <bool kBF16, class CF, class AF, class BF>
EO_HD void warp_mma(CF&& c_of, AF&& a_of, BF&& b_of) {
#ifdef __CUDA_ARCH__
  const int lane = int(threadIdx.x) % kWarp;
  float(&c)[4] = c_of(lane);
  const uint4 a = a_of(lane);
  const uint2 b = b_of(lane);
  if constexpr (kBF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b.x), "r"(b.y));
#else
  using E = Elem<kBF16>;
  float A[16][16], B[16][8], C[16][8];
  const auto lo = [](uint32_t w) { return E::to_float(uint16_t(w)); };
  const auto hi = [](uint32_t w) { return E::to_float(uint16_t(w >> 16)); };
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, c = 2 * (l % 4);
    const uint4 a = a_of(l);
    A[g][c] = lo(a.x), A[g][c + 1] = hi(a.x);
    A[g + 8][c] = lo(a.y), A[g + 8][c + 1] = hi(a.y);
    A[g][c + 8] = lo(a.z), A[g][c + 9] = hi(a.z);
    A[g + 8][c + 8] = lo(a.w), A[g + 8][c + 9] = hi(a.w);
    const uint2 b = b_of(l);
    B[c][g] = lo(b.x), B[c + 1][g] = hi(b.x);
    B[c + 8][g] = lo(b.y), B[c + 9][g] = hi(b.y);
    const float(&cc)[4] = c_of(l);
    C[g][c] = cc[0], C[g][c + 1] = cc[1], C[g + 8][c] = cc[2], C[g + 8][c + 1] = cc[3];
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      float acc = C[m][n];
      for (int k = 0; k < 16; ++k) acc = fmaf(A[m][k], B[k][n], acc);  // products exact in float32
      C[m][n] = acc;
    }
  for (int l = 0; l < kWarp; ++l) {
    const int g = l / 4, c = 2 * (l % 4);
    float(&cc)[4] = c_of(l);
    cc[0] = C[g][c], cc[1] = C[g][c + 1], cc[2] = C[g + 8][c], cc[3] = C[g + 8][c + 1];
  }
#endif
}

// Max / sum over the 4 lanes of each quad (the lanes holding one accumulator row): xor shuffles 1 then 2.
template <class F>
EO_HD void quad_max(F&& ref) {
#ifdef __CUDA_ARCH__
  float& v = ref(int(threadIdx.x) % kWarp);
  v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 2));
#else
  for (int q = 0; q < kWarp; q += 4) {
    const float m = fmaxf(fmaxf(ref(q), ref(q + 1)), fmaxf(ref(q + 2), ref(q + 3)));
    for (int l = q; l < q + 4; ++l) ref(l) = m;
  }
#endif
}

template <class F>
EO_HD void quad_sum(F&& ref) {
#ifdef __CUDA_ARCH__
  float& v = ref(int(threadIdx.x) % kWarp);
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
#else
  for (int q = 0; q < kWarp; q += 4) {
    const float s = (ref(q) + ref(q + 1)) + (ref(q + 2) + ref(q + 3));  // the device's order, for each lane
    for (int l = q; l < q + 4; ++l) ref(l) = s;
  }
#endif
}

// Max / sum over the whole warp, every lane getting the result (xor butterfly 16, 8, 4, 2, 1; the host
// version performs the same butterfly).
template <bool kMax, class F>
EO_HD void warp_allreduce(F&& ref) {
#ifdef __CUDA_ARCH__
  float& v = ref(int(threadIdx.x) % kWarp);
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) {
    const float u = __shfl_xor_sync(0xFFFFFFFFu, v, o);
    v = kMax ? fmaxf(v, u) : v + u;
  }
#else
  float v[kWarp], u[kWarp];
  for (int l = 0; l < kWarp; ++l) v[l] = ref(l);
  for (int o = 16; o >= 1; o /= 2) {
    for (int l = 0; l < kWarp; ++l) u[l] = kMax ? fmaxf(v[l], v[l ^ o]) : v[l] + v[l ^ o];
    for (int l = 0; l < kWarp; ++l) v[l] = u[l];
  }
  for (int l = 0; l < kWarp; ++l) ref(l) = v[l];
#endif
}

}  // namespace common_detail
}  // namespace efficient_ops
