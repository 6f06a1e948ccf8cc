// Attention building blocks shared by the attention kernel families (csrc/speculative/tree_attention.cu,
// csrc/sparse_attention/*.cu), in namespace efficient_ops::common_detail, written against the executor of
// block_exec.cuh and the warp collectives of warp_mma.cuh (so they run in the CPU emulations as well):
//   * swz: the XOR-swizzled [rows][D] shared tile layout read by ldmatrix;
//   * next_kv_tile: the double-buffered cp.async K/V pipeline step of a key-tile loop;
//   * the per-warp flash-attention steps on 16 query rows x 16 * NP keys (mma.sync m16n8k16):
//     init_row_state, warp_qk (S = Q K^T), mask_scale_rowmax, online_softmax (P = exp2(S - m), rescale),
//     warp_pv (O += P V);
//   * merge_partials: the merge block of the flash-decoding kernels (one warp per output row combines the
//     float32 split partials o, lse by log-sum-exp and stores the row rounded to the dtype).
// The per-warp steps take lane_state(l) -> the lane's state, with members qa, frag (uint4), sc[2 NP][4]
// (scores / probabilities: n-tile x C-fragment), o[D / 8][4] (accumulator), m[2], l[2], mt[2] (running max,
// partial sum, tile max of rows g and g + 8).
#pragma once

#include "arg_checks.h"
#include "block_exec.cuh"
#include "device_helpers.cuh"
#include "warp_mma.cuh"

#include <cmath>
#include <cstdint>

namespace efficient_ops {
namespace common_detail {

// Element offset of 16-byte chunk ch of row r in a [rows][D] tile: chunks XOR-swizzled by r % 8, so that
// the 8 rows of an ldmatrix (same logical chunk) hit 8 different bank groups.
template <int D>
EO_HD int swz(int r, int ch) {
  return r * D + ((ch ^ (r & 7)) << 3);
}

// Makes key tile `it` of n_tiles ready in shared memory: issues load_kv(it + 1) into the other buffer
// (released by the barrier that ended iteration it - 1) and waits for tile it's copies, then a barrier.
template <class Exec, class LoadKV>
EO_HD void next_kv_tile(const Exec& ex, int it, int n_tiles, LoadKV&& load_kv) {
  if (it + 1 < n_tiles) {
    load_kv(it + 1);
    ex.each([&](int) { cp_async_wait<1>(); });
  } else {
    ex.each([&](int) { cp_async_wait<0>(); });
  }
  ex.sync();
}

// ---- per-warp flash-attention steps (inside a warp phase) ------------------------------------------

// o = 0, m = -inf, l = 0 for every lane of the warp.
template <int D, class LaneState>
EO_HD void init_row_state(LaneState&& lane_state) {
  for_lanes([&](int l) {
    auto& my = lane_state(l);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) my.o[dt][e] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) my.m[h] = -INFINITY, my.l[h] = 0.f;
  });
}

// sc = Q K^T for the warp's 16 query rows (q_tile rows q_row0 ..) and keys k_row0 + 16 np + 0..15 of k_tile
// (both swizzled [rows][D] tiles) for np < NP with active(np); an inactive 16-key group keeps sc = 0.
// kPrefix: the active groups are a prefix (the loop stops at the first inactive one).
template <int D, int NP, bool kBF16, bool kPrefix, class LaneState, class Active>
EO_HD void warp_qk(LaneState&& lane_state, const uint16_t* q_tile, int q_row0, const uint16_t* k_tile, int k_row0,
                   Active&& active) {
  for_lanes([&](int l) {
#pragma unroll
    for (int nt = 0; nt < 2 * NP; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) lane_state(l).sc[nt][e] = 0.f;
  });
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    // Q A-fragment of this k-step from shared memory (the Q tile stays there; registers go to S and O).
    for_lanes([&](int l) {  // matrices: rows 0-7 / 8-15 x columns 0-7, then rows 0-7 / 8-15 x columns 8-15
      lane_state(l).qa = ldsm_x4<false>(l, [&](int j) {
        const int mi = j / 8;
        return q_tile + swz<D>(q_row0 + 8 * (mi % 2) + j % 8, 2 * ks + mi / 2);
      });
    });
#pragma unroll
    for (int np = 0; np < NP; ++np) {
      if (!active(np)) {
        if constexpr (kPrefix) break;
        continue;
      }
      for_lanes([&](int l) {  // matrices: keys 0-7 x d 0-7, keys 0-7 x d 8-15, keys 8-15 x d 0-7, 8-15 x 8-15
        lane_state(l).frag = ldsm_x4<false>(l, [&](int j) {
          const int mi = j / 8;
          return k_tile + swz<D>(k_row0 + 16 * np + 8 * (mi / 2) + j % 8, 2 * ks + mi % 2);
        });
      });
      warp_mma<kBF16>([&](int l) -> float(&)[4] { return lane_state(l).sc[2 * np]; },
                      [&](int l) { return lane_state(l).qa; },
                      [&](int l) { return make_uint2(lane_state(l).frag.x, lane_state(l).frag.y); });
      warp_mma<kBF16>([&](int l) -> float(&)[4] { return lane_state(l).sc[2 * np + 1]; },
                      [&](int l) { return lane_state(l).qa; },
                      [&](int l) { return make_uint2(lane_state(l).frag.z, lane_state(l).frag.w); });
    }
  }
}

// Mask, scale to the log2 domain, row max of the tile: sc = keep(l, h, col) ? sc * scale_log2 : -inf for
// row h (g or g + 8) and key column col (0 .. 16 NP - 1) of lane l, mt[h] = the lane's max of its row.
template <int NP, class LaneState, class Keep>
EO_HD void mask_scale_rowmax(LaneState&& lane_state, float scale_log2, Keep&& keep) {
  for_lanes([&](int l) {
    auto& my = lane_state(l);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2 * NP; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float x = keep(l, h, 8 * nt + 2 * (l % 4) + e) ? my.sc[nt][2 * h + e] * scale_log2 : -INFINITY;
          my.sc[nt][2 * h + e] = x;
          mx = fmaxf(mx, x);
        }
      my.mt[h] = mx;
    }
  });
}

// Online softmax: row max over the quad, rescale the running state (m, l, o) and P = exp2(S - m) in sc.
template <int D, int NP, class LaneState>
EO_HD void online_softmax(LaneState&& lane_state) {
  quad_max([&](int l) -> float& { return lane_state(l).mt[0]; });
  quad_max([&](int l) -> float& { return lane_state(l).mt[1]; });
  for_lanes([&](int l) {
    auto& my = lane_state(l);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(my.m[h], my.mt[h]);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: all P = 0
      const float alpha = exp2f(my.m[h] - m_use);           // 0 on the first keys (m = -inf)
      my.m[h] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2 * NP; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = exp2f(my.sc[nt][2 * h + e] - m_use);
          my.sc[nt][2 * h + e] = pv;
          sum += pv;
        }
      my.l[h] = my.l[h] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) my.o[dt][2 * h] *= alpha, my.o[dt][2 * h + 1] *= alpha;
    }
  });
}

// O += P V over keys k_row0 + 16 kk + 0..15 of v_tile (a swizzled [rows][D] tile) for kk < NP with active(kk)
// (P = 0 elsewhere; kPrefix as for warp_qk): P from the score registers (two n-tiles = one k16 A fragment,
// rounded to the dtype), V by ldmatrix.trans.
template <int D, int NP, bool kBF16, bool kPrefix, class LaneState, class Active>
EO_HD void warp_pv(LaneState&& lane_state, const uint16_t* v_tile, int k_row0, Active&& active) {
#pragma unroll
  for (int kk = 0; kk < NP; ++kk) {
    if (!active(kk)) {
      if constexpr (kPrefix) break;
      continue;
    }
    const auto a_of = [&](int l) {
      const auto& my = lane_state(l);
      return make_uint4(pack2<kBF16>(my.sc[2 * kk][0], my.sc[2 * kk][1]),
                        pack2<kBF16>(my.sc[2 * kk][2], my.sc[2 * kk][3]),
                        pack2<kBF16>(my.sc[2 * kk + 1][0], my.sc[2 * kk + 1][1]),
                        pack2<kBF16>(my.sc[2 * kk + 1][2], my.sc[2 * kk + 1][3]));
    };
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      for_lanes([&](int l) {  // matrices: keys 0-7 x d 0-7, keys 8-15 x d 0-7, keys 0-7 x d 8-15, 8-15 x 8-15
        lane_state(l).frag = ldsm_x4<true>(l, [&](int j) {
          const int mi = j / 8;
          return v_tile + swz<D>(k_row0 + 16 * kk + 8 * (mi % 2) + j % 8, 2 * dp + mi / 2);
        });
      });
      warp_mma<kBF16>([&](int l) -> float(&)[4] { return lane_state(l).o[2 * dp]; }, a_of,
                      [&](int l) { return make_uint2(lane_state(l).frag.x, lane_state(l).frag.y); });
      warp_mma<kBF16>([&](int l) -> float(&)[4] { return lane_state(l).o[2 * dp + 1]; }, a_of,
                      [&](int l) { return make_uint2(lane_state(l).frag.z, lane_state(l).frag.w); });
    }
  }
}

// ---- merge of split partials (flash decoding) ----------------------------------------------------

// The split kernels' workspace: float32 partial outputs [rows, D], then (256-byte aligned) their lse [rows];
// rows counts every (output row, split) pair.
struct PartialsLayout {
  int64_t lse_offset, bytes;
};

inline PartialsLayout partials_layout(int64_t rows, int64_t D) {
  PartialsLayout w;
  w.lse_offset = cdiv(rows * D * 4, 256) * 256;
  w.bytes = w.lse_offset + cdiv(rows * 4, 256) * 256;
  return w;
}

// Which partials the merge skips (weight 0, o not read).
enum class EmptyPartial {
  kNegInfLse,   // lse = -inf (an empty split)
  kZeroWeight,  // exp2(lse - max) == 0 (an empty split, or one far below the maximum)
};

// One warp per output row: row = block * rows_per_block + warp, for rows < p.rows_total. The row's `parts`
// partials are o = p.ws_o[(sp * rows_total + row) * D ..] (float32, normalised) and lse = p.ws_lse[sp *
// rows_total + row] (log2 domain); weights exp2(lse_s - max lse); out_row(row) -> the row's first output
// element, written as the weighted mean rounded to the dtype (4-byte pair stores when p.out_vec2; a row
// with no finite lse gets zeros). (p, the kernel's parameters, is read in place: no register copies.)
template <int D, bool kBF16, EmptyPartial kRule, class Params, class Exec, class OutRow>
EO_HD void merge_partials(const Params& p, const Exec& ex, int64_t block, int rows_per_block, int parts,
                          OutRow&& out_row) {
  using E = Elem<kBF16>;
  constexpr int EPL = D / kWarp;  // elements per lane: 2 or 4
  ex.each([&](int t) {
    const int64_t row = block * rows_per_block + t / kWarp;
    if (row >= p.rows_total) return;
    const int d0 = EPL * (t % kWarp);
    float mx = -INFINITY;
    for (int sp = 0; sp < parts; ++sp) mx = fmaxf(mx, p.ws_lse[int64_t(sp) * p.rows_total + row]);
    float acc[EPL];
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
    float wsum = 0.f;
    if (mx != -INFINITY) {
      for (int sp = 0; sp < parts; ++sp) {
        const float lse = p.ws_lse[int64_t(sp) * p.rows_total + row];
        if (kRule == EmptyPartial::kNegInfLse && lse == -INFINITY) continue;
        const float wgt = exp2f(lse - mx);
        if (kRule == EmptyPartial::kZeroWeight && wgt == 0.f) continue;
        wsum += wgt;
        const float* o = p.ws_o + (int64_t(sp) * p.rows_total + row) * D + d0;
        float v[EPL];
#ifdef __CUDA_ARCH__
        if constexpr (EPL == 4) {
          const float4 f = *reinterpret_cast<const float4*>(o);
          v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
        } else {
          const float2 f = *reinterpret_cast<const float2*>(o);
          v[0] = f.x, v[1] = f.y;
        }
#else
        for (int e = 0; e < EPL; ++e) v[e] = o[e];
#endif
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[e] = fmaf(wgt, v[e], acc[e]);
      }
    }
    const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
    uint16_t* out = out_row(row) + d0;
#pragma unroll
    for (int e = 0; e < EPL; e += 2) {
      const uint16_t lo = E::from_float(acc[e] * inv), hi = E::from_float(acc[e + 1] * inv);
      if (p.out_vec2) {
#ifdef __CUDA_ARCH__
        *reinterpret_cast<uint32_t*>(out + e) = uint32_t(lo) | (uint32_t(hi) << 16);
#else
        if (reinterpret_cast<uintptr_t>(out + e) % 4 != 0) emulation_fail("misaligned 4-byte output store");
        out[e] = lo, out[e + 1] = hi;
#endif
      } else {
        out[e] = lo, out[e + 1] = hi;
      }
    }
  });
}

}  // namespace common_detail
}  // namespace efficient_ops
