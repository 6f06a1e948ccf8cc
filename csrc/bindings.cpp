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
#include "sparse_attention/block_sparse_attention.h"
#include "sparse_attention/paged_sparse_decode.h"
#include "speculative/compact_kv.h"
#include "speculative/tree_attention.h"

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

// Each binding below does the same four things once: convert the Python ints to typed pointers and parse
// the names (ptr, parse_dtype, parse_format), fill the kernel's Args struct, then check_and_launch.

template <typename T>
T* ptr(uintptr_t p) {  // a raw device pointer from Python; 0 -> nullptr
  return reinterpret_cast<T*>(p);
}

DType parse_dtype(const char* op, const std::string& name, const char* arg) {
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw py::value_error(std::string(op) + ": " + arg + " must be 'float16' or 'bfloat16', got '" + name + "'");
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

// A sequence of exactly n ints (pybind11 converts lists and tuples to std::vector).
void copy_strides(const std::vector<int64_t>& in, int64_t* out, size_t n, const char* op, const char* arg) {
  if (in.size() != n)
    throw py::value_error(std::string(op) + ": " + arg + " must have " + std::to_string(n) + " entries, got " +
                          std::to_string(in.size()));
  for (size_t i = 0; i < n; ++i) out[i] = in[i];
}

// The kernel's own argument check (ValueError "op: problem"), then the launch on `stream` (RuntimeError
// "op: CUDA launch failed: ..."): the last line of defence against out-of-bounds accesses.
template <typename Args, typename Check, typename Launch>
void check_and_launch(const char* op, const Args& args, Check check, Launch launch, uintptr_t stream) {
  if (const char* problem = check(args)) throw py::value_error(std::string(op) + ": " + problem);
  const cudaError_t err = launch(args, reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(err) + " (" +
                             cudaGetErrorName(err) + ")");
}

// A workspace size, or ValueError "op: need ..., got ..." when the size helper rejects the arguments (< 0).
int64_t checked_bytes(int64_t bytes, const char* op, const std::string& need, const std::string& got) {
  if (bytes < 0) throw py::value_error(std::string(op) + ": need " + need + ", got " + got);
  return bytes;
}

void lowbit_gemv(uintptr_t x_ptr, uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t N, int64_t x_row_stride,
                 int64_t out_row_stride, const std::string& x_dtype, const std::string& scale_dtype, uintptr_t stream,
                 const std::string& fmt_a, uintptr_t qweight_a_ptr, uintptr_t scales_a_ptr, uintptr_t zeros_a_ptr,
                 int64_t k_a, int64_t group_a, uintptr_t perm_ptr, const std::string& fmt_b, uintptr_t qweight_b_ptr,
                 uintptr_t scales_b_ptr, uintptr_t zeros_b_ptr, int64_t k_b, int64_t group_b) {
  constexpr const char* op = "lowbit_gemv";
  efficient_ops::LowbitGemvArgs args;
  args.x_dtype = parse_dtype(op, x_dtype, "x_dtype");
  args.scale_dtype = parse_dtype(op, scale_dtype, "scale_dtype");
  args.x = ptr<const void>(x_ptr);
  args.bias = ptr<const void>(bias_ptr);  // null: no bias
  args.out = ptr<void>(out_ptr);
  args.perm = ptr<const void>(perm_ptr);  // null: x read in order
  args.M = M;
  args.N = N;
  args.x_row_stride = x_row_stride;
  args.out_row_stride = out_row_stride;
  args.a = {parse_format(fmt_a, "fmt_a", false), ptr<const void>(qweight_a_ptr), ptr<const void>(scales_a_ptr),
            ptr<const void>(zeros_a_ptr), k_a, group_a};
  args.b = {parse_format(fmt_b, "fmt_b", true), ptr<const void>(qweight_b_ptr), ptr<const void>(scales_b_ptr),
            ptr<const void>(zeros_b_ptr), k_b, group_b};
  if (M < 1 || M > efficient_ops::kLowbitGemvMaxM)
    throw py::value_error(std::string(op) + ": M must be in 1.." + std::to_string(efficient_ops::kLowbitGemvMaxM) +
                          ", got " + std::to_string(M));
  check_and_launch(op, args, efficient_ops::lowbit_gemv_check, efficient_ops::lowbit_gemv, stream);
}

void rsparse_gemv(uintptr_t x_ptr, uintptr_t bias_ptr, uintptr_t out_ptr, int64_t M, int64_t K, int64_t N, int64_t R,
                  int64_t x_row_stride, int64_t out_row_stride, uintptr_t weight_t_ptr, uintptr_t col_norms_ptr,
                  float threshold, uintptr_t v_ptr, uintptr_t us_t_ptr, uintptr_t workspace_ptr,
                  const std::string& dtype, uintptr_t stream) {
  constexpr const char* op = "rsparse_gemv";
  efficient_ops::RSparseGemvArgs args;
  args.dtype = parse_dtype(op, dtype, "dtype");
  args.x = ptr<const void>(x_ptr);
  args.weight_t = ptr<const void>(weight_t_ptr);
  args.col_norms = ptr<const float>(col_norms_ptr);
  args.threshold = threshold;
  args.v = ptr<const void>(v_ptr);        // null: allowed when R == 0
  args.us_t = ptr<const void>(us_t_ptr);  // null: allowed when R == 0
  args.bias = ptr<const void>(bias_ptr);  // null: no bias
  args.out = ptr<void>(out_ptr);
  args.workspace = ptr<void>(workspace_ptr);
  args.M = M;
  args.K = K;
  args.N = N;
  args.R = R;
  args.x_row_stride = x_row_stride;
  args.out_row_stride = out_row_stride;
  check_and_launch(op, args, efficient_ops::rsparse_gemv_check, efficient_ops::rsparse_gemv, stream);
}

int64_t rsparse_workspace_bytes(int64_t M, int64_t N, int64_t R) {
  return checked_bytes(efficient_ops::rsparse_gemv_workspace_bytes(M, N, R), "rsparse_workspace_bytes",
                       "0 <= M <= " + std::to_string(efficient_ops::kRSparseGemvMaxM) + " and 0 <= N, R < 2^30",
                       "M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", R=" + std::to_string(R));
}

void tree_attention(uintptr_t q_ptr, uintptr_t k_ptr, uintptr_t v_ptr, uintptr_t out_ptr, uintptr_t prefix_lens_ptr,
                    uintptr_t parents_ptr, uintptr_t workspace_ptr, int64_t B, int64_t Hq, int64_t Hkv, int64_t T,
                    int64_t D, int64_t S_max, int64_t num_splits, const std::vector<int64_t>& q_strides,
                    const std::vector<int64_t>& k_strides, const std::vector<int64_t>& v_strides,
                    const std::vector<int64_t>& out_strides, int64_t parents_batch_stride, double scale,
                    const std::string& dtype, uintptr_t stream) {
  constexpr const char* op = "tree_attention";
  efficient_ops::TreeAttentionArgs args{};
  args.dtype = parse_dtype(op, dtype, "dtype");
  args.q = ptr<const void>(q_ptr);
  args.k_cache = ptr<const void>(k_ptr);
  args.v_cache = ptr<const void>(v_ptr);
  args.out = ptr<void>(out_ptr);
  args.prefix_lens = ptr<const int64_t>(prefix_lens_ptr);
  args.parents = ptr<const int64_t>(parents_ptr);
  args.workspace = ptr<void>(workspace_ptr);
  args.B = B;
  args.Hq = Hq;
  args.Hkv = Hkv;
  args.T = T;
  args.D = D;
  args.S_max = S_max;
  args.num_splits = num_splits;
  copy_strides(q_strides, args.q_strides, 3, op, "q_strides");
  copy_strides(k_strides, args.k_strides, 3, op, "k_strides");
  copy_strides(v_strides, args.v_strides, 3, op, "v_strides");
  copy_strides(out_strides, args.out_strides, 3, op, "out_strides");
  args.parents_batch_stride = parents_batch_stride;
  args.scale = float(scale);
  check_and_launch(op, args, efficient_ops::tree_attention_check, efficient_ops::tree_attention, stream);
}

int64_t tree_attention_workspace_bytes(int64_t B, int64_t Hq, int64_t T, int64_t D, int64_t num_splits) {
  return checked_bytes(efficient_ops::tree_attention_workspace_bytes(B, Hq, T, D, num_splits),
                       "tree_attention_workspace_bytes",
                       "B, Hq >= 1, T in 1..256, D in {64, 128} and num_splits in 1..1024",
                       "B=" + std::to_string(B) + ", Hq=" + std::to_string(Hq) + ", T=" + std::to_string(T) +
                           ", D=" + std::to_string(D) + ", num_splits=" + std::to_string(num_splits));
}

void compact_kv(uintptr_t k_ptr, uintptr_t v_ptr, uintptr_t prefix_lens_ptr, uintptr_t accepted_ptr,
                uintptr_t accept_len_ptr, int64_t L, int64_t B, int64_t Hkv, int64_t S_max, int64_t D, int64_t P,
                const std::vector<int64_t>& k_strides, const std::vector<int64_t>& v_strides,
                int64_t accepted_batch_stride, int64_t elem_bytes, uintptr_t stream) {
  constexpr const char* op = "compact_kv";
  efficient_ops::CompactKVArgs args{};
  args.k_cache = ptr<void>(k_ptr);
  args.v_cache = ptr<void>(v_ptr);
  args.prefix_lens = ptr<const int64_t>(prefix_lens_ptr);
  args.accepted = ptr<const int64_t>(accepted_ptr);
  args.accept_len = ptr<const int64_t>(accept_len_ptr);
  args.L = L;
  args.B = B;
  args.Hkv = Hkv;
  args.S_max = S_max;
  args.D = D;
  args.P = P;
  copy_strides(k_strides, args.k_strides, 4, op, "k_strides");
  copy_strides(v_strides, args.v_strides, 4, op, "v_strides");
  args.accepted_batch_stride = accepted_batch_stride;
  args.elem_bytes = elem_bytes;
  check_and_launch(op, args, efficient_ops::compact_kv_check, efficient_ops::compact_kv, stream);
}

// ---- sparse attention (csrc/sparse_attention) ------------------------------------------------------

void block_sparse_attention(uintptr_t q_ptr, uintptr_t k_ptr, uintptr_t v_ptr, uintptr_t out_ptr, uintptr_t lse_ptr,
                            uintptr_t kv_num_blocks_ptr, uintptr_t kv_indices_ptr, int64_t B, int64_t Hq, int64_t Hkv,
                            int64_t Sq, int64_t Skv, int64_t D, int64_t block_m, int64_t block_n, int64_t Mq,
                            int64_t Nk, const std::vector<int64_t>& num_blocks_strides,
                            const std::vector<int64_t>& indices_strides, bool causal,
                            const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                            const std::vector<int64_t>& v_strides, const std::vector<int64_t>& out_strides,
                            double scale, const std::string& dtype, uintptr_t stream) {
  constexpr const char* op = "block_sparse_attention";
  efficient_ops::BlockSparseAttentionArgs args{};
  args.dtype = parse_dtype(op, dtype, "dtype");
  args.q = ptr<const void>(q_ptr);
  args.k = ptr<const void>(k_ptr);
  args.v = ptr<const void>(v_ptr);
  args.out = ptr<void>(out_ptr);
  args.lse = ptr<float>(lse_ptr);  // null: lse not wanted
  args.kv_num_blocks = ptr<const int32_t>(kv_num_blocks_ptr);
  args.kv_indices = ptr<const int32_t>(kv_indices_ptr);
  args.B = B;
  args.Hq = Hq;
  args.Hkv = Hkv;
  args.Sq = Sq;
  args.Skv = Skv;
  args.D = D;
  args.block_m = block_m;
  args.block_n = block_n;
  args.Mq = Mq;
  args.Nk = Nk;
  copy_strides(num_blocks_strides, args.num_blocks_strides, 2, op, "num_blocks_strides");
  copy_strides(indices_strides, args.indices_strides, 3, op, "indices_strides");
  args.causal = causal;
  copy_strides(q_strides, args.q_strides, 3, op, "q_strides");
  copy_strides(k_strides, args.k_strides, 3, op, "k_strides");
  copy_strides(v_strides, args.v_strides, 3, op, "v_strides");
  copy_strides(out_strides, args.out_strides, 3, op, "out_strides");
  args.scale = float(scale);
  check_and_launch(op, args, efficient_ops::block_sparse_attention_check, efficient_ops::block_sparse_attention,
                   stream);
}

void paged_sparse_decode(uintptr_t q_ptr, uintptr_t k_ptr, uintptr_t v_ptr, uintptr_t out_ptr, uintptr_t seq_lens_ptr,
                         uintptr_t page_indices_ptr, uintptr_t workspace_ptr, int64_t B, int64_t Hq, int64_t Hkv,
                         int64_t D, int64_t S_max, int64_t page_size, int64_t n_sel, int64_t num_splits,
                         const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
                         const std::vector<int64_t>& v_strides, const std::vector<int64_t>& out_strides, double scale,
                         const std::string& dtype, uintptr_t stream) {
  constexpr const char* op = "paged_sparse_decode";
  efficient_ops::PagedSparseDecodeArgs args{};
  args.dtype = parse_dtype(op, dtype, "dtype");
  args.q = ptr<const void>(q_ptr);
  args.k_cache = ptr<const void>(k_ptr);
  args.v_cache = ptr<const void>(v_ptr);
  args.out = ptr<void>(out_ptr);
  args.seq_lens = ptr<const int64_t>(seq_lens_ptr);
  args.page_indices = ptr<const int32_t>(page_indices_ptr);
  args.workspace = ptr<void>(workspace_ptr);
  args.B = B;
  args.Hq = Hq;
  args.Hkv = Hkv;
  args.D = D;
  args.S_max = S_max;
  args.page_size = page_size;
  args.n_sel = n_sel;
  args.num_splits = num_splits;
  copy_strides(q_strides, args.q_strides, 2, op, "q_strides");
  copy_strides(k_strides, args.k_strides, 3, op, "k_strides");
  copy_strides(v_strides, args.v_strides, 3, op, "v_strides");
  copy_strides(out_strides, args.out_strides, 2, op, "out_strides");
  args.scale = float(scale);
  check_and_launch(op, args, efficient_ops::paged_sparse_decode_check, efficient_ops::paged_sparse_decode, stream);
}

int64_t paged_sparse_decode_workspace_bytes(int64_t B, int64_t Hq, int64_t D, int64_t num_splits) {
  return checked_bytes(efficient_ops::paged_sparse_decode_workspace_bytes(B, Hq, D, num_splits),
                       "paged_sparse_decode_workspace_bytes",
                       "B, Hq >= 1 (B * Hq < 2^36), D in {64, 128} and num_splits in 1..1024",
                       "B=" + std::to_string(B) + ", Hq=" + std::to_string(Hq) + ", D=" + std::to_string(D) +
                           ", num_splits=" + std::to_string(num_splits));
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
        "fmt_a, fmt_b: 'w4', 'w3', 'w2', 'ternary', 'w1' (layouts: efficient_ops.formats.lowbit); fmt_b '' = no\n"
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

  m.def("tree_attention", &tree_attention, py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"), py::arg("out_ptr"),
        py::arg("prefix_lens_ptr"), py::arg("parents_ptr"), py::arg("workspace_ptr"), py::arg("B"), py::arg("Hq"),
        py::arg("Hkv"), py::arg("T"), py::arg("D"), py::arg("S_max"), py::arg("num_splits"), py::arg("q_strides"),
        py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"), py::arg("parents_batch_stride"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "Tree attention for speculative verification (dtype 'float16' or 'bfloat16', D 64 or 128, T <= 256):\n"
        "query node i of batch row b, head h attends to the prefix keys [0, prefix_lens[b]) and to the tree keys\n"
        "prefix_lens[b] + j for j = i and every ancestor j of i (parents row b at parents_ptr + b *\n"
        "parents_batch_stride, int64, parents[0] = -1, 0 <= parents[i] < i), KV head h / (Hq / Hkv);\n"
        "softmax(scale * q.k) in float32. q, out [B, Hq, T, D] and k, v caches [B, Hkv, S_max, D] with element\n"
        "strides (b, h, t|s) and unit stride in d; prefix_lens int64 [B] (clamped to [0, S_max - T] on the\n"
        "device). workspace: tree_attention_workspace_bytes(B, Hq, T, D, num_splits) bytes, 16-byte aligned, no\n"
        "initialisation needed. Two launches on `stream` (0 = legacy default stream). Raises ValueError for bad\n"
        "sizes, strides, pointers or alignment, RuntimeError if a launch fails.");

  m.def("tree_attention_num_splits", &efficient_ops::tree_attention_num_splits, py::arg("B"), py::arg("Hq"),
        py::arg("Hkv"), py::arg("T"), py::arg("S_max"), py::arg("sm_count"),
        "Prefix splits for tree_attention: about two waves of blocks on sm_count SMs, each split at least 256\n"
        "prefix positions, between 1 and 1024.");

  m.def("tree_attention_workspace_bytes", &tree_attention_workspace_bytes, py::arg("B"), py::arg("Hq"), py::arg("T"),
        py::arg("D"), py::arg("num_splits"),
        "Bytes of workspace tree_attention needs: float32 partial outputs and log-sum-exps of the num_splits + 1\n"
        "splits of every query row. Raises ValueError for sizes out of range.");

  m.def("compact_kv", &compact_kv, py::arg("k_ptr"), py::arg("v_ptr"), py::arg("prefix_lens_ptr"),
        py::arg("accepted_ptr"), py::arg("accept_len_ptr"), py::arg("L"), py::arg("B"), py::arg("Hkv"),
        py::arg("S_max"), py::arg("D"), py::arg("P"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("accepted_batch_stride"), py::arg("elem_bytes"), py::arg("stream"),
        "In-place KV compaction after verification, all layers in one launch: for every (l, b, h) and\n"
        "j = 1 .. accept_len[b] (clamped to [0, P - 1]) in order, cache row prefix_lens[b] + accepted[b, j] ->\n"
        "row prefix_lens[b] + j, for k and v ([L, B, Hkv, S_max, D], element strides (l, b, h, s), unit stride\n"
        "in d, elem_bytes 2 or 4). accepted int64 [B, P] (row stride accepted_batch_stride), strictly\n"
        "increasing from 0, -1 padded; moves out of [0, S_max) or with a negative index are skipped. Raises\n"
        "ValueError for bad sizes, strides, pointers or alignment, RuntimeError if the launch fails.");

  // ---- sparse attention ----
  m.def("block_sparse_attention", &block_sparse_attention, py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("kv_num_blocks_ptr"), py::arg("kv_indices_ptr"), py::arg("B"),
        py::arg("Hq"), py::arg("Hkv"), py::arg("Sq"), py::arg("Skv"), py::arg("D"), py::arg("block_m"),
        py::arg("block_n"), py::arg("Mq"), py::arg("Nk"), py::arg("num_blocks_strides"), py::arg("indices_strides"),
        py::arg("causal"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"), py::arg("out_strides"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "Block-sparse attention over a FlexAttention-layout block mask (dtype 'float16' or 'bfloat16', D 64 or\n"
        "128, tensor cores, float32 accumulation): query row i of (b, h) (query block m = i // block_m) attends\n"
        "key j of KV head h // (Hq // Hkv) iff j // block_n is in kv_indices[b, h, m, :kv_num_blocks[b, h, m]],\n"
        "j < Skv and, if causal, j <= i + Skv - Sq. q, out [B, Hq, Sq, D] and k, v [B, Hkv, Skv, D] with element\n"
        "strides (b, h, s) and unit stride in d; kv_num_blocks int32 [Bm, Hm, Mq] (strides num_blocks_strides\n"
        "(b, h), unit in m) and kv_indices int32 [Bm, Hm, Mq, Nk] (strides indices_strides (b, h, m), unit in n),\n"
        "broadcast over batch / heads by stride 0; block_m, block_n in {16, 32, 64, 128}; Mq = ceil(Sq /\n"
        "block_m), Nk = ceil(Skv / block_n). lse_ptr: float32 [B, Hq, Sq] contiguous natural-log log-sum-exp of\n"
        "the scaled scores, or 0. A row with no key: out 0, lse -inf. kv_num_blocks is clamped to [0, Nk] and\n"
        "indices outside [0, Nk) are skipped on the device. One launch on `stream` (0 = legacy default stream).\n"
        "Raises ValueError for bad sizes, strides, pointers or alignment, RuntimeError if the launch fails.");

  m.def("paged_sparse_decode", &paged_sparse_decode, py::arg("q_ptr"), py::arg("k_ptr"), py::arg("v_ptr"),
        py::arg("out_ptr"), py::arg("seq_lens_ptr"), py::arg("page_indices_ptr"), py::arg("workspace_ptr"),
        py::arg("B"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"), py::arg("S_max"), py::arg("page_size"),
        py::arg("n_sel"), py::arg("num_splits"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("out_strides"), py::arg("scale"), py::arg("dtype"), py::arg("stream"),
        "Decode attention over selected KV pages (dtype 'float16' or 'bfloat16', D 64 or 128, Hq / Hkv <= 16,\n"
        "float32 accumulation): query head h of batch row b attends every position s < seq_lens[b] of the pages\n"
        "page_indices[b, h // (Hq // Hkv), :] (int32 [B, Hkv, n_sel] contiguous; page p = positions [p *\n"
        "page_size, (p + 1) * page_size), page_size 16 or 64; -1 or any page outside [0, ceil(S_max /\n"
        "page_size)) is skipped; seq_lens int64 [B] clamped to [0, S_max]). q, out [B, Hq, D] with element\n"
        "strides (b, h); k, v caches [B, Hkv, S_max, D] with strides (b, h, s); unit stride in d. No key: out 0.\n"
        "workspace: paged_sparse_decode_workspace_bytes(B, Hq, D, num_splits) bytes, 16-byte aligned, no\n"
        "initialisation needed. Two launches on `stream`, fixed shapes (CUDA-graph capturable). Raises\n"
        "ValueError for bad sizes, strides, pointers or alignment, RuntimeError if a launch fails.");

  m.def("paged_sparse_decode_num_splits", &efficient_ops::paged_sparse_decode_num_splits, py::arg("B"),
        py::arg("Hkv"), py::arg("n_sel"), py::arg("page_size"), py::arg("sm_count"),
        "Page-list splits for paged_sparse_decode: about two waves of blocks on sm_count SMs, each split at least\n"
        "256 tokens, between 1 and min(n_sel, 1024) (1 for sizes out of range).");

  m.def("paged_sparse_decode_workspace_bytes", &paged_sparse_decode_workspace_bytes, py::arg("B"), py::arg("Hq"),
        py::arg("D"), py::arg("num_splits"),
        "Bytes of workspace paged_sparse_decode needs: float32 partial outputs and log-sum-exps of the\n"
        "num_splits splits of every (b, h) row. Raises ValueError for sizes out of range.");
}
