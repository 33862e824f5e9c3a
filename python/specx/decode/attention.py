"""Tree attention over a KV cache: the attention of speculative-decoding tree verification,
of chunked prefill, and (T = 1) of plain decoding, in one kernel."""

from __future__ import annotations

import torch
from torch import Tensor

import specx.ops  # noqa: F401  (registers the fake kernel)


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                   tree_mask: Tensor | None = None, *, scale: float | None = None,
                   return_lse: bool = False, num_splits: int = 0) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of the T tree nodes of each sequence over its KV cache.

    Args:
        q: ``[batch, T, heads_q, head_dim]`` queries of the tree nodes, in topological order.
        k_cache, v_cache: ``[batch, max_len, heads_kv, head_dim]``. Sequence ``b`` holds its
            prefix at positions ``0 .. cache_lens[b]-1`` and the tree nodes' own K/V right after,
            at ``cache_lens[b] .. cache_lens[b]+T-1``; positions past that are never read. Any
            view whose ``(heads_kv, head_dim)`` block is contiguous is used in place.
        cache_lens: ``[batch]`` int32 or int64 prefix lengths, each in ``[0, max_len - T]``
            (checked on CPU; on CUDA keys past ``max_len`` are ignored instead).
        tree_mask: ``[batch, T, ceil(T/32)]`` int32 ancestor bits: bit ``j % 32`` of word
            ``j // 32`` of row ``i`` is set iff node ``j`` is an ancestor of node ``i`` or ``i``
            itself. Node ``i`` attends to the whole prefix and to the nodes whose bit is set.
            ``None`` means causal over the T nodes (chunked prefill; T = 1 is plain decoding).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return the natural-log log-sum-exp of the scaled scores,
            ``[batch, heads_q, T]`` float32 (``-inf`` for a node that sees no key).
        num_splits: number of slices of the KV length processed in parallel and merged
            (flash-decoding); 0 picks from batch x heads against the SM count. CUDA only.

    Returns:
        ``out [batch, T, heads_q, head_dim]`` in the dtype of ``q``, and ``lse`` if asked.

    Requirements: heads_q a multiple of heads_kv (GQA; query head ``h`` reads KV head
    ``h // (heads_q // heads_kv)``), head_dim 64 or 128, q/k/v of one dtype: float16 or
    bfloat16 on CUDA (tensor-core kernel; float32 takes a slow dense path), any of float32,
    float16, bfloat16 on CPU (fp32 accumulation). Not differentiable (inference kernel).
    """
    out, lse = torch.ops.specx.tree_attention(q, k_cache, v_cache, cache_lens, tree_mask, scale, num_splits)
    return (out, lse) if return_lse else out
