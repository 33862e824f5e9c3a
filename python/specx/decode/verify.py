"""Lossless verification of draft trees: greedy (``torch.ops.specx.verify_greedy``) and
multi-candidate rejection sampling (``torch.ops.specx.verify_sample``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from specx.decode.tree import check_tree

__all__ = ["Verification", "verify_greedy", "verify_sample"]


class Verification(NamedTuple):
    """Outcome of verifying a batch of trees.

    - ``accepted_nodes [batch, tree_size]`` int64: the accepted path's node indices, root
      (node 0) first, -1 padded; its first ``accept_len + 1`` entries are set.
    - ``accept_len [batch]`` int64: accepted draft nodes (the root not counted).
    - ``next_token [batch]`` int64: the token emitted after them (the bonus token, or the
      replacement sampled from the residual). A step emits ``accept_len + 1`` tokens:
      ``tokens[accepted_nodes[1:accept_len + 1]]`` then ``next_token``.
    """

    accepted_nodes: Tensor
    accept_len: Tensor
    next_token: Tensor


def verify_greedy(node_tokens: Tensor, parents: Tensor, target: Tensor, num_nodes: Tensor | None = None, *,
                  check: bool = True) -> Verification:
    """Greedy (temperature 0) verification.

    Args:
        node_tokens, parents: int64 ``[batch, tree_size]`` (see :class:`specx.decode.Tree`).
        target: the target's logits at the tree nodes ``[batch, tree_size, vocab]`` (fp32 /
            fp16 / bf16; the argmax, lowest index on ties, is fused into the kernel) or their
            argmax, int64 ``[batch, tree_size]``.
        num_nodes: int64 ``[batch]`` real nodes per tree (default: all).
        check: validate the tree values first (a device sync on CUDA; the CPU op always checks).

    Returns:
        :class:`Verification`: the longest root-to-leaf path whose every node's token equals
        the target's argmax at its parent (ties: the lowest node index), and the argmax after
        its last node.
    """
    if check and node_tokens.is_cuda:
        check_tree(parents, num_nodes, "verify_greedy")
    return Verification(*torch.ops.specx.verify_greedy(node_tokens, parents, num_nodes, target))


def verify_sample(node_tokens: Tensor, parents: Tensor, target_logits: Tensor, num_nodes: Tensor | None = None,
                  draft_probs: Tensor | None = None, *, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, offset: int = 0, check: bool = True) -> Verification:
    """Lossless multi-candidate rejection sampling over the tree.

    Walks from the root: tries the children of the current node in index order, accepting
    child x with probability ``min(1, p(x) / q(x))`` against the current residual p; on a
    rejection the residual becomes ``norm(max(p - q, 0))`` (deterministic drafts: x's mass is
    removed). When every child is rejected the emitted token is sampled from the residual; when
    a leaf is accepted the bonus token is sampled from p at the leaf. The output tokens follow
    the target's sampling distribution exactly, for deterministic drafts (any fixed children)
    and for children drawn independently from q.

    Args:
        node_tokens, parents: int64 ``[batch, tree_size]``.
        target_logits: ``[batch, tree_size, vocab]``; p at node i is softmax(logits / temperature)
            restricted by top-p (the smallest top set reaching ``top_p`` of the mass; ties at the
            boundary kept), computed in 2^-40 fixed point so every device agrees bit for bit.
        num_nodes: int64 ``[batch]`` real nodes per tree (default: all).
        draft_probs: ``[batch, tree_size, vocab]``: row i is the draft distribution q that node
            i's children were drawn from; None for deterministic drafts (q(x) = 1).
        temperature, top_p: applied to the target distribution.
        seed, offset: key and counter of the Philox random numbers (use a new offset, e.g. the
            decoding step, for each call); sequence b's draws depend only on (seed, offset, b).
        check: validate the tree values first (a device sync on CUDA).

    Returns:
        :class:`Verification`.
    """
    if check and node_tokens.is_cuda:
        check_tree(parents, num_nodes, "verify_sample")
    return Verification(*torch.ops.specx.verify_sample(node_tokens, parents, num_nodes, target_logits, draft_probs,
                                                       float(temperature), float(top_p), int(seed), int(offset)))
