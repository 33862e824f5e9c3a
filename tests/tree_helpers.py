"""Random draft trees shared by the decoding tests."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_parents(size: int, shape: str, gen: torch.Generator) -> list[int]:
    if shape == "chain":
        return [-1] + list(range(size - 1))
    if shape == "star":
        return [-1] + [0] * (size - 1)
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, size)]


def random_trees(batch: int, size: int, vocab: int, shape: str, gen: torch.Generator, uneven: bool = True):
    """(node_tokens, parents, num_nodes) of ``batch`` random trees padded to ``size`` nodes."""
    tokens = torch.randint(0, vocab, (batch, size), generator=gen)
    parents = torch.full((batch, size), -1, dtype=torch.int64)
    num_nodes = torch.full((batch,), size, dtype=torch.int64)
    for b in range(batch):
        n = int(torch.randint(1, size + 1, (1,), generator=gen)) if uneven and b % 2 else size
        parents[b, :n] = torch.tensor(random_parents(n, shape, gen))
        tokens[b, n:] = -1
        num_nodes[b] = n
    return tokens, parents, num_nodes
