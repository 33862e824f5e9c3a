// Tree attention over a KV cache: argument checks, the CPU kernel, the hand-off to the CUDA
// launcher (float16 / bfloat16) and a plain ATen path for float32 on CUDA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda_launch.h"
#include "ops.h"
#include "specx/tree_attention.h"


namespace specx {
namespace {

DType attention_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, "tree_attention: q must be float32, float16 or bfloat16; got ", t);
  }
}

// The CUDA kernel reads 16-byte chunks of K/V (4-byte pairs of q).
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// K/V may be any view whose (heads, head_dim) block is contiguous, e.g. one layer or a batch
// slice of a larger cache; anything else (or a view off 16-byte alignment) is copied.
at::Tensor kv_view(const at::Tensor& t) {
  const bool usable = t.stride(3) == 1 && t.stride(2) == t.size(3) && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                      aligned16(t);
  return usable ? t : t.clone(at::MemoryFormat::Contiguous);
}

// ---- CPU: one (sequence, node, query head) row at a time, fp32 accumulation ----

template <typename T>
void tree_attention_cpu(const TreeAttentionParams& p) {
  const int64_t T_ = p.tree_size, Hq = p.heads_q, D = p.head_dim, group = p.heads_q / p.heads_kv;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.batch * T_ * Hq, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores, acc(D);
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t head = row % Hq, node = (row / Hq) % T_, b = row / (Hq * T_);
      const int64_t len = p.lens_int64 ? static_cast<const int64_t*>(p.cache_lens)[b]
                                       : static_cast<const int32_t*>(p.cache_lens)[b];
      const int64_t kv_head = head / group;
      const T* q_row = q + row * D;
      const int32_t* mask_row = p.tree_mask ? p.tree_mask + (b * T_ + node) * p.mask_words : nullptr;
      auto visible = [&](int64_t key) {
        if (key < len) return true;
        const int64_t j = key - len;
        return mask_row ? tree_mask_bit(mask_row, j) : j <= node;
      };
      auto key_ptr = [&](const T* base, int which, int64_t key) {
        return base + b * p.kv_batch_stride[which] + key * p.kv_seq_stride[which] + kv_head * D;
      };
      const int64_t n = len + T_;
      scores.assign(n, -std::numeric_limits<float>::infinity());
      float max_score = -std::numeric_limits<float>::infinity();
      for (int64_t key = 0; key < n; ++key) {
        if (!visible(key)) continue;
        const T* k_row = key_ptr(k, 0, key);
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += static_cast<float>(q_row[d]) * static_cast<float>(k_row[d]);
        scores[key] = dot * p.scale;
        max_score = std::max(max_score, scores[key]);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      double total = 0;
      if (max_score != -std::numeric_limits<float>::infinity()) {
        for (int64_t key = 0; key < n; ++key) {
          if (scores[key] == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(scores[key] - max_score);
          total += w;
          const T* v_row = key_ptr(v, 1, key);
          for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<float>(v_row[d]);
        }
      }
      const float inv = total > 0 ? static_cast<float>(1.0 / total) : 0.f;
      for (int64_t d = 0; d < D; ++d) out[row * D + d] = static_cast<T>(acc[d] * inv);
      p.lse[(b * Hq + head) * T_ + node] = total > 0 ? static_cast<float>(max_score + std::log(total))
                                                     : -std::numeric_limits<float>::infinity();
    }
  });
}

// Float32 on CUDA: a dense masked attention in ATen (correct, not fast; the kernels are 16-bit).
std::tuple<at::Tensor, at::Tensor> tree_attention_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& cache_lens,
                                                       const std::optional<at::Tensor>& tree_mask, double scale) {
  const int64_t B = q.size(0), T_ = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t L = k.size(1), Hkv = k.size(2), group = Hq / Hkv;
  const auto lens = cache_lens.to(at::kLong).view({B, 1, 1});
  const auto pos = at::arange(L, lens.options()).view({1, 1, L});
  const auto node = at::arange(T_, lens.options()).view({1, T_, 1});
  const auto j = pos - lens;  // index among the tree nodes, valid in [0, T)
  const auto in_tree = j.ge(0).logical_and(j.lt(T_));
  at::Tensor tree_visible;
  if (tree_mask.has_value()) {
    const auto shifts = at::arange(32, tree_mask->options());
    const auto bits = tree_mask->unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(1).view({B, T_, -1});
    tree_visible = bits.gather(2, j.clamp(0, T_ - 1).expand({B, T_, L})).ne(0);
  } else {
    tree_visible = j.le(node);
  }
  const auto visible = pos.lt(lens).logical_or(in_tree.logical_and(tree_visible));  // [B, T, L]
  const auto qh = q.view({B, T_, Hkv, group, D}).permute({0, 2, 3, 1, 4});          // [B, Hkv, G, T, D]
  const auto kh = k.permute({0, 2, 1, 3}).unsqueeze(2);                              // [B, Hkv, 1, L, D]
  const auto vh = v.permute({0, 2, 1, 3}).unsqueeze(2);
  auto scores = at::matmul(qh, kh.transpose(-1, -2)).mul(scale);
  scores = scores.masked_fill(visible.view({B, 1, 1, T_, L}).logical_not(), -std::numeric_limits<float>::infinity());
  const auto lse = at::logsumexp(scores, -1, /*keepdim=*/true);
  const auto weights = at::nan_to_num(scores.sub(lse).exp(), 0.0);
  const auto out = at::matmul(weights, vh).permute({0, 3, 1, 2, 4}).reshape({B, T_, Hq, D});
  return {out.contiguous(), lse.squeeze(-1).reshape({B, Hq, T_})};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                                  const at::Tensor& v_cache, const at::Tensor& cache_lens,
                                                  const std::optional<at::Tensor>& tree_mask,
                                                  std::optional<double> scale, int64_t num_splits) {
  TORCH_CHECK_VALUE(q.dim() == 4, "tree_attention: q must be [batch, T, heads_q, head_dim]; got ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4, "tree_attention: k_cache must be [batch, max_len, heads_kv, head_dim]; got ",
                    k_cache.sizes());
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "tree_attention: v_cache must have the shape of k_cache ",
                    k_cache.sizes(), "; got ", v_cache.sizes());
  const int64_t B = q.size(0), T_ = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t L = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(0) == B, "tree_attention: k_cache has batch size ", k_cache.size(0),
                    " but q has ", B);
  TORCH_CHECK_VALUE(cache_lens.dim() == 1 && cache_lens.size(0) == B, "tree_attention: cache_lens must be [", B,
                    "] (the batch size of q); got ", cache_lens.sizes());
  TORCH_CHECK_VALUE(cache_lens.scalar_type() == at::kInt || cache_lens.scalar_type() == at::kLong,
                    "tree_attention: cache_lens must be int32 or int64; got ", cache_lens.scalar_type());
  TORCH_CHECK_VALUE(D == 64 || D == 128, "tree_attention: head_dim must be 64 or 128; got ", D);
  TORCH_CHECK_VALUE(k_cache.size(3) == D, "tree_attention: k_cache head_dim ", k_cache.size(3),
                    " differs from q head_dim ", D);
  TORCH_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, "tree_attention: heads_q (", Hq,
                    ") must be a multiple of heads_kv (", Hkv, ")");
  TORCH_CHECK_VALUE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                    "tree_attention: k_cache and v_cache must have the dtype of q (", q.scalar_type(), "); got ",
                    k_cache.scalar_type(), " and ", v_cache.scalar_type());
  const DType dtype = attention_dtype(q.scalar_type());
  for (const at::Tensor* t : {&k_cache, &v_cache, &cache_lens}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), "tree_attention: k_cache, v_cache, cache_lens and tree_mask must be on ",
                      q.device(), "; got ", t->device());
  }
  TORCH_CHECK_VALUE(L <= std::numeric_limits<int32_t>::max() / 2, "tree_attention: max_len too large: ", L);
  TORCH_CHECK_VALUE(T_ <= L, "tree_attention: T (", T_, ") exceeds the cache length max_len (", L, ")");
  TORCH_CHECK_VALUE(B <= 65535 && Hkv <= 65535, "tree_attention: batch and heads_kv must be <= 65535");
  const int64_t words = (T_ + 31) / 32;
  if (tree_mask.has_value()) {
    const at::Tensor& m = *tree_mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kInt, "tree_attention: tree_mask must be int32 words; got ",
                      m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 3 && m.size(0) == B && m.size(1) == T_ && m.size(2) == words,
                      "tree_attention: tree_mask must be [batch, T, ceil(T/32)] = [", B, ", ", T_, ", ", words,
                      "]; got ", m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), "tree_attention: tree_mask must be on ", q.device(), "; got ",
                      m.device());
  }
  const double softmax_scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), "tree_attention: scale must be finite; got ", softmax_scale);
  TORCH_CHECK_VALUE(num_splits >= 0, "tree_attention: num_splits must be >= 0 (0 picks); got ", num_splits);

  const at::Tensor qc = aligned16(q) ? q.contiguous() : q.clone(at::MemoryFormat::Contiguous);
  const at::Tensor kc = kv_view(k_cache), vc = kv_view(v_cache);
  const at::Tensor lens = cache_lens.contiguous();
  const at::Tensor mask = tree_mask.has_value() ? tree_mask->contiguous() : at::Tensor();
  at::Tensor out = at::empty({B, T_, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, T_}, q.options().dtype(at::kFloat));

  TreeAttentionParams p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.v = vc.data_ptr();
  p.kv_batch_stride[0] = kc.stride(0);
  p.kv_batch_stride[1] = vc.stride(0);
  p.kv_seq_stride[0] = kc.stride(1);
  p.kv_seq_stride[1] = vc.stride(1);
  p.cache_lens = lens.data_ptr();
  p.lens_int64 = lens.scalar_type() == at::kLong;
  p.tree_mask = mask.defined() ? mask.data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = B;
  p.tree_size = T_;
  p.max_len = L;
  p.heads_q = Hq;
  p.heads_kv = Hkv;
  p.head_dim = D;
  p.mask_words = words;
  p.scale = static_cast<float>(softmax_scale);
  p.splits = 1;
  p.dtype = dtype;
  if (out.numel() == 0) return {out, lse};
  if (q.is_cuda() && dtype == DType::kFloat32) {
    return tree_attention_aten(q, k_cache, v_cache, cache_lens, tree_mask, softmax_scale);
  }

  if (q.is_cuda()) {
    launch_on_cuda(q.device(), "tree_attention", [&](void* stream) {
      p.splits = tree_attention_cuda_splits(p, static_cast<int>(std::min<int64_t>(num_splits, 1 << 20)));
      at::Tensor partial;
      if (p.splits > 1) {
        // The splits' outputs [splits, B, T, Hq, D], then their log-sum-exps [splits, B, T, Hq]:
        // one allocation, as small trees are launch-bound.
        const int64_t rows = p.splits * B * T_ * Hq;
        partial = at::empty({rows * (D + 1)}, q.options().dtype(at::kFloat));
        p.partial_out = partial.data_ptr<float>();
        p.partial_lse = p.partial_out + rows * D;
      }
      return tree_attention_cuda(p, stream);
    });
    return {out, lse};
  }
  TORCH_CHECK_VALUE(q.is_cpu(), "tree_attention: unsupported device ", q.device());
  // The CPU can afford the check the GPU path skips (it would need a device sync).
  const at::Tensor lens64 = lens.to(at::kLong);
  const int64_t* lp = lens64.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lp[b] >= 0 && lp[b] + T_ <= L, "tree_attention: cache_lens[", b, "] = ", lp[b],
                      " must be in [0, max_len - T] = [0, ", L - T_, "]");
  }
  switch (dtype) {
    case DType::kFloat32: tree_attention_cpu<float>(p); break;
    case DType::kFloat16: tree_attention_cpu<c10::Half>(p); break;
    case DType::kBFloat16: tree_attention_cpu<c10::BFloat16>(p); break;
  }
  return {out, lse};
}

}  // namespace specx
