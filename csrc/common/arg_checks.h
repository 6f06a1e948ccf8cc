// Host-side helpers for argument checks and launch sizes, shared by the attention kernel families
// (csrc/speculative/tree_attention.cu, csrc/sparse_attention/*.cu), in namespace efficient_ops::common_detail.
#pragma once

#include <cstdint>

namespace efficient_ops {
namespace common_detail {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool misaligned(const void* p, uintptr_t alignment) { return reinterpret_cast<uintptr_t>(p) % alignment != 0; }

// n strides in [0, 2^40) and the largest element offset of sizes[0..n) x inner below 2^62.
inline bool strides_ok(const int64_t* s, const int64_t* sizes, int n, int64_t inner) {
  double extent = double(inner);
  for (int i = 0; i < n; ++i) {
    if (s[i] < 0 || s[i] >= (int64_t(1) << 40)) return false;
    extent += double(sizes[i] > 0 ? sizes[i] - 1 : 0) * double(s[i]);
  }
  return extent < 4.0e18;
}

// Every one of n strides a multiple of m (with an aligned base: vector loads / stores stay aligned).
inline bool strides_multiple_of(const int64_t* s, int n, int64_t m) {
  for (int i = 0; i < n; ++i)
    if (s[i] % m != 0) return false;
  return true;
}

}  // namespace common_detail
}  // namespace efficient_ops
