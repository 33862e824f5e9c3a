import pytest
import torch

import specx  # noqa: F401
from specx import reference as ref
from specx.decode import build_tree
from tree_helpers import DEVICES

FIELDS = ["tokens", "parents", "depths", "scores", "mask", "paths", "num_nodes"]


def candidates(batch, depth, k, per_parent, gen, missing=0.1, dtype=torch.float32):
    shape = (batch, depth, k, k) if per_parent else (batch, depth, k)
    tokens = torch.randint(0, 1000, shape, generator=gen)
    log_probs = torch.rand(shape, generator=gen).log().to(dtype)
    drop = torch.rand(shape, generator=gen) < missing
    tokens[drop & (torch.rand(shape, generator=gen) < 0.5)] = -1
    log_probs[drop] = float("-inf")
    return tokens, log_probs


def check(tree, expected):
    for name in FIELDS:
        got = getattr(tree, name).cpu()
        assert torch.equal(got, expected[name]), (name, got, expected[name])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_parent", [False, True])
@pytest.mark.parametrize("batch,depth,k", [(1, 1, 1), (3, 4, 3), (5, 6, 1), (2, 3, 8), (4, 0, 3), (0, 2, 2)])
def test_backbone_matches_reference(device, per_parent, batch, depth, k):
    gen = torch.Generator().manual_seed(batch * 100 + depth * 10 + k)
    tokens, log_probs = candidates(batch, depth, k, per_parent, gen)
    root = torch.arange(batch)
    tree = build_tree(tokens.to(device), log_probs.to(device), root.to(device), mode="backbone")
    check(tree, ref.build_tree(tokens, log_probs, root, mode="backbone"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_parent", [False, True])
# The last two reach the CUDA kernel's sort (many contenders) and, with one list per parent, its
# reads from global memory (more candidates than it preloads).
@pytest.mark.parametrize("batch,depth,k,budget", [(1, 3, 2, 1), (3, 4, 3, 9), (4, 5, 4, 16), (2, 6, 2, 64),
                                                  (3, 2, 5, 40), (2, 8, 8, 300), (2, 20, 16, 100)])
def test_topk_expand_matches_reference(device, per_parent, batch, depth, k, budget):
    gen = torch.Generator().manual_seed(batch + depth + k + budget)
    tokens, log_probs = candidates(batch, depth, k, per_parent, gen)
    root = torch.arange(batch)
    tree = build_tree(tokens.to(device), log_probs.to(device), root.to(device), mode="topk_expand", budget=budget)
    check(tree, ref.build_tree(tokens, log_probs, root, mode="topk_expand", budget=budget))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_log_probs_and_noncontiguous(device):
    gen = torch.Generator().manual_seed(7)
    tokens, log_probs = candidates(4, 5, 6, False, gen, dtype=torch.bfloat16)
    tokens_t = tokens.transpose(1, 2).contiguous().transpose(1, 2)
    root = torch.arange(4)
    for mode, budget in [("backbone", None), ("topk_expand", 20)]:
        tree = build_tree(tokens_t.to(device), log_probs.to(device), root.to(device), mode=mode, budget=budget)
        check(tree, ref.build_tree(tokens, log_probs, root, mode=mode, budget=budget))


def test_backbone_shape_and_invariants():
    gen = torch.Generator().manual_seed(0)
    tokens, log_probs = candidates(2, 5, 4, False, gen, missing=0.0)
    tree = build_tree(tokens, log_probs, torch.tensor([7, 8]))
    assert tree.tokens.shape == (2, 21) and tree.mask.shape == (2, 21, 1) and tree.paths.shape == (2, 21, 6)
    assert torch.equal(tree.num_nodes, torch.tensor([21, 21]))
    assert torch.equal(tree.tokens[:, 0], torch.tensor([7, 8]))
    # spine: nodes 1, 5, 9, ... each the parent of the next depth
    assert tree.parents[0, 1:5].tolist() == [0] * 4 and tree.parents[0, 5:9].tolist() == [1] * 4
    leaves = (tree.paths[0, :, 0] == 0).sum()
    assert int(leaves) == 5 * 3 + 1
    assert (tree.scores[0, 1:] <= 0).all()


def test_topk_expand_keeps_best_paths():
    tokens = torch.tensor([[[10, 11], [20, 21]]])
    log_probs = torch.tensor([[[-0.1, -3.0], [-0.2, -0.3]]])
    tree = build_tree(tokens, log_probs, torch.tensor([1]), mode="topk_expand", budget=4)
    # best: 10 (-0.1), 10->20 (-0.3), 10->21 (-0.4); then 11 (-3.0) is left out
    assert tree.tokens[0].tolist() == [1, 10, 20, 21]
    assert tree.parents[0].tolist() == [-1, 0, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    tokens, log_probs = candidates(3, 3, 2, False, gen)
    root = torch.arange(3, device=device)
    for mode, budget in [("backbone", 0), ("topk_expand", 5)]:
        torch.library.opcheck(torch.ops.specx.build_tree, (tokens.to(device), log_probs.to(device), root, mode, budget))


def test_bad_inputs():
    tokens = torch.zeros(2, 3, 2, dtype=torch.int64)
    lp = torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="root_tokens"):
        build_tree(tokens, lp, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="candidate_log_probs"):
        build_tree(tokens, lp[:, :2], torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="mode"):
        build_tree(tokens, lp, torch.zeros(2, dtype=torch.int64), mode="beam")
    with pytest.raises(ValueError, match="budget"):
        build_tree(tokens, lp, torch.zeros(2, dtype=torch.int64), mode="topk_expand")
    with pytest.raises(ValueError, match="candidate_tokens"):
        build_tree(tokens.float(), lp, torch.zeros(2, dtype=torch.int64))
