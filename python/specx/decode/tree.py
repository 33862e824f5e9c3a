"""Draft-tree construction and KV-cache compaction (``torch.ops.specx.build_tree`` /
``compact_kv``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Tree", "build_tree", "compact_kv", "check_tree"]


class Tree(NamedTuple):
    """A batch of draft trees, padded to ``size`` nodes.

    - ``tokens [batch, size]`` int64: node tokens; node 0 is the root (the last verified token); -1 pads.
    - ``parents [batch, size]`` int64: ``parents[i] < i``; -1 for the root and padding.
    - ``depths [batch, size]`` int64: depth of each node (the root is 0): its position offset.
    - ``scores [batch, size]`` float32: cumulative draft log-probability (root 0, padding -inf).
    - ``mask [batch, size, ceil(size / 32)]`` int32: bit ``j % 32`` of word ``j // 32`` in row ``i``
      is set iff node ``j`` is ``i`` or one of its ancestors (padding rows are 0).
    - ``paths [batch, size, depth + 1]`` int64: the root-to-leaf paths (node indices from the
      root), one row per leaf in leaf-index order, -1 padded.
    - ``num_nodes [batch]`` int64: nodes of each tree (root included); nodes beyond are padding.
    """

    tokens: Tensor
    parents: Tensor
    depths: Tensor
    scores: Tensor
    mask: Tensor
    paths: Tensor
    num_nodes: Tensor


def build_tree(candidate_tokens: Tensor, candidate_log_probs: Tensor, root_tokens: Tensor, *,
               mode: str = "backbone", budget: int | None = None) -> Tree:
    """Builds the draft trees of a batch from per-depth candidates.

    Args:
        candidate_tokens: int64 ``[batch, depth, k]``: the k candidates of each draft depth, or
            ``[batch, depth, k, k]``: per parent candidate slot (``[b, d, j, c]`` is child ``c``
            of a depth-``d - 1`` node that was candidate ``j``; depth 0 reads ``j = 0``). A
            negative token marks a missing candidate.
        candidate_log_probs: their draft log-probabilities (same shape, any float dtype; -inf or
            NaN also marks a missing candidate). Values above 0 count as 0.
        root_tokens: int64 ``[batch]``: the last verified token of each sequence (node 0).
        mode: ``"backbone"`` (FastEagle): at each depth the first candidate (top-1) continues
            the spine and the other ``k - 1`` hang off the spine node as leaf siblings; a
            missing spine candidate ends the tree after its depth. Nodes are ordered depth by
            depth, spine first; ``size = 1 + depth * k``.
            ``"topk_expand"`` (EAGLE-2): nodes are scored by cumulative log-probability and
            the best ``budget - 1`` nodes (with the root: ``size = budget``) are kept. Depth by
            depth, the children of the nodes kept at the previous depth are ranked (score, then
            parent rank, then slot) and the best ``budget - 1`` kept; finally the best
            ``budget - 1`` over all depths (score, then depth, then rank) form the tree, in
            depth-then-rank order.
        budget: the node budget of ``topk_expand`` (root included).

    Returns:
        a :class:`Tree`.
    """
    if mode == "topk_expand" and budget is None:
        raise ValueError("build_tree: topk_expand needs a budget")
    return Tree(*torch.ops.specx.build_tree(candidate_tokens, candidate_log_probs, root_tokens, mode,
                                            0 if budget is None else int(budget)))


def check_tree(parents: Tensor, num_nodes: Tensor | None, op: str) -> None:
    """Raises ValueError unless every real node ``i > 0`` has ``0 <= parents[b, i] < i`` and
    ``1 <= num_nodes <= tree_size`` (one device sync)."""
    if parents.dim() != 2:
        raise ValueError(f"{op}: parents must be [batch, tree_size]; got {tuple(parents.shape)}")
    size = parents.shape[1]
    idx = torch.arange(size, device=parents.device)
    if num_nodes is not None:
        if num_nodes.shape != parents.shape[:1]:
            raise ValueError(f"{op}: num_nodes must be [batch] with batch = {parents.shape[0]} (parents); "
                             f"got {tuple(num_nodes.shape)}")
        bad_n = (num_nodes < 1) | (num_nodes > size)
        if bool(bad_n.any()):
            b = int(bad_n.nonzero()[0, 0])
            raise ValueError(f"{op}: num_nodes[{b}] = {int(num_nodes[b])} must be in [1, {size}]")
        real = idx[None, :] < num_nodes[:, None]
    else:
        real = torch.ones_like(parents, dtype=torch.bool)
    bad = real & (idx[None, :] > 0) & ((parents < 0) | (parents >= idx[None, :]))
    if bool(bad.any()):
        b, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{op}: parents[{b}, {i}] = {int(parents[b, i])} must be in [0, {i}) "
                         "(a parent comes before its child)")


def compact_kv(k_cache: Tensor, v_cache: Tensor, lengths: Tensor, accepted_nodes: Tensor,
               accept_len: Tensor) -> None:
    """Moves the accepted path's K/V entries next to the prefix, in place, in one launch.

    Cache layout ``[batch, max_len, heads_kv, head_dim]`` (contiguous). Before the call,
    sequence ``b`` holds ``lengths[b]`` prefix entries and tree node ``i`` sits at
    ``lengths[b] + i``. ``accepted_nodes [batch, n]`` (int64, root first, increasing node
    indices, as returned by :func:`verify_greedy` / :func:`verify_sample`) and ``accept_len
    [batch]`` give the path; entry ``accepted_nodes[b, i]`` moves to ``lengths[b] + i`` for
    ``i <= accept_len[b]`` and ``lengths[b]`` becomes ``lengths[b] + accept_len[b] + 1`` (the
    root and the accepted nodes; the next token's K/V comes with the next forward).
    The CPU path checks the path values; the CUDA kernel skips a sequence whose path leaves
    the cache.
    """
    torch.ops.specx.compact_kv(k_cache, v_cache, lengths, accepted_nodes, accept_len)
