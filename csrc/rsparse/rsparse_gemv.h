// Host-side interface of the R-Sparse decode GEMV (see rsparse_gemv.cu for the kernel design).
// Deliberately free of PyTorch and pybind11 headers: bindings.cpp passes raw pointers in.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/dtype.h"

namespace efficient_ops {

// Largest M (rows of x) the kernel handles: decode batches. Larger M belongs to a GEMM.
constexpr int kRSparseGemvMaxM = 8;

// Largest K, N and R (each < 2^30: the kernel's column and channel arithmetic is 32-bit).
constexpr int64_t kRSparseGemvMaxDim = (int64_t(1) << 30) - 1;

// R-Sparse rank-aware sparse linear for M = 1..8 rows of x, one launch:
//   active[m][i] = fabsf(float(x[m][i])) * col_norms[i] > threshold       (float32; NaN -> inactive)
//   z[m][j]      = sum_{i: !active[m][i]} float(x[m][i]) * float(v[i][j])
//   y[m][n]      = sum_{i: active[m][i]} float(x[m][i]) * float(weight_t[i][n])
//                + sum_j z[m][j] * float(us_t[j][n]) + float(bias[n])
//   out[m][n]    = round-to-nearest T(y[m][n])
// All sums in float32 (order unspecified). T = dtype, float16 or bfloat16, for x, weight_t, v, us_t,
// bias and out. Every pointer needs 2-byte alignment (col_norms and workspace 4); 16-byte aligned
// weight_t / v / us_t with N (resp. R) a multiple of 8 take the fast vector path.
struct RSparseGemvArgs {
  const void* x;          // [M, K] T, row stride x_row_stride elements, unit stride within a row
  const void* weight_t;   // [K, N] T contiguous: row i = input channel i (column i of W[N, K])
  const float* col_norms; // [K] float32 (the column norms of W that scale |x| before the threshold)
  float threshold;        // any value: -inf (every channel active), +inf (none), NaN (none)
  const void* v;          // [K, R] T contiguous (V_r); not read, may be null, when R == 0
  const void* us_t;       // [R, N] T contiguous ((U_r S_r)^T: row j = component j); may be null when R == 0
  const void* bias;       // [N] T, or nullptr
  void* out;              // [M, N] T, row stride out_row_stride elements
  // rsparse_gemv_workspace_bytes(M, N, R) bytes, ZEROED by the caller before every call (the kernel
  // leaves it dirty): float32 partial sums y [M, N], z [M, R], and arrival counters.
  void* workspace;
  int64_t M, K, N, R;
  int64_t x_row_stride;   // >= K when M > 1
  int64_t out_row_stride; // >= N when M > 1
  DType dtype;
};

// Bytes of workspace for (M, N, R); -1 if an argument is negative or beyond the kernel's limits.
// Layout: y float32 [M, N] | z float32 [M, R] | counters uint32 [1 + N tiles], each part 256-byte aligned.
int64_t rsparse_gemv_workspace_bytes(int64_t M, int64_t N, int64_t R);

// Returns nullptr if the arguments are within what the kernel supports, else a message. The bounds the
// kernel relies on for memory safety: M in 1..8; K, N, R in [0, 2^30); strides; non-null pointers
// where they are read; alignment. K == 0 is accepted (y = bias, plus z @ us_t with z = 0).
const char* rsparse_gemv_check(const RSparseGemvArgs& args);

// Enqueues the kernel on `stream` (one launch; the caller zeroes the workspace before it) and returns
// cudaGetLastError() after the launch (cudaErrorInvalidValue, launching nothing, if rsparse_gemv_check
// fails). N == 0 launches nothing.
cudaError_t rsparse_gemv(const RSparseGemvArgs& args, cudaStream_t stream);

}  // namespace efficient_ops
