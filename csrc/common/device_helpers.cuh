// Small device helpers shared by the kernel families. Each has a host version, so that the CPU
// emulations (tests/csrc/*_emulation.cu) can run the kernels' own code.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define EO_HD __host__ __device__ __forceinline__

namespace efficient_ops {

EO_HD float as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

EO_HD uint32_t word_of(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// A 16-bit element through the read-only data cache.
EO_HD uint16_t load_u16(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(static_cast<const unsigned short*>(p));
#else
  return *static_cast<const uint16_t*>(p);
#endif
}

EO_HD float half_bits_to_float(uint16_t u) {
  __half_raw raw;
  raw.x = u;
  return __half2float(__half(raw));
}

EO_HD float bf16_bits_to_float(uint16_t u) { return as_float(uint32_t(u) << 16); }  // widening is a shift

}  // namespace efficient_ops
