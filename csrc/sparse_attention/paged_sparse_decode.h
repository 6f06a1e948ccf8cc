// Host-side interface of the sparse paged decode-attention kernel (see paged_sparse_decode.cu for the kernel
// design). Free of PyTorch and pybind11 headers: bindings.cpp passes raw pointers in.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/dtype.h"

namespace efficient_ops {

constexpr int64_t kPagedSparseDecodeMaxG = 16;          // query heads per KV head
constexpr int64_t kPagedSparseDecodeMaxSplits = 1024;   // splits of the page list
constexpr int64_t kPagedSparseDecodeMaxSel = int64_t(1) << 24;  // n_sel
constexpr int64_t kPagedSparseDecodeMaxDim = int64_t(1) << 30;  // B, heads, S_max (32-bit index arithmetic)

// Decode attention over an explicit list of selected KV pages (Quest / LServe style), one call = two launches:
//   for batch row b, query head h (KV head kvh = h / G, G = Hq / Hkv):
//     keys = { s : s in page p for p in page_indices[b, kvh, :] with 0 <= p < ceil(S_max / page_size),
//              0 <= s < clamp(seq_lens[b], 0, S_max) },   page p = positions [p * page_size, (p + 1) * page_size)
//     out[b, h] = sum_{s in keys} softmax_s(scale * q[b, h] . k[b, kvh, s]) v[b, kvh, s]
//   float32 accumulation (CUDA cores), output rounded to dtype; no key: out = 0. Slots with -1 (or any page
//   outside the range) are skipped; duplicate pages would count twice (the Python layer rejects them).
//   Fixed shapes: CUDA-graph capturable; no value in seq_lens / page_indices makes it access out of bounds.
struct PagedSparseDecodeArgs {
  const void* q;        // [B, Hq, D] dtype, element strides q_strides (b, h), unit stride in d
  const void* k_cache;  // [B, Hkv, S_max, D] dtype, strides k_strides (b, h, s), unit stride in d
  const void* v_cache;  // [B, Hkv, S_max, D] dtype, strides v_strides (b, h, s), unit stride in d
  void* out;            // [B, Hq, D] dtype, strides out_strides (b, h), unit stride in d
  const int64_t* seq_lens;      // [B] int64
  const int32_t* page_indices;  // [B, Hkv, n_sel] int32 contiguous
  void* workspace;  // paged_sparse_decode_workspace_bytes(B, Hq, D, num_splits) bytes, 16-byte aligned; no
                    // initialisation needed (every byte read is written first)
  int64_t B, Hq, Hkv, D, S_max, page_size, n_sel, num_splits;
  int64_t q_strides[2], k_strides[3], v_strides[3], out_strides[2];
  float scale;
  DType dtype;
};

// Splits of each (b, kvh) page list for the flash-decoding split: about two waves of blocks on sm_count SMs,
// each split at least 256 tokens (pages rounded up), between 1 and min(n_sel, 1024). Bad sizes give 1.
int64_t paged_sparse_decode_num_splits(int64_t B, int64_t Hkv, int64_t n_sel, int64_t page_size, int64_t sm_count);

// Workspace bytes: float32 partial outputs [num_splits][B * Hq][D] then their log-sum-exps
// [num_splits][B * Hq], the second part 256-byte aligned. -1 for arguments out of range.
int64_t paged_sparse_decode_workspace_bytes(int64_t B, int64_t Hq, int64_t D, int64_t num_splits);

// nullptr if the kernel supports the arguments, else a message that names the bad argument.
const char* paged_sparse_decode_check(const PagedSparseDecodeArgs& args);

// Enqueues both kernels on `stream`; returns cudaErrorInvalidValue (launching nothing) if the check fails,
// else the first launch error.
cudaError_t paged_sparse_decode(const PagedSparseDecodeArgs& args, cudaStream_t stream);

}  // namespace efficient_ops
