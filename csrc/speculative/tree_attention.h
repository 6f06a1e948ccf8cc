// Host-side interface of the tree-attention kernel for speculative-decoding verification (see
// tree_attention.cu for the kernel design). Free of PyTorch and pybind11 headers: bindings.cpp passes raw
// pointers in.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/dtype.h"

namespace efficient_ops {

constexpr int64_t kTreeAttentionMaxT = 256;          // tree nodes
constexpr int64_t kTreeAttentionMaxSplits = 1024;    // prefix splits per (batch row, KV head)
constexpr int64_t kTreeAttentionMaxDim = int64_t(1) << 30;  // B, heads, S_max (32-bit index arithmetic)

// Attention of a flattened draft tree over a prefix KV cache, one call = two launches on `stream`:
//   for batch row b, query head h (KV head h / G, G = Hq / Hkv), tree node i:
//     keys  = { s : 0 <= s < P_b } U { P_b + j : j == i or j an ancestor of i }, P_b = prefix_len[b]
//     out[b, h, i] = sum_{s in keys} softmax_s(scale * q[b, h, i] . k[b, h / G, s]) v[b, h / G, s]
// float32 accumulation (tensor cores, probabilities rounded to dtype before the P.V product), output
// rounded to dtype. Ancestors come from parents[b] (parents[0] = -1, 0 <= parents[i] < i). The kernel
// clamps prefix_len[b] to [0, S_max - T] and treats any parent outside [0, i) as "no parent", so that
// no value in prefix_lens or parents can make it read or write out of bounds.
struct TreeAttentionArgs {
  const void* q;        // [B, Hq, T, D] dtype, element strides q_strides (b, h, t), unit stride in d
  const void* k_cache;  // [B, Hkv, S_max, D] dtype, strides k_strides (b, h, s), unit stride in d
  const void* v_cache;  // [B, Hkv, S_max, D] dtype, strides v_strides (b, h, s), unit stride in d
  void* out;            // [B, Hq, T, D] dtype, strides out_strides (b, h, t), unit stride in d
  const int64_t* prefix_lens;  // [B] device
  const int64_t* parents;      // row b at parents + b * parents_batch_stride (0: one tree for the batch)
  void* workspace;             // tree_attention_workspace_bytes(B, Hq, T, D, num_splits) bytes, 16-aligned;
                               // no initialisation needed (every byte read is written first)
  int64_t B, Hq, Hkv, T, D, S_max, num_splits;
  int64_t q_strides[3], k_strides[3], v_strides[3], out_strides[3];
  int64_t parents_batch_stride;
  float scale;
  DType dtype;
};

// Prefix splits for the flash-decoding split: enough (query-row tiles x B x Hkv x (splits + 1)) blocks for
// about two waves on sm_count SMs, each split at least 256 prefix positions, at least 1, at most
// kTreeAttentionMaxSplits. Non-positive sizes give 1.
int64_t tree_attention_num_splits(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S_max, int64_t sm_count);

// Workspace bytes: float32 partial outputs [num_splits + 1][B * Hq * T][D] then their log-sum-exps
// [num_splits + 1][B * Hq * T], the second part 256-byte aligned. -1 for arguments out of range.
int64_t tree_attention_workspace_bytes(int64_t B, int64_t Hq, int64_t T, int64_t D, int64_t num_splits);

// nullptr if the kernel supports the arguments, else a message that names the bad argument.
const char* tree_attention_check(const TreeAttentionArgs& args);

// Enqueues both kernels on `stream`; returns cudaErrorInvalidValue (launching nothing) if the check fails,
// else the first launch error.
cudaError_t tree_attention(const TreeAttentionArgs& args, cudaStream_t stream);

}  // namespace efficient_ops
