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

void lowbit_gemv_w4(uintptr_t x_ptr, uintptr_t qweight_ptr, uintptr_t scales_ptr, uintptr_t zeros_ptr,
                    uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t N, int64_t K, int64_t K_pad,
                    int64_t group_size, int64_t x_row_stride, int64_t out_row_stride,
                    const std::string& x_dtype, const std::string& scale_dtype, uintptr_t stream) {
  efficient_ops::LowbitGemvW4Args args;
  args.x_dtype = parse_dtype(x_dtype, "x_dtype");
  args.scale_dtype = parse_dtype(scale_dtype, "scale_dtype");
  args.x = reinterpret_cast<const void*>(x_ptr);
  args.qweight = reinterpret_cast<const void*>(qweight_ptr);
  args.scales = reinterpret_cast<const void*>(scales_ptr);
  args.zeros = reinterpret_cast<const void*>(zeros_ptr);
  args.bias = reinterpret_cast<const void*>(bias_ptr);  // 0 -> nullptr: no bias
  args.out = reinterpret_cast<void*>(out_ptr);
  args.M = M;
  args.N = N;
  args.K = K;
  args.K_pad = K_pad;
  args.group_size = group_size;
  args.x_row_stride = x_row_stride;
  args.out_row_stride = out_row_stride;
  if (M < 1 || M > efficient_ops::kLowbitGemvMaxM)
    throw py::value_error("lowbit_gemv_w4: M must be in 1.." + std::to_string(efficient_ops::kLowbitGemvMaxM) +
                          ", got " + std::to_string(M));
  if (const char* problem = efficient_ops::lowbit_gemv_w4_check(args))
    throw py::value_error(std::string("lowbit_gemv_w4: ") + problem);

  const cudaError_t err = efficient_ops::lowbit_gemv_w4(args, reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("lowbit_gemv_w4: CUDA launch failed: ") + cudaGetErrorString(err) + " (" +
                             cudaGetErrorName(err) + ")");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "efficient_ops CUDA kernels. Functions take raw device pointers, sizes, strides and the CUDA stream "
      "handle as Python ints; use the torch.ops.efficient_ops API instead of calling these directly.";

  m.def("build_info", &build_info,
        "Dict with 'archs' (list of str), 'cuda_runtime_version' (int, e.g. 13000) and 'nvcc_version' (str).");

  m.def("lowbit_gemv_w4", &lowbit_gemv_w4, py::arg("x_ptr"), py::arg("qweight_ptr"), py::arg("scales_ptr"),
        py::arg("zeros_ptr"), py::arg("bias_ptr"), py::arg("out_ptr"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("K_pad"), py::arg("group_size"), py::arg("x_row_stride"), py::arg("out_row_stride"),
        py::arg("x_dtype"), py::arg("scale_dtype"), py::arg("stream"),
        "W4A16 decode GEMV, M = 1..16: out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] (+ bias[n]), "
        "g = k // group_size, float32 accumulation. qweight: int32 [N, K_pad/8], nibble j of word w is "
        "k = 8w + j. Asynchronous on `stream` (0 = legacy default stream). Raises ValueError for bad dtype "
        "strings or M, RuntimeError if the launch fails.");
}
