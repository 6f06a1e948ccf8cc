// Host-side interface of the KV-cache compaction after speculative verification (see compact_kv.cu).
// Free of PyTorch and pybind11 headers: bindings.cpp passes raw pointers in.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace efficient_ops {

// After verification the accepted path's keys and values move next to the prefix, in every layer at once:
//   for every layer l, batch row b, KV head h, j = 1 .. accept_len[b] (clamped to [0, P - 1]), in order:
//     cache[l, b, h, prefix_len[b] + j] = cache[l, b, h, prefix_len[b] + accepted[b, j]]     (k and v)
// in place. accepted[b] is the accepted path's node indices: accepted[b, 0] = 0 (the root), strictly
// increasing, padded with -1 after accept_len[b] + 1 entries. Moves whose index is negative or whose source
// or destination row is outside [0, S_max) are skipped (never accessed), so no index value can make the
// kernel go out of bounds.
struct CompactKVArgs {
  void* k_cache;  // [L, B, Hkv, S_max, D], element strides k_strides (l, b, h, s), unit stride in d
  void* v_cache;  // same shape, strides v_strides
  const int64_t* prefix_lens;  // [B] device
  const int64_t* accepted;     // [B, P] device, row stride accepted_batch_stride
  const int64_t* accept_len;   // [B] device
  int64_t L, B, Hkv, S_max, D, P;
  int64_t k_strides[4], v_strides[4];
  int64_t accepted_batch_stride;
  int64_t elem_bytes;  // 2 or 4
};

// nullptr if the kernel supports the arguments, else a message that names the bad argument.
const char* compact_kv_check(const CompactKVArgs& args);

// One launch on `stream`; cudaErrorInvalidValue (launching nothing) if the check fails.
cudaError_t compact_kv(const CompactKVArgs& args, cudaStream_t stream);

}  // namespace efficient_ops
