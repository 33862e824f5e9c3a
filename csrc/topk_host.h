// Host-side helpers shared by the top-k threshold and DeepKD glue: dtype mapping and the ordered
// keys of torch's scalar types (see specx/topk_threshold.h for the order).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "specx/topk_threshold.h"

namespace specx {

inline DType float_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, what, " must be float32, float16 or bfloat16; got ", t);
  }
}

template <typename T>
uint32_t host_key(T v) {
  if constexpr (std::is_same_v<T, float>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    return ordered_key32(bits);
  } else {
    return ordered_key16(v.x);
  }
}

template <typename T>
T host_value_of_key(uint32_t key) {
  if constexpr (std::is_same_v<T, float>) {
    const uint32_t bits = key_to_bits32(key);
    float v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  } else {
    return T(static_cast<uint16_t>(key_to_bits16(key)), T::from_bits());
  }
}

}  // namespace specx
