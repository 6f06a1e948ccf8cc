// Host utilities shared by the CPU emulation harnesses in tests/csrc/ (lowbit_gemv_emulation.cu,
// rsparse_gemv_emulation.cu, speculative_emulation.cu, sparse_attention_emulation.cu).
//
// Host-only: a harness includes it after its kernel sources, inside its `#ifndef __CUDA_ARCH__` block
// (nvcc also parses the harness in the device pass, where none of this is wanted), by a path relative to
// the harness (`#include "emulation_common.h"`), so the build needs no extra include directory. It relies
// on common/device_helpers.cuh (the 16-bit float widenings), which every kernel source already includes.
//
// Everything here is deterministic and draws no random numbers of its own: the harnesses keep their own
// random engines and seeds, and so their own input sequences.
#pragma once

#ifndef __CUDA_ARCH__

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <random>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/device_helpers.cuh"

namespace emulation {

// ---- 16-bit floats as raw bits ------------------------------------------------------------------
// The harnesses hold float16 / bfloat16 tensors as uint16_t bit patterns; `bf16` picks the format.

// float -> float16 / bfloat16 bits, round to nearest even (the CUDA host conversions).
inline uint16_t f2h(float f, bool bf16) {
  uint16_t u;
  if (bf16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(f);
    memcpy(&u, &b, 2);
  } else {
    const __half h = __float2half_rn(f);
    memcpy(&u, &h, 2);
  }
  return u;
}

// float16 / bfloat16 bits -> float (exact), through the kernels' own host helpers.
inline float h2f(uint16_t u, bool bf16) {
  return bf16 ? efficient_ops::bf16_bits_to_float(u) : efficient_ops::half_bits_to_float(u);
}

// ---- NaN poisoning ------------------------------------------------------------------------------
// Both indexed by bf16 (0: float16, 1: bfloat16).

// A quiet NaN: fills every input element that no kernel may read, so a stray read shows as NaN.
constexpr uint16_t kNanIn[2] = {0x7E00, 0x7FC0};
// A NaN with a payload no kernel produces: fills outputs before a run, so an element the kernel never
// wrote (or padding it wrote over) is told apart from a NaN it computed.
constexpr uint16_t kPoison[2] = {0x7E01, 0x7FC1};

// ---- exact-size heap buffers --------------------------------------------------------------------

// `count` elements of E in a heap block of exactly count * sizeof(E) + offset_bytes bytes, starting
// `offset_bytes` past a 16-byte boundary (0: aligned; 2: a 16-bit tensor misaligned for 16-byte loads),
// so that AddressSanitizer flags a read or write one byte past either end. `p` is the data, `n` its
// element count; the block is freed with the Buf.
template <class E>
struct Buf {
  unsigned char* base;
  E* p;
  size_t n;
  explicit Buf(size_t count, size_t offset_bytes = 0) : n(count) {
    base = static_cast<unsigned char*>(::operator new[](count * sizeof(E) + offset_bytes, std::align_val_t(16)));
    p = reinterpret_cast<E*>(base + offset_bytes);
  }
  ~Buf() { ::operator delete[](base, std::align_val_t(16)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// A kernel workspace of `bytes` bytes, every byte 0xFF (NaN floats), so that a workspace value read
// before the kernel wrote it shows up; null (with a message) if the sizing function gave no size.
inline std::unique_ptr<Buf<unsigned char>> poisoned_workspace(int64_t bytes) {
  if (bytes <= 0) {
    printf("  workspace_bytes = %lld\n", (long long)bytes);
    return nullptr;
  }
  std::unique_ptr<Buf<unsigned char>> ws(new Buf<unsigned char>(size_t(bytes)));
  memset(ws->p, 0xFF, size_t(bytes));
  return ws;
}

// Elements spanned by a strided tensor: dims are (size, stride) pairs, outermost first, over rows of
// `inner` contiguous elements; 0 when any size is 0.
inline size_t strided_extent(std::initializer_list<std::pair<int64_t, int64_t>> dims, int64_t inner) {
  int64_t last = inner;
  for (const auto& d : dims) {
    if (d.first == 0) return 0;
    last += (d.first - 1) * d.second;
  }
  return size_t(last);
}

// True if every element of `out` outside the strided tensor (dims as in strided_extent, rows of
// `inner` elements) still holds kPoison[bf16]: the padding between rows / heads / batch rows is
// untouched. Prints the first element written otherwise.
inline bool padding_untouched(const Buf<uint16_t>& out, bool bf16,
                              std::initializer_list<std::pair<int64_t, int64_t>> dims, int64_t inner) {
  std::vector<char> mine(out.n, 0);
  std::vector<int64_t> starts = {0};  // offsets of the rows, expanded one dimension at a time
  for (const auto& d : dims) {
    std::vector<int64_t> next;
    for (int64_t s : starts)
      for (int64_t i = 0; i < d.first; ++i) next.push_back(s + i * d.second);
    starts.swap(next);
  }
  for (int64_t s : starts)
    for (int64_t e = 0; e < inner; ++e) mine[size_t(s + e)] = 1;
  for (size_t e = 0; e < out.n; ++e)
    if (!mine[e] && out.p[e] != kPoison[bf16]) {
      printf("  wrote output padding at element %zu\n", e);
      return false;
    }
  return true;
}

// ---- random inputs ------------------------------------------------------------------------------
// Each harness owns its engine (type and seed); these draw from it.

// Uniform double in [lo, hi).
template <class Engine>
double uniform(Engine& rng, double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}

// Integer in [0, n), n > 0 (one raw draw, modulo n).
template <class Engine>
int below(Engine& rng, int n) {
  return int(rng() % uint64_t(n));
}

// The block indices 0 .. count - 1 in the order the emulation runs them: increasing, or (shuffle) in a
// random order drawn from `rng`, for kernels that must not depend on the order blocks are scheduled in.
template <class Engine>
std::vector<int64_t> block_order(int64_t count, bool shuffle, Engine& rng) {
  std::vector<int64_t> order(count);
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  if (shuffle) std::shuffle(order.begin(), order.end(), rng);
  return order;
}

// ---- float64 attention reference ----------------------------------------------------------------

// Softmax attention of one query row over an explicit key list, in float64 from the 16-bit inputs:
// q points at the row's D elements, k_row(key) / v_row(key) at the key's K / V rows. On return sc holds
// the unnormalised weights exp(s - mx), mx the largest scaled score (-inf without keys), l their sum,
// acc[d] the output and absacc[d] the sum of |weight * v| (the scale of its rounding error); acc and
// absacc must hold D elements.
template <class Key, class KRow, class VRow>
void attention_row_reference(const uint16_t* q, const std::vector<Key>& keys, KRow k_row, VRow v_row, int D,
                             bool bf16, float scale, std::vector<double>& sc, std::vector<double>& acc,
                             std::vector<double>& absacc, double& mx, double& l) {
  sc.assign(keys.size(), 0);
  mx = -INFINITY;
  for (size_t x = 0; x < keys.size(); ++x) {
    const uint16_t* k = k_row(keys[x]);
    double dot = 0;
    for (int d = 0; d < D; ++d) dot += double(h2f(q[d], bf16)) * h2f(k[d], bf16);
    sc[x] = double(scale) * dot;
    mx = std::max(mx, sc[x]);
  }
  l = 0;
  for (double& s : sc) l += (s = std::exp(s - mx));
  std::fill(acc.begin(), acc.end(), 0.0);
  std::fill(absacc.begin(), absacc.end(), 0.0);
  for (size_t x = 0; x < keys.size(); ++x) {
    const uint16_t* v = v_row(keys[x]);
    for (int d = 0; d < D; ++d) {
      const double vv = h2f(v[d], bf16);
      acc[d] += sc[x] / l * vv;
      absacc[d] += sc[x] / l * std::fabs(vv);
    }
  }
}

// ---- error and pass / fail bookkeeping ----------------------------------------------------------

// Relative error ||got - ref|| / ||ref|| over a whole output, accumulated element by element.
struct RelativeError {
  double num = 0, den = 0;
  void add(double err, double ref) {
    num += err * err;
    den += ref * ref;
  }
  // False (with a message) if it exceeds `limit`; an all-zero reference always passes.
  bool within(double limit) const {
    if (den > 0 && std::sqrt(num / den) > limit) {
      printf("  relative error %.3g\n", std::sqrt(num / den));
      return false;
    }
    return true;
  }
};

// One attention output element against its float64 reference: folds it into `worst` (error / tolerance)
// and `rel`; false when the element is still poisoned, not finite, or outside the tolerance.
inline bool output_element_ok(uint16_t bits, bool bf16, double ref, double tol, double& worst, RelativeError& rel) {
  const double got = h2f(bits, bf16), err = std::fabs(got - ref);
  if (std::isfinite(got)) worst = std::max(worst, err / tol);
  rel.add(err, ref);
  return bits != kPoison[bf16] && std::isfinite(got) && err <= tol;
}

// Cases run and cases failed, over the whole harness (the last line of its output reports them).
inline int n_cases = 0, n_fail = 0;

// Counts one case with its result; returns the result (the caller prints what failed).
inline bool tally(bool ok) {
  ++n_cases;
  if (!ok) ++n_fail;
  return ok;
}

// A host-check table entry: arguments made bad by `apply`, which the check must reject.
template <class Args>
struct BadArgs {
  const char* what;
  void (*apply)(Args&);
};

// True if `check` rejects every entry of `bad` applied to the (good) arguments `good`; otherwise prints
// "<label>check accepted bad arguments: <what>" for the first one it accepts and returns false.
template <class Args, size_t N, class Check>
bool rejects_all(const Args& good, const BadArgs<Args> (&bad)[N], Check check, const char* label = "") {
  for (const BadArgs<Args>& b : bad) {
    Args c = good;
    b.apply(c);
    if (check(c) == nullptr) {
      printf("%scheck accepted bad arguments: %s\n", label, b.what);
      return false;
    }
  }
  return true;
}

}  // namespace emulation

#endif  // __CUDA_ARCH__
