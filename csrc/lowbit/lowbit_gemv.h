// Host-side interface of the low-bit decode GEMV (see lowbit_gemv.cu for the packed formats).
// Deliberately free of PyTorch and pybind11 headers: bindings.cpp passes raw pointers in.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/dtype.h"

namespace efficient_ops {

// Packed weight formats (efficient_ops.formats.lowbit's module docstring is the specification).
// kNone marks an absent second segment.
enum class LowbitFormat : int { kNone = 0, kW4, kW3, kW2, kTernary, kW1 };

// Largest M (rows of x) the GEMV kernels handle; larger M belongs to a GEMM kernel.
constexpr int kLowbitGemvMaxM = 16;

// Largest padded column count of one segment (the kernels map columns to groups with 32-bit math).
constexpr int64_t kLowbitGemvMaxKPad = int64_t(1) << 20;

// One packed weight matrix [N, K]: levels q, w[n, k] = (q[n, k] - zeros[n, k / group]) * scales[n, k / group].
struct LowbitSegment {
  LowbitFormat format;
  const void* qweight;  // int32 [N, words(K_pad)], contiguous, 16-byte aligned; K_pad = lowbit_k_pad(format, K)
  const void* scales;   // [N, ceil(K_pad / group_size)] scale_dtype, contiguous
  const void* zeros;    // same shape and dtype as scales; any float
  int64_t K;            // real columns (before padding)
  int64_t group_size;   // columns per scale: a multiple of 32 (K_pad for one scale per row)
};

struct LowbitGemvArgs {
  const void* x;     // [M, K_x] x_dtype, row stride x_row_stride elements, unit stride in a row
  const void* bias;  // [N] x_dtype, or nullptr
  void* out;         // [M, N] x_dtype, row stride out_row_stride elements
  // int32 [K_x] or nullptr. With perm, K_x = a.K + b.K and column j of segment a reads x[m, perm[j]],
  // column j of segment b reads x[m, perm[a.K + j]]; values outside [0, K_x) read column K_x - 1 (a
  // clamp, so that a corrupt perm cannot read out of bounds). Without perm, K_x = a.K, x is read in
  // order, and b.format must be kNone.
  const void* perm;
  int64_t M, N, x_row_stride, out_row_stride;
  DType x_dtype, scale_dtype;  // scale_dtype: of both segments' scales and zeros
  LowbitSegment a, b;          // b.format == kNone: a single segment
};

// K rounded up to the format's column alignment (128; 160 for ternary); -1 for kNone or K < 0.
int64_t lowbit_k_pad(LowbitFormat format, int64_t K);

// Returns nullptr if the arguments are within what the kernel supports (sizes, alignment, the
// packed-format invariants), else a message. Bounds the kernel relies on for memory safety.
const char* lowbit_gemv_check(const LowbitGemvArgs& args);

// out[m, n] = sum over both segments of x[m, col(j)] * w[n, j] (+ bias[n]), float32 accumulation, one
// launch. Enqueues the kernel on `stream` and returns cudaGetLastError() after the launch
// (cudaErrorInvalidValue, launching nothing, if lowbit_gemv_check fails). N == 0 launches nothing.
cudaError_t lowbit_gemv(const LowbitGemvArgs& args, cudaStream_t stream);

}  // namespace efficient_ops
