// Per-device facts the launchers need on every call, read from the runtime once per device:
// small trees are launch-bound, and each attribute query costs about half a microsecond.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace specx {

constexpr int kCachedDevices = 64;

// The current device's multiprocessor count.
inline int sm_count() {
  static std::atomic<int> cached[kCachedDevices];  // 0 until read
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  if (device < kCachedDevices && (sms = cached[device].load(std::memory_order_relaxed)) > 0) return sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (device < kCachedDevices) cached[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// The current device's compute capability as 10 * major + minor.
inline int compute_capability() {
  static std::atomic<int> cached[kCachedDevices];
  int device = 0, cc = 0;
  cudaGetDevice(&device);
  if (device < kCachedDevices && (cc = cached[device].load(std::memory_order_relaxed)) > 0) return cc;
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  cc = 10 * major + minor;
  if (device < kCachedDevices) cached[device].store(cc, std::memory_order_relaxed);
  return cc;
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
