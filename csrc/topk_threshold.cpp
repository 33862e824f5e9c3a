// Top-k threshold op: argument checks, the CPU path (nth_element over ordered keys), and the
// hand-off to the CUDA radix-select launcher.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <limits>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "ops.h"
#include "specx/topk_threshold.h"
#include "topk_host.h"


namespace specx {
namespace {

template <typename T>
void topk_threshold_cpu(const TopKThresholdParams& p) {
  at::parallel_for(0, p.rows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> keys(p.cols), scratch;
    for (int64_t r = lo; r < hi; ++r) {
      const T* x = static_cast<const T*>(p.logits) + r * p.cols;
      for (int64_t j = 0; j < p.cols; ++j) keys[j] = host_key(x[j]);
      const TopKSelection sel = select_topk_host(keys.data(), p.cols, p.k, scratch);
      static_cast<T*>(p.threshold)[r] = host_value_of_key<T>(sel.key);
      p.count_greater[r] = sel.greater;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_threshold(const at::Tensor& logits, int64_t k) {
  TORCH_CHECK_VALUE(logits.dim() >= 1, "topk_threshold: logits needs a class dimension");
  const DType dtype = float_dtype(logits.scalar_type(), "topk_threshold: logits");
  const int64_t cols = logits.size(-1);
  TORCH_CHECK_VALUE(cols >= 1 && cols <= std::numeric_limits<int32_t>::max(),
                    "topk_threshold: the class dimension of logits must be in [1, 2^31); got ", cols);
  TORCH_CHECK_VALUE(k >= 1 && k <= cols, "topk_threshold: k must be in [1, ", cols, "]; got ", k);
  const at::Tensor x = logits.reshape({-1, cols}).contiguous();
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  at::Tensor threshold = at::empty(lead, logits.options());
  at::Tensor count = at::empty(lead, logits.options().dtype(at::kLong));
  TopKThresholdParams p;
  p.logits = x.data_ptr();
  p.threshold = threshold.data_ptr();
  p.count_greater = count.data_ptr<int64_t>();
  p.rows = x.size(0);
  p.cols = cols;
  p.k = k;
  p.dtype = dtype;
  if (x.is_cuda()) {
    launch_on_cuda(x.device(), "topk_threshold", [&](void* stream) { return topk_threshold_cuda(p, stream); });
    return {threshold, count};
  }
  TORCH_CHECK_VALUE(x.is_cpu(), "topk_threshold: unsupported device ", x.device());
  if (p.rows == 0) return {threshold, count};
  switch (dtype) {
    case DType::kFloat32: topk_threshold_cpu<float>(p); break;
    case DType::kFloat16: topk_threshold_cpu<c10::Half>(p); break;
    case DType::kBFloat16: topk_threshold_cpu<c10::BFloat16>(p); break;
  }
  return {threshold, count};
}

}  // namespace specx
