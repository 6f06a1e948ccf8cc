// CPU emulation of the CUDA kernels of csrc/speculative/ (tree_attention.cu, compact_kv.cu): runs the kernels'
// own block programs, compiled for the host, for every block of their grids:
//   * tree attention: attention_block with the HostExec executor (block phases for threads 0..127 in turn,
//     warp phases for warps 0..3, the warp collectives ldmatrix / mma.sync m16n8k16 / quad shuffles emulated
//     from their PTX fragment layouts), then merge_block; grid, tiling, workspace layout and kernel variant
//     come from the launcher's own host code (make_params, dispatch);
//   * compact_kv: compact_thread for every thread of every block.
// Results are compared with references written here from the specification (tree_attention.h,
// compact_kv.h): float64 attention over the explicit key set of every query node (prefix + the node's
// ancestors found by walking the parent links), and the sequential in-place moves for compact_kv.
// Exact-size heap buffers under AddressSanitizer catch out-of-bounds reads and writes; outputs, the
// workspace, shared memory, per-thread state, the padding between rows and every cache row that must not
// be read are NaN-poisoned, so unwritten outputs, reads of unwritten workspace and reads of rows outside the
// key set all fail. Garbage prefix_lens / parents / accepted / accept_len values run too (the kernels
// clamp or skip them; the references apply the documented clamping).
// tests/test_speculative_emulation.py builds and runs it wherever nvcc is found:
//   nvcc -std=c++17 -O0 -g -arch=sm_80 -Xcompiler=-fsanitize=address,-fsanitize=undefined -I<repo>/csrc \
//        tests/csrc/speculative_emulation.cu
#define EFFICIENT_OPS_SPECULATIVE_HOST_ONLY  // the host side only: no kernel to compile
#include "speculative/compact_kv.cu"
#include "speculative/tree_attention.cu"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <new>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

using namespace efficient_ops;
#ifndef __CUDA_ARCH__  // host-only harness (nvcc also parses it in the device pass)

#include "emulation_common.h"  // f2h / h2f, Buf, NaN poison, random draws, attention reference, tallies
using namespace emulation;

static std::mt19937_64 rng(20240917);
static double urand(double lo, double hi) { return uniform(rng, lo, hi); }
static int irand(int n) { return below(rng, n); }  // [0, n)

static std::set<std::pair<int, bool>> g_variants;  // (D, bf16) attention kernels that ran
static std::set<int> g_paths;                      // bit 0: q/k/v 16-byte path ran, bit 1: scalar path ran
static double g_worst = 0;                         // largest error / tolerance

// ================================ tree attention ================================================

enum Shape { kChain, kStar, kRandom, kBushy, kGarbage };

static std::vector<int64_t> make_tree(int T, Shape shape) {
  std::vector<int64_t> par(T);
  par[0] = -1;
  for (int i = 1; i < T; ++i) {
    switch (shape) {
      case kChain: par[i] = i - 1; break;
      case kStar: par[i] = 0; break;
      case kRandom: par[i] = irand(i); break;
      case kBushy: par[i] = (i - 1) / 3; break;  // a 3-ary tree, breadth first
      case kGarbage: {
        const int64_t choices[] = {-1, -7, i, i + 1, int64_t(T) + 5, std::numeric_limits<int64_t>::max(),
                                   std::numeric_limits<int64_t>::min(), int64_t(irand(i))};
        par[i] = choices[irand(8)];
        break;
      }
    }
  }
  if (shape == kGarbage) par[0] = irand(2) ? 3 : std::numeric_limits<int64_t>::min();
  return par;
}

struct AttnCase {
  int B, Hq, Hkv, T, D, S_max, splits;
  bool bf16;
  std::vector<int64_t> prefix;              // [B], may be garbage
  std::vector<std::vector<int64_t>> trees;  // one (shared, stride 0) or B rows
  int pad;        // element padding added to each stride (0: contiguous)
  int misalign;   // bit mask: 1 q, 2 k, 4 v, 8 out (base 2 bytes past 16-byte alignment)
  bool shuffle;   // run the attention blocks in a random order
  const char* what;
};

static bool run_attention(const AttnCase& c) {
  const bool bf = c.bf16;
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, T = c.T, D = c.D, S = c.S_max, G = Hq / Hkv;
  // Strides (elements): (b, h, t) with padding.
  const int64_t qt = D + c.pad, qh = T * qt + c.pad * 3, qb = Hq * qh + c.pad * 5;
  const int64_t kt = D + c.pad, kh = S * kt + c.pad * 7, kb = Hkv * kh + c.pad;
  const int64_t vt = D + 2 * c.pad, vh = S * vt + c.pad, vb = Hkv * vh + c.pad * 3;
  const int64_t ot = D + 3 * c.pad, oh = T * ot, ob = Hq * oh + c.pad;
  Buf<uint16_t> q(strided_extent({{B, qb}, {Hq, qh}, {T, qt}}, D), (c.misalign & 1) ? 2 : 0);
  Buf<uint16_t> k(strided_extent({{B, kb}, {Hkv, kh}, {S, kt}}, D), (c.misalign & 2) ? 2 : 0);
  Buf<uint16_t> v(strided_extent({{B, vb}, {Hkv, vh}, {S, vt}}, D), (c.misalign & 4) ? 2 : 0);
  Buf<uint16_t> out(strided_extent({{B, ob}, {Hq, oh}, {T, ot}}, D), (c.misalign & 8) ? 2 : 0);
  std::fill(q.p, q.p + q.n, kNanIn[bf]);  // NaN in every element no kernel may read
  std::fill(k.p, k.p + k.n, kNanIn[bf]);
  std::fill(v.p, v.p + v.n, kNanIn[bf]);
  std::fill(out.p, out.p + out.n, kPoison[bf]);

  const bool shared_tree = c.trees.size() == 1;
  Buf<int64_t> prefix(B), parents(shared_tree ? size_t(T) : size_t(B) * (T + 3));
  const int64_t par_stride = shared_tree ? 0 : T + 3;
  std::fill(parents.p, parents.p + parents.n, int64_t(-99));
  for (size_t r = 0; r < c.trees.size(); ++r)
    for (int i = 0; i < T; ++i) parents.p[r * par_stride + i] = c.trees[r][i];
  std::vector<int64_t> plen(B);  // the clamped prefix, as the kernel documents it
  for (int b = 0; b < B; ++b) {
    prefix.p[b] = c.prefix[b];
    plen[b] = std::min<int64_t>(std::max<int64_t>(c.prefix[b], 0), S - T);
  }
  // Inputs: q rows; k / v rows of the key set (prefix + tree) of every (b, kvh). Other rows stay NaN.
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int i = 0; i < T; ++i)
        for (int d = 0; d < D; ++d) q.p[b * qb + h * qh + i * qt + d] = f2h(float(urand(-1, 1)), bf);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      for (int64_t s = 0; s < plen[b] + T; ++s)
        for (int d = 0; d < D; ++d) {
          k.p[b * kb + h * kh + s * kt + d] = f2h(float(urand(-1, 1)), bf);
          v.p[b * vb + h * vh + s * vt + d] = f2h(float(urand(-1, 1)), bf);
        }

  TreeAttentionArgs a{};
  a.q = q.p, a.k_cache = k.p, a.v_cache = v.p, a.out = out.p;
  a.prefix_lens = prefix.p;
  a.parents = parents.p;
  a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.T = T, a.D = D, a.S_max = S, a.num_splits = c.splits;
  const int64_t qs[3] = {qb, qh, qt}, ks[3] = {kb, kh, kt}, vs[3] = {vb, vh, vt}, os[3] = {ob, oh, ot};
  for (int i = 0; i < 3; ++i) a.q_strides[i] = qs[i], a.k_strides[i] = ks[i], a.v_strides[i] = vs[i], a.out_strides[i] = os[i];
  a.parents_batch_stride = par_stride;
  a.scale = float(1.0 / std::sqrt(double(D)) * (1 + 0.5 * urand(0, 1)));
  a.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  const int64_t ws_bytes = tree_attention_workspace_bytes(B, Hq, T, D, c.splits);
  const auto ws = poisoned_workspace(ws_bytes);  // every workspace value read must be written first
  if (!ws) return false;
  a.workspace = ws->p;
  if (const char* e = tree_attention_check(a)) {
    printf("  check failed: %s\n", e);
    return false;
  }

  using namespace tree_attention_detail;
  const Params p = make_params(a);
  g_paths.insert((p.q_vec && p.k_vec && p.v_vec) ? 1 : 2);
  if (!p.q_vec || !p.k_vec || !p.v_vec) g_paths.insert(2);
  const std::vector<int64_t> order = block_order(attention_blocks(p), c.shuffle, rng);
  dispatch(a, [&](auto d, auto bf16) {
    constexpr int kD = decltype(d)::value;
    constexpr bool kBF = decltype(bf16)::value;
    g_variants.insert({kD, kBF});
    std::unique_ptr<Smem<kD>> smem(new Smem<kD>);
    for (int64_t blk : order) {
      memset(static_cast<void*>(smem.get()), 0xFF, sizeof(Smem<kD>));  // garbage shared memory
      attention_block<kD, kBF>(p, blk, *smem, HostExec{});
    }
    for (int64_t blk = 0; blk < merge_blocks(p); ++blk) merge_block<kD, kBF>(p, blk, HostExec{});
    return cudaSuccess;
  });

  // float64 reference over the explicit key set.
  bool ok = true;
  const double u_p = bf ? 1.0 / 512 : 1.0 / 4096;   // P rounded to the dtype before P V
  const double u_o = bf ? 1.0 / 256 : 1.0 / 2048;   // output rounding (one ulp, generous)
  RelativeError rel;
  std::vector<int64_t> keys;
  std::vector<double> sc, acc(D), absacc(D);
  for (int b = 0; b < B && ok; ++b) {
    const int64_t* par = parents.p + b * par_stride;
    for (int h = 0; h < Hq && ok; ++h) {
      const int kvh = h / G;
      for (int i = 0; i < T && ok; ++i) {
        keys.clear();
        for (int64_t s = 0; s < plen[b]; ++s) keys.push_back(s);
        for (int64_t cur = i;;) {  // i and its ancestors; a parent outside [0, cur) ends the walk
          keys.push_back(plen[b] + cur);
          const int64_t pp = par[cur];
          if (cur == 0 || pp < 0 || pp >= cur) break;
          cur = pp;
        }
        double mx, l;
        attention_row_reference(
            q.p + b * qb + h * qh + i * qt, keys, [&](int64_t s) { return k.p + b * kb + kvh * kh + s * kt; },
            [&](int64_t s) { return v.p + b * vb + kvh * vh + s * vt; }, D, bf, a.scale, sc, acc, absacc, mx, l);
        for (int d = 0; d < D; ++d) {
          const uint16_t bits = out.p[b * ob + h * oh + i * ot + d];
          const double ref = acc[d], tol = 2 * u_p * absacc[d] + u_o * std::fabs(ref) + 1e-6;
          if (!output_element_ok(bits, bf, ref, tol, g_worst, rel)) {
            printf("  MISMATCH b=%d h=%d i=%d d=%d got=%.7g (0x%04x) ref=%.7g tol=%.3g keys=%zu\n", b, h, i, d,
                   h2f(bits, bf), bits, ref, tol, keys.size());
            ok = false;
            break;
          }
        }
      }
    }
  }
  ok = ok && rel.within(1e-2);
  // Padding between output rows / heads / batch rows must be untouched.
  ok = ok && padding_untouched(out, bf, {{B, ob}, {Hq, oh}, {T, ot}}, D);
  return ok;
}

static void run(const AttnCase& c) {
  if (tally(run_attention(c))) return;
  printf("FAIL attention (%s) B=%d Hq=%d Hkv=%d T=%d D=%d S_max=%d splits=%d bf16=%d trees=%zu pad=%d misalign=%d "
         "prefix[0]=%lld\n",
         c.what, c.B, c.Hq, c.Hkv, c.T, c.D, c.S_max, c.splits, c.bf16, c.trees.size(), c.pad, c.misalign,
         (long long)c.prefix[0]);
}

// A case with prefixes given per batch row; S_max = max prefix + T + extra.
static AttnCase make_case(int B, int Hq, int Hkv, int T, int D, std::vector<int64_t> prefix, int splits, bool bf16,
                          Shape shape, bool per_row, int extra, const char* what) {
  AttnCase c;
  c.B = B, c.Hq = Hq, c.Hkv = Hkv, c.T = T, c.D = D, c.splits = splits, c.bf16 = bf16;
  int64_t most = 0;
  for (int64_t x : prefix) most = std::max(most, x);
  c.S_max = int(most + T + extra);
  c.prefix = prefix;
  const int rows = per_row ? B : 1;
  for (int r = 0; r < rows; ++r) c.trees.push_back(make_tree(T, r == 0 ? shape : Shape(irand(4))));
  c.pad = 0, c.misalign = 0, c.shuffle = false;
  c.what = what;
  return c;
}

static void attention_cases() {
  // T sweep (D, G, dtype, tree shape and prefix vary along), one shared tree.
  const int Ts[] = {1, 2, 7, 16, 33, 64, 128, 256};
  for (int x = 0; x < 8; ++x) {
    const int T = Ts[x];
    const int G = T >= 128 ? 1 : (x % 3 == 0 ? 1 : x % 3 == 1 ? 4 : 8);
    const int D = x % 2 ? 128 : 64;
    const int64_t pre = T >= 128 ? 37 : (x % 4 == 0 ? 0 : x % 4 == 1 ? 1 : x % 4 == 2 ? 129 : 300);
    run(make_case(1, 2 * G, 2, T, D, {pre}, 1 + x % 3, x % 2 == 0, Shape(x % 4), false, x, "T sweep"));
  }
  // Chains and stars at T = 256 (deepest pointer jumping; 8-word masks), no prefix, D 64.
  run(make_case(1, 1, 1, 256, 64, {0}, 1, true, kChain, false, 0, "chain 256"));
  run(make_case(1, 1, 1, 256, 64, {5}, 2, false, kStar, false, 3, "star 256"));
  // Ragged prefixes per batch row, per-row trees, several splits (some empty for the short rows).
  run(make_case(3, 8, 2, 7, 64, {0, 1, 257}, 3, true, kRandom, true, 11, "ragged per-row"));
  run(make_case(3, 4, 1, 16, 128, {200, 63, 64}, 4, false, kBushy, true, 0, "ragged G=4"));
  run(make_case(2, 8, 1, 33, 64, {65, 1000}, 5, true, kRandom, true, 64, "ragged G=8 T=33"));
  run(make_case(2, 4, 4, 16, 128, {513, 0}, 2, false, kChain, false, 1, "G=1 shared chain"));
  // More splits than 64-key chunks: most prefix splits empty (lse = -inf, o = 0).
  run(make_case(1, 4, 1, 7, 64, {70}, 9, true, kRandom, false, 0, "splits > chunks"));
  run(make_case(2, 2, 2, 2, 128, {3, 130}, 16, false, kStar, true, 500, "splits >> chunks"));
  run(make_case(1, 8, 1, 1, 64, {1}, 1, false, kChain, false, 0, "T=1 G=8"));
  run(make_case(1, 8, 8, 64, 64, {191}, 1, true, kRandom, false, 0, "G=1 Hkv=8 splits=1"));
  // Rows per KV head not a multiple of the 64-row tile, with 16-row warps fully idle.
  run(make_case(1, 12, 4, 5, 128, {90}, 2, true, kBushy, false, 7, "G=3 T=5"));
  // Strided and misaligned tensors (scalar load path, 2-byte output stores), shuffled block order.
  {
    AttnCase c = make_case(2, 4, 2, 9, 64, {40, 77}, 2, false, kRandom, true, 5, "strided");
    c.pad = 3, c.shuffle = true;
    run(c);
    c = make_case(2, 8, 2, 12, 128, {100, 3}, 3, true, kRandom, false, 2, "misaligned");
    c.misalign = 15, c.shuffle = true;
    run(c);
    c = make_case(1, 4, 4, 20, 64, {150}, 2, true, kChain, false, 0, "padded, aligned strides");
    c.pad = 8;  // strides stay multiples of 8: the 16-byte path with non-contiguous rows
    run(c);
    c = make_case(1, 2, 1, 3, 128, {10}, 1, false, kStar, false, 0, "k misaligned only");
    c.misalign = 2;
    run(c);
  }
  // Garbage prefix_lens and parents: clamped / ignored by the kernel, never out of bounds.
  {
    const int64_t big = std::numeric_limits<int64_t>::max(), small = std::numeric_limits<int64_t>::min();
    AttnCase c = make_case(4, 4, 2, 9, 64, {0, 0, 0, 0}, 3, true, kGarbage, true, 150, "garbage");
    c.prefix = {big, small, -3, int64_t(c.S_max) + 1};
    for (auto& t : c.trees) t = make_tree(9, kGarbage);
    run(c);
    c = make_case(2, 8, 1, 40, 128, {0, 0}, 2, false, kGarbage, false, 100, "garbage shared");
    c.prefix = {int64_t(c.S_max) - 40, int64_t(c.S_max) - 39};  // the largest valid value and one past it
    run(c);
  }
  // Random shapes, bounded work.
  for (int x = 0; x < 14; ++x) {
    const int Ds[] = {64, 128}, Gs[] = {1, 2, 4, 8};
    const int D = Ds[irand(2)], G = Gs[irand(4)], Hkv = 1 + irand(2), B = 1 + irand(3);
    const int T = 1 + irand(x % 3 == 0 ? 70 : 24);
    std::vector<int64_t> pre(B);
    for (auto& y : pre) y = irand(4) == 0 ? 0 : irand(400);
    AttnCase c = make_case(B, G * Hkv, Hkv, T, D, pre, 1 + irand(6), irand(2), Shape(irand(4)), irand(2), irand(90),
                           "random");
    c.pad = irand(4) == 0 ? irand(9) : 0;
    c.misalign = irand(4) == 0 ? irand(16) : 0;
    c.shuffle = irand(2);
    run(c);
  }
}

// Host checks and the host-side sizing functions.
static bool attention_checks_ok() {
  alignas(16) static unsigned char mem[4096];
  TreeAttentionArgs a{};
  a.q = a.k_cache = a.v_cache = mem;
  a.out = mem;
  a.prefix_lens = a.parents = reinterpret_cast<const int64_t*>(mem);
  a.workspace = mem;
  a.B = 2, a.Hq = 8, a.Hkv = 2, a.T = 16, a.D = 128, a.S_max = 1024, a.num_splits = 3;
  for (int i = 0; i < 3; ++i) a.q_strides[i] = a.k_strides[i] = a.v_strides[i] = a.out_strides[i] = 128;
  a.scale = 0.1f;
  a.dtype = DType::kBFloat16;
  if (const char* e = tree_attention_check(a)) {
    printf("check rejected good arguments: %s\n", e);
    return false;
  }
  const BadArgs<TreeAttentionArgs> bad[] = {
      {"dtype", [](TreeAttentionArgs& b) { b.dtype = DType(5); }},
      {"B = 0", [](TreeAttentionArgs& b) { b.B = 0; }},
      {"Hq % Hkv", [](TreeAttentionArgs& b) { b.Hkv = 3; }},
      {"T = 0", [](TreeAttentionArgs& b) { b.T = 0; }},
      {"T = 257", [](TreeAttentionArgs& b) { b.T = 257; }},
      {"D = 96", [](TreeAttentionArgs& b) { b.D = 96; }},
      {"S_max < T", [](TreeAttentionArgs& b) { b.S_max = 15; }},
      {"splits = 0", [](TreeAttentionArgs& b) { b.num_splits = 0; }},
      {"splits = 1025", [](TreeAttentionArgs& b) { b.num_splits = 1025; }},
      {"q stride < 0", [](TreeAttentionArgs& b) { b.q_strides[1] = -1; }},
      {"k stride 2^40", [](TreeAttentionArgs& b) { b.k_strides[2] = int64_t(1) << 40; }},
      {"parents stride", [](TreeAttentionArgs& b) { b.parents_batch_stride = -2; }},
      {"scale NaN", [](TreeAttentionArgs& b) { b.scale = NAN; }},
      {"null q", [](TreeAttentionArgs& b) { b.q = nullptr; }},
      {"odd out", [](TreeAttentionArgs& b) { b.out = mem + 1; }},
      {"odd prefix_lens", [](TreeAttentionArgs& b) { b.prefix_lens = reinterpret_cast<const int64_t*>(mem + 4); }},
      {"null parents", [](TreeAttentionArgs& b) { b.parents = nullptr; }},
      {"workspace 8", [](TreeAttentionArgs& b) { b.workspace = mem + 8; }},
  };
  if (!rejects_all(a, bad, tree_attention_check)) return false;
  // Sizing: workspace = (splits + 1) * rows * (D + 1) floats, in two 256-byte aligned parts.
  const int64_t rows = 1 * 4 * 3 * 3;
  const int64_t want = (rows * 64 * 4 + 255) / 256 * 256 + (rows * 4 + 255) / 256 * 256;
  if (tree_attention_workspace_bytes(1, 4, 3, 64, 2) != want || tree_attention_workspace_bytes(1, 4, 3, 96, 2) != -1 ||
      tree_attention_workspace_bytes(1, 4, 0, 64, 2) != -1 || tree_attention_workspace_bytes(1, 4, 3, 64, 0) != -1) {
    printf("workspace_bytes wrong\n");
    return false;
  }
  // Splits: 1 for short prefixes; >= 256 positions each; about two waves on the Llama shapes.
  const int64_t s1 = tree_attention_num_splits(1, 32, 8, 64, 64 + 100, 132);
  const int64_t s2 = tree_attention_num_splits(1, 32, 8, 64, 64 + 32768, 132);
  const int64_t s3 = tree_attention_num_splits(1, 32, 8, 16, 16 + 1024, 132);
  const int64_t s4 = tree_attention_num_splits(64, 32, 8, 128, 128 + 65536, 132);
  const int64_t s5 = tree_attention_num_splits(0, 0, 0, 0, 0, 0);
  printf("num_splits: %lld %lld %lld %lld %lld\n", (long long)s1, (long long)s2, (long long)s3, (long long)s4,
         (long long)s5);
  if (s1 != 1 || s2 < 8 || s3 > 1024 / 256 || s3 < 1 || s4 != 1 || s5 != 1) {
    printf("num_splits wrong\n");
    return false;
  }
  // Two waves: (tiles * B * Hkv) * (splits + 1) >= 2 * 2 * 132 blocks for the long prefix.
  if (int64_t((4 * 64 + 63) / 64) * 8 * (s2 + 1) < 4 * 132) return false;
  return true;
}

// ================================ compact_kv ===================================================

struct KVCase {
  int L, B, Hkv, S_max, D, P, eb;
  int pad;       // element padding added to strides
  int misalign;  // bit mask: 1 k, 2 v (base elem_bytes past 16-byte alignment)
  bool garbage;  // garbage prefix_lens / accepted / accept_len
  bool full;     // accept_len = P - 1 everywhere
};

static bool run_compact(const KVCase& c) {
  const int L = c.L, B = c.B, H = c.Hkv, S = c.S_max, D = c.D, P = c.P, eb = c.eb;
  const int64_t st_s = D + c.pad, st_h = S * st_s + c.pad, st_b = H * st_h + 2 * c.pad, st_l = B * st_b + c.pad;
  const size_t n = size_t((L - 1) * st_l + (B - 1) * st_b + (H - 1) * st_h + (S - 1) * st_s + D);
  Buf<unsigned char> k(n * eb, (c.misalign & 1) ? eb : 0), v(n * eb, (c.misalign & 2) ? eb : 0);
  for (size_t i = 0; i < n * eb; ++i) k.p[i] = (unsigned char)(rng()), v.p[i] = (unsigned char)(rng());
  std::vector<unsigned char> k_ref(k.p, k.p + n * eb), v_ref(v.p, v.p + n * eb);
  const int64_t acc_stride = P + (c.pad ? 2 : 0);
  Buf<int64_t> prefix(B), accepted(size_t(B - 1) * acc_stride + P), accept_len(B);
  std::fill(accepted.p, accepted.p + accepted.n, int64_t(-1));
  for (int b = 0; b < B; ++b) {
    // A strictly increasing path from 0 within the tree slots [0, room), -1 padded.
    const int64_t pre = irand(S);
    prefix.p[b] = pre;
    const int64_t room = S - pre;
    std::vector<int64_t> path = {0};
    for (int64_t x = 1; x < room && int(path.size()) < P; ++x)
      if (irand(3) != 0 || x == 1) path.push_back(x + (irand(2) ? irand(3) : 0));
    std::sort(path.begin(), path.end());
    path.erase(std::unique(path.begin(), path.end()), path.end());
    if (int(path.size()) > P) path.resize(P);
    for (size_t j = 0; j < path.size(); ++j) accepted.p[b * acc_stride + j] = path[j];
    accept_len.p[b] = c.full ? P - 1 : irand(int(path.size()));  // path.size() - 1 at most
    if (c.full) accept_len.p[b] = P - 1;  // entries past the path are -1: skipped
    if (c.garbage) {
      const int64_t big = std::numeric_limits<int64_t>::max(), small = std::numeric_limits<int64_t>::min();
      const int64_t pres[] = {big, small, -1, int64_t(S), int64_t(S) - 1, pre};
      prefix.p[b] = pres[irand(6)];
      const int64_t lens[] = {big, small, -5, int64_t(P), int64_t(P) + 3, accept_len.p[b]};
      accept_len.p[b] = lens[irand(6)];
      for (int j = 0; j < P; ++j)
        if (irand(3) == 0) {
          const int64_t vals[] = {big, small, -2, int64_t(S), int64_t(S) - 1, int64_t(irand(S + 2))};
          accepted.p[b * acc_stride + j] = vals[irand(6)];
        }
    }
  }
  // Reference: the documented sequential moves with the documented skips.
  for (int which = 0; which < 2; ++which) {
    std::vector<unsigned char>& ref = which ? v_ref : k_ref;
    for (int l = 0; l < L; ++l)
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
          const int64_t pre = prefix.p[b];
          if (pre < 0 || pre >= S) continue;
          const int64_t nacc = std::min<int64_t>(std::max<int64_t>(accept_len.p[b], 0), P - 1);
          for (int64_t j = 1; j <= nacc; ++j) {
            const int64_t a = accepted.p[b * acc_stride + j];
            if (a < 0 || a >= S - pre || j >= S - pre) continue;
            const int64_t row0 = l * st_l + b * st_b + h * st_h;
            memmove(&ref[size_t(row0 + (pre + j) * st_s) * eb], &ref[size_t(row0 + (pre + a) * st_s) * eb],
                    size_t(D) * eb);
          }
        }
  }
  CompactKVArgs a{};
  a.k_cache = k.p, a.v_cache = v.p;
  a.prefix_lens = prefix.p, a.accepted = accepted.p, a.accept_len = accept_len.p;
  a.L = L, a.B = B, a.Hkv = H, a.S_max = S, a.D = D, a.P = P;
  const int64_t st[4] = {st_l, st_b, st_h, st_s};
  for (int i = 0; i < 4; ++i) a.k_strides[i] = a.v_strides[i] = st[i];
  a.accepted_batch_stride = acc_stride;
  a.elem_bytes = eb;
  if (const char* e = compact_kv_check(a)) {
    printf("  check failed: %s\n", e);
    return false;
  }
  using namespace compact_kv_detail;
  const Params p = make_params(a);
  g_paths.insert(p.k_vec ? 4 : 8);
  g_paths.insert(p.v_vec ? 4 : 8);
  for (int64_t blk = 0; blk < blocks_for(p); ++blk)
    for (int t = 0; t < kThreads; ++t) compact_thread(p, blk, t);
  if (memcmp(k.p, k_ref.data(), n * eb) != 0 || memcmp(v.p, v_ref.data(), n * eb) != 0) {
    printf("  cache differs from the reference\n");
    return false;
  }
  return true;
}

static void run(const KVCase& c) {
  if (tally(run_compact(c))) return;
  printf("FAIL compact_kv L=%d B=%d Hkv=%d S_max=%d D=%d P=%d eb=%d pad=%d misalign=%d garbage=%d full=%d\n", c.L,
         c.B, c.Hkv, c.S_max, c.D, c.P, c.eb, c.pad, c.misalign, c.garbage, c.full);
}

static void compact_cases() {
  int x = 0;
  for (int L = 1; L <= 3; ++L)
    for (int eb : {2, 4})
      for (int D : {8, 64, 7, 128})
        for (int variant = 0; variant < 4; ++variant, ++x) {
          KVCase c{};
          c.L = L, c.eb = eb, c.D = D;
          c.B = 1 + x % 3, c.Hkv = 1 + (x / 3) % 3;
          c.S_max = 8 + irand(60);
          c.P = 1 + irand(12);
          c.pad = variant == 1 ? 1 + irand(5) : variant == 2 ? 8 : 0;
          c.misalign = variant == 3 ? 1 + irand(3) : 0;
          c.garbage = x % 5 == 4;
          c.full = x % 7 == 3;
          run(c);
        }
  // P = 1 (no moves possible), a huge accept_len with -1 padding, S_max tiny.
  run(KVCase{2, 2, 2, 3, 64, 1, 2, 0, 0, false, true});
  run(KVCase{1, 3, 1, 2, 16, 5, 4, 0, 0, true, true});
}

static bool compact_checks_ok() {
  alignas(16) static unsigned char mem[256];
  CompactKVArgs a{};
  a.k_cache = a.v_cache = mem;
  a.prefix_lens = a.accepted = a.accept_len = reinterpret_cast<const int64_t*>(mem);
  a.L = 2, a.B = 2, a.Hkv = 2, a.S_max = 64, a.D = 64, a.P = 8;
  for (int i = 0; i < 4; ++i) a.k_strides[i] = a.v_strides[i] = 64;
  a.accepted_batch_stride = 8;
  a.elem_bytes = 2;
  if (compact_kv_check(a) != nullptr) return false;
  const BadArgs<CompactKVArgs> bad[] = {
      {"elem_bytes 3", [](CompactKVArgs& b) { b.elem_bytes = 3; }},
      {"L 0", [](CompactKVArgs& b) { b.L = 0; }},
      {"P 0", [](CompactKVArgs& b) { b.P = 0; }},
      {"D 0", [](CompactKVArgs& b) { b.D = 0; }},
      {"stride -1", [](CompactKVArgs& b) { b.k_strides[3] = -1; }},
      {"v stride 2^40", [](CompactKVArgs& b) { b.v_strides[0] = int64_t(1) << 40; }},
      {"accepted stride", [](CompactKVArgs& b) { b.accepted_batch_stride = -1; }},
      {"null v", [](CompactKVArgs& b) { b.v_cache = nullptr; }},
      {"odd k", [](CompactKVArgs& b) { b.k_cache = mem + 1; }},
      {"k 2-aligned with eb 4", [](CompactKVArgs& b) { b.elem_bytes = 4, b.k_cache = mem + 2; }},
      {"odd accepted", [](CompactKVArgs& b) { b.accepted = reinterpret_cast<const int64_t*>(mem + 4); }},
      {"null accept_len", [](CompactKVArgs& b) { b.accept_len = nullptr; }},
      {"grid", [](CompactKVArgs& b) { b.L = b.B = b.Hkv = int64_t(1) << 20; }},
  };
  return rejects_all(a, bad, compact_kv_check, "compact_kv ");
}

int main() {
  const auto start = std::chrono::steady_clock::now();
  if (!attention_checks_ok() || !compact_checks_ok()) return 1;
  printf("host checks ok\n");
  attention_cases();
  const double t_attn = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  compact_cases();
  if (g_variants.size() != 4 || g_paths.size() != 4) {
    printf("only %zu of 4 attention kernel variants and %zu of 4 load paths ran\n", g_variants.size(), g_paths.size());
    return 1;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  printf("all 4 attention kernel variants, both load paths of tree_attention and of compact_kv ran; largest "
         "attention error: %.2g of the tolerance; %.1f s (attention %.1f s)\n",
         g_worst, seconds, t_attn);
  printf("emulation: %d cases ok, %d failed\n", n_cases - n_fail, n_fail);
  return n_fail != 0;
}

#endif
