// Macros shared by the torch-free kernel headers (compiled by both g++ and nvcc).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SPECX_HD __host__ __device__ __forceinline__
#else
#define SPECX_HD inline
#endif

namespace specx {

// Element types of the kernels' floating-point tensors.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Divergences and gates of SpecKD, in the order the Python layer numbers them.
enum class Divergence : int { kFKL = 0, kRKL = 1, kJSD = 2, kSKL = 3, kSRKL = 4 };
enum class Gate : int { kNone = 0, kTopK = 1, kSpec = 2 };

}  // namespace specx
