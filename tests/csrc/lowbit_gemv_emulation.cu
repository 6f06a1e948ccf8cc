// CPU emulation of the CUDA kernel lowbit_gemv_w4 (csrc/lowbit/lowbit_gemv.cu): runs the kernel's
// own per-lane code (lane_accumulate, compiled for the host) for every lane of every warp, reduces
// like the warp shuffle, and compares with a float64 reference. Exact-size heap buffers under
// AddressSanitizer catch any out-of-bounds read; outputs are NaN-poisoned, so unwritten elements fail.
// tests/test_cuda_emulation.py builds and runs it wherever nvcc is found (no GPU needed):
//   nvcc -std=c++17 -O1 -g -arch=sm_80 -Xcompiler=-fsanitize=address,-fsanitize=undefined \
//        -DEO_SRC='"<repo>/csrc/lowbit/lowbit_gemv.cu"' -I<repo>/csrc/lowbit lowbit_gemv_emulation.cu
#include EO_SRC
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include <cmath>

using namespace efficient_ops;
using namespace efficient_ops::lowbit_gemv_detail;
#ifndef __CUDA_ARCH__  // host-only harness (nvcc also parses it in the device pass)

static uint16_t f2h(float f, bool bf16) {
  if (bf16) { __nv_bfloat16 b = __float2bfloat16_rn(f); uint16_t u; memcpy(&u, &b, 2); return u; }
  __half h = __float2half_rn(f); uint16_t u; memcpy(&u, &h, 2); return u;
}
static float h2f(uint16_t u, bool bf16) { return bf16 ? bf16_bits_to_float(u) : half_bits_to_float(u); }

template <int MT, typename T, bool kVecX>
void emulate_kernel(const Args& args) {
  constexpr int R = kRowsPerWarp<MT>;
  constexpr int kStages = kRingStages<R>;
  const int warps = (args.N + R - 1) / R;
  for (int warp = 0; warp < warps; ++warp) {
    const int n0 = warp * R;
    constexpr int kMaxTiles = (kLowbitGemvMaxM + MT - 1) / MT == 2 ? 2 : 1;
    for (int m0 = 0; m0 < args.M && m0 < kMaxTiles * MT; m0 += MT) {
      Args a = args;
      a.M = std::min(MT, args.M - m0);
      a.x = static_cast<const T*>(args.x) + m0 * args.x_row_stride;
      a.out = static_cast<T*>(args.out) + m0 * args.out_row_stride;
      float total[MT][R] = {};
      // butterfly order of the shuffle reduction differs from a serial sum; fine for the check
      for (int lane = 0; lane < kWarp; ++lane) {
        float acc[MT][R] = {};
        WeightRing<R, kStages> ring;
        lane_accumulate<MT, R, T, kVecX>(a, ring, n0, lane, acc);
        for (int m = 0; m < MT; ++m) for (int r = 0; r < R; ++r) total[m][r] += acc[m][r];
      }
      using X = XType<T>;
      const uint16_t* bias = static_cast<const uint16_t*>(a.bias);
      T* out = static_cast<T*>(a.out);
      for (int r = 0; r < R; ++r) {
        const int n = n0 + r;
        if (n >= a.N) break;
        const float b = bias != nullptr ? X::to_float(bias[n]) : 0.f;
        for (int m = 0; m < MT; ++m)
          if (m < a.M) out[int64_t(m) * a.out_row_stride + n] = X::from_float(total[m][r] + b);
      }
    }
  }
}

template <typename T, bool kVecX>
void emulate_m(const Args& a) {
  if (a.M <= 1) return emulate_kernel<1, T, kVecX>(a);
  if (a.M <= 2) return emulate_kernel<2, T, kVecX>(a);
  if (a.M <= 4) return emulate_kernel<4, T, kVecX>(a);
  return emulate_kernel<8, T, kVecX>(a);
}

void emulate(const LowbitGemvW4Args& p) {
  if (const char* e = lowbit_gemv_w4_check(p)) { printf("check failed: %s\n", e); exit(1); }
  if (p.N == 0) return;
  const Args a = make_args(p);
  const bool vec = x_vectorizable(p);
  if (p.x_dtype == DType::kBFloat16) { if (vec) emulate_m<__nv_bfloat16, true>(a); else emulate_m<__nv_bfloat16, false>(a); }
  else { if (vec) emulate_m<__half, true>(a); else emulate_m<__half, false>(a); }
}

struct Case { int M, N, K, K_pad, gs; bool xbf, sbf, bias; int zero_mode; int x_offset; int x_stride_extra; };

static std::mt19937 rng(1234);
static double urand(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

bool run_case(const Case& c, bool verbose) {
  const int G = c.K_pad / c.gs;
  // qweight: exact size, aligned (new of uint4)
  std::vector<uint32_t> q(size_t(c.N) * c.K_pad / 8);
  for (auto& w : q) w = rng();  // padding columns hold arbitrary nibbles too
  uint4* qbuf = new uint4[q.size() / 4];
  memcpy(qbuf, q.data(), q.size() * 4);
  std::vector<uint16_t> s(size_t(c.N) * G), z(size_t(c.N) * G);
  for (size_t i = 0; i < s.size(); ++i) {
    s[i] = f2h(float(urand(0.005, 0.1)), c.sbf);
    float zv;
    switch (c.zero_mode) {
      case 0: zv = float(rng() % 16); break;                 // integer zeros
      case 1: zv = float(rng() % 16) + (rng() % 2 ? 0.5f : 0.f); break;  // some fractional
      case 2: zv = float(urand(-20, 20)); break;              // arbitrary (rounded to 16 bit)
      default: zv = (rng() % 3 == 0) ? (c.sbf ? 70144.f : 65504.f) : float(rng() % 16); break;  // huge zero (>= 2^16 path; bf16-representable)
    }
    z[i] = f2h(zv, c.sbf);
  }
  uint16_t* sbuf = new uint16_t[s.size()]; memcpy(sbuf, s.data(), s.size() * 2);
  uint16_t* zbuf = new uint16_t[z.size()]; memcpy(zbuf, z.data(), z.size() * 2);
  const int stride = c.K + c.x_stride_extra;
  const size_t x_elems = size_t(c.M - 1) * stride + c.K;  // exactly what may be read
  // place x at an element offset inside an aligned allocation whose end is exactly the last element
  uint16_t* xbase = new uint16_t[c.x_offset + x_elems];  // exact-size allocation for ASan
  uint16_t* x = xbase + c.x_offset;
  for (size_t i = 0; i < x_elems; ++i) x[i] = f2h(float(urand(-1, 1)), c.xbf);
  std::vector<uint16_t> bias(c.N);
  for (auto& b : bias) b = f2h(float(urand(-1, 1)), c.xbf);
  uint16_t* bbuf = new uint16_t[c.N]; memcpy(bbuf, bias.data(), c.N * 2);
  const int out_stride = c.N + (c.M > 1 ? 3 : 0);
  const size_t out_elems = size_t(c.M - 1) * out_stride + c.N;
  uint16_t* out = new uint16_t[out_elems];
  for (size_t i = 0; i < out_elems; ++i) out[i] = c.xbf ? 0x7FC1 : 0x7E01;  // NaN poison

  LowbitGemvW4Args p;
  p.x = x; p.qweight = qbuf; p.scales = sbuf; p.zeros = zbuf; p.bias = c.bias ? bbuf : nullptr; p.out = out;
  p.M = c.M; p.N = c.N; p.K = c.K; p.K_pad = c.K_pad; p.group_size = c.gs;
  p.x_row_stride = stride; p.out_row_stride = out_stride;
  p.x_dtype = c.xbf ? DType::kBFloat16 : DType::kFloat16;
  p.scale_dtype = c.sbf ? DType::kBFloat16 : DType::kFloat16;
  emulate(p);

  bool ok = true;
  double worst = 0;
  for (int m = 0; m < c.M; ++m)
    for (int n = 0; n < c.N; ++n) {
      double ref = 0, sum_abs = 0;
      for (int k = 0; k < c.K; ++k) {
        const uint32_t qv = (q[size_t(n) * c.K_pad / 8 + k / 8] >> (4 * (k % 8))) & 0xF;
        const int g = k / c.gs;
        const double sv = h2f(s[size_t(n) * G + g], c.sbf), zv = h2f(z[size_t(n) * G + g], c.sbf);
        const double t = double(h2f(x[size_t(m) * stride + k], c.xbf)) * (double(qv) - zv) * sv;
        ref += t; sum_abs += fabs(t);
      }
      if (c.bias) { ref += h2f(bias[n], c.xbf); sum_abs += fabs(h2f(bias[n], c.xbf)); }
      const double got = h2f(out[size_t(m) * out_stride + n], c.xbf);
      const double eps = c.xbf ? 1.0 / 256 : 1.0 / 2048;
      const double tol = eps * fabs(ref) * 1.01 + 2e-6 * sum_abs + 1e-30 + (c.xbf ? 0 : 6e-8);
      double err = fabs(got - ref);
      if (!c.xbf && fabs(ref) > 65520.0 && std::isinf(got) && (got > 0) == (ref > 0)) err = 0;  // overflow to inf is right
      if (!(err <= tol)) {
        if (verbose || ok) printf("  MISMATCH m=%d n=%d got=%g ref=%g err=%g tol=%g\n", m, n, got, ref, err, tol);
        ok = false;
      }
      if (sum_abs > 0) worst = std::max(worst, err / (sum_abs + 1e-30));
    }
  // padding between output rows must be untouched
  for (int m = 0; m + 1 < c.M; ++m)
    for (int n = c.N; n < out_stride; ++n)
      if (out[size_t(m) * out_stride + n] != (c.xbf ? 0x7FC1 : 0x7E01)) { printf("  wrote padding m=%d n=%d\n", m, n); ok = false; }
  delete[] qbuf; delete[] sbuf; delete[] zbuf; delete[] xbase; delete[] bbuf; delete[] out;
  return ok;
}

int main() {
  // group magic: exhaustive over the supported range (K_pad <= 2^20: chunks, cpg <= 2^15)
  for (uint32_t cpg = 1; cpg <= (1u << 15); ++cpg) {
    Args a{}; LowbitGemvW4Args p{}; p.K_pad = 1 << 20; p.group_size = cpg * 32; p.K = 0; p.M = 1;
    a = make_args(p);
    for (uint32_t c = 0; c < (1u << 15); c += (cpg > 64 ? 1 : 1)) {
      if (uint32_t(group_of(a, int(c))) != c / cpg) { printf("group_of wrong cpg=%u c=%u\n", cpg, c); return 1; }
    }
  }
  printf("group_of exact for all chunks < 2^15, chunks_per_group <= 2^15\n");

  int n_cases = 0, n_fail = 0;
  const int Ms[] = {1, 2, 3, 4, 5, 8, 9, 13, 16};
  const int Ks[] = {1, 31, 32, 33, 100, 128, 255, 1000, 1024, 1056};
  for (int M : Ms)
    for (int K : Ks)
      for (int variant = 0; variant < 6; ++variant) {
        Case c;
        c.M = M; c.K = K;
        c.K_pad = (K + 127) / 128 * 128 + (variant == 5 ? 128 : 0);
        const int gss[] = {32, 64, 128, c.K_pad};
        c.gs = gss[variant % 4];
        if (c.K_pad % c.gs) c.gs = 32;
        c.N = 1 + (variant * 7 + M) % 13;
        c.xbf = variant & 1; c.sbf = (variant >> 1) & 1; c.bias = variant % 3 != 0;
        c.zero_mode = (variant + M) % 4;
        c.x_offset = (variant % 3 == 2) ? 1 : 0;          // misaligned base
        c.x_stride_extra = (variant % 4 == 3) ? 3 : (variant % 2 ? 8 : 0);  // stride % 8 != 0 sometimes
        ++n_cases;
        if (!run_case(c, false)) {
          ++n_fail;
          printf("FAIL M=%d N=%d K=%d K_pad=%d gs=%d xbf=%d sbf=%d bias=%d zero_mode=%d x_off=%d stride+%d\n",
                 c.M, c.N, c.K, c.K_pad, c.gs, c.xbf, c.sbf, c.bias, c.zero_mode, c.x_offset, c.x_stride_extra);
        }
      }
  // a larger shape: many warps, multi-iteration ring (K = 4096 -> 4 chunks per lane), N odd
  for (int M : {1, 2, 4, 8, 16}) {
    Case c{M, 37, 4000, 4096, 128, M % 2 == 0, false, true, 0, 0, 0};
    ++n_cases; if (!run_case(c, false)) { ++n_fail; printf("FAIL large M=%d\n", M); }
    Case d{M, 9, 8192 + 96, 8320, 32, true, true, false, 1, 1, 5};
    ++n_cases; if (!run_case(d, false)) { ++n_fail; printf("FAIL large2 M=%d\n", M); }
  }
  printf("emulation: %d cases ok, %d failed\n", n_cases - n_fail, n_fail);
  return n_fail != 0;
}

#endif
