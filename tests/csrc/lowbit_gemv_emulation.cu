// CPU emulation of the CUDA kernels of csrc/lowbit/lowbit_gemv.cu: runs the kernels' own per-warp code
// (warp_tile, compiled for the host) for every lane of every warp, reduces like the warp shuffle, stores
// with the kernel's store_tile, and compares with a float64 reference computed from the levels through
// an independent packer written from the format specification (efficient_ops.quant.lowbit's docstring).
// The kernel variant comes from the launcher's own dispatch, and the run checks that every variant ran.
// Exact-size heap buffers under AddressSanitizer catch any out-of-bounds read; outputs are NaN-poisoned,
// so unwritten elements fail. tests/test_lowbit_emulation.py builds and runs it wherever nvcc is found:
//   nvcc -std=c++17 -O0 -g -arch=sm_80 -Xcompiler=-fsanitize=address,-fsanitize=undefined \
//        -DEO_SRC='"<repo>/csrc/lowbit/lowbit_gemv.cu"' -I<repo>/csrc/lowbit lowbit_gemv_emulation.cu
#define EFFICIENT_OPS_LOWBIT_HOST_ONLY  // the host side only: no kernels to compile
#include EO_SRC
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

using namespace efficient_ops;
using namespace efficient_ops::lowbit_gemv_detail;
#ifndef __CUDA_ARCH__  // host-only harness (nvcc also parses it in the device pass)

#include "emulation_common.h"  // f2h / h2f, kPoison, random draws, case tally
using namespace emulation;

// Kernel variants that ran: (number of formats in the kernel, its first format, MT, bf16 x, x load).
static std::set<std::tuple<int, int, int, bool, int>> g_variants;

template <class... Fs>
constexpr int first_format(FormatList<Fs...>) {
  return int(std::get<0>(std::make_tuple(Fs::kId...)));
}
template <class... Fs>
constexpr int format_count(FormatList<Fs...>) {
  return int(sizeof...(Fs));
}

template <class Formats, int MT, typename T, XLoad kLoad>
void emulate_kernel(const Args& args) {
  constexpr int R = kRowsPerWarp<MT>;
  g_variants.insert({format_count(Formats{}), first_format(Formats{}), MT, std::is_same<T, __nv_bfloat16>::value,
                     int(kLoad)});
  const int warps = (args.N + R - 1) / R;
  for (int warp = 0; warp < warps; ++warp) {
    const int n0 = warp * R;
    for_each_tile<MT, T>(args, [&](const Args& a) {
      float total[MT][R] = {};
      // (the butterfly order of the shuffle reduction differs from this serial sum; fine for the check)
      for (int lane = 0; lane < kWarp; ++lane) {
        float acc[MT][R];
        warp_tile<Formats, MT, R, T, kLoad>(a, nullptr, n0, lane, acc);
        for (int m = 0; m < MT; ++m)
          for (int r = 0; r < R; ++r) total[m][r] += acc[m][r];
      }
      store_tile<MT, R, T>(a, n0, total);
    });
  }
}

void emulate(const LowbitGemvArgs& p) {
  if (const char* e = lowbit_gemv_check(p)) {
    printf("check failed: %s\n", e);
    exit(1);
  }
  if (p.N == 0) return;
  const Args a = make_args(p);
  dispatch(p, [&](auto formats, auto mt, auto t, auto load) {
    emulate_kernel<decltype(formats), decltype(mt)::value, typename decltype(t)::type, decltype(load)::value>(a);
    return cudaSuccess;
  });
}

// ---- the formats, independently of the kernel (efficient_ops.quant.lowbit's module docstring) ----

struct Spec {
  const char* name;
  int levels, k_align, words_per_align;
  double magic;  // the kernel's per-format float offset M (its numerics bound the error by it)
};
static Spec spec(LowbitFormat f) {
  switch (f) {
    case LowbitFormat::kW4: return {"w4", 16, 128, 16, 16};
    case LowbitFormat::kW3: return {"w3", 8, 128, 12, 8};
    case LowbitFormat::kW2: return {"w2", 4, 128, 8, 4};
    case LowbitFormat::kTernary: return {"ternary", 3, 160, 8, 4};
    default: return {"w1", 2, 128, 4, 2};
  }
}
static const LowbitFormat kFormats[] = {LowbitFormat::kW4, LowbitFormat::kW3, LowbitFormat::kW2,
                                        LowbitFormat::kTernary, LowbitFormat::kW1};

// Packs one row of levels q[0 .. k_pad) into words.
static void pack_row(LowbitFormat f, const int* q, int k_pad, uint32_t* out) {
  const int words = k_pad / spec(f).k_align * spec(f).words_per_align;
  std::fill(out, out + words, 0u);
  switch (f) {
    case LowbitFormat::kW4:
      for (int k = 0; k < k_pad; ++k) out[k / 8] |= uint32_t(q[k]) << (4 * (k % 8));
      break;
    case LowbitFormat::kW2:
      for (int k = 0; k < k_pad; ++k) out[k / 16] |= uint32_t(q[k]) << (2 * (k % 16));
      break;
    case LowbitFormat::kW1:
      for (int k = 0; k < k_pad; ++k) out[k / 32] |= uint32_t(q[k]) << (k % 32);
      break;
    case LowbitFormat::kW3:
      for (int b = 0; b < k_pad / 128; ++b) {
        for (int w = 0; w < 8; ++w)
          for (int j = 0; j < 16; ++j) out[12 * b + w] |= uint32_t(q[128 * b + 16 * w + j] & 3) << (2 * j);
        for (int v = 0; v < 4; ++v)
          for (int j = 0; j < 32; ++j) out[12 * b + 8 + v] |= uint32_t((q[128 * b + 32 * v + j] >> 2) & 1) << j;
      }
      break;
    default:  // ternary
      for (int u = 0; u < k_pad / 160; ++u)
        for (int i = 0; i < 32; ++i) {
          uint32_t byte = 0;
          for (int j = 4; j >= 0; --j) byte = 3 * byte + uint32_t(q[160 * u + 32 * j + i]);
          out[(32 * u + i) / 4] |= byte << (8 * ((32 * u + i) % 4));
        }
  }
}

// ---- one test case --------------------------------------------------------------------------------

struct SegCase {
  LowbitFormat fmt;
  int K;
  int group;  // 0: one group per row (K_pad)
};
struct Case {
  int M, N;
  SegCase a, b;    // b.fmt == kNone: one segment
  int perm_mode;   // 0: none, 1: a random permutation, 2: garbage values (clamped by the kernel)
  bool xbf, sbf, bias;
  int zero_mode;   // 0 integer, 1 half-integer, 2 arbitrary, 3 huge, 4 binary-centred (0.5 - small)
  int x_offset;    // elements: 1 misaligns x
  int x_stride_extra;
};

static std::mt19937 rng(1234);
static double urand(double lo, double hi) { return uniform(rng, lo, hi); }

// A segment's packed weight with its levels, scales and zeros (buffers sized exactly, for ASan).
struct SegData {
  SegCase c;
  int k_pad = 0, group = 0, groups = 0, words = 0;
  std::vector<int> q;                 // [N, k_pad]
  std::vector<uint16_t> s, z;         // [N, groups]
  uint4* qbuf = nullptr;
  uint16_t* sbuf = nullptr;
  uint16_t* zbuf = nullptr;

  void make(const SegCase& sc, int N, bool sbf, int zero_mode) {
    c = sc;
    const Spec sp = spec(sc.fmt);
    k_pad = (sc.K + sp.k_align - 1) / sp.k_align * sp.k_align;
    group = sc.group ? sc.group : std::max(k_pad, 32);
    groups = (k_pad + group - 1) / group;
    words = k_pad / sp.k_align * sp.words_per_align;
    q.resize(size_t(N) * k_pad);
    for (auto& v : q) v = int(rng() % sp.levels);  // padding columns hold levels too
    std::vector<uint32_t> packed(size_t(N) * words);
    for (int n = 0; n < N; ++n) pack_row(sc.fmt, q.data() + size_t(n) * k_pad, k_pad, packed.data() + size_t(n) * words);
    qbuf = new uint4[packed.size() / 4];
    std::copy(packed.begin(), packed.end(), reinterpret_cast<uint32_t*>(qbuf));
    s.resize(size_t(N) * groups);
    z.resize(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
      s[i] = f2h(float(urand(0.005, 0.1)), sbf);
      float zv;
      switch (zero_mode) {
        case 0: zv = float(rng() % sp.levels); break;
        case 1: zv = float(rng() % sp.levels) + 0.5f; break;
        case 2: zv = float(urand(-20, 20)); break;
        case 3: zv = rng() % 3 == 0 ? (sbf ? 70144.f : 65504.f) : float(rng() % sp.levels); break;
        default: zv = 0.5f - float(urand(-0.3, 0.3)); break;
      }
      z[i] = f2h(zv, sbf);
    }
    sbuf = new uint16_t[s.size()];
    zbuf = new uint16_t[z.size()];
    std::copy(s.begin(), s.end(), sbuf);
    std::copy(z.begin(), z.end(), zbuf);
  }
  ~SegData() {
    delete[] qbuf;
    delete[] sbuf;
    delete[] zbuf;
  }
};

static double g_worst_ratio = 0;  // largest |error| / (float32 error scale) seen

bool run_case(const Case& c) {
  const bool two = c.b.fmt != LowbitFormat::kNone;
  SegData A, B;
  A.make(c.a, c.N, c.sbf, c.zero_mode);
  if (two) B.make(c.b, c.N, c.sbf, (c.zero_mode + 2) % 5);
  const int kx = c.a.K + (two ? c.b.K : 0);  // columns of x

  int* perm = nullptr;
  if (c.perm_mode != 0) {
    perm = new int[std::max(kx, 1)];
    for (int k = 0; k < kx; ++k) perm[k] = k;
    if (c.perm_mode == 1) std::shuffle(perm, perm + kx, rng);
    else
      for (int k = 0; k < kx; ++k) perm[k] = rng() % 4 == 0 ? int(rng()) : int(rng() % (kx + 5)) - 2;
  }
  const auto col = [&](int k) {  // x column of concatenated segment column k (the documented clamp)
    if (!perm) return k;
    return uint32_t(perm[k]) < uint32_t(kx) ? perm[k] : kx - 1;
  };

  const int stride = kx + c.x_stride_extra;
  const size_t x_elems = size_t(c.M - 1) * stride + kx;  // exactly what may be read
  uint16_t* xbase = new uint16_t[c.x_offset + x_elems];
  uint16_t* x = xbase + c.x_offset;
  for (size_t i = 0; i < x_elems; ++i) x[i] = f2h(float(urand(-1, 1)), c.xbf);
  uint16_t* bias = new uint16_t[c.N];
  for (int n = 0; n < c.N; ++n) bias[n] = f2h(float(urand(-1, 1)), c.xbf);
  const int out_stride = c.N + (c.M > 1 ? 3 : 0);
  const size_t out_elems = size_t(c.M - 1) * out_stride + c.N;
  const uint16_t poison = kPoison[c.xbf];
  uint16_t* out = new uint16_t[out_elems];
  std::fill(out, out + out_elems, poison);

  LowbitGemvArgs p{};
  p.x = x;
  p.bias = c.bias ? bias : nullptr;
  p.out = out;
  p.perm = perm;
  p.M = c.M;
  p.N = c.N;
  p.x_row_stride = stride;
  p.out_row_stride = out_stride;
  p.x_dtype = c.xbf ? DType::kBFloat16 : DType::kFloat16;
  p.scale_dtype = c.sbf ? DType::kBFloat16 : DType::kFloat16;
  p.a = {c.a.fmt, A.qbuf, A.sbuf, A.zbuf, c.a.K, A.group};
  if (two) p.b = {c.b.fmt, B.qbuf, B.sbuf, B.zbuf, c.b.K, B.group};
  emulate(p);

  // The kernel sums x * (M + q) and subtracts (M + z) * sum(x) per 32 columns, in float32: its error
  // scales with sum |x s| (2M + |z|), not with the result. 2^-18 of that, plus half an ulp of the output.
  bool ok = true;
  for (int m = 0; m < c.M; ++m)
    for (int n = 0; n < c.N; ++n) {
      double ref = 0, scale = 0;
      for (const SegData* d : {&A, &B}) {
        if (d == &B && !two) continue;
        const int offset = d == &A ? 0 : c.a.K;
        const double magic = spec(d->c.fmt).magic;
        for (int k = 0; k < d->c.K; ++k) {
          const int g = k / d->group;
          const double sv = h2f(d->s[size_t(n) * d->groups + g], c.sbf), zv = h2f(d->z[size_t(n) * d->groups + g], c.sbf);
          const double xv = h2f(x[size_t(m) * stride + col(offset + k)], c.xbf);
          ref += xv * (d->q[size_t(n) * d->k_pad + k] - zv) * sv;
          scale += fabs(xv * sv) * (2 * magic + fabs(zv));
        }
      }
      if (c.bias) {
        ref += h2f(bias[n], c.xbf);
        scale += fabs(h2f(bias[n], c.xbf));
      }
      const double got = h2f(out[size_t(m) * out_stride + n], c.xbf);
      const double half_ulp = c.xbf ? 1.0 / 256 : 1.0 / 2048;
      const double rounding = half_ulp * fabs(ref) * 1.01 + (c.xbf ? 0 : 3e-8);  // (+ fp16 subnormals)
      const double f32 = std::ldexp(scale, -18);
      const double tol = rounding + f32;
      double err = fabs(got - ref);
      if (!c.xbf && fabs(ref) > 65520.0 && std::isinf(got) && (got > 0) == (ref > 0)) err = 0;  // overflow to inf
      if (!(err <= tol)) {
        if (ok) printf("  MISMATCH m=%d n=%d got=%.9g ref=%.9g err=%g tol=%g\n", m, n, got, ref, err, tol);
        ok = false;
      }
      // How much of the float32 bound was used: the error beyond what the output rounding may explain.
      if (f32 > 0) g_worst_ratio = std::max(g_worst_ratio, (err - rounding) / f32);
    }
  for (int m = 0; m + 1 < c.M; ++m)  // padding between output rows must be untouched
    for (int n = c.N; n < out_stride; ++n)
      if (out[size_t(m) * out_stride + n] != poison) {
        printf("  wrote padding m=%d n=%d\n", m, n);
        ok = false;
      }
  delete[] perm;
  delete[] xbase;
  delete[] bias;
  delete[] out;
  return ok;
}

static void run(const Case& c) {
  if (tally(run_case(c))) return;
  printf("FAIL M=%d N=%d a=%s K=%d group=%d", c.M, c.N, spec(c.a.fmt).name, c.a.K, c.a.group);
  if (c.b.fmt != LowbitFormat::kNone) printf(" b=%s K=%d group=%d", spec(c.b.fmt).name, c.b.K, c.b.group);
  printf(" perm=%d xbf=%d sbf=%d bias=%d zeros=%d x_off=%d stride+%d\n", c.perm_mode, c.xbf, c.sbf, c.bias,
         c.zero_mode, c.x_offset, c.x_stride_extra);
}

// Every byte value through the kernel's ternary decoder: digits of the 243 valid bytes.
static bool ternary_digits_exact() {
  for (int base = 0; base < 243; base += 32) {
    alignas(16) uint8_t unit[32];
    for (int i = 0; i < 32; ++i) unit[i] = uint8_t(std::min(base + i, 242));
    const uint4* rows[1] = {reinterpret_cast<const uint4*>(unit)};
    WeightRing<1, 2, FormatTernary::kVecs> ring(nullptr, 0);
    ring.issue(0, rows, 0);
    ring.commit();
    ring.commit();
    ring.wait_oldest();
    uint32_t w[FormatTernary::kWords];
    for (int s = 0; s < FormatTernary::kSubs; ++s) {
      FormatTernary::fetch(ring, 0, 0, s, w);
      const int plane = FormatTernary::sub_column(s) / kSubChunk;
      for (int j = 0; j < 4; ++j) {
        float f[8];
        FormatTernary::decode(w, s, j, f);
        for (int e = 0; e < 8; ++e) {
          int v = unit[8 * j + e];
          for (int p = 0; p < plane; ++p) v /= 3;
          if (f[e] != float(FormatTernary::kMagic + v % 3)) {
            printf("ternary byte %d plane %d: got %g\n", unit[8 * j + e], plane, f[e]);
            return false;
          }
        }
      }
    }
  }
  return true;
}

// `--pack`: prints the packer's words for a fixed level pattern, one line per format, so the Python
// test can hold them against efficient_ops.quant.lowbit.pack_levels.
static int print_packed() {
  for (LowbitFormat f : kFormats) {
    const Spec sp = spec(f);
    const int k_pad = 2 * sp.k_align;
    std::vector<int> q(k_pad);
    for (int k = 0; k < k_pad; ++k) q[k] = (7 * k + k / 5 + 3) % sp.levels;
    std::vector<uint32_t> words(k_pad / sp.k_align * sp.words_per_align);
    pack_row(f, q.data(), k_pad, words.data());
    printf("%s", sp.name);
    for (uint32_t w : words) printf(" %u", w);
    printf("\n");
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--pack") return print_packed();
  // group_of over the whole supported range (K_pad, group <= 2^20: sub-chunks c < 2^15, d <= 2^15
  // sub-chunks per group). It is monotone in c and never below c / d, so checking both ends of every
  // quotient class [q d, q d + d - 1] checks every c.
  for (uint32_t d = 1; d <= (1u << 15); ++d) {
    const Segment seg = make_segment({LowbitFormat::kW4, nullptr, nullptr, nullptr, 1 << 20, int64_t(d) * 32}, nullptr);
    for (uint32_t q = 0; q * d < (1u << 15); ++q)
      for (const uint32_t c : {q * d, std::min(q * d + d - 1, (1u << 15) - 1)})
        if (uint32_t(group_of(seg, int(c))) != c / d) {
          printf("group_of wrong: %u sub-chunks per group, sub-chunk %u\n", d, c);
          return 1;
        }
  }
  printf("group_of exact for all sub-chunks < 2^15, sub-chunks per group <= 2^15\n");
  if (!ternary_digits_exact()) return 1;
  printf("ternary digits exact for all 243 byte values\n");

  // One segment: every format, M, odd K, groups (96: not a power of 2), dtypes, bias, zero points,
  // aligned / misaligned x (the vector and the element kernels), padded row strides.
  const int Ms[] = {1, 2, 3, 5, 8, 9, 16};
  const int Ks[] = {0, 1, 31, 33, 96, 128, 160, 416, 1000};
  for (LowbitFormat f : kFormats)
    for (int M : Ms)
      for (int K : Ks)
        for (int v = 0; v < 5; ++v) {
          const int groups[] = {32, 64, 128, 0, 96};
          Case c{};
          c.M = M;
          c.N = 1 + (7 * v + M + K) % 13;
          c.a = {f, K, groups[(v + K) % 5]};
          c.b = {LowbitFormat::kNone, 0, 0};
          c.xbf = v & 1;
          c.sbf = ((v >> 1) ^ M) & 1;
          c.bias = (v + M) % 3 != 0;
          c.zero_mode = (v + M + K) % 5;
          c.x_offset = v % 3 == 2 ? 1 : 0;
          c.x_stride_extra = v % 4 == 3 ? 3 : v % 2 ? 8 : 0;
          run(c);
        }
  // Long rows: several units per lane, so the weight ring wraps; N not a multiple of the rows per warp.
  for (LowbitFormat f : kFormats)
    for (int M : {1, 5, 16})
      for (int v = 0; v < 2; ++v) {
        const int cols = 32 * (f == LowbitFormat::kW4 ? 1 : f == LowbitFormat::kW2 ? 2 : f == LowbitFormat::kTernary ? 5 : 4);
        Case c{};
        c.M = M;
        c.N = 9;
        c.a = {f, 5 * kWarp * cols - 5 - 40 * v, v ? 128 : 0};
        c.b = {LowbitFormat::kNone, 0, 0};
        c.xbf = (M + v) % 2;
        c.sbf = v;
        c.bias = true;
        c.zero_mode = (M + v) % 5;
        c.x_offset = v;  // v = 1: the element kernel
        run(c);
      }
  // Mixed weights: every (A, B) format pair through a random permutation, and a single segment with perm.
  const int Kas[] = {1, 40, 200}, Kbs[] = {7, 300, 1100};
  for (LowbitFormat fa : kFormats)
    for (LowbitFormat fb : kFormats)
      for (int M : {1, 3, 9})
        for (int v = 0; v < 2; ++v) {
          const int groups[] = {0, 32, 64, 128};
          Case c{};
          c.M = M;
          c.N = 1 + (3 * v + M + int(fa) * 5 + int(fb)) % 13;
          c.a = {fa, Kas[(M + v) % 3], groups[(v + int(fa)) % 4]};
          c.b = {fb, Kbs[(M + v + int(fb)) % 3], groups[(v + int(fb) + 1) % 4]};
          c.perm_mode = 1;
          c.xbf = v;
          c.sbf = (M + int(fa)) % 2;
          c.bias = v == 0;
          c.zero_mode = (M + v + int(fa)) % 5;
          c.x_offset = int(fb) % 2;
          c.x_stride_extra = M % 2 ? 5 : 0;
          run(c);
        }
  for (LowbitFormat f : kFormats)
    for (int v = 0; v < 2; ++v) {
      Case c{};
      c.M = v ? 4 : 1;
      c.N = 6;
      c.a = {f, v ? 333 : 64, v ? 0 : 32};
      c.b = {LowbitFormat::kNone, 0, 0};
      c.perm_mode = 1;
      c.xbf = v;
      c.zero_mode = 2 + v;
      run(c);
    }
  // Garbage perm values (negative, huge): clamped, never read out of bounds.
  for (int v = 0; v < 10; ++v) {
    Case c{};
    c.M = 1 + 5 * (v % 4);
    c.N = 5;
    c.a = {kFormats[v % 5], 50 + 30 * v, 32};
    c.b = {kFormats[(v + 2) % 5], 700 - 40 * v, 0};
    c.perm_mode = 2;
    c.xbf = v % 2;
    c.zero_mode = v % 5;
    run(c);
  }
  // PTQ1.61's shape: w4 salient columns, w1 rest, one scale per row, long rows.
  for (int M : {1, 16}) {
    Case c{};
    c.M = M;
    c.N = 13;
    c.a = {LowbitFormat::kW4, 800, 0};
    c.b = {LowbitFormat::kW1, 3296, 0};
    c.perm_mode = 1;
    c.xbf = M > 1;
    c.sbf = true;
    c.bias = true;
    c.zero_mode = 4;
    run(c);
  }

  const size_t expected_variants = 5 * 4 * 2 + 3 * 2;  // vector kernels per format, element kernels
  if (g_variants.size() != expected_variants) {
    printf("only %zu of %zu kernel variants ran\n", g_variants.size(), expected_variants);
    return 1;
  }
  printf("all %zu kernel variants ran; largest error beyond the output rounding: %.2g of the float32 bound\n", g_variants.size(), g_worst_ratio);
  printf("emulation: %d cases ok, %d failed\n", n_cases - n_fail, n_fail);
  return n_fail != 0;
}

#endif
