// efficient_ops._C: pybind11 bindings for the CUDA kernels.
//
// No PyTorch headers and no libtorch linkage, by design: the Python layer passes raw device
// pointers (tensor.data_ptr()), sizes, strides and the CUDA stream handle as Python ints, so the
// module builds with nvcc + pybind11 alone, against any PyTorch build, and imports on machines
// without a GPU. The Python layer validates its inputs before calling; the checks here are a
// cheap last line of defence against out-of-bounds accesses.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "lowbit/lowbit_gemv.h"
#include "rsparse/rsparse_gemv.h"

#ifndef EFFICIENT_OPS_CUDA_ARCHS
#define EFFICIENT_OPS_CUDA_ARCHS ""  // set by CMakeLists.txt, comma separated, e.g. "80,90a"
#endif
#ifndef EFFICIENT_OPS_NVCC_VERSION
#define EFFICIENT_OPS_NVCC_VERSION ""  // set by CMakeLists.txt from CMAKE_CUDA_COMPILER_VERSION
#endif

namespace py = pybind11;
using efficient_ops::DType;

namespace {

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(',', start);
    const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  int runtime_version = 0;
  // cudart is linked statically, so this reports the compiled-in runtime and needs no driver or GPU.
  if (cudaRuntimeGetVersion(&runtime_version) != cudaSuccess) runtime_version = 0;
  py::dict info;
  info["archs"] = split_commas(EFFICIENT_OPS_CUDA_ARCHS);
  info["cuda_runtime_version"] = runtime_version;
  info["nvcc_version"] = std::string(EFFICIENT_OPS_NVCC_VERSION);
  return info;
}

DType parse_dtype(const std::string& name, const char* arg) {
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw py::value_error(std::string(arg) + " must be 'float16' or 'bfloat16', got '" + name + "'");
}

efficient_ops::LowbitFormat parse_format(const std::string& name, const char* arg, bool allow_empty) {
  using efficient_ops::LowbitFormat;
  if (name == "w4") return LowbitFormat::kW4;
  if (name == "w3") return LowbitFormat::kW3;
  if (name == "w2") return LowbitFormat::kW2;
  if (name == "ternary") return LowbitFormat::kTernary;
  if (name == "w1") return LowbitFormat::kW1;
  if (allow_empty && name.empty()) return LowbitFormat::kNone;
  throw py::value_error("lowbit_gemv: " + std::string(arg) + " must be one of 'w4', 'w3', 'w2', 'ternary', 'w1'" +
                        (allow_empty ? " or ''" : "") + ", got '" + name + "'");
}

void lowbit_gemv(uintptr_t x_ptr, uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t N, int64_t x_row_stride,
                 int64_t out_row_stride, const std::string& x_dtype, const std::string& scale_dtype, uintptr_t stream,
                 const std::string& fmt_a, uintptr_t qweight_a_ptr, uintptr_t scales_a_ptr, uintptr_t zeros_a_ptr,
                 int64_t k_a, int64_t group_a, uintptr_t perm_ptr, const std::string& fmt_b, uintptr_t qweight_b_ptr,
                 uintptr_t scales_b_ptr, uintptr_t zeros_b_ptr, int64_t k_b, int64_t group_b) {
  efficient_ops::LowbitGemvArgs args;
  args.x_dtype = parse_dtype(x_dtype, "x_dtype");
  args.scale_dtype = parse_dtype(scale_dtype, "scale_dtype");
  args.x = reinterpret_cast<const void*>(x_ptr);
  args.bias = reinterpret_cast<const void*>(bias_ptr);  // 0 -> nullptr: no bias
  args.out = reinterpret_cast<void*>(out_ptr);
  args.perm = reinterpret_cast<const void*>(perm_ptr);  // 0 -> nullptr: x read in order
  args.M = M;
  args.N = N;
  args.x_row_stride = x_row_stride;
  args.out_row_stride = out_row_stride;
  args.a = {parse_format(fmt_a, "fmt_a", false), reinterpret_cast<const void*>(qweight_a_ptr),
            reinterpret_cast<const void*>(scales_a_ptr), reinterpret_cast<const void*>(zeros_a_ptr), k_a, group_a};
  args.b = {parse_format(fmt_b, "fmt_b", true), reinterpret_cast<const void*>(qweight_b_ptr),
            reinterpret_cast<const void*>(scales_b_ptr), reinterpret_cast<const void*>(zeros_b_ptr), k_b, group_b};
  if (M < 1 || M > efficient_ops::kLowbitGemvMaxM)
    throw py::value_error("lowbit_gemv: M must be in 1.." + std::to_string(efficient_ops::kLowbitGemvMaxM) +
                          ", got " + std::to_string(M));
  if (const char* problem = efficient_ops::lowbit_gemv_check(args))
    throw py::value_error(std::string("lowbit_gemv: ") + problem);

  const cudaError_t err = efficient_ops::lowbit_gemv(args, reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("lowbit_gemv: CUDA launch failed: ") + cudaGetErrorString(err) + " (" +
                             cudaGetErrorName(err) + ")");
}

void rsparse_gemv(uintptr_t x_ptr, uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t K, int64_t N, int64_t R,
                  int64_t x_row_stride, int64_t out_row_stride, uintptr_t weight_t_ptr, uintptr_t col_norms_ptr,
                  float threshold, uintptr_t v_ptr, uintptr_t us_t_ptr, uintptr_t workspace_ptr,
                  const std::string& dtype, uintptr_t stream) {
  if (dtype != "float16" && dtype != "bfloat16")
    throw py::value_error("rsparse_gemv: dtype must be 'float16' or 'bfloat16', got '" + dtype + "'");
  efficient_ops::RSparseGemvArgs args;
  args.dtype = parse_dtype(dtype, "dtype");
  args.x = reinterpret_cast<const void*>(x_ptr);
  args.weight_t = reinterpret_cast<const void*>(weight_t_ptr);
  args.col_norms = reinterpret_cast<const float*>(col_norms_ptr);
  args.threshold = threshold;
  args.v = reinterpret_cast<const void*>(v_ptr);        // 0 -> nullptr: allowed when R == 0
  args.us_t = reinterpret_cast<const void*>(us_t_ptr);  // 0 -> nullptr: allowed when R == 0
  args.bias = reinterpret_cast<const void*>(bias_ptr);  // 0 -> nullptr: no bias
  args.out = reinterpret_cast<void*>(out_ptr);
  args.workspace = reinterpret_cast<void*>(workspace_ptr);
  args.M = M;
  args.K = K;
  args.N = N;
  args.R = R;
  args.x_row_stride = x_row_stride;
  args.out_row_stride = out_row_stride;
  if (const char* problem = efficient_ops::rsparse_gemv_check(args))
    throw py::value_error(std::string("rsparse_gemv: ") + problem);

  const cudaError_t err = efficient_ops::rsparse_gemv(args, reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("rsparse_gemv: CUDA launch failed: ") + cudaGetErrorString(err) + " (" +
                             cudaGetErrorName(err) + ")");
}

int64_t rsparse_workspace_bytes(int64_t M, int64_t N, int64_t R) {
  const int64_t bytes = efficient_ops::rsparse_gemv_workspace_bytes(M, N, R);
  if (bytes < 0)
    throw py::value_error("rsparse_workspace_bytes: need 0 <= M <= " + std::to_string(efficient_ops::kRSparseGemvMaxM) +
                          " and 0 <= N, R < 2^30, got M=" + std::to_string(M) + ", N=" + std::to_string(N) +
                          ", R=" + std::to_string(R));
  return bytes;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "efficient_ops CUDA kernels. Functions take raw device pointers, sizes, strides and the CUDA stream "
      "handle as Python ints; use the torch.ops.efficient_ops API instead of calling these directly.";

  m.def("build_info", &build_info,
        "Dict with 'archs' (list of str), 'cuda_runtime_version' (int, e.g. 13000) and 'nvcc_version' (str).");

  m.def("lowbit_gemv", &lowbit_gemv, py::arg("x_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("M"),
        py::arg("N"), py::arg("x_row_stride"), py::arg("out_row_stride"), py::arg("x_dtype"), py::arg("scale_dtype"),
        py::arg("stream"), py::arg("fmt_a"), py::arg("qweight_a_ptr"), py::arg("scales_a_ptr"),
        py::arg("zeros_a_ptr"), py::arg("k_a"), py::arg("group_a"), py::arg("perm_ptr") = 0, py::arg("fmt_b") = "",
        py::arg("qweight_b_ptr") = 0, py::arg("scales_b_ptr") = 0, py::arg("zeros_b_ptr") = 0, py::arg("k_b") = 0,
        py::arg("group_b") = 0,
        "Low-bit decode GEMV, M = 1..16 rows of x (float16/bfloat16), one launch, float32 accumulation:\n"
        "out[m, n] = sum_j x[m, col_a(j)] * wa[n, j] + sum_j x[m, col_b(j)] * wb[n, j] (+ bias[n]), with\n"
        "w[n, j] = (q[n, j] - zeros[n, j // group]) * scales[n, j // group] for each segment's packed levels q.\n"
        "fmt_a, fmt_b: 'w4', 'w3', 'w2', 'ternary', 'w1' (layouts: efficient_ops.quant.lowbit); fmt_b '' = no\n"
        "second segment. k_a, k_b: real columns (K before padding; K_pad comes from the format's k_align).\n"
        "group_a, group_b: columns per scale, a multiple of 32 (K_pad for one scale per row); scales/zeros are\n"
        "[N, ceil(K_pad / group)] in scale_dtype, qweight int32 [N, words], 16-byte aligned. perm_ptr 0: x has\n"
        "k_a columns read in order (fmt_b must be ''); else perm is int32 [k_a + k_b], x has k_a + k_b columns,\n"
        "col_a(j) = perm[j], col_b(j) = perm[k_a + j] (values outside [0, k_a + k_b) are clamped to the last\n"
        "column). Pointers are raw ints, 0 = null. Asynchronous on `stream` (0 = legacy default stream).\n"
        "Raises ValueError for bad formats, dtypes, sizes or alignment, RuntimeError if the launch fails.");

  m.def("rsparse_gemv", &rsparse_gemv, py::arg("x_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("M"),
        py::arg("K"), py::arg("N"), py::arg("R"), py::arg("x_row_stride"), py::arg("out_row_stride"),
        py::arg("weight_t_ptr"), py::arg("col_norms_ptr"), py::arg("threshold"), py::arg("v_ptr"),
        py::arg("us_t_ptr"), py::arg("workspace_ptr"), py::arg("dtype"), py::arg("stream"),
        "R-Sparse decode GEMV, M = 1..8 rows of x (dtype 'float16' or 'bfloat16'), one launch, float32 sums:\n"
        "active[m, i] = |x[m, i]| * col_norms[i] > threshold (float32; NaN inactive);\n"
        "z[m] = sum over inactive i of x[m, i] * v[i];  out[m] = sum over active i of x[m, i] * weight_t[i]\n"
        "+ z[m] @ us_t (+ bias), rounded once to dtype. weight_t [K, N], v [K, R], us_t [R, N] contiguous in\n"
        "dtype; col_norms float32 [K]; bias [N] or 0; x [M, K] and out [M, N] with the given row strides\n"
        "(elements, unit stride within a row). R = 0: no low-rank branch (v_ptr, us_t_ptr may be 0). K = 0 is\n"
        "allowed (out = bias). workspace: rsparse_workspace_bytes(M, N, R) bytes, at least 16-byte aligned,\n"
        "ZEROED before every call (the kernel leaves it dirty). Pointers are raw ints, 0 = null. Asynchronous\n"
        "on `stream` (0 = legacy default stream). Raises ValueError for bad sizes, strides, null pointers or\n"
        "alignment, RuntimeError if the launch fails.");

  m.def("rsparse_workspace_bytes", &rsparse_workspace_bytes, py::arg("M"), py::arg("N"), py::arg("R"),
        "Bytes of zeroed workspace rsparse_gemv needs for M rows, N outputs and rank R (float32 partial sums\n"
        "[M, N] and [M, R] plus arrival counters). Raises ValueError for M outside 0..8 or negative N, R.");
}
