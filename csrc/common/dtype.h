// Element types the kernels accept, shared by every family's host interface (no PyTorch headers).
#pragma once

namespace efficient_ops {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

}  // namespace efficient_ops
