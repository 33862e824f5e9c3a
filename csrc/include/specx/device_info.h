// Per-device facts the launchers need on every call, read from the runtime once per device:
// small trees are launch-bound, and each attribute query costs about half a microsecond.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace specx {

constexpr int kCachedDevices = 64;

// read(device) for the current device, cached per device in `cache` (0 until read; read > 0).
template <typename Read>
int cached_for_device(std::atomic<int> (&cache)[kCachedDevices], Read read) {
  int device = 0;
  cudaGetDevice(&device);
  if (device >= kCachedDevices) return read(device);
  int value = cache[device].load(std::memory_order_relaxed);
  if (value > 0) return value;
  value = read(device);
  cache[device].store(value, std::memory_order_relaxed);
  return value;
}

// One integer attribute of the current device, cached per device (each attribute its own cache).
template <cudaDeviceAttr kAttribute>
int device_attribute() {
  static std::atomic<int> cache[kCachedDevices];
  return cached_for_device(cache, [](int device) {
    int value = 0;
    cudaDeviceGetAttribute(&value, kAttribute, device);
    return value;
  });
}

// The current device's multiprocessor count.
inline int sm_count() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// The most shared memory the current device can give one block (with the opt-in attribute).
inline int max_smem_per_block() { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(); }

// The current device's compute capability as 10 * major + minor.
inline int compute_capability() {
  static std::atomic<int> cache[kCachedDevices];
  return cached_for_device(cache, [](int device) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return 10 * major + minor;
  });
}

// cudaFuncSetAttribute(kernel, MaxDynamicSharedMemorySize, bytes) once per device for a kernel
// whose shared memory never changes; `done` is that kernel's own record of the devices.
inline cudaError_t set_max_dynamic_smem_once(const void* kernel, int bytes, std::atomic<uint64_t>& done) {
  int device = 0;
  cudaGetDevice(&device);
  const uint64_t bit = device < kCachedDevices ? uint64_t{1} << device : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && bit != 0) done.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

}  // namespace specx
