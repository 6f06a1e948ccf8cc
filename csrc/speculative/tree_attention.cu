// Tree attention for speculative-decoding verification: the T nodes of a flattened draft tree attend to
// the prefix KV cache and to their own ancestors in the tree, for every query head (GQA), in one call.
// (tree_attention.h documents the arguments; efficient_ops.reference is the specification.)
//
// Kernel design
// -------------
// The cost is reading the prefix K/V (B x Hkv x prefix x D x 2 x 2 bytes); the tree part (T x T) is tiny.
// All G x T query rows of one KV head (G = Hq / Hkv query heads x T nodes; row r = g * T + i) share that
// read, flash-decoding style, with no T x (prefix + T) mask anywhere:
//
//   kernel 1, grid (1-D, tile fastest):  block = ((b * Hkv + kvh) * (num_splits + 1) + split) * tiles + tile
//     tile:   64 query rows of the G x T rows of KV head kvh (4 warps x 16 rows).
//     split < num_splits: prefix positions [split * chunk, min((split + 1) * chunk, prefix_len[b])), chunk =
//             ceil((S_max - T) / num_splits) rounded up to the 64-key tile. A split whose chunk is empty
//             writes lse = -inf and o = 0 for its rows, so the workspace needs no memset.
//     split == num_splits: the tree part, keys prefix_len[b] + j for j < T, masked per row to the node's
//             ancestors and itself (bitmasks built in shared memory, below).
//     The query-row tiles of one (b, kvh, split) are adjacent in launch order, so they run together and
//     read the same K/V chunk through L2: DRAM sees it about once.
//     Each block: Q tile (64 x D) -> shared memory (cp.async; kept there, A fragments by ldmatrix); for each
//     64-key tile, double buffered with cp.async (K and V, 16-byte chunks, XOR-swizzled rows so that
//     ldmatrix is free of bank conflicts): S = Q K^T with mma.sync.m16n8k16 (f16 / bf16 in, f32
//     accumulate), mask, online softmax in the log2 domain (exp2f of scale * log2(e) * q.k), P rounded to
//     the dtype and re-used in registers as the A operand of O += P V (the m16n8 accumulator layout of two
//     adjacent n-tiles is the m16k16 A layout), V fragments by ldmatrix.trans. At the end each row's
//     float32 o / l and lse = m + log2(l) go to the workspace.
//   kernel 2 (same stream): one warp per output row merges the num_splits + 1 partials by log-sum-exp
//     (max lse, weights exp2(lse_s - max); an empty split has weight 0 and its o is not even read) and
//     writes out rounded to the dtype. Every row has a finite lse from the tree split (a node always
//     attends to itself), so no input row produces NaN.
//
// Ancestor bitmasks (tree split only): parents -> shared memory as jump[i] (the parent, or i itself for
// the root and for any parent outside [0, i), so garbage parents cannot leave the tree), anc[i] = {i,
// jump[i]} as a T-bit mask; then ceil(log2 T) rounds of pointer jumping, anc[i] |= anc[jump[i]], jump[i] =
// jump[jump[i]] (staged through registers, two barriers per round): ~8 short rounds for T = 256 instead of
// a walk as long as the tree is deep.
// prefix_len[b] is clamped to [0, S_max - T] in the kernel, so every K/V row it reads is in [0, S_max);
// K/V tile rows beyond the split's keys are zero-filled in shared memory (never read from global), and
// masked probabilities are exactly 0, so no uninitialised cache slot can leak a NaN.
// Numerics: float32 scores and accumulators; P is rounded to the dtype before P V (as in FlashAttention);
// 1 / l and the merge in float32; one rounding of the output.
//
// Emulation: the block programs (attention_block, merge_block) are __host__ __device__ and written against
// an executor (csrc/common/block_exec.cuh): block-wide phases (ex.each, ex.sync) and warp phases (ex.warp) in
// which per-lane code runs in for_lanes and the warp collectives are helpers with a host version
// (csrc/common/warp_mma.cuh, shared with csrc/sparse_attention): ldsm_x4 (ldmatrix: the host version
// takes the address function of all 32 lanes and returns this lane's words as the PTX fragment layout
// defines them), warp_mma (mma.sync m16n8k16: the host version gathers the 32 lanes' A, B, C fragments,
// multiplies the 16 x 16 x 8 tile and scatters D back), quad_max / quad_sum (the two xor shuffles).
// The per-warp tile steps (warp_qk, mask_scale_rowmax, online_softmax, warp_pv) and the merge of split
// partials (merge_partials) are shared with csrc/sparse_attention through csrc/common/attention_tile.cuh.
// tests/csrc/speculative_emulation.cu runs every block of both grids on the CPU under AddressSanitizer.
//
// A Hopper-native version (sm_90a) would add: TMA bulk tensor loads of the K/V tiles (one thread issues,
// mbarrier completion, hardware swizzle) in a producer warp, with consumer warpgroups running wgmma
// (m64nNk16, Q and K/V straight from shared memory, accumulators in registers, asynchronous so that the
// next tile's QK^T overlaps this tile's softmax); warp specialisation with setmaxnreg (producer gives its
// registers to the consumers); a deeper (3-4 stage) pipeline; and TMA multicast of one K/V tile into the
// CTAs of a cluster holding the different query-row tiles of the same (b, kvh, split), which replaces the
// L2 sharing used here. The mma.sync version runs on sm_80+ (sm_90a included) unchanged.

#include "tree_attention.h"

#include "../common/arg_checks.h"
#include "../common/attention_tile.cuh"
#include "../common/block_exec.cuh"
#include "../common/device_helpers.cuh"
#include "../common/warp_mma.cuh"

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace efficient_ops {
namespace tree_attention_detail {

using namespace common_detail;  // kWarp, Elem, cp.async, warp_qk / warp_pv, swz, merge_partials, executors, ...

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;
constexpr int kBM = 16 * kWarps;  // query rows per block: 16 per warp
constexpr int kBN = 64;           // keys per tile
constexpr int kMaxT = int(kTreeAttentionMaxT);
constexpr int kMaxW = kMaxT / 32;  // 32-bit words of an ancestor mask
constexpr int kMinSplitLen = 256;  // prefix positions per split, at least
constexpr int kBlocksPerSM = 2;    // resident attention blocks per SM at D = 128 (sizes the split count)
// __launch_bounds__ minimum blocks per SM: D = 128 needs ~250 registers (3 blocks would spill), D = 64 fits
// 3 blocks in 168 (and 3 x 49 KB of shared memory).
template <int D>
constexpr int kMinBlocksPerSM = D == 64 ? 3 : 2;
constexpr int kMergeRows = kWarps; // output rows per merge block (a warp each)

using HostExec = HostBlockExec<kThreads>;  // the CPU emulation's executor

// ---- kernel arguments, prepared on the host (make_params) ---------------------------------------

struct Params {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  const int64_t* prefix_lens;
  const int64_t* parents;
  float* ws_o;    // [splits + 1][rows_total][D]
  float* ws_lse;  // [splits + 1][rows_total]
  int64_t qs[3], ks[3], vs[3], os[3];
  int64_t parents_stride;
  int64_t rows_total;  // B * Hq * T; row id (b * Hq + h) * T + i = (b * Hkv + kvh) * R + r
  float scale_log2;    // scale * log2(e)
  int B, Hq, Hkv, G, T, S_max, R;  // R = G * T rows per KV head
  int splits, chunk, tiles;
  bool q_vec, k_vec, v_vec;  // 16-byte loads: aligned base and strides a multiple of 8 elements
  bool out_vec2;             // 4-byte stores of element pairs
};

// ---- shared memory and per-thread state -----------------------------------------------------------

template <int D>
struct alignas(16) Smem {
  uint16_t q[kBM * D];        // query tile, swizzled rows
  uint16_t k[2][kBN * D];     // key tiles, double buffered
  uint16_t v[2][kBN * D];     // value tiles
  uint32_t anc[kMaxT][kMaxW]; // tree split: ancestor (and self) bitmask of every node
  int jump[kMaxT];            // tree split: pointer-jumping links
};

template <int D>
struct ThreadState {
  uint4 qa;             // Q A-fragment of the current k-step
  float sc[kBN / 8][4]; // scores / probabilities of the key tile: n-tile x C-fragment
  float o[D / 8][4];    // output accumulator: d n-tile x C-fragment
  float m[2], l[2];     // running max (log2 domain) and this lane's partial sum, rows g and g + 8
  float mt[2];          // the tile's row max
  uint4 frag;           // ldmatrix result
  uint32_t nv[kMaxT * kMaxW / kThreads];  // pointer jumping: new mask words
  int nj[kMaxT / kThreads];               // pointer jumping: new links
};

// Rows [0, rows) of a 64-row tile from row_ptr(r) (rows >= valid are zero-filled, never read).
template <int D, class Exec, class RowPtr>
EO_HD void load_tile(const Exec& ex, uint16_t* tile, int rows, int valid, bool vec, RowPtr&& row_ptr) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  ex.each([&](int t) {
#pragma unroll
    for (int u = 0; u < kBN * CH / kThreads; ++u) {
      const int c = t + u * kThreads, r = c / CH, ch = c % CH;
      if (r >= rows) continue;
      uint16_t* dst = tile + swz<D>(r, ch);
      if (r < valid) {
        copy_chunk16(dst, row_ptr(r) + ch * 8, vec);
      } else {
        st_shared_u128(dst, make_uint4(0u, 0u, 0u, 0u));
      }
    }
  });
}

// Tree split: s.anc[i] = {i} U ancestors(i) for the T nodes of batch row b (parents outside [0, i) count
// as none).
template <int D, class Exec, class States>
EO_HD void build_ancestors(const Params& p, Smem<D>& s, const Exec& ex, States& st, int b) {
  const int T = p.T, W = (T + 31) / 32;
  const int64_t* par = p.parents + int64_t(b) * p.parents_stride;
  ex.each([&](int t) {
    for (int i = t; i < T; i += kThreads) {
      const int64_t pr = ld_i64(par + i);
      const bool has = i > 0 && pr >= 0 && pr < i;
      const int pi = has ? int(pr) : i;
      s.jump[i] = pi;
      for (int w = 0; w < W; ++w) {
        uint32_t bits = w == (i >> 5) ? 1u << (i & 31) : 0u;
        if (w == (pi >> 5)) bits |= 1u << (pi & 31);
        s.anc[i][w] = bits;
      }
    }
  });
  ex.sync();
  // anc[i] holds every ancestor within distance 2^k after k rounds; depth < T.
  int rounds = 0;
  while ((1 << rounds) < T - 1) ++rounds;
  for (int k = 0; k < rounds; ++k) {
    ex.each([&](int t) {
      auto& my = st[t];
#pragma unroll
      for (int u = 0; u < kMaxT * kMaxW / kThreads; ++u) {
        const int idx = t + u * kThreads;
        if (idx < T * W) {
          const int i = idx / W, w = idx % W;
          my.nv[u] = s.anc[i][w] | s.anc[s.jump[i]][w];
        }
      }
#pragma unroll
      for (int u = 0; u < kMaxT / kThreads; ++u) {
        const int i = t + u * kThreads;
        if (i < T) my.nj[u] = s.jump[s.jump[i]];
      }
    });
    ex.sync();
    ex.each([&](int t) {
      auto& my = st[t];
#pragma unroll
      for (int u = 0; u < kMaxT * kMaxW / kThreads; ++u) {
        const int idx = t + u * kThreads;
        if (idx < T * W) s.anc[idx / W][idx % W] = my.nv[u];
      }
#pragma unroll
      for (int u = 0; u < kMaxT / kThreads; ++u) {
        const int i = t + u * kThreads;
        if (i < T) s.jump[i] = my.nj[u];
      }
    });
    ex.sync();
  }
}

// ---- the attention block program ----------------------------------------------------------------------

template <int D, bool kBF16, class Exec>
EO_HD void attention_block(const Params& p, int64_t block, Smem<D>& s, const Exec& ex) {
  typename Exec::template PerThread<ThreadState<D>> st;
  const int tile = int(block % p.tiles);
  const int64_t rest = block / p.tiles;
  const int split = int(rest % (p.splits + 1));
  const int bh = int(rest / (p.splits + 1));
  const int b = bh / p.Hkv, kvh = bh % p.Hkv;
  const int r0 = tile * kBM;
  const int rows = p.R - r0 < kBM ? p.R - r0 : kBM;  // valid rows of this tile

  int64_t plen = ld_i64(p.prefix_lens + b);  // clamped: every key row read is in [0, S_max)
  plen = plen < 0 ? 0 : plen > int64_t(p.S_max - p.T) ? int64_t(p.S_max - p.T) : plen;
  const bool tree = split == p.splits;
  int key_begin, key_end;
  if (tree) {
    key_begin = int(plen);
    key_end = int(plen) + p.T;
  } else {
    const int64_t k0 = int64_t(split) * p.chunk, k1 = k0 + p.chunk < plen ? k0 + p.chunk : plen;
    key_begin = int(k0 < plen ? k0 : plen);
    key_end = int(k1 > key_begin ? k1 : key_begin);
  }
  const int64_t row_base = int64_t(bh) * p.R + r0;  // workspace row of tile row 0
  float* ws_o = p.ws_o + (int64_t(split) * p.rows_total + row_base) * D;
  float* ws_l = p.ws_lse + int64_t(split) * p.rows_total + row_base;

  if (key_end <= key_begin) {  // a prefix split past this batch row's prefix: an empty partial
    ex.each([&](int t) {
      for (int e = 4 * t; e < rows * D; e += 4 * kThreads)
        *reinterpret_cast<float4*>(ws_o + e) = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int r = t; r < rows; r += kThreads) ws_l[r] = -INFINITY;
    });
    return;
  }

  // Q tile (rows r0 .. r0 + 63 of this KV head's G x T rows), then the first K/V tile.
  const uint16_t* qb = p.q + int64_t(b) * p.qs[0];
  const int h0 = kvh * p.G;
  load_tile<D>(ex, s.q, kBM, rows, p.q_vec, [&](int r) {
    const int rr = r0 + r, g = rr / p.T, i = rr % p.T;
    return qb + int64_t(h0 + g) * p.qs[1] + int64_t(i) * p.qs[2];
  });
  ex.each([&](int) { cp_async_commit(); });
  const uint16_t* kb = p.k + int64_t(b) * p.ks[0] + int64_t(kvh) * p.ks[1];
  const uint16_t* vb = p.v + int64_t(b) * p.vs[0] + int64_t(kvh) * p.vs[1];
  const auto load_kv = [&](int it) {
    const int key0 = key_begin + it * kBN, valid = key_end - key0;
    load_tile<D>(ex, s.k[it & 1], kBN, valid, p.k_vec, [&](int r) { return kb + int64_t(key0 + r) * p.ks[2]; });
    load_tile<D>(ex, s.v[it & 1], kBN, valid, p.v_vec, [&](int r) { return vb + int64_t(key0 + r) * p.vs[2]; });
    ex.each([&](int) { cp_async_commit(); });
  };
  load_kv(0);
  if (tree) build_ancestors<D>(p, s, ex, st, b);
  ex.each([&](int) { cp_async_wait<1>(); });  // this thread's Q copies have landed
  ex.sync();

  // Warps whose 16 rows are all padding (r >= R) skip the math (warp-uniform).
  const auto idle = [&](int w) { return r0 + 16 * w >= p.R; };
  ex.warp([&](int w) {
    if (!idle(w)) init_row_state<D>([&](int l) -> ThreadState<D>& { return st[w * kWarp + l]; });
  });

  const int n_tiles = (key_end - key_begin + kBN - 1) / kBN;
  for (int it = 0; it < n_tiles; ++it) {
    next_kv_tile(ex, it, n_tiles, load_kv);
    const uint16_t* kt = s.k[it & 1];
    const uint16_t* vt = s.v[it & 1];
    const int key0 = key_begin + it * kBN, valid = key_end - key0;  // tile rows >= valid are masked
    ex.warp([&](int w) {
      if (idle(w)) return;
      const auto lane_state = [&](int l) -> ThreadState<D>& { return st[w * kWarp + l]; };
      // S = Q K^T (16 keys = two n-tiles per ldmatrix.x4; key 16-blocks past `valid` are all masked).
      const auto has_keys = [&](int np) { return 16 * np < valid; };
      warp_qk<D, kBN / 16, kBF16, true>(lane_state, s.q, 16 * w, kt, 0, has_keys);
      // Mask (columns past `valid`; in the tree split, keys that are not the node's ancestors or itself),
      // scale to the log2 domain, row max of the tile.
      mask_scale_rowmax<kBN / 16>(lane_state, p.scale_log2, [&](int l, int h, int col) {
        const int node = (r0 + 16 * w + l / 4 + 8 * h) % p.T;  // padding rows map to some node: harmless
        bool keep = col < valid;
        if (tree && keep) {
          const int j = key0 - key_begin + col;  // < T
          keep = (s.anc[node][j >> 5] >> (j & 31)) & 1u;
        }
        return keep;
      });
      online_softmax<D, kBN / 16>(lane_state);  // P = exp2(S - m), running state rescaled
      warp_pv<D, kBN / 16, kBF16, true>(lane_state, vt, 0, has_keys);  // O += P V
    });
    ex.sync();  // the buffers of this tile may be refilled next iteration
  }

  // This split's partial: o / l and lse = m + log2(l) (log2 domain) per row.
  ex.warp([&](int w) {
    if (idle(w)) return;
    quad_sum([&](int l) -> float& { return st[w * kWarp + l].l[0]; });
    quad_sum([&](int l) -> float& { return st[w * kWarp + l].l[1]; });
    for_lanes([&](int l) {
      const ThreadState<D>& my = st[w * kWarp + l];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * w + l / 4 + 8 * h;  // tile row
        if (r >= rows) continue;
        const float sum = my.l[h];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        float* orow = ws_o + int64_t(r) * D + 2 * (l % 4);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<float2*>(orow + 8 * dt) = make_float2(my.o[dt][2 * h] * inv, my.o[dt][2 * h + 1] * inv);
        if (l % 4 == 0) ws_l[r] = sum > 0.f ? my.m[h] + log2f(sum) : -INFINITY;
      }
    });
  });
}

// ---- the merge block program: one warp per output row ------------------------------------------------

template <int D, bool kBF16, class Exec>
EO_HD void merge_block(const Params& p, int64_t block, const Exec& ex) {
  // num_splits + 1 partials; one whose weight underflows to 0 (an empty split, lse = -inf) is skipped.
  merge_partials<D, kBF16, EmptyPartial::kZeroWeight>(
      p, ex, block, kMergeRows, p.splits + 1, [&](int64_t row) {
        const int i = int(row % p.T);
        const int64_t bh = row / p.T;
        const int h = int(bh % p.Hq), b = int(bh / p.Hq);
        return p.out + int64_t(b) * p.os[0] + int64_t(h) * p.os[1] + int64_t(i) * p.os[2];
      });
}

#ifndef EFFICIENT_OPS_SPECULATIVE_HOST_ONLY
extern __shared__ __align__(16) unsigned char tree_attention_smem[];

template <int D, bool kBF16>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM<D>) tree_attention_kernel(const Params p) {
  attention_block<D, kBF16>(p, int64_t(blockIdx.x), *reinterpret_cast<Smem<D>*>(tree_attention_smem), DeviceExec{});
}

template <int D, bool kBF16>
__global__ void __launch_bounds__(kThreads) tree_attention_merge_kernel(const Params p) {
  merge_block<D, kBF16>(p, int64_t(blockIdx.x), DeviceExec{});
}
#endif

// ---- host-side preparation, shared by the launcher and the CPU emulation -----------------------

// Prefix positions per split (a multiple of the key tile) for the largest prefix S_max - T.
inline int64_t chunk_for(int64_t S_max, int64_t T, int64_t splits) {
  const int64_t prefix_max = S_max - T > 0 ? S_max - T : 0;
  const int64_t c = cdiv(cdiv(prefix_max, splits), kBN) * kBN;
  return c > 0 ? c : kBN;
}

// Workspace for every (batch row, query head, node, split), the tree part counted as one more split.
inline PartialsLayout workspace_layout(int64_t B, int64_t Hq, int64_t T, int64_t D, int64_t splits) {
  return partials_layout(B * Hq * T * (splits + 1), D);
}

inline Params make_params(const TreeAttentionArgs& a) {
  Params p{};
  p.q = static_cast<const uint16_t*>(a.q);
  p.k = static_cast<const uint16_t*>(a.k_cache);
  p.v = static_cast<const uint16_t*>(a.v_cache);
  p.out = static_cast<uint16_t*>(a.out);
  p.prefix_lens = a.prefix_lens;
  p.parents = a.parents;
  const PartialsLayout W = workspace_layout(a.B, a.Hq, a.T, a.D, a.num_splits);
  p.ws_o = static_cast<float*>(a.workspace);
  p.ws_lse = reinterpret_cast<float*>(static_cast<char*>(a.workspace) + W.lse_offset);
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = a.q_strides[i];
    p.ks[i] = a.k_strides[i];
    p.vs[i] = a.v_strides[i];
    p.os[i] = a.out_strides[i];
  }
  p.parents_stride = a.parents_batch_stride;
  p.rows_total = a.B * a.Hq * a.T;
  p.scale_log2 = a.scale * kLog2e;
  p.B = int(a.B);
  p.Hq = int(a.Hq);
  p.Hkv = int(a.Hkv);
  p.G = int(a.Hq / a.Hkv);
  p.T = int(a.T);
  p.S_max = int(a.S_max);
  p.R = p.G * p.T;
  p.splits = int(a.num_splits);
  p.chunk = int(chunk_for(a.S_max, a.T, a.num_splits));
  p.tiles = int(cdiv(p.R, kBM));
  p.q_vec = !misaligned(a.q, 16) && strides_multiple_of(a.q_strides, 3, 8);
  p.k_vec = !misaligned(a.k_cache, 16) && strides_multiple_of(a.k_strides, 3, 8);
  p.v_vec = !misaligned(a.v_cache, 16) && strides_multiple_of(a.v_strides, 3, 8);
  p.out_vec2 = !misaligned(a.out, 4) && strides_multiple_of(a.out_strides, 3, 2);
  return p;
}

inline int64_t attention_blocks(const Params& p) { return int64_t(p.tiles) * p.B * p.Hkv * (p.splits + 1); }
inline int64_t merge_blocks(const Params& p) { return cdiv(p.rows_total, kMergeRows); }

// Calls fn(std::integral_constant<int, D>, std::bool_constant<bf16>) for the kernel serving `a`.
template <class Fn>
cudaError_t dispatch(const TreeAttentionArgs& a, Fn&& fn) {
  const auto by_d = [&](auto bf16) {
    if (a.D == 64) return fn(std::integral_constant<int, 64>{}, bf16);
    return fn(std::integral_constant<int, 128>{}, bf16);
  };
  return a.dtype == DType::kBFloat16 ? by_d(std::true_type{}) : by_d(std::false_type{});
}

}  // namespace tree_attention_detail

int64_t tree_attention_num_splits(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S_max, int64_t sm_count) {
  using namespace tree_attention_detail;
  if (B < 1 || Hq < 1 || Hkv < 1 || T < 1 || S_max < 1 || B > kTreeAttentionMaxDim || Hq > kTreeAttentionMaxDim ||
      Hkv > Hq || T > kTreeAttentionMaxT || S_max > kTreeAttentionMaxDim)
    return 1;
  const int64_t prefix_max = S_max - T;
  if (prefix_max <= kMinSplitLen) return 1;
  const int64_t base = cdiv(cdiv(Hq, Hkv) * T, kBM) * B * Hkv;      // blocks per split
  const int64_t target = 2 * kBlocksPerSM * (sm_count > 0 ? sm_count : 1);  // two waves
  int64_t splits = cdiv(target, base) - 1;                           // + 1 for the tree split
  const int64_t most = prefix_max / kMinSplitLen < kTreeAttentionMaxSplits ? prefix_max / kMinSplitLen
                                                                           : kTreeAttentionMaxSplits;
  if (splits > most) splits = most;
  return splits < 1 ? 1 : splits;
}

int64_t tree_attention_workspace_bytes(int64_t B, int64_t Hq, int64_t T, int64_t D, int64_t num_splits) {
  if (B < 1 || B > kTreeAttentionMaxDim || Hq < 1 || Hq > kTreeAttentionMaxDim || T < 1 || T > kTreeAttentionMaxT ||
      (D != 64 && D != 128) || num_splits < 1 || num_splits > kTreeAttentionMaxSplits)
    return -1;
  if (B * Hq > (int64_t(1) << 32)) return -1;  // rows B * Hq * T < 2^40
  return tree_attention_detail::workspace_layout(B, Hq, T, D, num_splits).bytes;
}

namespace {

// Strides in [0, 2^40) and the largest element offset of [n0, n1, n2, D] below 2^62. (Kept apart from
// common_detail::strides_ok, which sums the extent in another order.)
bool strides3_ok(const int64_t* s, int64_t n0, int64_t n1, int64_t n2, int64_t D) {
  for (int i = 0; i < 3; ++i)
    if (s[i] < 0 || s[i] >= (int64_t(1) << 40)) return false;
  const double extent = double(n0 - 1) * double(s[0]) + double(n1 - 1) * double(s[1]) +
                        double(n2 - 1) * double(s[2]) + double(D);
  return extent < 4.0e18;
}

}  // namespace

const char* tree_attention_check(const TreeAttentionArgs& a) {
  using namespace tree_attention_detail;
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) return "dtype must be float16 or bfloat16";
  if (a.B < 1 || a.B > kTreeAttentionMaxDim) return "B must be in [1, 2^30]";
  if (a.Hq < 1 || a.Hq > kTreeAttentionMaxDim) return "Hq must be in [1, 2^30]";
  if (a.Hkv < 1 || a.Hkv > a.Hq || a.Hq % a.Hkv != 0) return "Hkv must be >= 1 and divide Hq";
  if (a.T < 1 || a.T > kTreeAttentionMaxT) return "T must be in 1..256";
  if (a.D != 64 && a.D != 128) return "D must be 64 or 128";
  if (a.S_max < a.T || a.S_max > kTreeAttentionMaxDim) return "S_max must be >= T (and <= 2^30)";
  if (a.num_splits < 1 || a.num_splits > kTreeAttentionMaxSplits) return "num_splits must be in 1..1024";
  if (a.Hq * a.T >= (int64_t(1) << 30) || a.B * a.Hq * a.T >= (int64_t(1) << 40))
    return "Hq * T (query rows per batch row) must be < 2^30";
  if (!strides3_ok(a.q_strides, a.B, a.Hq, a.T, a.D)) return "q_strides must be 3 values in [0, 2^40)";
  if (!strides3_ok(a.k_strides, a.B, a.Hkv, a.S_max, a.D)) return "k_strides must be 3 values in [0, 2^40)";
  if (!strides3_ok(a.v_strides, a.B, a.Hkv, a.S_max, a.D)) return "v_strides must be 3 values in [0, 2^40)";
  if (!strides3_ok(a.out_strides, a.B, a.Hq, a.T, a.D)) return "out_strides must be 3 values in [0, 2^40)";
  if (a.parents_batch_stride < 0 || a.parents_batch_stride >= (int64_t(1) << 40))
    return "parents_batch_stride must be in [0, 2^40)";
  if (!std::isfinite(a.scale)) return "scale must be finite";
  if (!a.q || !a.k_cache || !a.v_cache || !a.out) return "q, k_cache, v_cache and out must not be null";
  if (misaligned(a.q, 2) || misaligned(a.k_cache, 2) || misaligned(a.v_cache, 2) || misaligned(a.out, 2))
    return "q, k_cache, v_cache and out must be 2-byte aligned";
  if (!a.prefix_lens || misaligned(a.prefix_lens, 8)) return "prefix_lens must be a non-null 8-byte aligned pointer";
  if (!a.parents || misaligned(a.parents, 8)) return "parents must be a non-null 8-byte aligned pointer";
  if (!a.workspace || misaligned(a.workspace, 16)) return "workspace must be a non-null 16-byte aligned pointer";
  const Params p = make_params(a);
  if (attention_blocks(p) >= (int64_t(1) << 31) - 1 || merge_blocks(p) >= (int64_t(1) << 31) - 1)
    return "problem too large for one grid (B, Hq, T, num_splits)";
  return nullptr;
}

#ifndef EFFICIENT_OPS_SPECULATIVE_HOST_ONLY
cudaError_t tree_attention(const TreeAttentionArgs& a, cudaStream_t stream) {
  using namespace tree_attention_detail;
  if (tree_attention_check(a) != nullptr) return cudaErrorInvalidValue;
  const Params p = make_params(a);
  return dispatch(a, [&](auto d, auto bf16) {
    constexpr int kD = decltype(d)::value;
    constexpr bool kBF = decltype(bf16)::value;
    const int smem = int(sizeof(Smem<kD>));
    cudaError_t err = cudaFuncSetAttribute(tree_attention_kernel<kD, kBF>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    tree_attention_kernel<kD, kBF><<<unsigned(attention_blocks(p)), kThreads, smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    tree_attention_merge_kernel<kD, kBF><<<unsigned(merge_blocks(p)), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}
#endif

}  // namespace efficient_ops
