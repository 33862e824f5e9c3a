import pytest
import torch

import specx  # noqa: F401
from specx import reference as ref
from specx.decode import compact_kv, verify_greedy
from tree_helpers import DEVICES, random_trees


def accepted_paths(batch, size, shape, gen):
    tokens, parents, num_nodes = random_trees(batch, size, 3, shape, gen)
    # Target argmax = the token of a random child, so paths of varying length are accepted.
    argmax = torch.randint(0, 3, (batch, size), generator=gen)
    out = verify_greedy(tokens, parents, argmax, num_nodes)
    return out.accepted_nodes, out.accept_len


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
@pytest.mark.parametrize("batch,size,heads,head_dim", [(1, 1, 1, 8), (4, 9, 2, 16), (7, 33, 3, 5), (2, 128, 1, 64)])
def test_matches_reference(device, dtype, shape, batch, size, heads, head_dim):
    gen = torch.Generator().manual_seed(batch * size + heads)
    nodes, alen = accepted_paths(batch, size, shape, gen)
    lengths = torch.randint(0, 20, (batch,), generator=gen)
    max_len = int(lengths.max()) + size + 3
    k = torch.randn(batch, max_len, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, max_len, heads, head_dim, generator=gen).to(dtype)
    ek, ev, elen = ref.compact_kv(k, v, lengths, nodes, alen)
    k_d, v_d, len_d = k.to(device), v.to(device), lengths.to(device)
    compact_kv(k_d, v_d, len_d, nodes.to(device), alen.to(device))
    assert torch.equal(k_d.cpu(), ek) and torch.equal(v_d.cpu(), ev) and torch.equal(len_d.cpu(), elen)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_opcheck(device):
    k = torch.zeros(0, 4, 2, 8, device=device)
    compact_kv(k, k.clone(), torch.zeros(0, dtype=torch.int64, device=device),
               torch.zeros(0, 3, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device))
    k = torch.randn(2, 10, 2, 8, device=device)
    args = (k, torch.randn_like(k), torch.tensor([1, 2], device=device),
            torch.tensor([[0, 2, 3], [0, 1, -1]], device=device), torch.tensor([2, 1], device=device))
    torch.library.opcheck(torch.ops.specx.compact_kv, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    k = torch.zeros(2, 8, 1, 4)
    nodes = torch.tensor([[0, 2, 3], [0, 1, -1]])
    alen = torch.tensor([2, 1])
    lengths = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="lengths"):
        compact_kv(k, k.clone(), torch.tensor([1]), nodes, alen)
    with pytest.raises(ValueError, match="v_cache"):
        compact_kv(k, torch.zeros(2, 8, 1, 5), lengths, nodes, alen)
    with pytest.raises(ValueError, match="accepted_nodes"):
        compact_kv(k, k.clone(), lengths, torch.tensor([[0, 3, 2], [0, 1, -1]]), alen)
    with pytest.raises(ValueError, match="accepted_nodes"):
        compact_kv(k, k.clone(), torch.tensor([6, 1]), nodes, alen)
    with pytest.raises(ValueError, match="accept_len"):
        compact_kv(k, k.clone(), lengths, nodes, torch.tensor([5, 1]))
