// KV-cache compaction after speculative verification: the accepted path's keys and values move next to
// the prefix, in place, for every layer, batch row and KV head, in ONE launch.
// (compact_kv.h documents the arguments.)
//
// Kernel design
// -------------
// Grid: 1-D, 128-thread blocks = 4 warps, one warp per task; task = 2 * ((l * B + b) * Hkv + h) + {0: k,
// 1: v}, so adjacent warps move the k and v rows of the same (l, b, h). The moves of a path read and write
// the same rows (path [0, 2, 5]: slot 2 is read by move j = 1 and written by move j = 2), so the whole row
// set of one (tensor, l, b, h) belongs to one warp, and each lane owns a fixed, disjoint set of columns
// (16-byte chunks, or single elements on the scalar path) across all rows: lane x copies only its columns,
// for j = 1, 2, ... in increasing order. accepted[b] is strictly increasing with accepted[b, 0] = 0, so the
// source of move j is accepted[b, j] >= j, never the destination j' < j of an earlier move: in increasing
// order no move reads a slot that an earlier move overwrote, and a slot that a later move overwrites has
// already been read. Since no two lanes share a column, no barrier or atomic is needed, and the result does
// not depend on how the warps are scheduled. Plain (coherent) loads: the kernel reads what it writes.
// Bounds: prefix_len[b] outside [0, S_max) skips the row set (every destination is prefix_len[b] + j >=
// prefix_len[b]); a move with accepted[b, j] < 0 or a source or destination row >= S_max is skipped;
// accept_len[b] is clamped to [0, P - 1], so accepted is read only at [b, 1 .. P - 1].
// Loads and stores are 16 bytes when the tensor's base, its four strides and the row (D x elem_bytes) are
// multiples of 16 bytes; element-sized otherwise.
// The per-thread program (compact_thread) is __host__ __device__; tests/csrc/speculative_emulation.cu runs
// it for every thread of every block on the CPU under AddressSanitizer.

#include "compact_kv.h"

#include "../common/device_helpers.cuh"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <cuda_runtime.h>

namespace efficient_ops {
namespace compact_kv_detail {

constexpr int kThreads = 128;
constexpr int kWarp = 32;
constexpr int kTasksPerBlock = kThreads / kWarp;

struct Params {
  unsigned char* k;
  unsigned char* v;
  const int64_t* prefix_lens;
  const int64_t* accepted;
  const int64_t* accept_len;
  int64_t k_strides[4], v_strides[4];  // bytes
  int64_t accepted_stride;
  int64_t row_bytes;  // D * elem_bytes
  int64_t tasks;      // 2 * L * B * Hkv
  int L, B, Hkv, S_max, D, P, elem_bytes;
  bool k_vec, v_vec;
};

EO_HD int64_t ld_i64(const int64_t* p) {
#ifdef __CUDA_ARCH__
  return __ldg(reinterpret_cast<const long long*>(p));  // read-only for the whole kernel
#else
  return *p;
#endif
}

// `bytes` (16, 4 or 2) from src to dst, both aligned to it.
template <int kBytes>
EO_HD void copy_unit(unsigned char* dst, const unsigned char* src) {
#ifdef __CUDA_ARCH__
  if constexpr (kBytes == 16)
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  else if constexpr (kBytes == 4)
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
  else
    *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
#else
  if (reinterpret_cast<uintptr_t>(dst) % kBytes != 0 || reinterpret_cast<uintptr_t>(src) % kBytes != 0) {
    std::fprintf(stderr, "compact_kv emulation: misaligned %d-byte access\n", kBytes);
    std::abort();
  }
  std::memmove(dst, src, kBytes);
#endif
}

template <int kBytes>
EO_HD void copy_row(unsigned char* dst, const unsigned char* src, int64_t row_bytes, int lane) {
  for (int64_t u = lane; u < row_bytes / kBytes; u += kWarp) copy_unit<kBytes>(dst + u * kBytes, src + u * kBytes);
}

// Thread t of block `block`.
EO_HD void compact_thread(const Params& p, int64_t block, int t) {
  const int64_t task = block * kTasksPerBlock + t / kWarp;
  if (task >= p.tasks) return;
  const int lane = t % kWarp;
  const bool is_v = task & 1;
  const int64_t lbh = task >> 1;
  const int h = int(lbh % p.Hkv), b = int(lbh / p.Hkv % p.B), l = int(lbh / p.Hkv / p.B);
  const int64_t* st = is_v ? p.v_strides : p.k_strides;
  unsigned char* base = (is_v ? p.v : p.k) + l * st[0] + b * st[1] + h * st[2];
  const int64_t plen = ld_i64(p.prefix_lens + b);
  if (plen < 0 || plen >= p.S_max) return;
  const int64_t room = p.S_max - plen;  // rows prefix_len + x are in bounds for 0 <= x < room
  int64_t n = ld_i64(p.accept_len + b);
  n = n < 0 ? 0 : n > p.P - 1 ? p.P - 1 : n;
  const int64_t* acc = p.accepted + int64_t(b) * p.accepted_stride;
  const bool vec = is_v ? p.v_vec : p.k_vec;
  // Increasing j: every source (accepted[j] >= j) is read before any later move overwrites it.
  for (int64_t j = 1; j <= n; ++j) {
    const int64_t a = ld_i64(acc + j);
    if (a < 0 || a >= room || j >= room || a == j) continue;
    const unsigned char* src = base + (plen + a) * st[3];
    unsigned char* dst = base + (plen + j) * st[3];
    if (vec)
      copy_row<16>(dst, src, p.row_bytes, lane);
    else if (p.elem_bytes == 4)
      copy_row<4>(dst, src, p.row_bytes, lane);
    else
      copy_row<2>(dst, src, p.row_bytes, lane);
  }
}

#ifndef EFFICIENT_OPS_SPECULATIVE_HOST_ONLY
__global__ void __launch_bounds__(kThreads) compact_kv_kernel(const Params p) {
  compact_thread(p, int64_t(blockIdx.x), int(threadIdx.x));
}
#endif

inline Params make_params(const CompactKVArgs& a) {
  Params p{};
  p.k = static_cast<unsigned char*>(a.k_cache);
  p.v = static_cast<unsigned char*>(a.v_cache);
  p.prefix_lens = a.prefix_lens;
  p.accepted = a.accepted;
  p.accept_len = a.accept_len;
  bool k16 = reinterpret_cast<uintptr_t>(a.k_cache) % 16 == 0, v16 = reinterpret_cast<uintptr_t>(a.v_cache) % 16 == 0;
  for (int i = 0; i < 4; ++i) {
    p.k_strides[i] = a.k_strides[i] * a.elem_bytes;
    p.v_strides[i] = a.v_strides[i] * a.elem_bytes;
    k16 = k16 && p.k_strides[i] % 16 == 0;
    v16 = v16 && p.v_strides[i] % 16 == 0;
  }
  p.accepted_stride = a.accepted_batch_stride;
  p.row_bytes = a.D * a.elem_bytes;
  p.tasks = 2 * a.L * a.B * a.Hkv;
  p.L = int(a.L);
  p.B = int(a.B);
  p.Hkv = int(a.Hkv);
  p.S_max = int(a.S_max);
  p.D = int(a.D);
  p.P = int(a.P);
  p.elem_bytes = int(a.elem_bytes);
  p.k_vec = k16 && p.row_bytes % 16 == 0;
  p.v_vec = v16 && p.row_bytes % 16 == 0;
  return p;
}

inline int64_t blocks_for(const Params& p) { return (p.tasks + kTasksPerBlock - 1) / kTasksPerBlock; }

}  // namespace compact_kv_detail

namespace {

bool kv_strides_ok(const int64_t* s, const CompactKVArgs& a) {
  for (int i = 0; i < 4; ++i)
    if (s[i] < 0 || s[i] >= (int64_t(1) << 40)) return false;
  const double extent = double(a.L - 1) * double(s[0]) + double(a.B - 1) * double(s[1]) +
                        double(a.Hkv - 1) * double(s[2]) + double(a.S_max - 1) * double(s[3]) + double(a.D);
  return extent * double(a.elem_bytes) < 4.0e18;
}

}  // namespace

const char* compact_kv_check(const CompactKVArgs& a) {
  constexpr int64_t kMax = int64_t(1) << 30;
  if (a.elem_bytes != 2 && a.elem_bytes != 4) return "elem_bytes must be 2 or 4";
  if (a.L < 1 || a.L > kMax) return "L must be in [1, 2^30]";
  if (a.B < 1 || a.B > kMax) return "B must be in [1, 2^30]";
  if (a.Hkv < 1 || a.Hkv > kMax) return "Hkv must be in [1, 2^30]";
  if (a.S_max < 1 || a.S_max > kMax) return "S_max must be in [1, 2^30]";
  if (a.D < 1 || a.D > kMax) return "D must be in [1, 2^30]";
  if (a.P < 1 || a.P > kMax) return "P must be in [1, 2^30]";
  if (double(a.L) * double(a.B) * double(a.Hkv) >= double(int64_t(1) << 32))
    return "L * B * Hkv must be < 2^32 (one grid)";
  if (!kv_strides_ok(a.k_strides, a)) return "k_strides must be 4 values in [0, 2^40)";
  if (!kv_strides_ok(a.v_strides, a)) return "v_strides must be 4 values in [0, 2^40)";
  if (a.accepted_batch_stride < 0 || a.accepted_batch_stride >= (int64_t(1) << 40))
    return "accepted_batch_stride must be in [0, 2^40)";
  if (!a.k_cache || !a.v_cache) return "k_cache and v_cache must not be null";
  if (reinterpret_cast<uintptr_t>(a.k_cache) % uintptr_t(a.elem_bytes) != 0 ||
      reinterpret_cast<uintptr_t>(a.v_cache) % uintptr_t(a.elem_bytes) != 0)
    return "k_cache and v_cache must be aligned to elem_bytes";
  const auto bad_index_ptr = [](const int64_t* p) { return !p || reinterpret_cast<uintptr_t>(p) % 8 != 0; };
  if (bad_index_ptr(a.prefix_lens)) return "prefix_lens must be a non-null 8-byte aligned pointer";
  if (bad_index_ptr(a.accepted)) return "accepted must be a non-null 8-byte aligned pointer";
  if (bad_index_ptr(a.accept_len)) return "accept_len must be a non-null 8-byte aligned pointer";
  return nullptr;
}

#ifndef EFFICIENT_OPS_SPECULATIVE_HOST_ONLY
cudaError_t compact_kv(const CompactKVArgs& a, cudaStream_t stream) {
  using namespace compact_kv_detail;
  if (compact_kv_check(a) != nullptr) return cudaErrorInvalidValue;
  const Params p = make_params(a);
  compact_kv_kernel<<<unsigned(blocks_for(p)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace efficient_ops
