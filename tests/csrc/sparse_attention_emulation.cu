// CPU emulation of the CUDA kernels of csrc/sparse_attention/ (block_sparse_attention.cu, paged_sparse_decode.cu):
// runs the kernels' own block programs, compiled for the host, for every block of their grids:
//   * block_sparse_attention: attention_block with the HostExec executor (block phases for threads 0..127 in
//     turn, warp phases for warps 0..3, the warp collectives ldmatrix / mma.sync m16n8k16 / quad shuffles
//     emulated from their PTX fragment layouts), every (D, dtype, row-group) kernel variant;
//   * paged_sparse_decode: decode_block then merge_block, every (D, dtype, GT) variant.
// Grid, tiling, workspace layout and kernel variant come from the launchers' own host code (make_params,
// dispatch). Results are compared with float64 references written here from the specifications
// (block_sparse_attention.h, paged_sparse_decode.h): an explicit key list per query row, built from the block
// mask / page list with the documented clamping and skipping. Exact-size heap buffers under AddressSanitizer
// catch out-of-bounds reads and writes; outputs, lse, the workspace, shared memory and per-thread state are
// NaN-poisoned, so unwritten outputs and reads of unwritten values fail; every K/V row the kernel has no
// reason to read (outside every selected block / page, past seq_len, the padding between rows) is NaN, so a
// stray read shows up as NaN in the output. Garbage masks, page lists and lengths run too.
// tests/test_sparse_attention_emulation.py builds and runs it wherever nvcc is found:
//   nvcc -std=c++17 -O0 -g -arch=sm_80 -Xcompiler=-fsanitize=address,-fsanitize=undefined -I<repo>/csrc \
//        tests/csrc/sparse_attention_emulation.cu
#define EFFICIENT_OPS_SPARSE_ATTENTION_HOST_ONLY  // the host side only: no kernel to compile
#include "sparse_attention/block_sparse_attention.cu"
#include "sparse_attention/paged_sparse_decode.cu"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <new>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

using namespace efficient_ops;
using common_detail::cdiv;
#ifndef __CUDA_ARCH__  // host-only harness (nvcc also parses it in the device pass)

#include "emulation_common.h"  // f2h / h2f, Buf, NaN poison, random draws, attention reference, tallies
using namespace emulation;

static std::mt19937_64 rng(20250219);
static double urand(double lo, double hi) { return uniform(rng, lo, hi); }
static int irand(int n) { return below(rng, n); }  // [0, n)

static std::set<std::tuple<int, bool, int>> g_bs_variants;  // (D, bf16, RG) block-sparse kernels that ran
static std::set<std::tuple<int, bool, int>> g_pd_variants;  // (D, bf16, GT) decode kernels that ran
static std::set<std::pair<int, int>> g_block_pairs;         // (block_m, block_n) that ran
static std::set<int> g_paths;  // 1: block-sparse 16-byte path, 2: its scalar path, 4 / 8: the same for decode
static double g_worst = 0;     // largest error / tolerance

// ================================ block-sparse attention =========================================

struct BSCase {
  int B, Hq, Hkv, Sq, Skv, D, bm, bn;
  bool causal, bf16, lse;
  bool mask_b, mask_h;  // the mask has a batch / head dimension (else broadcast by stride 0)
  double density;       // fraction of the key blocks each query block selects
  int empty;            // 0: none; 1: some query blocks select nothing; 2: every query block selects nothing
  bool garbage;         // garbage counts and indices (out of range, huge, negative, duplicates)
  int pad;              // element padding added to strides (0: contiguous)
  int misalign;         // bit mask: 1 q, 2 k, 4 v, 8 out (base 2 bytes past 16-byte alignment)
  bool shuffle;         // run the blocks in a random order
  const char* what;
};

static bool run_bs(const BSCase& c) {
  const bool bf = c.bf16;
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, Sq = c.Sq, Skv = c.Skv, D = c.D, G = Hq / Hkv;
  const int bm = c.bm, bn = c.bn, Mq = int(cdiv(Sq, bm)), Nk = int(cdiv(Skv, bn));
  const int off = Skv - Sq;
  // Strides (elements) with padding.
  const int64_t qt = D + c.pad, qh = Sq * qt + 3 * c.pad, qb = Hq * qh + 5 * c.pad;
  const int64_t kt = D + 2 * c.pad, kh = Skv * kt + c.pad, kb = Hkv * kh + 7 * c.pad;
  const int64_t vt = D + c.pad, vh = Skv * vt + 5 * c.pad, vb = Hkv * vh + c.pad;
  const int64_t ot = D + 3 * c.pad, oh = Sq * ot, ob = Hq * oh + c.pad;
  Buf<uint16_t> q(strided_extent({{B, qb}, {Hq, qh}, {Sq, qt}}, D), (c.misalign & 1) ? 2 : 0);
  Buf<uint16_t> k(strided_extent({{B, kb}, {Hkv, kh}, {Skv, kt}}, D), (c.misalign & 2) ? 2 : 0);
  Buf<uint16_t> v(strided_extent({{B, vb}, {Hkv, vh}, {Skv, vt}}, D), (c.misalign & 4) ? 2 : 0);
  Buf<uint16_t> out(strided_extent({{B, ob}, {Hq, oh}, {Sq, ot}}, D), (c.misalign & 8) ? 2 : 0);
  Buf<float> lse(size_t(B) * Hq * Sq);
  std::fill(q.p, q.p + q.n, kNanIn[bf]);
  std::fill(k.p, k.p + k.n, kNanIn[bf]);
  std::fill(v.p, v.p + v.n, kNanIn[bf]);
  std::fill(out.p, out.p + out.n, kPoison[bf]);
  std::fill(lse.p, lse.p + lse.n, std::numeric_limits<float>::quiet_NaN());

  // The block mask: kv_num_blocks [Bm, Hm, Mq] (stride 0 on broadcast dims), kv_indices [Bm, Hm, Mq, Nk]
  // with a padded m stride.
  const int Bm = c.mask_b ? B : 1, Hm = c.mask_h ? Hq : 1;
  const int64_t nb_s1 = c.mask_h ? Mq + c.pad : 0, nb_s0 = c.mask_b ? (c.mask_h ? Hm * nb_s1 : Mq) + c.pad : 0;
  const int64_t ix_s2 = Nk + c.pad, ix_s1 = c.mask_h ? Mq * ix_s2 : 0, ix_s0 = c.mask_b ? (c.mask_h ? Hm * ix_s1 : Mq * ix_s2) : 0;
  Buf<int32_t> nblocks(size_t((Bm - 1) * nb_s0 + (Hm - 1) * nb_s1 + Mq));
  Buf<int32_t> indices(Nk == 0 ? 0 : size_t((Bm - 1) * ix_s0 + (Hm - 1) * ix_s1 + (Mq - 1) * ix_s2 + Nk));
  std::fill(indices.p, indices.p + indices.n, int32_t(-77));
  std::fill(nblocks.p, nblocks.p + nblocks.n, int32_t(-77));
  for (int bb = 0; bb < Bm; ++bb)
    for (int hh = 0; hh < Hm; ++hh)
      for (int m = 0; m < Mq; ++m) {
        int32_t* row = indices.p + bb * ix_s0 + hh * ix_s1 + int64_t(m) * ix_s2;
        int32_t& n = nblocks.p[bb * nb_s0 + hh * nb_s1 + m];
        if (c.garbage) {
          const int32_t counts[] = {-5, -1, 0, irand(Nk + 1), Nk, Nk + 1, INT_MAX, INT_MIN, irand(Nk + 1)};
          n = counts[irand(9)];
          for (int e = 0; e < Nk; ++e) {
            const int32_t vals[] = {-1, INT_MIN, Nk, Nk + 7, INT_MAX, irand(Nk), irand(Nk), irand(Nk)};
            row[e] = vals[irand(8)];
          }
          continue;
        }
        std::vector<int32_t> perm(Nk);
        for (int e = 0; e < Nk; ++e) perm[e] = e;
        std::shuffle(perm.begin(), perm.end(), rng);  // unsorted index lists
        int sel = int(std::lround(c.density * Nk));
        if (c.density > 0 && sel == 0 && Nk > 0) sel = 1;
        if (c.empty == 2 || (c.empty == 1 && irand(3) == 0)) sel = 0;
        n = sel;
        for (int e = 0; e < Nk; ++e) row[e] = e < sel ? perm[e] : (irand(2) ? -1 : perm[e]);  // tail: junk
      }

  // Key list of query row i of (b, h), as the spec defines it (list semantics: a duplicate counts twice).
  const auto keys_of = [&](int b, int h, int i, std::vector<int>& keys) {
    keys.clear();
    const int m = i / bm;
    int n = nblocks.p[(c.mask_b ? b : 0) * nb_s0 + (c.mask_h ? h : 0) * nb_s1 + m];
    n = std::min(std::max(n, 0), Nk);
    const int32_t* row = indices.p + (c.mask_b ? b : 0) * ix_s0 + (c.mask_h ? h : 0) * ix_s1 + int64_t(m) * ix_s2;
    for (int e = 0; e < n; ++e) {
      const int blk = row[e];
      if (blk < 0 || blk >= Nk) continue;
      for (int j = blk * bn; j < blk * bn + bn && j < Skv; ++j)
        if (!c.causal || j <= i + off) keys.push_back(j);
    }
  };
  // K/V rows the kernel may read: keys of the selected blocks up to the query block's causal limit. All
  // other rows stay NaN.
  std::vector<char> needed(size_t(B) * Hkv * std::max(Skv, 1), 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int m = 0; m < Mq; ++m) {
        const int last = std::min(m * bm + bm - 1, Sq - 1);
        int n = nblocks.p[(c.mask_b ? b : 0) * nb_s0 + (c.mask_h ? h : 0) * nb_s1 + m];
        n = std::min(std::max(n, 0), Nk);
        const int32_t* row = indices.p + (c.mask_b ? b : 0) * ix_s0 + (c.mask_h ? h : 0) * ix_s1 + int64_t(m) * ix_s2;
        for (int e = 0; e < n; ++e) {
          const int blk = row[e];
          if (blk < 0 || blk >= Nk) continue;
          for (int j = blk * bn; j < blk * bn + bn && j < Skv; ++j)
            if (!c.causal || j <= last + off) needed[(size_t(b) * Hkv + h / G) * Skv + j] = 1;
        }
      }
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int i = 0; i < Sq; ++i)
        for (int d = 0; d < D; ++d) q.p[b * qb + h * qh + i * qt + d] = f2h(float(urand(-1, 1)), bf);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hkv; ++h)
      for (int j = 0; j < Skv; ++j)
        if (needed[(size_t(b) * Hkv + h) * Skv + j])
          for (int d = 0; d < D; ++d) {
            k.p[b * kb + h * kh + j * kt + d] = f2h(float(urand(-1, 1)), bf);
            v.p[b * vb + h * vh + j * vt + d] = f2h(float(urand(-1, 1)), bf);
          }

  BlockSparseAttentionArgs a{};
  a.q = q.p, a.k = k.p, a.v = v.p, a.out = out.p;
  a.lse = c.lse ? lse.p : nullptr;
  a.kv_num_blocks = nblocks.p;
  a.kv_indices = indices.p;
  a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.Sq = Sq, a.Skv = Skv, a.D = D, a.block_m = bm, a.block_n = bn;
  a.Mq = Mq, a.Nk = Nk;
  a.num_blocks_strides[0] = nb_s0, a.num_blocks_strides[1] = nb_s1;
  a.indices_strides[0] = ix_s0, a.indices_strides[1] = ix_s1, a.indices_strides[2] = ix_s2;
  a.causal = c.causal;
  const int64_t qs[3] = {qb, qh, qt}, ks[3] = {kb, kh, kt}, vs[3] = {vb, vh, vt}, os[3] = {ob, oh, ot};
  for (int i = 0; i < 3; ++i) a.q_strides[i] = qs[i], a.k_strides[i] = ks[i], a.v_strides[i] = vs[i], a.out_strides[i] = os[i];
  a.scale = float(1.0 / std::sqrt(double(D)) * (1 + 2 * urand(0, 1)));
  a.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  if (const char* e = block_sparse_attention_check(a)) {
    printf("  check failed: %s\n", e);
    return false;
  }

  using namespace block_sparse_detail;
  const Params p = make_params(a);
  g_paths.insert((p.q_vec && p.k_vec && p.v_vec && p.out_vec) ? 1 : 2);
  g_block_pairs.insert({bm, bn});
  const std::vector<int64_t> order = block_order(grid_blocks(a), c.shuffle, rng);
  dispatch(a, [&](auto d, auto bf16, auto rg) {
    constexpr int kD = decltype(d)::value;
    constexpr bool kBF = decltype(bf16)::value;
    constexpr int kRG = decltype(rg)::value;
    g_bs_variants.insert({kD, kBF, kRG});
    std::unique_ptr<Smem<kD>> smem(new Smem<kD>);
    for (int64_t blk : order) {
      memset(static_cast<void*>(smem.get()), 0xFF, sizeof(Smem<kD>));  // garbage shared memory
      attention_block<kD, kBF, kRG>(p, blk, *smem, HostExec{});
    }
    return cudaSuccess;
  });

  // float64 reference.
  bool ok = true;
  const double u_p = bf ? 1.0 / 512 : 1.0 / 4096;  // P rounded to the dtype before P V
  const double u_o = bf ? 1.0 / 128 : 1.0 / 1024;  // output rounding: one ulp
  RelativeError rel;
  std::vector<int> keys;
  std::vector<double> sc, acc(D), absacc(D);
  for (int b = 0; b < B && ok; ++b)
    for (int h = 0; h < Hq && ok; ++h) {
      const int kvh = h / G;
      for (int i = 0; i < Sq && ok; ++i) {
        keys_of(b, h, i, keys);
        double mx, l;
        attention_row_reference(
            q.p + b * qb + h * qh + i * qt, keys, [&](int j) { return k.p + b * kb + kvh * kh + j * kt; },
            [&](int j) { return v.p + b * vb + kvh * vh + j * vt; }, D, bf, a.scale, sc, acc, absacc, mx, l);
        for (int d = 0; d < D; ++d) {
          const uint16_t bits = out.p[b * ob + h * oh + i * ot + d];
          const double ref = acc[d], tol = 2 * u_p * absacc[d] + u_o * std::fabs(ref) + 1e-6;
          if (!output_element_ok(bits, bf, ref, tol, g_worst, rel) || (keys.empty() && bits != 0)) {
            printf("  MISMATCH b=%d h=%d i=%d d=%d got=%.7g (0x%04x) ref=%.7g tol=%.3g keys=%zu\n", b, h, i, d,
                   h2f(bits, bf), bits, ref, tol, keys.size());
            ok = false;
            break;
          }
        }
        if (ok && c.lse) {
          const float got = lse.p[(size_t(b) * Hq + h) * Sq + i];
          const double ref = keys.empty() ? -INFINITY : mx + std::log(l);
          const bool good = keys.empty() ? (got == -INFINITY) : std::fabs(got - ref) <= 1e-4 * (1 + std::fabs(ref));
          if (!good) {
            printf("  LSE MISMATCH b=%d h=%d i=%d got=%.9g ref=%.9g keys=%zu\n", b, h, i, got, ref, keys.size());
            ok = false;
          }
        }
      }
    }
  ok = ok && rel.within(1e-2);
  if (ok) {  // padding between output rows / heads / batch rows untouched; lse untouched when not wanted
    ok = padding_untouched(out, bf, {{B, ob}, {Hq, oh}, {Sq, ot}}, D);
    if (!c.lse)
      for (size_t e = 0; e < lse.n && ok; ++e)
        if (!std::isnan(lse.p[e])) {
          printf("  wrote lse although lse_ptr is null\n");
          ok = false;
        }
  }
  return ok;
}

static void run(const BSCase& c) {
  if (tally(run_bs(c))) return;
  printf("FAIL block_sparse (%s) B=%d Hq=%d Hkv=%d Sq=%d Skv=%d D=%d bm=%d bn=%d causal=%d bf16=%d lse=%d mask=%d%d "
         "density=%.2f empty=%d garbage=%d pad=%d misalign=%d\n",
         c.what, c.B, c.Hq, c.Hkv, c.Sq, c.Skv, c.D, c.bm, c.bn, c.causal, c.bf16, c.lse, c.mask_b, c.mask_h,
         c.density, c.empty, c.garbage, c.pad, c.misalign);
}

static BSCase bs(int B, int Hq, int Hkv, int Sq, int Skv, int D, int bm, int bn, bool causal, bool bf16,
                 double density, const char* what) {
  BSCase c{};
  c.B = B, c.Hq = Hq, c.Hkv = Hkv, c.Sq = Sq, c.Skv = Skv, c.D = D, c.bm = bm, c.bn = bn;
  c.causal = causal, c.bf16 = bf16, c.lse = true;
  c.mask_b = B > 1, c.mask_h = true;
  c.density = density;
  c.what = what;
  return c;
}

static void block_sparse_cases() {
  const int sizes[] = {16, 32, 64, 128};
  // Every (block_m, block_n) pair, odd lengths, causal with Sq < Skv; D, dtype, G, lse, mask layout vary.
  int x = 0;
  for (int bm : sizes)
    for (int bn : sizes) {
      const int D = x % 2 ? 128 : 64;
      const int G = x % 3 == 0 ? 1 : 4;
      BSCase c = bs(1 + x % 2, G * (1 + x % 2), 1 + x % 2, 37 + 11 * x, 150 + 7 * x, D, bm, bn, x % 4 != 3,
                    (x / 2) % 2 == 0, 0.3 + 0.1 * (x % 5), "block pair sweep");
      c.lse = x % 5 != 1;
      c.mask_b = x % 3 == 1 && c.B > 1;
      c.mask_h = x % 4 != 2;
      c.shuffle = x % 3 == 2;
      c.pad = x % 7 == 3 ? 8 : 0;
      run(c);
      ++x;
    }
  // Full density = dense (causal) attention, both dtypes and head dims.
  run(bs(1, 4, 2, 100, 100, 64, 64, 64, true, false, 1.0, "full causal"));
  run(bs(1, 2, 2, 77, 203, 128, 32, 128, false, true, 1.0, "full non-causal"));
  run(bs(2, 4, 1, 130, 130, 128, 128, 16, true, true, 1.0, "full causal, block_n 16"));
  // Sq > Skv under causal: leading rows have no key (zeros, lse = -inf).
  run(bs(1, 2, 1, 90, 40, 64, 16, 32, true, true, 1.0, "Sq > Skv causal"));
  run(bs(1, 2, 2, 70, 20, 128, 64, 16, true, false, 0.8, "Sq > Skv causal, D 128"));
  // Decode-like and tiny shapes.
  run(bs(2, 8, 2, 1, 300, 64, 16, 64, true, true, 0.5, "Sq 1"));
  run(bs(1, 1, 1, 1, 1, 128, 128, 128, true, false, 1.0, "Sq = Skv = 1"));
  run(bs(1, 4, 4, 5, 9, 64, 16, 16, false, true, 1.0, "tiny"));
  // Broadcast masks: one for the batch, one for the heads, one for everything.
  {
    BSCase c = bs(2, 4, 2, 96, 160, 64, 32, 32, true, false, 0.5, "mask broadcast over heads");
    c.mask_h = false;
    run(c);
    c = bs(2, 4, 2, 96, 160, 128, 64, 64, false, true, 0.5, "mask broadcast over batch");
    c.mask_b = false;
    run(c);
    c = bs(3, 2, 1, 50, 70, 64, 16, 64, true, true, 0.6, "mask broadcast over batch and heads");
    c.mask_b = c.mask_h = false;
    run(c);
  }
  // Empty query blocks (some / all), empty rows from causal future-only blocks, very sparse masks.
  {
    BSCase c = bs(2, 4, 2, 150, 190, 64, 32, 64, true, true, 0.5, "some empty query blocks");
    c.empty = 1;
    run(c);
    c = bs(1, 2, 1, 64, 64, 128, 64, 32, false, false, 0.5, "every query block empty");
    c.empty = 2;
    run(c);
    c = bs(1, 2, 2, 64, 64, 128, 16, 16, true, true, 0.05, "very sparse");
    run(c);
    c = bs(1, 2, 1, 200, 200, 64, 128, 128, true, false, 0.5, "causal 128 x 128");
    run(c);
  }
  // Padded strides and misaligned bases: the scalar load / store paths.
  {
    BSCase c = bs(2, 4, 2, 45, 99, 64, 32, 16, true, true, 0.7, "misaligned q/k/v/out");
    c.misalign = 15;
    run(c);
    c = bs(1, 4, 1, 80, 120, 128, 64, 32, false, false, 0.6, "padded strides, misaligned out");
    c.pad = 3, c.misalign = 8, c.lse = false;
    run(c);
    c = bs(1, 2, 2, 33, 65, 128, 16, 128, true, true, 0.9, "padded strides 8");
    c.pad = 8, c.shuffle = true;
    run(c);
  }
  // Garbage counts and indices: clamped / skipped, never out of bounds (duplicates count twice).
  for (int g = 0; g < 6; ++g) {
    const int bm = sizes[g % 4], bn = sizes[(g + 1) % 4];
    BSCase c = bs(1 + g % 2, 2 + 2 * (g % 2), 1 + g % 2, 40 + 23 * g, 60 + 31 * g, g % 2 ? 128 : 64, bm, bn, g % 3 != 0,
                  g % 2 == 0, 0.5, "garbage mask");
    c.garbage = true;
    c.mask_b = g % 2 == 1 && c.B > 1;
    c.shuffle = true;
    run(c);
  }
  // Skv = 0 (no key anywhere: Nk = 0) and Sq = 0 (nothing launched).
  run(bs(1, 2, 1, 20, 0, 64, 16, 16, false, true, 1.0, "Skv 0"));
}

// ================================ paged sparse decode ============================================

struct PDCase {
  int B, Hq, Hkv, D, S_max, page_size, n_sel, splits;
  bool bf16;
  std::vector<int64_t> seq;  // [B], may be garbage
  int sel;        // 0: random distinct pages (with -1 slots); 1: every page in order; 2: garbage values
  int pad, misalign;  // misalign bits: 1 q, 2 k, 4 v, 8 out
  bool shuffle;
  const char* what;
};

static bool run_pd(const PDCase& c) {
  const bool bf = c.bf16;
  const int B = c.B, Hq = c.Hq, Hkv = c.Hkv, D = c.D, S = c.S_max, ps = c.page_size, n_sel = c.n_sel, G = Hq / Hkv;
  const int max_page = int(cdiv(S, ps));
  const int64_t qh = D + c.pad, qb = Hq * qh + 3 * c.pad;
  const int64_t kt = D + c.pad, kh = S * kt + 5 * c.pad, kb = Hkv * kh + c.pad;
  const int64_t vt = D + 2 * c.pad, vh = S * vt + c.pad, vb = Hkv * vh + 3 * c.pad;
  const int64_t oh = D + 3 * c.pad, ob = Hq * oh + c.pad;
  Buf<uint16_t> q(strided_extent({{B, qb}, {Hq, qh}}, D), (c.misalign & 1) ? 2 : 0);
  Buf<uint16_t> k(strided_extent({{B, kb}, {Hkv, kh}, {S, kt}}, D), (c.misalign & 2) ? 2 : 0);
  Buf<uint16_t> v(strided_extent({{B, vb}, {Hkv, vh}, {S, vt}}, D), (c.misalign & 4) ? 2 : 0);
  Buf<uint16_t> out(strided_extent({{B, ob}, {Hq, oh}}, D), (c.misalign & 8) ? 2 : 0);
  Buf<int64_t> seq(B);
  Buf<int32_t> pages(size_t(B) * Hkv * n_sel);
  std::fill(q.p, q.p + q.n, kNanIn[bf]);
  std::fill(k.p, k.p + k.n, kNanIn[bf]);
  std::fill(v.p, v.p + v.n, kNanIn[bf]);
  std::fill(out.p, out.p + out.n, kPoison[bf]);
  std::vector<int64_t> slen(B);
  for (int b = 0; b < B; ++b) {
    seq.p[b] = c.seq[b];
    slen[b] = std::min<int64_t>(std::max<int64_t>(c.seq[b], 0), S);
  }
  for (int bh = 0; bh < B * Hkv; ++bh) {
    int32_t* row = pages.p + size_t(bh) * n_sel;
    if (c.sel == 2) {
      for (int e = 0; e < n_sel; ++e) {
        const int32_t vals[] = {-1, -2, INT_MIN, INT_MAX, max_page, max_page + 3, irand(max_page + 1), irand(max_page + 1)};
        row[e] = vals[irand(8)];
      }
    } else if (c.sel == 1) {
      for (int e = 0; e < n_sel; ++e) row[e] = e < max_page ? e : -1;
    } else {
      std::vector<int32_t> perm(max_page);
      for (int e = 0; e < max_page; ++e) perm[e] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
      int used = 0;
      for (int e = 0; e < n_sel; ++e) row[e] = (irand(4) == 0 || used >= max_page) ? -1 : perm[used++];
    }
  }
  // Keys of (b, kvh): list semantics (garbage duplicates count twice), as the kernel documents.
  const auto keys_of = [&](int b, int kvh, std::vector<int>& keys) {
    keys.clear();
    const int32_t* row = pages.p + (size_t(b) * Hkv + kvh) * n_sel;
    for (int e = 0; e < n_sel; ++e) {
      const int pg = row[e];
      if (pg < 0 || pg >= max_page) continue;
      for (int s = pg * ps; s < pg * ps + ps; ++s)
        if (s < slen[b]) keys.push_back(s);
    }
  };
  std::vector<int> keys;
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < Hq; ++h)
      for (int d = 0; d < D; ++d) q.p[b * qb + h * qh + d] = f2h(float(urand(-1, 1)), bf);
    for (int kvh = 0; kvh < Hkv; ++kvh) {  // only the rows in the key set are finite
      keys_of(b, kvh, keys);
      for (int s : keys)
        for (int d = 0; d < D; ++d) {
          k.p[b * kb + kvh * kh + s * kt + d] = f2h(float(urand(-1, 1)), bf);
          v.p[b * vb + kvh * vh + s * vt + d] = f2h(float(urand(-1, 1)), bf);
        }
    }
  }

  PagedSparseDecodeArgs a{};
  a.q = q.p, a.k_cache = k.p, a.v_cache = v.p, a.out = out.p;
  a.seq_lens = seq.p;
  a.page_indices = pages.p;
  a.B = B, a.Hq = Hq, a.Hkv = Hkv, a.D = D, a.S_max = S, a.page_size = ps, a.n_sel = n_sel, a.num_splits = c.splits;
  a.q_strides[0] = qb, a.q_strides[1] = qh;
  a.out_strides[0] = ob, a.out_strides[1] = oh;
  const int64_t ks[3] = {kb, kh, kt}, vs[3] = {vb, vh, vt};
  for (int i = 0; i < 3; ++i) a.k_strides[i] = ks[i], a.v_strides[i] = vs[i];
  a.scale = float(1.0 / std::sqrt(double(D)) * (1 + 2 * urand(0, 1)));
  a.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  const int64_t ws_bytes = paged_sparse_decode_workspace_bytes(B, Hq, D, c.splits);
  const auto ws = poisoned_workspace(ws_bytes);  // every workspace value read must be written first
  if (!ws) return false;
  a.workspace = ws->p;
  if (const char* e = paged_sparse_decode_check(a)) {
    printf("  check failed: %s\n", e);
    return false;
  }

  using namespace paged_decode_detail;
  const Params p = make_params(a);
  g_paths.insert((p.k_vec && p.v_vec) ? 4 : 8);
  const std::vector<int64_t> order = block_order(decode_blocks(a), c.shuffle, rng);
  dispatch(a, [&](auto d, auto bf16, auto gt) {
    constexpr int kD = decltype(d)::value;
    constexpr bool kBF = decltype(bf16)::value;
    constexpr int kGT = decltype(gt)::value;
    g_pd_variants.insert({kD, kBF, kGT});
    std::unique_ptr<Smem<kD, kGT>> smem(new Smem<kD, kGT>);
    for (int64_t blk : order) {
      memset(static_cast<void*>(smem.get()), 0xFF, sizeof(Smem<kD, kGT>));  // garbage shared memory
      decode_block<kD, kBF, kGT>(p, blk, *smem, HostExec{});
    }
    for (int64_t blk = 0; blk < merge_blocks(a); ++blk) merge_block<kD, kBF>(p, blk, HostExec{});
    return cudaSuccess;
  });

  bool ok = true;
  const double u_o = bf ? 1.0 / 128 : 1.0 / 1024;  // output rounding: one ulp
  RelativeError rel;
  std::vector<double> sc, acc(D), absacc(D);
  for (int b = 0; b < B && ok; ++b)
    for (int h = 0; h < Hq && ok; ++h) {
      const int kvh = h / G;
      keys_of(b, kvh, keys);
      double mx, l;
      attention_row_reference(
          q.p + b * qb + h * qh, keys, [&](int s) { return k.p + b * kb + kvh * kh + s * kt; },
          [&](int s) { return v.p + b * vb + kvh * vh + s * vt; }, D, bf, a.scale, sc, acc, absacc, mx, l);
      for (int d = 0; d < D; ++d) {
        const uint16_t bits = out.p[b * ob + h * oh + d];
        const double ref = acc[d], tol = 1e-5 * absacc[d] + u_o * std::fabs(ref) + 1e-6;
        if (!output_element_ok(bits, bf, ref, tol, g_worst, rel) || (keys.empty() && bits != 0)) {
          printf("  MISMATCH b=%d h=%d d=%d got=%.7g (0x%04x) ref=%.7g tol=%.3g keys=%zu\n", b, h, d, h2f(bits, bf),
                 bits, ref, tol, keys.size());
          ok = false;
          break;
        }
      }
    }
  ok = ok && rel.within(1e-2);
  ok = ok && padding_untouched(out, bf, {{B, ob}, {Hq, oh}}, D);
  return ok;
}

static void run(const PDCase& c) {
  if (tally(run_pd(c))) return;
  printf("FAIL paged_decode (%s) B=%d Hq=%d Hkv=%d D=%d S_max=%d page=%d n_sel=%d splits=%d bf16=%d sel=%d pad=%d "
         "misalign=%d seq[0]=%lld\n",
         c.what, c.B, c.Hq, c.Hkv, c.D, c.S_max, c.page_size, c.n_sel, c.splits, c.bf16, c.sel, c.pad, c.misalign,
         (long long)c.seq[0]);
}

static PDCase pd(int B, int Hq, int Hkv, int D, int S_max, int ps, int n_sel, int splits, bool bf16,
                 std::vector<int64_t> seq, const char* what) {
  PDCase c{};
  c.B = B, c.Hq = Hq, c.Hkv = Hkv, c.D = D, c.S_max = S_max, c.page_size = ps, c.n_sel = n_sel, c.splits = splits;
  c.bf16 = bf16;
  c.seq = seq;
  c.what = what;
  return c;
}

static void paged_decode_cases() {
  // Every GT variant with both head dims and dtypes, odd G in between; ragged seq_lens, several splits.
  const int Gs[] = {1, 2, 4, 8, 16, 3, 5, 11};
  for (int x = 0; x < 8; ++x) {
    const int G = Gs[x];
    for (int v = 0; v < (x < 5 ? 4 : 1); ++v) {
      const int D = (v + x) % 2 ? 128 : 64, ps = (x + v) % 3 == 0 ? 64 : 16;
      const bool bf = (v / 2 + x) % 2 == 1;
      PDCase c = pd(2, 2 * G, 2, D, 300, ps, 9 + x + v, 1 + (x + v) % 4, bf, {300, 123 + 17 * x + v}, "G sweep");
      c.shuffle = v % 2 == 1;
      run(c);
    }
  }
  // n_sel 0 and 1; every page in order (dense decode); pages past seq_len.
  run(pd(2, 4, 1, 128, 200, 16, 0, 1, true, {100, 200}, "n_sel 0"));
  run(pd(2, 4, 2, 64, 200, 64, 1, 1, false, {100, 7}, "n_sel 1"));
  run(pd(1, 8, 2, 128, 200, 16, 1, 3, true, {200}, "n_sel 1, 3 splits (two empty)"));
  {
    PDCase c = pd(2, 8, 1, 128, 256, 16, 16, 4, true, {256, 31}, "every page, in order");
    c.sel = 1;
    run(c);
    c = pd(1, 4, 4, 64, 500, 64, 8, 2, false, {500}, "every page, ps 64, S_max not a page multiple");
    c.sel = 1;
    run(c);
    c = pd(3, 6, 3, 64, 320, 16, 20, 5, true, {0, 1, 17}, "short sequences: most pages past seq_len");
    run(c);
  }
  // Many splits, more splits than entries, one split.
  run(pd(1, 4, 1, 128, 1024, 16, 40, 16, false, {1000}, "16 splits"));
  run(pd(1, 2, 2, 64, 256, 16, 5, 9, true, {256}, "splits > n_sel"));
  run(pd(2, 16, 1, 64, 640, 64, 10, 1, false, {640, 333}, "G 16, one split"));
  // Padded strides / misaligned bases: the scalar load path and element stores.
  {
    PDCase c = pd(2, 4, 2, 64, 160, 16, 8, 2, true, {160, 90}, "misaligned q/k/v/out");
    c.misalign = 15;
    run(c);
    c = pd(1, 6, 2, 128, 200, 64, 4, 2, false, {199}, "padded strides");
    c.pad = 3, c.shuffle = true;
    run(c);
  }
  // Garbage page indices and seq_lens (clamped / skipped; duplicates count twice).
  for (int g = 0; g < 4; ++g) {
    std::vector<int64_t> seqs = {std::numeric_limits<int64_t>::max(), -5, std::numeric_limits<int64_t>::min(), 77};
    PDCase c = pd(4, 4 + 4 * (g % 2), 2, g % 2 ? 128 : 64, 150 + 40 * g, g < 2 ? 16 : 64, 12, 1 + g, g % 2 == 0,
                  seqs, "garbage pages and lengths");
    c.sel = 2;
    run(c);
  }
  // S_max = 0: no page is in range.
  run(pd(1, 2, 1, 64, 0, 16, 3, 2, true, {5}, "S_max 0"));
}

// ================================ host checks =====================================================

static bool expect(const char* got, const char* want_substr, const char* what) {
  if (want_substr == nullptr ? got == nullptr : (got != nullptr && strstr(got, want_substr) != nullptr)) return true;
  printf("host check '%s': got %s\n", what, got ? got : "(accepted)");
  return false;
}

static bool host_checks() {
  bool ok = true;
  alignas(16) static unsigned char mem[4096];
  BlockSparseAttentionArgs a{};
  a.q = a.k = a.v = mem;
  a.out = mem;
  a.kv_num_blocks = reinterpret_cast<const int32_t*>(mem);
  a.kv_indices = reinterpret_cast<const int32_t*>(mem);
  a.B = 2, a.Hq = 8, a.Hkv = 2, a.Sq = 100, a.Skv = 300, a.D = 128, a.block_m = 64, a.block_n = 32;
  a.Mq = 2, a.Nk = 10;
  a.num_blocks_strides[0] = 16, a.num_blocks_strides[1] = 2;
  a.indices_strides[0] = 160, a.indices_strides[1] = 20, a.indices_strides[2] = 10;
  const int64_t qs[3] = {8 * 100 * 128, 100 * 128, 128}, ks[3] = {2 * 300 * 128, 300 * 128, 128};
  for (int i = 0; i < 3; ++i) a.q_strides[i] = a.out_strides[i] = qs[i], a.k_strides[i] = a.v_strides[i] = ks[i];
  a.scale = 0.1f;
  ok &= expect(block_sparse_attention_check(a), nullptr, "good");
  auto bad = a;
  bad.Mq = 3;
  ok &= expect(block_sparse_attention_check(bad), "Mq", "Mq");
  bad = a, bad.Nk = 9;
  ok &= expect(block_sparse_attention_check(bad), "Nk", "Nk");
  bad = a, bad.block_n = 48;
  ok &= expect(block_sparse_attention_check(bad), "block_n", "block_n");
  bad = a, bad.Hkv = 3;
  ok &= expect(block_sparse_attention_check(bad), "Hkv", "Hkv");
  bad = a, bad.D = 96;
  ok &= expect(block_sparse_attention_check(bad), "D must", "D");
  bad = a, bad.indices_strides[2] = -1;
  ok &= expect(block_sparse_attention_check(bad), "indices_strides", "indices_strides");
  bad = a, bad.lse = reinterpret_cast<float*>(mem + 2);
  ok &= expect(block_sparse_attention_check(bad), "lse", "lse alignment");
  bad = a, bad.kv_num_blocks = nullptr;
  ok &= expect(block_sparse_attention_check(bad), "kv_num_blocks", "kv_num_blocks null");
  bad = a, bad.scale = INFINITY;
  ok &= expect(block_sparse_attention_check(bad), "scale", "scale");

  PagedSparseDecodeArgs d{};
  d.q = d.k_cache = d.v_cache = mem;
  d.out = mem;
  d.seq_lens = reinterpret_cast<const int64_t*>(mem);
  d.page_indices = reinterpret_cast<const int32_t*>(mem);
  d.workspace = mem;
  d.B = 2, d.Hq = 32, d.Hkv = 8, d.D = 128, d.S_max = 4096, d.page_size = 16, d.n_sel = 64, d.num_splits = 4;
  d.q_strides[0] = 32 * 128, d.q_strides[1] = 128, d.out_strides[0] = 32 * 128, d.out_strides[1] = 128;
  const int64_t cs[3] = {8 * 4096 * 128, 4096 * 128, 128};
  for (int i = 0; i < 3; ++i) d.k_strides[i] = d.v_strides[i] = cs[i];
  d.scale = 0.1f;
  ok &= expect(paged_sparse_decode_check(d), nullptr, "decode good");
  auto dbad = d;
  dbad.Hkv = 1;
  ok &= expect(paged_sparse_decode_check(dbad), "16 query heads", "G > 16");
  dbad = d, dbad.page_size = 32;
  ok &= expect(paged_sparse_decode_check(dbad), "page_size", "page_size");
  dbad = d, dbad.num_splits = 0;
  ok &= expect(paged_sparse_decode_check(dbad), "num_splits", "num_splits");
  dbad = d, dbad.workspace = mem + 8;
  ok &= expect(paged_sparse_decode_check(dbad), "workspace", "workspace alignment");
  dbad = d, dbad.seq_lens = nullptr;
  ok &= expect(paged_sparse_decode_check(dbad), "seq_lens", "seq_lens null");
  dbad = d, dbad.n_sel = -1;
  ok &= expect(paged_sparse_decode_check(dbad), "n_sel", "n_sel");
  if (paged_sparse_decode_workspace_bytes(2, 32, 128, 4) != 4 * 64 * 128 * 4 + 4 * 64 * 4) {
    printf("host check: workspace bytes %lld\n", (long long)paged_sparse_decode_workspace_bytes(2, 32, 128, 4));
    ok = false;
  }
  if (paged_sparse_decode_workspace_bytes(1, 1, 96, 1) != -1) ok = false;
  const int64_t s1 = paged_sparse_decode_num_splits(1, 8, 2048, 16, 132);  // 32K tokens at batch 1: many splits
  const int64_t s2 = paged_sparse_decode_num_splits(64, 8, 2048, 16, 132);  // 512 blocks: about two waves already
  const int64_t s3 = paged_sparse_decode_num_splits(1, 8, 4, 16, 132);     // 64 tokens: one split
  if (s1 < 16 || s1 > 1024 || s2 > 2 || s3 != 1) {
    printf("host check: num_splits %lld %lld %lld\n", (long long)s1, (long long)s2, (long long)s3);
    ok = false;
  }
  return ok;
}

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  if (!host_checks()) {
    printf("host checks FAILED\n");
    return 1;
  }
  printf("host checks ok\n");
  block_sparse_cases();
  paged_decode_cases();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const bool all_variants = g_bs_variants.size() == 12 && g_pd_variants.size() == 20;
  if (all_variants && g_block_pairs.size() == 16 && g_paths == std::set<int>{1, 2, 4, 8})
    printf("all 12 block-sparse and 20 decode kernel variants, all 16 block-size pairs and both load paths ran\n");
  else
    printf("coverage incomplete: %zu block-sparse variants, %zu decode variants, %zu block pairs, %zu paths\n",
           g_bs_variants.size(), g_pd_variants.size(), g_block_pairs.size(), g_paths.size());
  printf("worst error / tolerance: %.3f\n", g_worst);
  printf("emulation: %d cases ok, %d failed (%.1f s)\n", n_cases - n_fail, n_fail, secs);
  return n_fail == 0 && all_variants ? 0 : 1;
}

#endif  // __CUDA_ARCH__
