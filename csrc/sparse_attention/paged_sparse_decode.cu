// Sparse paged decode attention: one query token per (batch row, query head) attends to the KV pages its KV
// head selected (Quest / LServe-style page selection), flash-decoding split over the page list.
// (paged_sparse_decode.h documents the arguments; efficient_ops.reference is the specification.)
//
// Kernel design
// -------------
// Decode is memory bound: the cost is reading the selected K/V rows (tokens x D x 2 x 2 bytes per KV head),
// so every K/V row is read once and used by all G query heads of its KV head (GQA), and the page list is
// split over enough blocks to fill the GPU even at batch 1:
//
//   kernel 1, grid (1-D, split fastest): block = (b * Hkv + kvh) * num_splits + split; 128 threads.
//     split: page-list entries [split * pps, min((split + 1) * pps, n_sel)), pps = ceil(n_sel / num_splits),
//            laid end to end as slots (slot s = position s % page_size of page entry s / page_size) and
//            consumed in tiles of 64 slots (4 pages of 16 tokens, or one page of 64).
//     per tile: the K and V rows of the tile's valid slots go to shared memory with cp.async (16-byte
//            chunks; rows padded to D + 8 elements so that the score phase's per-row reads are free of bank
//            conflicts), double buffered: the next tile's copies are in flight during this tile's math. A slot
//            whose page index is outside [0, ceil(S_max / page_size)) (-1 = unused) or whose position is
//            >= clamp(seq_lens[b], 0, S_max) is never read, from global or from shared memory.
//       scores: thread (slot, head half) computes q_g . k_slot for GT / 2 heads from shared memory (q as
//            float32, read as broadcasts; k rows 16 bytes at a time), scaled to the log2 domain;
//       softmax: a warp per head (heads w, w + 4, ...): tile max and sum by warp butterflies, running max m,
//            sum l and the rescale factor alpha per head in shared memory;
//       P V: thread (8-column chunk of D, group of up to 4 heads, key part) rescales its float32 accumulators
//            by alpha and adds p * v over its key part's slots (o: up to 4 x 8 floats per thread).
//     end: the key parts are summed through shared memory; each head row of the split writes o / l (float32)
//            and lse = m + log2(l) to the workspace; an empty split (no entries, or none valid) writes o = 0
//            and lse = -inf, so the workspace needs no memset.
//   kernel 2 (same stream): one warp per output row merges the num_splits partials by log-sum-exp (weights
//     exp2(lse_s - max); a -inf split has weight 0 and is not read) and writes out rounded to the dtype;
//     a row with no key anywhere gets zeros.
// GT (G rounded up to 1, 2, 4, 8 or 16) is a template parameter: padding heads have q = 0 and are not stored.
// Fixed shapes, no host synchronisation, no workspace initialisation: CUDA-graph capturable.
// Numerics: float32 dot products, softmax and accumulation (CUDA cores, no rounding of P); one rounding of
// the output.
//
// Emulation: both block programs (decode_block, merge_block) are __host__ __device__ and written against the
// executor of csrc/common/block_exec.cuh (warp collectives: csrc/common/warp_mma.cuh; the merge of split
// partials: csrc/common/attention_tile.cuh, shared with csrc/speculative/tree_attention.cu);
// tests/csrc/sparse_attention_emulation.cu runs every block of both grids on the CPU under AddressSanitizer.

#include "paged_sparse_decode.h"

#include "../common/arg_checks.h"
#include "../common/attention_tile.cuh"
#include "../common/block_exec.cuh"
#include "../common/device_helpers.cuh"
#include "../common/warp_mma.cuh"

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace efficient_ops {
namespace paged_decode_detail {

using namespace common_detail;  // kWarp, Elem, cp.async, warp_allreduce, merge_partials, executors, cdiv, ...

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / kWarp;
using HostExec = HostBlockExec<kThreads>;  // the CPU emulation's executor

constexpr int kTile = 64;          // slots per tile
constexpr int kMinSplitTokens = 256;
constexpr int kBlocksPerSM = 2;    // resident decode blocks per SM at D = 128 (shared memory bound)
constexpr int kMergeRows = kWarps; // output rows per merge block (a warp each)

struct Params {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  const int64_t* seq_lens;
  const int32_t* pages;  // [B, Hkv, n_sel]
  float* ws_o;           // [splits][rows_total][D]
  float* ws_lse;         // [splits][rows_total]
  int64_t qs[2], ks[3], vs[3], os[2];
  int64_t rows_total;  // B * Hq; row b * Hq + h
  float scale_log2;    // scale * log2(e)
  int B, Hq, Hkv, G, S_max, page_size, n_sel, splits, pps, max_page;
  bool k_vec, v_vec;  // 16-byte loads: aligned base and strides a multiple of 8 elements
  bool out_vec2;      // 4-byte stores of element pairs
};

template <int D, int GT>
struct alignas(16) Smem {
  static constexpr int LD = D + 8;  // padded row (elements)
  union {
    struct {
      uint16_t k[2][kTile * LD];
      uint16_t v[2][kTile * LD];
    } kv;
    float red[8 * kThreads * 4];  // [key part][GT][D] partial outputs: at most 4096 floats
  } u;
  float qf[GT][D];      // query rows of the KV head, float32
  float sc[GT][kTile];  // scores, then probabilities, of the tile
  int key[2][kTile];    // position of each slot, -1 = skipped
  float m[GT], l[GT], alpha[GT];
};

template <int GT>
struct ThreadState {
  static constexpr int Gt = GT < 4 ? GT : 4;
  float o[Gt][8];  // P V accumulators: heads of this thread's group x 8 columns
  float t0, t1;    // softmax: per-lane values of the butterflies
  float alpha;
};

EO_HD float4 ld_shared_f4(const float* p) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const float4*>(p);
#else
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emulation_fail("misaligned float4 shared load");
  return make_float4(p[0], p[1], p[2], p[3]);
#endif
}

EO_HD void syncwarp() {
#ifdef __CUDA_ARCH__
  __syncwarp();
#endif
}

// ---- the decode block program -------------------------------------------------------------------------

template <int D, bool kBF16, int GT, class Exec>
EO_HD void decode_block(const Params& p, int64_t block, Smem<D, GT>& s, const Exec& ex) {
  using E = Elem<kBF16>;
  constexpr int LD = Smem<D, GT>::LD, CH = D / 8;
  constexpr int GH = GT >= 2 ? GT / 2 : 1;  // score phase: heads per thread (two head halves)
  constexpr int Gt = ThreadState<GT>::Gt;   // P V phase: heads per thread
  constexpr int HG = GT / Gt;               // P V phase: head groups
  constexpr int KP = kThreads / (CH * HG);  // P V phase: key parts
  static_assert(KP * CH * HG == kThreads && KP >= 1, "P V thread layout");
  static_assert(KP * GT * D <= int(sizeof(s.u.red) / sizeof(float)), "reduction buffer");

  const int split = int(block % p.splits);
  const int64_t bh = block / p.splits;
  const int kvh = int(bh % p.Hkv), b = int(bh / p.Hkv);
  int64_t seq = ld_i64(p.seq_lens + b);
  seq = seq < 0 ? 0 : seq > p.S_max ? p.S_max : seq;
  const int64_t e0 = int64_t(split) * p.pps;
  const int64_t e1 = e0 + p.pps < p.n_sel ? e0 + p.pps : p.n_sel;
  const int64_t slots = e1 > e0 ? (e1 - e0) * p.page_size : 0;
  const int n_tiles = int((slots + kTile - 1) / kTile);
  const int32_t* plist = slots > 0 ? p.pages + bh * p.n_sel + e0 : nullptr;  // (never null + offset)

  // Position of slot r of tile `tile`, or -1 (page outside [0, max_page), or position >= seq).
  const auto slot_pos = [&](int tile, int r) -> int {
    const int64_t sl = int64_t(tile) * kTile + r;
    if (sl >= slots) return -1;
    const int pg = ld_i32(plist + sl / p.page_size);
    if (pg < 0 || pg >= p.max_page) return -1;
    const int pos = pg * p.page_size + int(sl % p.page_size);
    return pos < seq ? pos : -1;
  };

  typename Exec::template PerThread<ThreadState<GT>> st;
  ex.each([&](int t) {
    ThreadState<GT>& my = st[t];
#pragma unroll
    for (int j = 0; j < Gt; ++j)
#pragma unroll
      for (int e = 0; e < 8; ++e) my.o[j][e] = 0.f;
    if (t < GT) s.m[t] = -INFINITY, s.l[t] = 0.f;
  });

  if (n_tiles > 0) {
    // The G query rows of this KV head as float32 (padding heads: zeros).
    const uint16_t* qb = p.q + int64_t(b) * p.qs[0] + int64_t(kvh) * p.G * p.qs[1];
    ex.each([&](int t) {
      for (int i = t; i < GT * D; i += kThreads) {
        const int g = i / D, d = i % D;
        s.qf[g][d] = g < p.G ? E::to_float(load_u16(qb + int64_t(g) * p.qs[1] + d)) : 0.f;
      }
    });
    const uint16_t* kb = p.k + int64_t(b) * p.ks[0] + int64_t(kvh) * p.ks[1];
    const uint16_t* vb = p.v + int64_t(b) * p.vs[0] + int64_t(kvh) * p.vs[1];
    const auto load_kv = [&](int it) {
      const int buf = it & 1;
      ex.each([&](int t) {
#pragma unroll
        for (int u = 0; u < kTile * CH / kThreads; ++u) {
          const int c = t + u * kThreads, r = c / CH, ch = c % CH;
          const int pos = slot_pos(it, r);
          if (pos >= 0) {
            uint16_t* kd = s.u.kv.k[buf] + r * LD + ch * 8;
            uint16_t* vd = s.u.kv.v[buf] + r * LD + ch * 8;
            copy_chunk16(kd, kb + int64_t(pos) * p.ks[2] + ch * 8, p.k_vec);
            copy_chunk16(vd, vb + int64_t(pos) * p.vs[2] + ch * 8, p.v_vec);
          }
          if (ch == 0) s.key[buf][r] = pos;
        }
        cp_async_commit();
      });
    };
    load_kv(0);

    for (int it = 0; it < n_tiles; ++it) {
      next_kv_tile(ex, it, n_tiles, load_kv);
      const int buf = it & 1;
      const uint16_t* kt = s.u.kv.k[buf];
      const uint16_t* vt = s.u.kv.v[buf];
      const int* keys = s.key[buf];

      // Scores (log2 domain) of the tile: thread (slot, head half).
      ex.each([&](int t) {
        const int slot = t % kTile, g0 = (t / kTile) * GH;
        if (g0 >= GT) return;  // GT = 1: the second half idles
        if (keys[slot] < 0) {
#pragma unroll
          for (int j = 0; j < GH; ++j) s.sc[g0 + j][slot] = -INFINITY;
          return;
        }
        float acc[GH];
#pragma unroll
        for (int j = 0; j < GH; ++j) acc[j] = 0.f;
        const uint16_t* krow = kt + slot * LD;
#pragma unroll 4
        for (int c = 0; c < CH; ++c) {
          float kf[8];
          unpack8<kBF16>(ld_shared_u128(krow + 8 * c), kf);
#pragma unroll
          for (int j = 0; j < GH; ++j) {
            const float4 qa = ld_shared_f4(&s.qf[g0 + j][8 * c]);
            const float4 qc = ld_shared_f4(&s.qf[g0 + j][8 * c + 4]);
            float a = acc[j];
            a = fmaf(qa.x, kf[0], a);
            a = fmaf(qa.y, kf[1], a);
            a = fmaf(qa.z, kf[2], a);
            a = fmaf(qa.w, kf[3], a);
            a = fmaf(qc.x, kf[4], a);
            a = fmaf(qc.y, kf[5], a);
            a = fmaf(qc.z, kf[6], a);
            a = fmaf(qc.w, kf[7], a);
            acc[j] = a;
          }
        }
#pragma unroll
        for (int j = 0; j < GH; ++j) s.sc[g0 + j][slot] = acc[j] * p.scale_log2;
      });
      ex.sync();

      // Online softmax, a warp per head: P = exp2(S - m_new), running m and l, alpha = exp2(m_old - m_new).
      ex.warp([&](int w) {
        for (int g = w; g < GT; g += kWarps) {
          const auto lane = [&](int l) -> ThreadState<GT>& { return st[w * kWarp + l]; };
          for_lanes([&](int l) { lane(l).t0 = fmaxf(s.sc[g][l], s.sc[g][l + kWarp]); });
          warp_allreduce<true>([&](int l) -> float& { return lane(l).t0; });
          for_lanes([&](int l) {
            ThreadState<GT>& my = lane(l);
            const float m_old = s.m[g];
            const float m_new = fmaxf(m_old, my.t0);
            const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no key yet: all P = 0
            const float p0 = exp2f(s.sc[g][l] - m_use), p1 = exp2f(s.sc[g][l + kWarp] - m_use);
            s.sc[g][l] = p0;
            s.sc[g][l + kWarp] = p1;
            my.t1 = p0 + p1;
            my.alpha = exp2f(m_old - m_use);  // 0 while m_old = -inf
            my.t0 = m_new;
          });
          warp_allreduce<false>([&](int l) -> float& { return lane(l).t1; });
          syncwarp();  // every lane has read s.m[g] before lane 0 replaces it
          for_lanes([&](int l) {
            if (l == 0) {
              const ThreadState<GT>& my = lane(l);
              s.l[g] = s.l[g] * my.alpha + my.t1;
              s.m[g] = my.t0;
              s.alpha[g] = my.alpha;
            }
          });
          syncwarp();
        }
      });
      ex.sync();

      // O = alpha O + P V: thread (column chunk c, head group hg, key part kp).
      ex.each([&](int t) {
        ThreadState<GT>& my = st[t];
        const int c = t % CH, hg = (t / CH) % HG, kp = t / (CH * HG);
#pragma unroll
        for (int j = 0; j < Gt; ++j) {
          const float a = s.alpha[hg * Gt + j];
#pragma unroll
          for (int e = 0; e < 8; ++e) my.o[j][e] *= a;
        }
        for (int slot = kp; slot < kTile; slot += KP) {
          if (keys[slot] < 0) continue;
          float vf[8];
          unpack8<kBF16>(ld_shared_u128(vt + slot * LD + 8 * c), vf);
#pragma unroll
          for (int j = 0; j < Gt; ++j) {
            const float pv = s.sc[hg * Gt + j][slot];
#pragma unroll
            for (int e = 0; e < 8; ++e) my.o[j][e] = fmaf(pv, vf[e], my.o[j][e]);
          }
        }
      });
      ex.sync();  // the buffers of this tile may be refilled next iteration (and, after the last, reused)
    }
  }

  // Sum the key parts through shared memory; write o / l and lse per head row of this split.
  ex.each([&](int t) {
    const ThreadState<GT>& my = st[t];
    const int c = t % CH, hg = (t / CH) % HG, kp = t / (CH * HG);
#pragma unroll
    for (int j = 0; j < Gt; ++j) {
      float* dst = s.u.red + (kp * GT + hg * Gt + j) * D + 8 * c;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = my.o[j][e];
    }
  });
  ex.sync();
  const int64_t row0 = int64_t(b) * p.Hq + int64_t(kvh) * p.G;
  float* ws_o = p.ws_o + (int64_t(split) * p.rows_total + row0) * D;
  float* ws_l = p.ws_lse + int64_t(split) * p.rows_total + row0;
  ex.each([&](int t) {
    for (int i = t; i < p.G * D; i += kThreads) {
      const int g = i / D, d = i % D;
      float sum = 0.f;
#pragma unroll
      for (int kp = 0; kp < KP; ++kp) sum += s.u.red[(kp * GT + g) * D + d];
      const float l = s.l[g];
      ws_o[i] = l > 0.f ? sum * (1.f / l) : 0.f;
      if (d == 0) ws_l[g] = l > 0.f ? s.m[g] + log2f(l) : -INFINITY;
    }
  });
}

// ---- the merge block program: one warp per output row ------------------------------------------------

template <int D, bool kBF16, class Exec>
EO_HD void merge_block(const Params& p, int64_t block, const Exec& ex) {
  // num_splits partials; an empty split (lse = -inf) is skipped, its o not read.
  merge_partials<D, kBF16, EmptyPartial::kNegInfLse>(
      p, ex, block, kMergeRows, p.splits, [&](int64_t row) {
        const int h = int(row % p.Hq), b = int(row / p.Hq);
        return p.out + int64_t(b) * p.os[0] + int64_t(h) * p.os[1];
      });
}

#ifndef EFFICIENT_OPS_SPARSE_ATTENTION_HOST_ONLY
extern __shared__ __align__(16) unsigned char paged_sparse_decode_smem[];

template <int D, bool kBF16, int GT>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) paged_sparse_decode_kernel(const Params p) {
  decode_block<D, kBF16, GT>(p, int64_t(blockIdx.x), *reinterpret_cast<Smem<D, GT>*>(paged_sparse_decode_smem),
                             DeviceExec{});
}

template <int D, bool kBF16>
__global__ void __launch_bounds__(kThreads) paged_sparse_decode_merge_kernel(const Params p) {
  merge_block<D, kBF16>(p, int64_t(blockIdx.x), DeviceExec{});
}
#endif

// ---- host-side preparation, shared by the launcher and the CPU emulation -----------------------

// Workspace for every (batch row, query head, split).
inline PartialsLayout workspace_layout(int64_t B, int64_t Hq, int64_t D, int64_t splits) {
  return partials_layout(B * Hq * splits, D);
}

inline Params make_params(const PagedSparseDecodeArgs& a) {
  Params p{};
  p.q = static_cast<const uint16_t*>(a.q);
  p.k = static_cast<const uint16_t*>(a.k_cache);
  p.v = static_cast<const uint16_t*>(a.v_cache);
  p.out = static_cast<uint16_t*>(a.out);
  p.seq_lens = a.seq_lens;
  p.pages = a.page_indices;
  const PartialsLayout W = workspace_layout(a.B, a.Hq, a.D, a.num_splits);
  p.ws_o = static_cast<float*>(a.workspace);
  p.ws_lse = reinterpret_cast<float*>(static_cast<char*>(a.workspace) + W.lse_offset);
  for (int i = 0; i < 3; ++i) p.ks[i] = a.k_strides[i], p.vs[i] = a.v_strides[i];
  for (int i = 0; i < 2; ++i) p.qs[i] = a.q_strides[i], p.os[i] = a.out_strides[i];
  p.rows_total = a.B * a.Hq;
  p.scale_log2 = a.scale * kLog2e;
  p.B = int(a.B);
  p.Hq = int(a.Hq);
  p.Hkv = int(a.Hkv);
  p.G = int(a.Hq / a.Hkv);
  p.S_max = int(a.S_max);
  p.page_size = int(a.page_size);
  p.n_sel = int(a.n_sel);
  p.splits = int(a.num_splits);
  p.pps = int(a.n_sel > 0 ? cdiv(a.n_sel, a.num_splits) : 0);
  p.max_page = int(cdiv(a.S_max, a.page_size));
  p.k_vec = !misaligned(a.k_cache, 16) && strides_multiple_of(a.k_strides, 3, 8);
  p.v_vec = !misaligned(a.v_cache, 16) && strides_multiple_of(a.v_strides, 3, 8);
  p.out_vec2 = !misaligned(a.out, 4) && strides_multiple_of(a.out_strides, 2, 2);
  return p;
}

inline int64_t decode_blocks(const PagedSparseDecodeArgs& a) { return a.B * a.Hkv * a.num_splits; }
inline int64_t merge_blocks(const PagedSparseDecodeArgs& a) { return cdiv(a.B * a.Hq, kMergeRows); }

// Calls fn(std::integral_constant<int, D>, std::bool_constant<bf16>, std::integral_constant<int, GT>).
template <class Fn>
cudaError_t dispatch(const PagedSparseDecodeArgs& a, Fn&& fn) {
  const int64_t G = a.Hq / a.Hkv;
  const auto by_g = [&](auto d, auto bf16) {
    if (G <= 1) return fn(d, bf16, std::integral_constant<int, 1>{});
    if (G <= 2) return fn(d, bf16, std::integral_constant<int, 2>{});
    if (G <= 4) return fn(d, bf16, std::integral_constant<int, 4>{});
    if (G <= 8) return fn(d, bf16, std::integral_constant<int, 8>{});
    return fn(d, bf16, std::integral_constant<int, 16>{});
  };
  const auto by_d = [&](auto bf16) {
    if (a.D == 64) return by_g(std::integral_constant<int, 64>{}, bf16);
    return by_g(std::integral_constant<int, 128>{}, bf16);
  };
  return a.dtype == DType::kBFloat16 ? by_d(std::true_type{}) : by_d(std::false_type{});
}

}  // namespace paged_decode_detail

int64_t paged_sparse_decode_num_splits(int64_t B, int64_t Hkv, int64_t n_sel, int64_t page_size, int64_t sm_count) {
  using namespace paged_decode_detail;
  if (B < 1 || Hkv < 1 || n_sel < 1 || B > kPagedSparseDecodeMaxDim || Hkv > kPagedSparseDecodeMaxDim ||
      n_sel > kPagedSparseDecodeMaxSel || (page_size != 16 && page_size != 64))
    return 1;
  const int64_t target = 2 * kBlocksPerSM * (sm_count > 0 ? sm_count : 1);  // two waves
  int64_t splits = cdiv(target, B * Hkv);
  const int64_t by_tokens = n_sel * page_size / kMinSplitTokens;  // each split >= kMinSplitTokens tokens
  if (splits > by_tokens) splits = by_tokens;
  if (splits > n_sel) splits = n_sel;
  if (splits > kPagedSparseDecodeMaxSplits) splits = kPagedSparseDecodeMaxSplits;
  return splits < 1 ? 1 : splits;
}

int64_t paged_sparse_decode_workspace_bytes(int64_t B, int64_t Hq, int64_t D, int64_t num_splits) {
  if (B < 1 || B > kPagedSparseDecodeMaxDim || Hq < 1 || Hq > kPagedSparseDecodeMaxDim || (D != 64 && D != 128) ||
      num_splits < 1 || num_splits > kPagedSparseDecodeMaxSplits)
    return -1;
  if (B * Hq >= (int64_t(1) << 36)) return -1;  // rows x splits x D x 4 bytes stays far below 2^63
  return paged_decode_detail::workspace_layout(B, Hq, D, num_splits).bytes;
}

const char* paged_sparse_decode_check(const PagedSparseDecodeArgs& a) {
  using namespace paged_decode_detail;
  constexpr int64_t kMax = kPagedSparseDecodeMaxDim;
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return "dtype must be float16 or bfloat16";
  if (a.B < 1 || a.B > kMax) return "B must be in [1, 2^30]";
  if (a.Hq < 1 || a.Hq > kMax) return "Hq must be in [1, 2^30]";
  if (a.Hkv < 1 || a.Hkv > a.Hq || a.Hq % a.Hkv != 0) return "Hkv must be >= 1 and divide Hq";
  if (a.Hq / a.Hkv > kPagedSparseDecodeMaxG) return "Hkv must be >= Hq / 16 (at most 16 query heads per KV head)";
  if (a.D != 64 && a.D != 128) return "D must be 64 or 128";
  if (a.S_max < 0 || a.S_max > kMax) return "S_max must be in [0, 2^30]";
  if (a.page_size != 16 && a.page_size != 64) return "page_size must be 16 or 64";
  if (a.n_sel < 0 || a.n_sel > kPagedSparseDecodeMaxSel) return "n_sel must be in [0, 2^24]";
  if (a.num_splits < 1 || a.num_splits > kPagedSparseDecodeMaxSplits) return "num_splits must be in 1..1024";
  if (a.B * a.Hq >= (int64_t(1) << 36)) return "B * Hq must be < 2^36";
  const int64_t q_sizes[2] = {a.B, a.Hq}, kv_sizes[3] = {a.B, a.Hkv, a.S_max};
  if (!strides_ok(a.q_strides, q_sizes, 2, a.D)) return "q_strides must be 2 values in [0, 2^40)";
  if (!strides_ok(a.k_strides, kv_sizes, 3, a.D)) return "k_strides must be 3 values in [0, 2^40)";
  if (!strides_ok(a.v_strides, kv_sizes, 3, a.D)) return "v_strides must be 3 values in [0, 2^40)";
  if (!strides_ok(a.out_strides, q_sizes, 2, a.D)) return "out_strides must be 2 values in [0, 2^40)";
  if (!std::isfinite(a.scale)) return "scale must be finite";
  if (!a.q || !a.k_cache || !a.v_cache || !a.out) return "q, k_cache, v_cache and out must not be null";
  if (misaligned(a.q, 2) || misaligned(a.k_cache, 2) || misaligned(a.v_cache, 2) || misaligned(a.out, 2))
    return "q, k_cache, v_cache and out must be 2-byte aligned";
  if (!a.seq_lens || misaligned(a.seq_lens, 8)) return "seq_lens must be a non-null 8-byte aligned pointer";
  if (misaligned(a.page_indices, 4) || (a.n_sel > 0 && !a.page_indices))
    return "page_indices must be a non-null 4-byte aligned pointer";
  if (!a.workspace || misaligned(a.workspace, 16)) return "workspace must be a non-null 16-byte aligned pointer";
  if (decode_blocks(a) >= (int64_t(1) << 31) - 1 || merge_blocks(a) >= (int64_t(1) << 31) - 1)
    return "problem too large for one grid (B, Hq, num_splits)";
  return nullptr;
}

#ifndef EFFICIENT_OPS_SPARSE_ATTENTION_HOST_ONLY
cudaError_t paged_sparse_decode(const PagedSparseDecodeArgs& a, cudaStream_t stream) {
  using namespace paged_decode_detail;
  if (paged_sparse_decode_check(a) != nullptr) return cudaErrorInvalidValue;
  const Params p = make_params(a);
  return dispatch(a, [&](auto d, auto bf16, auto gt) {
    constexpr int kD = decltype(d)::value;
    constexpr bool kBF = decltype(bf16)::value;
    constexpr int kGT = decltype(gt)::value;
    const int smem = int(sizeof(Smem<kD, kGT>));
    cudaError_t err = cudaFuncSetAttribute(paged_sparse_decode_kernel<kD, kBF, kGT>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    paged_sparse_decode_kernel<kD, kBF, kGT><<<unsigned(decode_blocks(a)), kThreads, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    paged_sparse_decode_merge_kernel<kD, kBF><<<unsigned(merge_blocks(a)), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}
#endif

}  // namespace efficient_ops
