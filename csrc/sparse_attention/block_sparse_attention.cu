// Block-sparse prefill attention over a FlexAttention-layout block mask (kv_num_blocks, kv_indices).
// (block_sparse_attention.h documents the arguments; efficient_ops.reference is the specification.)
//
// Kernel design (FlashAttention-2 style, mma.sync m16n8k16, sm_80+)
// ------------------------------------------------------------------
// One block of 128 threads (4 warps) owns RM = min(block_m, 64) query rows of one query block m of one
// (b, h): a query block of 128 rows takes two blocks, smaller query blocks one. Each warp owns 16 query rows
// (row group rg = w % RG, RG = RM / 16) and a slice of the key tile (key split w / RG of KS = 4 / RG), so all
// four warps stay busy for any block_m: block_m >= 64 gives 4 row groups x the full 64-key tile, block_m = 32
// 2 row groups x 32-key halves, block_m = 16 one row group x 16-key quarters. Warps that split the keys merge
// their (m, l, o) through shared memory at the end (log-sum-exp weights), which is also where the output is
// staged for 16-byte stores.
//
// The key loop walks only this query block's index list: the n = clamp(kv_num_blocks, 0, Nk) selected key
// blocks are laid end to end as n * block_n "slots" (slot s = key s % block_n of block kv_indices[s / block_n])
// and consumed in tiles of 64 slots: one tile holds four 16-key blocks, two 32-key blocks, one 64-key block
// or half a 128-key block. Work is proportional to the selected blocks. Per tile:
//   * K and V rows of the slots go to shared memory with cp.async (16-byte chunks, XOR-swizzled rows so that
//     ldmatrix is free of bank conflicts), double buffered: the next tile's copies overlap this tile's math.
//     A slot whose index is outside [0, Nk), whose key is >= Skv, or (causal) whose key lies after the last
//     row of the block is never read from global memory; its shared row is zero-filled and its key is -1.
//     The slot's key and, per 16-slot group, the smallest valid key go to shared memory with the tile.
//   * S = Q K^T (Q stays in shared memory; A fragments by ldmatrix; K fragments by ldmatrix), skipping
//     16-slot groups with no key this warp may see (all invalid, or causally after the warp's last row):
//     fully masked causal blocks cost no tensor-core work.
//   * Mask per element (slot key -1, or causal key > i + Skv - Sq), online softmax in the log2 domain
//     (exp2f of scale * log2(e) * q.k), P rounded to the dtype and reused in registers as the A operand of
//     O += P V (V fragments by ldmatrix.trans).
// Finally o / l is written rounded to the dtype and lse = ln(2) * (m + log2(l)); a row without keys gets
// o = 0 and lse = -inf (l = 0; no 0 / 0). Blocks are launched heaviest-first within a head (query blocks in
// decreasing m: under a causal mask the late query blocks have the most keys), and all query blocks of one
// (b, h) are adjacent, so the blocks sharing K/V rows run together and share them through L2.
// Shared memory: Q 64 x D, K and V 2 x 64 x D each (16 + 64 KB at D = 128: two blocks per SM; 40 KB at 64).
//
// Numerics: float32 scores and accumulators; P rounded to the dtype before P V (as FlashAttention); one
// rounding of the output.
//
// Emulation: the block program (attention_block) is __host__ __device__ and written against an executor
// (csrc/common/block_exec.cuh): block-wide phases (ex.each), barriers (ex.sync) and warp phases (ex.warp)
// whose per-lane code runs in for_lanes, with the warp collectives (ldmatrix, mma.sync, quad shuffles;
// csrc/common/warp_mma.cuh) emulated from their PTX fragment layouts; the per-warp tile steps (S = Q K^T,
// online softmax, P V) are those of csrc/common/attention_tile.cuh. tests/csrc/sparse_attention_emulation.cu
// runs every block of the grid on the CPU under AddressSanitizer.
//
// What a Hopper-native (sm_90a) version would add: TMA loads of the K/V tiles (a producer warp issues one
// bulk tensor copy per 16..128-key block straight from kv_indices, mbarrier completion, hardware swizzle; the
// gather by index list maps onto per-block TMA boxes); wgmma m64nNk16 for S = Q K^T and O += P V with Q and
// K/V read directly from shared memory and accumulators in registers, issued asynchronously so that one
// tile's softmax overlaps the next tile's GEMMs; warp specialisation (one producer warp group with
// setmaxnreg-reduced registers, two consumer warp groups of 64 query rows each) and FA3-style ping-pong
// scheduling between the consumer groups so that one group's softmax (MUFU exp2) hides under the other's
// wgmma; a 3-4 stage K/V pipeline; 128-row query tiles; and TMA multicast of a K/V block to the CTAs of a
// cluster whose query blocks select it. The mma.sync version runs on sm_80+ (sm_90a included) unchanged.

#include "block_sparse_attention.h"

#include "../common/arg_checks.h"
#include "../common/attention_tile.cuh"
#include "../common/block_exec.cuh"
#include "../common/device_helpers.cuh"
#include "../common/warp_mma.cuh"

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace efficient_ops {
namespace block_sparse_detail {

using namespace common_detail;  // kWarp, Elem, cp.async, warp_qk / warp_pv, swz, executors, cdiv, ...

constexpr int kThreads = 128;  // 4 warps per block
constexpr int kWarps = kThreads / kWarp;
using HostExec = HostBlockExec<kThreads>;  // the CPU emulation's executor

constexpr int kBN = 64;        // slots (keys) per tile
constexpr int kRowsMax = 64;   // query rows per block
constexpr int kGroups = kBN / 16;
constexpr int kBlocksPerSM = 2;  // resident blocks per SM (shared memory bound at D = 128)
constexpr int kNoKey = INT_MAX;  // grp_min of a 16-slot group without a valid key

struct Params {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* lse;  // nullptr: not wanted
  const int32_t* num_blocks;
  const int32_t* indices;
  int64_t qs[3], ks[3], vs[3], os[3];
  int64_t nbs[2], ids[3];
  float scale_log2;  // scale * log2(e)
  int B, Hq, Hkv, G, Sq, Skv, block_m, block_n, Mq, Nk;
  int chunks;      // blocks per query block: ceil(block_m / 64)
  int causal_off;  // Skv - Sq
  bool causal;
  bool q_vec, k_vec, v_vec;  // 16-byte loads: aligned base and strides a multiple of 8 elements
  bool out_vec;              // 16-byte stores
};

template <int D>
struct alignas(16) Smem {
  uint16_t q[kRowsMax * D];  // query rows, swizzled
  union {
    struct {
      uint16_t k[2][kBN * D];  // key tiles, double buffered, swizzled
      uint16_t v[2][kBN * D];  // value tiles
    } kv;
    struct {
      float o[kRowsMax * D];  // [key split][row of the row group range][D]: unnormalised partial outputs
      float m[kRowsMax];      // their running max (log2 domain)
      float l[kRowsMax];      // and sums
    } red;
  } u;
  int key[2][kBN];          // key of each slot of the tile, -1 = masked for every row
  int grp_min[2][kGroups];  // smallest valid key of each 16-slot group (kNoKey: none)
};

template <int D, int KW>
struct ThreadState {
  uint4 qa;              // Q A-fragment of the current k-step
  uint4 frag;            // ldmatrix result
  float sc[KW / 8][4];   // scores / probabilities of this warp's key slice: n-tile x C-fragment
  float o[D / 8][4];     // output accumulator: d n-tile x C-fragment
  float m[2], l[2];      // running max (log2 domain) and this lane's partial sum, rows g and g + 8
  float mt[2];           // the tile's row max
};

// ---- the attention block program -------------------------------------------------------------------
// RG = row groups of 16 rows (1, 2 or 4); KS = 4 / RG warps split each key tile; KW = 64 / KS keys each.

template <int D, bool kBF16, int RG, class Exec>
EO_HD void attention_block(const Params& p, int64_t block, Smem<D>& s, const Exec& ex) {
  constexpr int KS = kWarps / RG, KW = kBN / KS, RM = 16 * RG, CH = D / 8;
  const int chunk = int(block % p.chunks);
  int64_t rest = block / p.chunks;
  const int m = p.Mq - 1 - int(rest % p.Mq);  // heaviest (latest) query blocks first
  rest /= p.Mq;
  const int h = int(rest % p.Hq), b = int(rest / p.Hq);
  const int q0 = m * p.block_m + chunk * RM;
  if (q0 >= p.Sq) return;  // the second half of a 128-row query block past Sq
  const int rows = p.Sq - q0 < RM ? p.Sq - q0 : RM;
  const int kvh = h / p.G;

  // This query block's index list (clamped length; entries are checked when read).
  int nb = ld_i32(p.num_blocks + int64_t(b) * p.nbs[0] + int64_t(h) * p.nbs[1] + m);
  nb = nb < 0 ? 0 : nb > p.Nk ? p.Nk : nb;
  const int64_t slots = int64_t(nb) * p.block_n;
  const int32_t* idx =  // (never null + offset: kv_indices may be null when Nk == 0)
      slots > 0 ? p.indices + int64_t(b) * p.ids[0] + int64_t(h) * p.ids[1] + int64_t(m) * p.ids[2] : nullptr;
  const int n_tiles = int((slots + kBN - 1) / kBN);
  // Keys after lim_block are masked for every row of this block (causal), so never read.
  const int lim_block = p.causal ? q0 + rows - 1 + p.causal_off : INT_MAX - 1;

  // Key of slot r of tile `tile`, or -1 (index outside [0, Nk), key >= Skv, or after lim_block).
  const auto slot_key = [&](int tile, int r) -> int {
    const int64_t sl = int64_t(tile) * kBN + r;
    if (sl >= slots) return -1;
    const int blk = ld_i32(idx + sl / p.block_n);
    if (blk < 0 || blk >= p.Nk) return -1;
    const int key = blk * p.block_n + int(sl % p.block_n);
    return key < p.Skv && key <= lim_block ? key : -1;
  };

  typename Exec::template PerThread<ThreadState<D, KW>> st;
  const auto idle = [&](int w) { return 16 * (w % RG) >= rows; };  // all 16 rows of the warp are padding
  ex.warp([&](int w) { init_row_state<D>([&](int l) -> ThreadState<D, KW>& { return st[w * kWarp + l]; }); });

  if (n_tiles > 0) {
    // Q rows q0 .. q0 + RM - 1 (rows >= `rows` zero-filled), then the first K/V tile.
    const uint16_t* qb = p.q + int64_t(b) * p.qs[0] + int64_t(h) * p.qs[1];
    ex.each([&](int t) {
      for (int c = t; c < RM * CH; c += kThreads) {
        const int r = c / CH, ch = c % CH;
        uint16_t* dst = s.q + swz<D>(r, ch);
        if (r < rows) {
          copy_chunk16(dst, qb + int64_t(q0 + r) * p.qs[2] + ch * 8, p.q_vec);
        } else {
          st_shared_u128(dst, make_uint4(0u, 0u, 0u, 0u));
        }
      }
      cp_async_commit();
    });
    const uint16_t* kb = p.k + int64_t(b) * p.ks[0] + int64_t(kvh) * p.ks[1];
    const uint16_t* vb = p.v + int64_t(b) * p.vs[0] + int64_t(kvh) * p.vs[1];
    const auto load_kv = [&](int it) {
      const int buf = it & 1;
      ex.each([&](int t) {
#pragma unroll
        for (int u = 0; u < kBN * CH / kThreads; ++u) {
          const int c = t + u * kThreads, r = c / CH, ch = c % CH;
          const int key = slot_key(it, r);
          uint16_t* kd = s.u.kv.k[buf] + swz<D>(r, ch);
          uint16_t* vd = s.u.kv.v[buf] + swz<D>(r, ch);
          if (key >= 0) {
            copy_chunk16(kd, kb + int64_t(key) * p.ks[2] + ch * 8, p.k_vec);
            copy_chunk16(vd, vb + int64_t(key) * p.vs[2] + ch * 8, p.v_vec);
          } else {  // zeros: a masked score times a zero V row, never NaN
            st_shared_u128(kd, make_uint4(0u, 0u, 0u, 0u));
            st_shared_u128(vd, make_uint4(0u, 0u, 0u, 0u));
          }
          if (ch == 0) s.key[buf][r] = key;
        }
        if (t < kGroups) {
          int lo = kNoKey;
          for (int r = 16 * t; r < 16 * t + 16; ++r) {
            const int key = slot_key(it, r);
            if (key >= 0 && key < lo) lo = key;
          }
          s.grp_min[buf][t] = lo;
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
      ex.warp([&](int w) {
        if (idle(w)) return;
        const int rb = 16 * (w % RG);          // first row (in the block) of this warp
        const int kofs = KW * (w / RG);        // first slot of this warp's key slice
        const int wlim = p.causal ? q0 + rb + 15 + p.causal_off : INT_MAX - 1;  // keys after: masked for the warp
        bool act[KW / 16];
        bool any = false;
#pragma unroll
        for (int np = 0; np < KW / 16; ++np) {
          const int lo = s.grp_min[buf][kofs / 16 + np];
          act[np] = lo != kNoKey && lo <= wlim;
          any = any || act[np];
        }
        if (!any) return;  // every score of the slice is masked: the state is unchanged
        const auto lane_state = [&](int l) -> ThreadState<D, KW>& { return st[w * kWarp + l]; };
        const auto active = [&](int np) { return act[np]; };
        // S = Q K^T over the active 16-slot groups.
        warp_qk<D, KW / 16, kBF16, false>(lane_state, s.q, rb, kt, kofs, active);
        // Mask (slot key -1, or causally after the row), scale to the log2 domain, row max of the slice.
        mask_scale_rowmax<KW / 16>(lane_state, p.scale_log2, [&](int l, int hh, int col) {
          const int i = q0 + rb + l / 4 + 8 * hh;  // query row (padding rows >= Sq: harmless, never stored)
          const int lim = p.causal ? i + p.causal_off : INT_MAX - 1;
          const int key = keys[kofs + col];
          return key >= 0 && key <= lim;  // inactive groups: every key > wlim >= lim, or -1
        });
        online_softmax<D, KW / 16>(lane_state);  // P = exp2(S - m), running state rescaled
        warp_pv<D, KW / 16, kBF16, false>(lane_state, vt, kofs, active);  // O += P V (P = 0 elsewhere)
      });
      ex.sync();  // the buffers of this tile may be refilled next iteration (and, after the last, reused)
    }
  }

  // Partial states of the key splits -> shared memory (the K/V buffers are free: the loop ended on a barrier).
  ex.warp([&](int w) {
    if (idle(w)) return;
    const int rb = 16 * (w % RG), split = w / RG;
    quad_sum([&](int l) -> float& { return st[w * kWarp + l].l[0]; });
    quad_sum([&](int l) -> float& { return st[w * kWarp + l].l[1]; });
    for_lanes([&](int l) {
      const ThreadState<D, KW>& my = st[w * kWarp + l];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = rb + l / 4 + 8 * hh;
        if (r >= rows) continue;
        const int slot = split * RM + r;
        float* orow = s.u.red.o + slot * D + 2 * (l % 4);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) orow[8 * dt] = my.o[dt][2 * hh], orow[8 * dt + 1] = my.o[dt][2 * hh + 1];
        if (l % 4 == 0) s.u.red.m[slot] = my.m[hh], s.u.red.l[slot] = my.l[hh];
      }
    });
  });
  ex.sync();
  // Merge the key splits (log-sum-exp weights), normalise, round, store 8 elements per item.
  uint16_t* ob = p.out + int64_t(b) * p.os[0] + int64_t(h) * p.os[1];
  ex.each([&](int t) {
    for (int item = t; item < rows * CH; item += kThreads) {
      const int r = item / CH, c = item % CH;
      float mx = -INFINITY;
#pragma unroll
      for (int sp = 0; sp < KS; ++sp) mx = fmaxf(mx, s.u.red.m[sp * RM + r]);
      float acc[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.f;
      float sum = 0.f;
      if (mx != -INFINITY) {
#pragma unroll
        for (int sp = 0; sp < KS; ++sp) {
          const float ms = s.u.red.m[sp * RM + r];
          if (ms == -INFINITY) continue;  // this split saw no key of the row (its o and l are 0)
          const float wgt = exp2f(ms - mx);
          sum = fmaf(wgt, s.u.red.l[sp * RM + r], sum);
          const float* o = s.u.red.o + (sp * RM + r) * D + 8 * c;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] = fmaf(wgt, o[e], acc[e]);
        }
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      uint32_t wd[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) wd[e] = pack2<kBF16>(acc[2 * e] * inv, acc[2 * e + 1] * inv);
      uint16_t* dst = ob + int64_t(q0 + r) * p.os[2] + 8 * c;
      if (p.out_vec) {
        st_global_u128(dst, make_uint4(wd[0], wd[1], wd[2], wd[3]));
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[2 * e] = uint16_t(wd[e]), dst[2 * e + 1] = uint16_t(wd[e] >> 16);
      }
      if (c == 0 && p.lse != nullptr)
        p.lse[(int64_t(b) * p.Hq + h) * p.Sq + q0 + r] = sum > 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
    }
  });
}

#ifndef EFFICIENT_OPS_SPARSE_ATTENTION_HOST_ONLY
extern __shared__ __align__(16) unsigned char block_sparse_attention_smem[];

template <int D, bool kBF16, int RG>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) block_sparse_attention_kernel(const Params p) {
  attention_block<D, kBF16, RG>(p, int64_t(blockIdx.x), *reinterpret_cast<Smem<D>*>(block_sparse_attention_smem),
                                DeviceExec{});
}
#endif

// ---- host-side preparation, shared by the launcher and the CPU emulation -----------------------

inline Params make_params(const BlockSparseAttentionArgs& a) {
  Params p{};
  p.q = static_cast<const uint16_t*>(a.q);
  p.k = static_cast<const uint16_t*>(a.k);
  p.v = static_cast<const uint16_t*>(a.v);
  p.out = static_cast<uint16_t*>(a.out);
  p.lse = a.lse;
  p.num_blocks = a.kv_num_blocks;
  p.indices = a.kv_indices;
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = a.q_strides[i];
    p.ks[i] = a.k_strides[i];
    p.vs[i] = a.v_strides[i];
    p.os[i] = a.out_strides[i];
    p.ids[i] = a.indices_strides[i];
  }
  p.nbs[0] = a.num_blocks_strides[0];
  p.nbs[1] = a.num_blocks_strides[1];
  p.scale_log2 = a.scale * kLog2e;
  p.B = int(a.B);
  p.Hq = int(a.Hq);
  p.Hkv = int(a.Hkv);
  p.G = int(a.Hq / a.Hkv);
  p.Sq = int(a.Sq);
  p.Skv = int(a.Skv);
  p.block_m = int(a.block_m);
  p.block_n = int(a.block_n);
  p.Mq = int(a.Mq);
  p.Nk = int(a.Nk);
  p.chunks = int(cdiv(a.block_m, kRowsMax));
  p.causal_off = int(a.Skv - a.Sq);
  p.causal = a.causal;
  p.q_vec = !misaligned(a.q, 16) && strides_multiple_of(a.q_strides, 3, 8);
  p.k_vec = !misaligned(a.k, 16) && strides_multiple_of(a.k_strides, 3, 8);
  p.v_vec = !misaligned(a.v, 16) && strides_multiple_of(a.v_strides, 3, 8);
  p.out_vec = !misaligned(a.out, 16) && strides_multiple_of(a.out_strides, 3, 8);
  return p;
}

inline int64_t grid_blocks(const BlockSparseAttentionArgs& a) {
  return a.B * a.Hq * a.Mq * cdiv(a.block_m, kRowsMax);
}

// Calls fn(std::integral_constant<int, D>, std::bool_constant<bf16>, std::integral_constant<int, RG>).
template <class Fn>
cudaError_t dispatch(const BlockSparseAttentionArgs& a, Fn&& fn) {
  const auto by_rg = [&](auto d, auto bf16) {
    if (a.block_m == 16) return fn(d, bf16, std::integral_constant<int, 1>{});
    if (a.block_m == 32) return fn(d, bf16, std::integral_constant<int, 2>{});
    return fn(d, bf16, std::integral_constant<int, 4>{});
  };
  const auto by_d = [&](auto bf16) {
    if (a.D == 64) return by_rg(std::integral_constant<int, 64>{}, bf16);
    return by_rg(std::integral_constant<int, 128>{}, bf16);
  };
  return a.dtype == DType::kBFloat16 ? by_d(std::true_type{}) : by_d(std::false_type{});
}

}  // namespace block_sparse_detail

const char* block_sparse_attention_check(const BlockSparseAttentionArgs& a) {
  using namespace block_sparse_detail;
  constexpr int64_t kMax = kBlockSparseMaxDim;
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return "dtype must be float16 or bfloat16";
  if (a.B < 1 || a.B > kMax) return "B must be in [1, 2^30]";
  if (a.Hq < 1 || a.Hq > kMax) return "Hq must be in [1, 2^30]";
  if (a.Hkv < 1 || a.Hkv > a.Hq || a.Hq % a.Hkv != 0) return "Hkv must be >= 1 and divide Hq";
  if (a.Sq < 0 || a.Sq > kMax) return "Sq must be in [0, 2^30]";
  if (a.Skv < 0 || a.Skv > kMax) return "Skv must be in [0, 2^30]";
  if (a.D != 64 && a.D != 128) return "D must be 64 or 128";
  const auto block_ok = [](int64_t x) { return x == 16 || x == 32 || x == 64 || x == 128; };
  if (!block_ok(a.block_m)) return "block_m must be 16, 32, 64 or 128";
  if (!block_ok(a.block_n)) return "block_n must be 16, 32, 64 or 128";
  if (a.Mq != cdiv(a.Sq, a.block_m)) return "Mq must be ceil(Sq / block_m)";
  if (a.Nk != cdiv(a.Skv, a.block_n)) return "Nk must be ceil(Skv / block_n)";
  const int64_t q_sizes[3] = {a.B, a.Hq, a.Sq}, kv_sizes[3] = {a.B, a.Hkv, a.Skv};
  const int64_t nb_sizes[2] = {a.B, a.Hq}, idx_sizes[3] = {a.B, a.Hq, a.Mq};
  if (!strides_ok(a.num_blocks_strides, nb_sizes, 2, a.Mq)) return "num_blocks_strides must be 2 values in [0, 2^40)";
  if (!strides_ok(a.indices_strides, idx_sizes, 3, a.Nk)) return "indices_strides must be 3 values in [0, 2^40)";
  if (!strides_ok(a.q_strides, q_sizes, 3, a.D)) return "q_strides must be 3 values in [0, 2^40)";
  if (!strides_ok(a.k_strides, kv_sizes, 3, a.D)) return "k_strides must be 3 values in [0, 2^40)";
  if (!strides_ok(a.v_strides, kv_sizes, 3, a.D)) return "v_strides must be 3 values in [0, 2^40)";
  if (!strides_ok(a.out_strides, q_sizes, 3, a.D)) return "out_strides must be 3 values in [0, 2^40)";
  if (!std::isfinite(a.scale)) return "scale must be finite";
  if (a.Sq > 0) {  // Sq == 0: nothing is launched, nothing is read
    if (!a.q || !a.k || !a.v || !a.out) return "q, k, v and out must not be null";
    if (!a.kv_num_blocks) return "kv_num_blocks must not be null";
    if (!a.kv_indices && a.Nk > 0) return "kv_indices must not be null";
  }
  if (misaligned(a.q, 2) || misaligned(a.k, 2) || misaligned(a.v, 2) || misaligned(a.out, 2))
    return "q, k, v and out must be 2-byte aligned";
  if (misaligned(a.lse, 4)) return "lse must be 4-byte aligned";
  if (misaligned(a.kv_num_blocks, 4) || misaligned(a.kv_indices, 4))
    return "kv_num_blocks and kv_indices must be 4-byte aligned";
  if (grid_blocks(a) >= (int64_t(1) << 31) - 1) return "problem too large for one grid (B, Hq, Sq)";
  return nullptr;
}

#ifndef EFFICIENT_OPS_SPARSE_ATTENTION_HOST_ONLY
cudaError_t block_sparse_attention(const BlockSparseAttentionArgs& a, cudaStream_t stream) {
  using namespace block_sparse_detail;
  if (block_sparse_attention_check(a) != nullptr) return cudaErrorInvalidValue;
  if (a.Sq == 0) return cudaSuccess;
  const Params p = make_params(a);
  const unsigned blocks = unsigned(grid_blocks(a));
  return dispatch(a, [&](auto d, auto bf16, auto rg) {
    constexpr int kD = decltype(d)::value;
    constexpr bool kBF = decltype(bf16)::value;
    constexpr int kRG = decltype(rg)::value;
    const int smem = int(sizeof(Smem<kD>));
    cudaError_t err = cudaFuncSetAttribute(block_sparse_attention_kernel<kD, kBF, kRG>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    block_sparse_attention_kernel<kD, kBF, kRG><<<blocks, kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  });
}
#endif

}  // namespace efficient_ops
