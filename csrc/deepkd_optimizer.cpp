// DeepKD optimizer step: argument checks, the CPU update, and the CUDA hand-off (one multi-tensor
// launch per dtype, with the tensor descriptors passed in a device buffer).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <map>
#include <optional>
#include <vector>

#include "cuda_launch.h"
#include "ops.h"
#include "specx/deepkd_optimizer.h"
#include "topk_host.h"


namespace specx {
namespace {

using GradList = c10::List<std::optional<at::Tensor>>;

std::optional<at::Tensor> grad_at(const GradList& grads, size_t i) {
  std::optional<at::Tensor> g = grads.get(i);
  if (g.has_value() && !g->defined()) return std::nullopt;
  return g;
}

// Whether tensor i can go through the raw-pointer update: everything contiguous, of the param's
// dtype and size.
bool fast_path_ok(const at::Tensor& param, const std::optional<at::Tensor> (&grads)[3], const at::Tensor (&bufs)[3]) {
  const auto st = param.scalar_type();
  if (!(st == at::kFloat || st == at::kHalf || st == at::kBFloat16) || !param.is_contiguous()) return false;
  for (const auto& g : grads)
    if (g && (g->scalar_type() != st || !g->is_contiguous() || g->numel() != param.numel())) return false;
  for (const auto& b : bufs)
    if (b.scalar_type() != st || !b.is_contiguous() || b.numel() != param.numel()) return false;
  return true;
}

// The same update with tensor ops, for whatever the fast path does not take.
void update_with_tensor_ops(at::Tensor& param, const std::optional<at::Tensor> (&grads)[3], at::Tensor (&bufs)[3],
                            const DeepKDSgdCoefs& c) {
  at::Tensor task = grads[0] ? grads[0]->to(param.scalar_type()) : at::zeros_like(param);
  if (c.weight_decay != 0.0f) task = task.add(param, c.weight_decay);
  bufs[0].mul_(c.decay[0]).add_(task);
  for (int k = 1; k < 3; ++k) {
    bufs[k].mul_(c.decay[k]);
    if (grads[k]) bufs[k].add_(*grads[k]);
  }
  param.sub_(bufs[0].add(bufs[1]).add_(bufs[2]), c.lr);
}

template <typename T>
void update_cpu(const DeepKDSgdTensor& t, const DeepKDSgdCoefs& c) {
  T* param = static_cast<T*>(t.param);
  const T* grad[3] = {static_cast<const T*>(t.grad[0]), static_cast<const T*>(t.grad[1]),
                      static_cast<const T*>(t.grad[2])};
  T* buffer[3] = {static_cast<T*>(t.buffer[0]), static_cast<T*>(t.buffer[1]), static_cast<T*>(t.buffer[2])};
  at::parallel_for(0, t.numel, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float p = static_cast<float>(param[i]);
      float g[3], b[3];
      for (int k = 0; k < 3; ++k) {
        g[k] = grad[k] ? static_cast<float>(grad[k][i]) : 0.0f;
        b[k] = static_cast<float>(buffer[k][i]);
      }
      deepkd_sgd_update(p, g, b, c);
      param[i] = static_cast<T>(p);
      for (int k = 0; k < 3; ++k) buffer[k][i] = static_cast<T>(b[k]);
    }
  });
}

// One launch for tensors of one dtype: descriptors and chunks go to the device in one copy.
int launch_cuda_group(const std::vector<DeepKDSgdTensor>& tensors, DType dtype, const DeepKDSgdCoefs& coefs,
                      const at::Device& device, void* stream) {
  std::vector<DeepKDSgdChunk> chunks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = (tensors[i].numel + kDeepKDSgdChunkSize - 1) / kDeepKDSgdChunkSize;
    for (int64_t c = 0; c < n; ++c) chunks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
  }
  if (chunks.empty()) return 0;
  const size_t tensor_bytes = tensors.size() * sizeof(DeepKDSgdTensor);
  const size_t bytes = tensor_bytes + chunks.size() * sizeof(DeepKDSgdChunk);
  at::Tensor host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), tensors.data(), tensor_bytes);
  std::memcpy(static_cast<char*>(host.data_ptr()) + tensor_bytes, chunks.data(), bytes - tensor_bytes);
  const at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const auto* dev_tensors = reinterpret_cast<const DeepKDSgdTensor*>(dev.data_ptr());
  const auto* dev_chunks = reinterpret_cast<const DeepKDSgdChunk*>(static_cast<const char*>(dev.data_ptr()) + tensor_bytes);
  return deepkd_sgd_step_cuda(dev_tensors, dev_chunks, static_cast<int64_t>(chunks.size()), dtype, coefs, stream);
}

}  // namespace

void deepkd_sgd_step_(at::TensorList params, const GradList& grads_task, const GradList& grads_tckd,
                      const GradList& grads_nckd, at::TensorList task_buffers, at::TensorList tckd_buffers,
                      at::TensorList nckd_buffers, double lr, double momentum, double delta, double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads_task.size() == n && grads_tckd.size() == n && grads_nckd.size() == n,
                    "deepkd_sgd_step_: grads_task, grads_tckd and grads_nckd must have one entry per param (", n,
                    "); got ", grads_task.size(), ", ", grads_tckd.size(), ", ", grads_nckd.size());
  TORCH_CHECK_VALUE(task_buffers.size() == n && tckd_buffers.size() == n && nckd_buffers.size() == n,
                    "deepkd_sgd_step_: the momentum buffers must have one entry per param (", n, ")");
  const DeepKDSgdCoefs coefs{static_cast<float>(lr),
                             {static_cast<float>(momentum + delta), static_cast<float>(momentum - delta),
                              static_cast<float>(momentum + delta)},
                             static_cast<float>(weight_decay)};
  if (n == 0) return;
  const at::Device device = params[0].device();
  std::map<DType, std::vector<DeepKDSgdTensor>> groups;
  for (size_t i = 0; i < n; ++i) {
    at::Tensor param = params[i];
    const std::optional<at::Tensor> grads[3] = {grad_at(grads_task, i), grad_at(grads_tckd, i),
                                                grad_at(grads_nckd, i)};
    at::Tensor bufs[3] = {task_buffers[i], tckd_buffers[i], nckd_buffers[i]};
    TORCH_CHECK_VALUE(param.device() == device, "deepkd_sgd_step_: every param must be on ", device, "; param ", i,
                      " is on ", param.device());
    for (const auto& g : grads)
      TORCH_CHECK_VALUE(!g || (g->device() == device && g->sizes() == param.sizes()),
                        "deepkd_sgd_step_: the gradients of param ", i, " must match its shape and device");
    for (const auto& b : bufs)
      TORCH_CHECK_VALUE(b.device() == device && b.sizes() == param.sizes(),
                        "deepkd_sgd_step_: the momentum buffers of param ", i, " must match its shape and device");
    if (!fast_path_ok(param, grads, bufs)) {
      update_with_tensor_ops(param, grads, bufs, coefs);
      continue;
    }
    DeepKDSgdTensor t;
    t.param = param.data_ptr();
    for (int k = 0; k < 3; ++k) {
      t.grad[k] = grads[k] ? grads[k]->data_ptr() : nullptr;
      t.buffer[k] = bufs[k].data_ptr();
    }
    t.numel = param.numel();
    groups[float_dtype(param.scalar_type(), "deepkd_sgd_step_: params")].push_back(t);
  }
  if (device.is_cuda()) {
    for (const auto& [dtype, tensors] : groups) {
      launch_on_cuda(device, "deepkd_sgd_step_",
                     [&](void* stream) { return launch_cuda_group(tensors, dtype, coefs, device, stream); });
    }
    return;
  }
  TORCH_CHECK_VALUE(device.is_cpu(), "deepkd_sgd_step_: unsupported device ", device);
  for (const auto& [dtype, tensors] : groups) {
    for (const DeepKDSgdTensor& t : tensors) {
      switch (dtype) {
        case DType::kFloat32: update_cpu<float>(t, coefs); break;
        case DType::kFloat16: update_cpu<c10::Half>(t, coefs); break;
        case DType::kBFloat16: update_cpu<c10::BFloat16>(t, coefs); break;
      }
    }
  }
}

}  // namespace specx
