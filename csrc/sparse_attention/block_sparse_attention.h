// Host-side interface of the block-sparse prefill attention kernel (see block_sparse_attention.cu for the
// kernel design). Free of PyTorch and pybind11 headers: bindings.cpp passes raw pointers in.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/dtype.h"

namespace efficient_ops {

constexpr int64_t kBlockSparseMaxDim = int64_t(1) << 30;  // B, heads, Sq, Skv (32-bit index arithmetic)

// Block-sparse attention over a FlexAttention-layout block mask, one launch on `stream`:
//   query row i of (b, h) lies in query block m = i / block_m; its keys are
//     K(b, h, i) = { j : j / block_n in kv_indices[b, h, m, 0 : n], j < Skv, and (causal) j <= i + Skv - Sq }
//   with n = clamp(kv_num_blocks[b, h, m], 0, Nk) (entries outside [0, Nk) are skipped); then
//     out[b, h, i] = sum_{j in K} softmax_j(scale * q[b, h, i] . k[b, h / G, j]) v[b, h / G, j],  G = Hq / Hkv
//     lse[b, h, i] = log(sum_{j in K} exp(scale * q . k_j))   (natural log, float32)
//   float32 accumulation (tensor cores; probabilities rounded to dtype before the P.V product), output rounded
//   to dtype. A row with no key gets out = 0 and lse = -inf. The mask tensors broadcast over batch and heads
//   by stride 0. Duplicate indices are not detected (they would count a block twice); the Python layer
//   rejects them. No value in kv_num_blocks / kv_indices makes the kernel access memory out of bounds.
struct BlockSparseAttentionArgs {
  const void* q;  // [B, Hq, Sq, D] dtype, element strides q_strides (b, h, s), unit stride in d
  const void* k;  // [B, Hkv, Skv, D] dtype, strides k_strides (b, h, s), unit stride in d
  const void* v;  // [B, Hkv, Skv, D] dtype, strides v_strides (b, h, s), unit stride in d
  void* out;      // [B, Hq, Sq, D] dtype, strides out_strides (b, h, s), unit stride in d
  float* lse;     // [B, Hq, Sq] float32 contiguous, or nullptr (not wanted)
  const int32_t* kv_num_blocks;  // [Bm, Hm, Mq], element strides num_blocks_strides (b, h), unit in m
  const int32_t* kv_indices;     // [Bm, Hm, Mq, Nk], element strides indices_strides (b, h, m), unit in n
  int64_t B, Hq, Hkv, Sq, Skv, D;
  int64_t block_m, block_n;  // each 16, 32, 64 or 128
  int64_t Mq, Nk;            // ceil(Sq / block_m), ceil(Skv / block_n)
  int64_t num_blocks_strides[2], indices_strides[3];
  bool causal;
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];
  float scale;
  DType dtype;
};

// nullptr if the kernel supports the arguments, else a message that names the bad argument.
const char* block_sparse_attention_check(const BlockSparseAttentionArgs& args);

// Enqueues the kernel on `stream`; returns cudaErrorInvalidValue (launching nothing) if the check fails, else
// the launch error. Sq == 0 launches nothing.
cudaError_t block_sparse_attention(const BlockSparseAttentionArgs& args, cudaStream_t stream);

}  // namespace efficient_ops
