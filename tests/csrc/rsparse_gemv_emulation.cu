// CPU emulation of the CUDA kernel of csrc/rsparse/rsparse_gemv.cu: runs the kernel's own block program
// (run_block, compiled for the host, with the HostExec executor: every phase for threads 0..255 in turn,
// ballots per warp, barriers at phase boundaries) for every block of the grid, in increasing block index
// (the dispatch order the kernel assumes) or with the role B blocks first and the rest shuffled (so that
// any block can be the last to arrive at its N tile). Tile layout, workspace layout and kernel variant
// come from the launcher's own host code (make_params, dispatch). Results are compared with a float64
// reference written here from the specification (rsparse_gemv.h). Exact-size heap buffers under
// AddressSanitizer catch out-of-bounds reads and writes (workspace included); outputs are NaN-poisoned,
// so unwritten elements fail; shared memory is poisoned per block. tests/test_rsparse_emulation.py
// builds and runs it wherever nvcc is found:
//   nvcc -std=c++17 -O0 -g -arch=sm_80 -Xcompiler=-fsanitize=address,-fsanitize=undefined \
//        -DEO_SRC='"<repo>/csrc/rsparse/rsparse_gemv.cu"' -I<repo>/csrc rsparse_gemv_emulation.cu
// `--layout` prints the grid layout for the Llama-3-8B shapes instead.
#define EFFICIENT_OPS_RSPARSE_HOST_ONLY  // the host side only: no kernel to compile
#include EO_SRC
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
using namespace efficient_ops::rsparse_gemv_detail;
#ifndef __CUDA_ARCH__  // host-only harness (nvcc also parses it in the device pass)

#include "emulation_common.h"  // f2h / h2f, Buf, kPoison, random draws, case tally, host-check tables
using namespace emulation;

static std::set<std::pair<int, bool>> g_variants;  // (MT, bf16) kernels that ran
static std::set<int> g_paths;                      // 16-byte / scalar path per matrix: 2 * matrix + vec
static std::mt19937 rng(20240611);
static double urand(double lo, double hi) { return uniform(rng, lo, hi); }

template <int MT, bool kBF16>
static void emulate_grid(const Params& p, const std::vector<int>& order) {
  g_variants.insert({MT, kBF16});
  for (int b : order) {
    std::unique_ptr<Smem<MT>> s(new Smem<MT>);
    memset(s.get(), 0xFF, sizeof(Smem<MT>));  // garbage shared memory: NaN floats, -1 ints
    run_block<MT, kBF16>(p, b, *s, HostExec{});
  }
}

// Runs the grid; returns false (with a message) if the counters do not end where they should.
static bool emulate(const RSparseGemvArgs& a, int sm_count, bool shuffle) {
  if (const char* e = rsparse_gemv_check(a)) {
    printf("check failed: %s\n", e);
    exit(1);
  }
  if (a.N == 0) return true;
  const Params p = make_params(a, sm_count);
  if (p.blocks_b > 0 && p.K > 0) g_paths.insert(2 * 1 + p.v_vec);
  if (p.K > 0) g_paths.insert(2 * 0 + p.w_vec);
  if (p.blocks_c > 0) g_paths.insert(2 * 2 + p.us_vec);
  std::vector<int> order(p.blocks_b + p.blocks_a + p.blocks_c);
  for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
  if (shuffle) {  // role B still first: a C block may only start once every B block was dispatched
    std::shuffle(order.begin(), order.begin() + p.blocks_b, rng);
    std::shuffle(order.begin() + p.blocks_b, order.end(), rng);
  }
  dispatch(a, [&](auto mt, auto bf16) {
    emulate_grid<decltype(mt)::value, decltype(bf16)::value>(p, order);
    return cudaSuccess;
  });
  bool ok = true;
  if (*p.b_done != unsigned(p.blocks_b)) {
    printf("  b_done = %u, expected %d\n", *p.b_done, p.blocks_b);
    ok = false;
  }
  for (int t = 0; t < p.tiles_n; ++t)
    if (p.tile_arrivals[t] != unsigned(p.a_splits + p.c_splits)) {
      printf("  tile %d: %u arrivals, expected %d\n", t, p.tile_arrivals[t], p.a_splits + p.c_splits);
      ok = false;
    }
  return ok;
}

struct Case {
  int M, K, N, R;
  bool bf16, bias;
  int thr_mode;   // 0: -inf, 1: +inf, 2: mid (about half active), 3: NaN, 4: low (most active)
  int norm_mode;  // 0: positive, 1: with zeros and infs
  bool nan_x;     // a few NaN (and inf) entries in x
  int x_stride_extra, out_stride_extra;
  int misalign;   // bit mask: 1 x, 2 weight_t, 4 v, 8 us_t, 16 bias, 32 out
  int sms;
  bool shuffle;
};

static double g_worst_ratio = 0;  // largest (error beyond the output rounding) / (float32 bound)
static double g_worst_ws = 0;     // largest workspace error / (float32 bound)

// A float32 sum against its float64 reference: within 2^-17 of the sum of |terms| (NaN and inf exact).
static bool close_f32(float got, double ref, double abs_sum) {
  if (!std::isfinite(ref)) return std::isnan(ref) ? std::isnan(got) : double(got) == ref;
  const double bound = std::ldexp(abs_sum, -17), err = fabs(double(got) - ref);
  if (bound > 0) g_worst_ws = std::max(g_worst_ws, err / bound);
  return err <= bound;
}

static bool run_case(const Case& c) {
  const bool bf = c.bf16;
  const int M = c.M, K = c.K, N = c.N, R = c.R;
  const int64_t xs = K + c.x_stride_extra, os = N + c.out_stride_extra;
  Buf<uint16_t> x(size_t(M - 1) * xs + K, (c.misalign & 1) ? 2 : 0);
  Buf<uint16_t> w(size_t(K) * N, (c.misalign & 2) ? 2 : 0);
  Buf<float> norms(K);
  Buf<uint16_t> v(size_t(K) * R, (c.misalign & 4) ? 2 : 0);
  Buf<uint16_t> us(size_t(R) * N, (c.misalign & 8) ? 2 : 0);
  Buf<uint16_t> bias(N, (c.misalign & 16) ? 2 : 0);
  Buf<uint16_t> out(size_t(M - 1) * os + N, (c.misalign & 32) ? 2 : 0);
  const int64_t ws_bytes = rsparse_gemv_workspace_bytes(M, N, R);
  Buf<unsigned char> ws{size_t(ws_bytes)};
  memset(ws.p, 0, size_t(ws_bytes));

  for (size_t i = 0; i < x.n; ++i) {
    float f = float(urand(-1, 1));
    if (c.nan_x && rng() % 17 == 0) f = rng() % 3 ? std::numeric_limits<float>::quiet_NaN() : (rng() % 2 ? INFINITY : -INFINITY);
    x.p[i] = f2h(f, bf);
  }
  for (int i = 0; i < K; ++i) {
    float f = float(urand(0.25, 2.0));
    if (c.norm_mode == 1 && rng() % 9 == 0) f = rng() % 2 ? 0.f : INFINITY;
    norms.p[i] = f;
  }
  for (size_t i = 0; i < w.n; ++i) w.p[i] = f2h(float(urand(-1, 1)), bf);
  for (size_t i = 0; i < v.n; ++i) v.p[i] = f2h(float(urand(-1, 1)), bf);
  for (size_t i = 0; i < us.n; ++i) us.p[i] = f2h(float(urand(-1, 1)), bf);
  for (int n = 0; n < N; ++n) bias.p[n] = f2h(float(urand(-1, 1)), bf);
  const uint16_t poison = kPoison[bf];
  std::fill(out.p, out.p + out.n, poison);
  const float thresholds[] = {-INFINITY, INFINITY, float(urand(0.3, 0.7)), std::numeric_limits<float>::quiet_NaN(),
                              float(urand(0.02, 0.15))};
  const float thr = thresholds[c.thr_mode];

  RSparseGemvArgs a{};
  a.x = x.p;
  a.weight_t = w.p;
  a.col_norms = norms.p;
  a.threshold = thr;
  a.v = R > 0 ? v.p : nullptr;  // R == 0: never read, so null
  a.us_t = R > 0 ? us.p : nullptr;
  a.bias = c.bias ? bias.p : nullptr;
  a.out = out.p;
  a.workspace = ws.p;
  a.M = M, a.K = K, a.N = N, a.R = R;
  a.x_row_stride = xs;
  a.out_row_stride = os;
  a.dtype = bf ? DType::kBFloat16 : DType::kFloat16;
  bool ok = emulate(a, c.sms, c.shuffle);

  // float64 reference from the specification; the mask is the float32 product and comparison.
  const float* ws_y = reinterpret_cast<const float*>(ws.p);
  const float* ws_z = reinterpret_cast<const float*>(ws.p + (ws_bytes > 0 ? workspace_layout(M, N, R).z_offset : 0));
  std::vector<double> z(R), zabs(R);
  for (int m = 0; m < M; ++m) {
    std::vector<char> active(K);
    for (int i = 0; i < K; ++i) {
      const float xf = h2f(x.p[m * xs + i], bf);
      const float prod = fabsf(xf) * norms.p[i];
      active[i] = prod > thr;
    }
    for (int j = 0; j < R; ++j) {
      z[j] = zabs[j] = 0;
      for (int i = 0; i < K; ++i)
        if (!active[i]) {
          const double t = double(h2f(x.p[m * xs + i], bf)) * h2f(v.p[size_t(i) * R + j], bf);
          z[j] += t;
          zabs[j] += fabs(t);
        }
      // The float32 partial sums left in the workspace: far tighter than the output rounding, so a
      // single dropped or doubled term shows.
      if (!close_f32(ws_z[size_t(m) * R + j], z[j], zabs[j])) {
        if (ok) printf("  workspace z[%d][%d] = %.9g, reference %.9g\n", m, j, ws_z[size_t(m) * R + j], z[j]);
        ok = false;
      }
    }
    for (int n = 0; n < N; ++n) {
      double ref = 0, scale = 0;
      for (int i = 0; i < K; ++i)
        if (active[i]) {
          const double t = double(h2f(x.p[m * xs + i], bf)) * h2f(w.p[size_t(i) * N + n], bf);
          ref += t;
          scale += fabs(t);
        }
      for (int j = 0; j < R; ++j) {
        const double u = h2f(us.p[size_t(j) * N + n], bf);
        ref += z[j] * u;
        scale += zabs[j] * fabs(u);
      }
      if (!close_f32(ws_y[size_t(m) * N + n], ref, scale)) {
        if (ok) printf("  workspace y[%d][%d] = %.9g, reference %.9g\n", m, n, ws_y[size_t(m) * N + n], ref);
        ok = false;
      }
      if (c.bias) {
        ref += h2f(bias.p[n], bf);
        scale += fabs(h2f(bias.p[n], bf));
      }
      const uint16_t bits = out.p[m * os + n];
      const double got = h2f(bits, bf);
      bool good;
      if (bits == poison) {
        good = false;
      } else if (!std::isfinite(ref)) {
        good = std::isnan(ref) ? std::isnan(got) : got == ref;
      } else {
        const double rounding = (bf ? 1.0 / 256 : 1.0 / 2048) * fabs(ref) * 1.01 + (bf ? 0 : 3e-8);
        const double f32 = std::ldexp(scale, -17);
        const double err = fabs(got - ref);
        good = err <= rounding + f32;
        if (f32 > 0) g_worst_ratio = std::max(g_worst_ratio, (err - rounding) / f32);
      }
      if (!good) {
        if (ok) printf("  MISMATCH m=%d n=%d got=%.9g (0x%04x) ref=%.9g scale=%g\n", m, n, got, bits, ref, scale);
        ok = false;
      }
    }
  }
  for (int m = 0; m + 1 < M; ++m)  // padding between output rows must be untouched
    for (int64_t n = N; n < os; ++n)
      if (out.p[m * os + n] != poison) {
        printf("  wrote padding m=%d n=%lld\n", m, (long long)n);
        ok = false;
      }
  return ok;
}

static void run(const Case& c) {
  if (tally(run_case(c))) return;
  printf("FAIL M=%d K=%d N=%d R=%d bf16=%d bias=%d thr=%d norms=%d nan_x=%d x_stride+%d out_stride+%d misalign=%d "
         "sms=%d shuffle=%d\n",
         c.M, c.K, c.N, c.R, c.bf16, c.bias, c.thr_mode, c.norm_mode, c.nan_x, c.x_stride_extra, c.out_stride_extra,
         c.misalign, c.sms, c.shuffle);
}

// Host checks that the emulation relies on (the Python test covers the rest through the extension).
static bool checks_ok() {
  alignas(16) static unsigned char mem[4096];
  RSparseGemvArgs a{};
  a.x = mem;
  a.weight_t = mem;
  a.col_norms = reinterpret_cast<const float*>(mem);
  a.v = mem;
  a.us_t = mem;
  a.out = mem;
  a.workspace = mem;
  a.M = 1, a.K = 16, a.N = 16, a.R = 8;
  a.x_row_stride = 16, a.out_row_stride = 16;
  a.dtype = DType::kFloat16;
  if (rsparse_gemv_check(a) != nullptr) return false;
  const BadArgs<RSparseGemvArgs> bad[] = {
      {"M = 0", [](RSparseGemvArgs& b) { b.M = 0; }},
      {"M = 9", [](RSparseGemvArgs& b) { b.M = 9; }},
      {"K < 0", [](RSparseGemvArgs& b) { b.K = -1; }},
      {"N = 2^30", [](RSparseGemvArgs& b) { b.N = int64_t(1) << 30; }},
      {"x stride", [](RSparseGemvArgs& b) { b.M = 2, b.x_row_stride = 15; }},
      {"out stride", [](RSparseGemvArgs& b) { b.M = 2, b.out_row_stride = 15; }},
      {"null v", [](RSparseGemvArgs& b) { b.v = nullptr; }},
      {"null us_t", [](RSparseGemvArgs& b) { b.us_t = nullptr; }},
      {"null workspace", [](RSparseGemvArgs& b) { b.workspace = nullptr; }},
      {"odd x", [](RSparseGemvArgs& b) { b.x = mem + 1; }},
      {"dtype", [](RSparseGemvArgs& b) { b.dtype = DType(7); }},
      {"grid", [](RSparseGemvArgs& b) { b.K = b.N = (int64_t(1) << 30) - 1; }},
  };
  if (!rejects_all(a, bad, rsparse_gemv_check)) return false;
  RSparseGemvArgs r0 = a;  // R == 0: v and us_t may be null
  r0.R = 0, r0.v = nullptr, r0.us_t = nullptr;
  if (rsparse_gemv_check(r0) != nullptr) return false;
  return rsparse_gemv_workspace_bytes(-1, 1, 1) == -1 && rsparse_gemv_workspace_bytes(9, 1, 1) == -1;
}

// `--layout`: the grid for the Llama-3-8B shapes, and the bytes each role reads at 50% activity, M = 1.
static int print_layout() {
  for (int sms : {108, 132})
    for (auto kn : {std::pair<int, int>{4096, 4096}, {4096, 14336}, {14336, 4096}})
      for (int R : {256, 1024, 2048}) {
        const Layout L = make_layout(kn.first, kn.second, R, sms);
        printf("sms=%d K=%d N=%d R=%d  A: %d tiles x %d splits (chunk %d) = %lld  B: %d x %d (chunk %d) = %lld  "
               "C: %d x %d (chunk %d) = %lld  MB read at 50%%: A %.1f B %.1f C %.1f\n",
               sms, kn.first, kn.second, R, L.tiles_n, L.a_splits, L.a_chunk, (long long)L.blocks_a, L.tiles_r,
               L.b_splits, L.b_chunk, (long long)L.blocks_b, L.tiles_n, L.c_splits, L.c_chunk, (long long)L.blocks_c,
               0.5 * kn.first * kn.second * 2 / 1e6, 0.5 * kn.first * R * 2 / 1e6, double(R) * kn.second * 2 / 1e6);
      }
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--layout") return print_layout();
  const auto start = std::chrono::steady_clock::now();
  if (!checks_ok()) return 1;
  printf("host checks ok\n");

  // Systematic small shapes: K, N, R around the 8-column vector and the 64-channel chunk boundaries,
  // every M, both dtypes, every threshold mode, aligned and misaligned pointers.
  const int Ks[] = {0, 1, 7, 8, 9, 65, 130};
  const int Ns[] = {1, 7, 8, 9, 72};
  const int Rs[] = {0, 1, 8, 9, 70};
  int v = 0;
  for (int K : Ks)
    for (int N : Ns)
      for (int R : Rs) {
        ++v;
        Case c{};
        c.M = 1 + v % 8;
        c.K = K, c.N = N, c.R = R;
        c.bf16 = v % 2;
        c.bias = v % 3 != 0;
        c.thr_mode = v % 5;
        c.norm_mode = (v / 5) % 2;
        c.nan_x = v % 7 == 3;
        c.x_stride_extra = v % 4 == 1 ? 3 : 0;
        c.out_stride_extra = v % 3 == 2 ? 5 : 0;
        c.misalign = v % 6 == 5 ? int(rng() % 64) : 0;
        c.sms = v % 2 ? 132 : 1;
        c.shuffle = v % 4 == 3;
        run(c);
      }
  // Random shapes up to a few hundred thousand multiply-adds, with every option drawn at random.
  for (int i = 0; i < 260; ++i) {
    Case c{};
    for (;;) {
      c.K = int(rng() % 1200);
      c.N = 1 + int(rng() % 600);
      c.R = rng() % 4 == 0 ? 0 : int(rng() % 300);
      if (rng() % 2) c.N = (c.N + 7) / 8 * 8;  // the 16-byte path
      if (rng() % 2) c.R = (c.R + 7) / 8 * 8;
      if (int64_t(c.K) * c.N + int64_t(c.K) * c.R + int64_t(c.R) * c.N <= 150000) break;
    }
    c.M = 1 + int(rng() % 8);
    c.bf16 = rng() % 2;
    c.bias = rng() % 4 != 0;
    c.thr_mode = rng() % 3 == 0 ? int(rng() % 5) : 2;
    c.norm_mode = rng() % 4 == 0;
    c.nan_x = rng() % 8 == 0;
    c.x_stride_extra = rng() % 3 == 0 ? int(rng() % 20) : 0;
    c.out_stride_extra = rng() % 3 == 0 ? int(rng() % 20) : 0;
    c.misalign = rng() % 4 == 0 ? int(rng() % 64) : 0;
    const int sms[] = {1, 4, 108, 132};
    c.sms = sms[rng() % 4];
    c.shuffle = rng() % 2;
    run(c);
  }
  // Chunks of up to 512 channels (two per thread) with one SM; wide R and N (32 lanes, several tiles).
  for (int i = 0; i < 4; ++i) {
    Case c{};
    c.M = i % 2 ? 8 : 1;
    c.K = 1100 + 3 * i;
    c.N = i < 2 ? 264 : 300;
    c.R = i < 2 ? 264 : 131;
    c.bf16 = i % 2;
    c.bias = true;
    c.thr_mode = 2;
    c.sms = 1;
    c.shuffle = i >= 2;
    run(c);
  }

  const size_t expected_variants = 4 * 2;
  if (g_variants.size() != expected_variants || g_paths.size() != 6) {
    printf("only %zu of %zu kernel variants and %zu of 6 load paths ran\n", g_variants.size(), expected_variants,
           g_paths.size());
    return 1;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  printf("all %zu kernel variants and both load paths of weight_t, v and us_t ran; largest error beyond the output "
         "rounding: %.2g of the float32 bound, workspace: %.2g; %.1f s\n",
         g_variants.size(), g_worst_ratio, g_worst_ws, seconds);
  printf("emulation: %d cases ok, %d failed\n", n_cases - n_fail, n_fail);
  return n_fail != 0;
}

#endif
