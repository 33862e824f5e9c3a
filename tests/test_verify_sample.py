import math

import pytest
import torch

import specx  # noqa: F401
from specx import reference as ref
from specx.decode import verify_sample
from tree_helpers import DEVICES, cuda_only, random_trees


def outputs_equal(got, expected):
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e), (g, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_matches_reference(device, dtype, shape, draft, temperature, top_p):
    gen = torch.Generator().manual_seed(hash((shape, draft, temperature)) % 1000)
    batch, size, vocab = 6, 9, 7
    tokens, parents, num_nodes = random_trees(batch, size, vocab, shape, gen)
    # Sharp logits so that some drafts are accepted.
    logits = (3 * torch.randn(batch, size, vocab, generator=gen)).to(dtype)
    q = torch.softmax(2 * torch.randn(batch, size, vocab, generator=gen), -1) if draft else None
    for seed in (0, 5):
        expected = ref.verify_sample(tokens, parents, num_nodes, logits, q, temperature=temperature, top_p=top_p,
                                     seed=seed, offset=3)
        got = verify_sample(tokens.to(device), parents.to(device), logits.to(device), num_nodes.to(device),
                            None if q is None else q.to(device), temperature=temperature, top_p=top_p, seed=seed,
                            offset=3)
        outputs_equal(got, expected)


@cuda_only
@pytest.mark.parametrize("draft", [False, True])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
# Vocab 200003 is past 8 blocks x 160 KB of weights: the slices live in global scratch.
@pytest.mark.parametrize("batch,size,vocab", [(32, 64, 32000), (4, 5, 200003)])
def test_cuda_matches_cpu_large(draft, top_p, batch, size, vocab):
    gen = torch.Generator().manual_seed(11)
    tokens, parents, num_nodes = random_trees(batch, size, 50, "random", gen)
    logits = 4 * torch.randn(batch, size, vocab, generator=gen)
    logits[..., :50] += 6  # drafts (tokens < 50) carry most of the mass
    logits = logits.to(torch.bfloat16)
    q = torch.softmax(logits.float() * 0.8, -1) if draft else None
    cpu = verify_sample(tokens, parents, logits, num_nodes, q, temperature=0.9, top_p=top_p, seed=1)
    cuda = verify_sample(tokens.cuda(), parents.cuda(), logits.cuda(), num_nodes.cuda(),
                         None if q is None else q.cuda(), temperature=0.9, top_p=top_p, seed=1)
    outputs_equal(cuda, cpu)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.5, 4.0])
@pytest.mark.parametrize("top_p", [0.2, 0.95, 0.999999])
def test_cuda_top_p_matches_cpu(dtype, scale, top_p):
    # Flat and peaked rows over a vocabulary split across 8 blocks: top-p's threshold falls among
    # light or heavy weights, and bf16 rows hold many equal weights.
    gen = torch.Generator().manual_seed(5)
    batch, size, vocab = 16, 3, 151936
    tokens, parents, num_nodes = random_trees(batch, size, 20, "chain", gen)
    logits = (scale * torch.randn(batch, size, vocab, generator=gen)).to(dtype)
    for seed in range(3):
        cpu = verify_sample(tokens, parents, logits, num_nodes, temperature=0.8, top_p=top_p, seed=seed)
        cuda = verify_sample(tokens.cuda(), parents.cuda(), logits.cuda(), num_nodes.cuda(), temperature=0.8,
                             top_p=top_p, seed=seed)
        outputs_equal(cuda, cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_reproducible_and_seeded(device):
    gen = torch.Generator().manual_seed(2)
    tokens, parents, num_nodes = random_trees(64, 5, 4, "random", gen)
    logits = torch.randn(64, 5, 4, generator=gen).to(device)
    args = (tokens.to(device), parents.to(device), logits, num_nodes.to(device))
    a = verify_sample(*args, seed=1)
    b = verify_sample(*args, seed=1)
    c = verify_sample(*args, seed=2)
    outputs_equal(a, [t.cpu() for t in b])
    assert not torch.equal(a.next_token, c.next_token)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    tokens, parents, num_nodes = random_trees(3, 6, 9, "random", gen)
    logits = torch.randn(3, 6, 9).to(device)
    q = torch.softmax(torch.randn(3, 6, 9), -1).to(device)
    torch.library.opcheck(torch.ops.specx.verify_sample,
                          (tokens.to(device), parents.to(device), num_nodes.to(device), logits, q, 0.8, 0.9, 3, 1))


def test_bad_inputs():
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    parents = torch.tensor([[-1, 0, 2], [-1, 0, 0]])
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"parents\[0, 2\]"):
        verify_sample(tokens, parents, logits)
    good = torch.tensor([[-1, 0, 1], [-1, 0, 0]])
    with pytest.raises(ValueError, match="target_logits"):
        verify_sample(tokens, good, logits[:1])
    with pytest.raises(ValueError, match="draft_probs"):
        verify_sample(tokens, good, logits, draft_probs=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="temperature"):
        verify_sample(tokens, good, logits, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        verify_sample(tokens, good, logits, top_p=1.5)


# ---- losslessness: the first emitted token follows the target's sampling distribution ----

def chi2_sf(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def target_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    p = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1:
        order = p.argsort(descending=True)
        cum = p[order].cumsum(0)
        keep = order[: int((cum < top_p).sum()) + 1]
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[keep] = True
        p = torch.where(mask, p, torch.zeros_like(p))
        p = p / p.sum()
    return p


@pytest.mark.parametrize("siblings", [1, 2, 4])
@pytest.mark.parametrize("draft", ["deterministic", "sampled"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.85)])
def test_lossless_first_token(siblings, draft, temperature, top_p):
    vocab, calls = 8, 200_000
    gen = torch.Generator().manual_seed(siblings)
    target_logits = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.0, 0.8, 0.1])
    q_dist = torch.softmax(torch.tensor([0.2, 1.0, 0.5, 1.5, -0.5, 0.0, 1.2, -1.0]), -1)
    size = 1 + siblings + 1  # root, its children, and one grandchild under the first child
    parents = torch.tensor([-1] + [0] * siblings + [1]).expand(calls, size).contiguous()
    if draft == "deterministic":
        # fixed distinct children: the draft's top tokens
        children = q_dist.argsort(descending=True)[:siblings].expand(calls, siblings)
        q = None
    else:
        children = torch.multinomial(q_dist, calls * siblings, replacement=True, generator=gen).view(calls, siblings)
        q = q_dist.expand(calls, size, vocab)
    tokens = torch.cat([torch.zeros(calls, 1, dtype=torch.int64), children,
                        torch.randint(0, vocab, (calls, 1), generator=gen)], 1)
    logits = target_logits.expand(calls, size, vocab)
    out = verify_sample(tokens, parents, logits, None, q, temperature=temperature, top_p=top_p, seed=siblings)
    first_node = out.accepted_nodes[:, 1]
    first = torch.where(out.accept_len > 0, tokens.gather(1, first_node.clamp_min(0)[:, None])[:, 0],
                        out.next_token)
    counts = torch.bincount(first, minlength=vocab).double()
    expected = target_distribution(target_logits, temperature, top_p) * calls
    kept = expected > 0
    assert counts[~kept].sum() == 0
    stat = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    p_value = chi2_sf(stat, int(kept.sum()) - 1)
    assert p_value > 1e-3, (stat, p_value, counts, expected)
