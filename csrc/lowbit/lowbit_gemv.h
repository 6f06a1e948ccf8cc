// Host-side interface of the W4A16 decode GEMV (see lowbit_gemv.cu for the packed format).
// Deliberately free of PyTorch and pybind11 headers: bindings.cpp passes raw pointers in.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace efficient_ops {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Largest M (rows of x) the GEMV kernels handle; larger M belongs to a GEMM kernel.
constexpr int kLowbitGemvMaxM = 16;

struct LowbitGemvW4Args {
  const void* x;        // [M, K] x_dtype, row stride x_row_stride elements, unit stride in a row
  const void* qweight;  // int32 [N, K_pad / 8], contiguous, 16-byte aligned
  const void* scales;   // [N, K_pad / group_size] scale_dtype, contiguous
  const void* zeros;    // [N, K_pad / group_size] scale_dtype, contiguous
  const void* bias;     // [N] x_dtype, or nullptr
  void* out;            // [M, N] x_dtype, row stride out_row_stride elements
  int64_t M, N, K, K_pad, group_size, x_row_stride, out_row_stride;
  DType x_dtype, scale_dtype;
};

// Returns nullptr if the arguments are within what the kernel supports (sizes, alignment, the
// packed-format invariants), else a message. Bounds the kernel relies on for memory safety.
const char* lowbit_gemv_w4_check(const LowbitGemvW4Args& args);

// Enqueues the kernel on `stream` and returns cudaGetLastError() after the launch
// (cudaErrorInvalidValue, launching nothing, if lowbit_gemv_w4_check fails). N == 0 launches nothing.
cudaError_t lowbit_gemv_w4(const LowbitGemvW4Args& args, cudaStream_t stream);

}  // namespace efficient_ops
