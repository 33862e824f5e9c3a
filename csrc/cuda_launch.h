// The torch side of every CUDA launch: device guard, current stream, error check.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#ifdef SPECX_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace specx {

// Calls launch(stream) (a torch-free launcher returning a CUDA error code) on `device`'s
// current stream; raises if it failed, or if specx was built without its CUDA kernels.
template <typename Launch>
void launch_on_cuda(const c10::Device& device, const char* op, Launch&& launch) {
#ifdef SPECX_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  const int err = launch(static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
  TORCH_CHECK(err == 0, op, ": CUDA kernel failed with error code ", err);
#else
  (void)launch;
  TORCH_CHECK(false, op, ": specx was built without CUDA kernels");
#endif
}

}  // namespace specx
