import pytest
import torch
import torch.nn.functional as F

import specx  # noqa: F401
from specx import reference as ref
from specx.decode import build_tree, verify_greedy
from tree_helpers import DEVICES, random_trees

DTYPES = [torch.float32, torch.bfloat16]


def planted_logits(tokens, parents, num_nodes, vocab, gen, dtype, hit=0.7):
    """Logits whose argmax at a node is often one of its children's tokens (long accepted paths)."""
    batch, size = tokens.shape
    logits = torch.randn(batch, size, vocab, generator=gen)
    for b in range(batch):
        for i in range(1, int(num_nodes[b])):
            if float(torch.rand(1, generator=gen)) < hit:
                logits[b, int(parents[b, i]), int(tokens[b, i])] = 10.0
    return logits.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["chain", "star", "random"])
@pytest.mark.parametrize("batch,size,vocab", [(1, 1, 5), (3, 7, 11), (8, 33, 64), (2, 128, 17)])
def test_matches_reference(device, dtype, shape, batch, size, vocab):
    gen = torch.Generator().manual_seed(batch * size + vocab)
    tokens, parents, num_nodes = random_trees(batch, size, vocab, shape, gen)
    logits = planted_logits(tokens, parents, num_nodes, vocab, gen, dtype)
    expected = ref.verify_greedy(tokens, parents, num_nodes, logits)
    args = (tokens.to(device), parents.to(device))
    for target in (logits.to(device), logits.float().argmax(-1).to(device)):
        got = verify_greedy(*args, target, num_nodes.to(device))
        for g, e in zip(got, expected):
            assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch_and_vocab(device):
    gen = torch.Generator().manual_seed(3)
    batch, size, vocab = (64, 64, 1000) if device == "cuda" else (16, 24, 300)
    tokens, parents, num_nodes = random_trees(batch, size, vocab, "random", gen)
    logits = planted_logits(tokens, parents, num_nodes, vocab, gen, torch.float32, hit=0.9)
    got = verify_greedy(tokens.to(device), parents.to(device), logits.to(device), num_nodes.to(device))
    for g, e in zip(got, ref.verify_greedy(tokens, parents, num_nodes, logits)):
        assert torch.equal(g.cpu(), e)


def test_duplicate_siblings_take_longest_path():
    # Two children both equal to the root's argmax; only the second continues.
    tokens = torch.tensor([[0, 3, 3, 4]])
    parents = torch.tensor([[-1, 0, 0, 2]])
    argmax = torch.tensor([[3, 9, 4, 6]])
    out = verify_greedy(tokens, parents, argmax)
    assert out.accepted_nodes[0].tolist() == [0, 2, 3, -1]
    assert int(out.accept_len[0]) == 2 and int(out.next_token[0]) == 6


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    tokens, parents, num_nodes = random_trees(3, 6, 9, "random", gen)
    logits = torch.randn(3, 6, 9)
    torch.library.opcheck(torch.ops.specx.verify_greedy,
                          (tokens.to(device), parents.to(device), num_nodes.to(device), logits.to(device)))
    torch.library.opcheck(torch.ops.specx.verify_greedy,
                          (tokens.to(device), parents.to(device), num_nodes.to(device), logits.argmax(-1).to(device)))


def test_bad_inputs():
    tokens = torch.zeros(2, 4, dtype=torch.int64)
    parents = torch.tensor([[-1, 0, 1, 3], [-1, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"parents\[0, 3\]"):
        verify_greedy(tokens, parents, torch.zeros(2, 4, 5))
    good = torch.tensor([[-1, 0, 1, 2], [-1, 0, 0, 0]])
    with pytest.raises(ValueError, match="target"):
        verify_greedy(tokens, good, torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="num_nodes"):
        verify_greedy(tokens, good, torch.zeros(2, 4, 5), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="num_nodes"):
        verify_greedy(tokens, good, torch.zeros(2, 4, 5), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="parents"):
        verify_greedy(tokens, good[:1], torch.zeros(2, 4, 5))


# ---- greedy tree decoding reproduces plain greedy decoding ----

class TinyLM(torch.nn.Module):
    """A random one-layer causal transformer over explicit positions and an attention mask."""

    def __init__(self, vocab, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(256, dim, generator=g) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(dim, 3 * dim, generator=g) / dim ** 0.5)
        self.mlp = torch.nn.Parameter(torch.randn(dim, dim, generator=g) / dim ** 0.5)
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g) / dim ** 0.5)

    def forward(self, ids, positions, mask):
        """ids, positions [B, L]; mask [B, L, L] True where attention is allowed."""
        x = self.emb[ids] + self.pos[positions]
        q, k, v = (x @ self.qkv).chunk(3, -1)
        att = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        x = x + torch.softmax(att.masked_fill(~mask, float("-inf")), -1) @ v
        x = x + torch.tanh(x @ self.mlp)
        return x @ self.out


def plain_greedy(model, prompt, steps):
    ids = prompt.clone()
    for _ in range(steps):
        L = ids.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool).tril()[None].expand(ids.shape[0], L, L)
        logits = model(ids, torch.arange(L)[None].expand_as(ids), mask)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:]


def tree_greedy(target, drafter, prompt, steps, depth, k, mode):
    """Speculative greedy decoding with draft trees (no KV cache: prefix + tree in one forward)."""
    batch = prompt.shape[0]
    seqs = [prompt[b].tolist() for b in range(batch)]
    out = [[] for _ in range(batch)]
    while min(len(o) for o in out) < steps:
        # Drafter proposes per-depth candidates along its own greedy continuation.
        cand_tok, cand_lp = [], []
        for b in range(batch):
            ids = torch.tensor([seqs[b]])
            toks, lps = [], []
            for _ in range(depth):
                L = ids.shape[1]
                logp = torch.log_softmax(drafter(ids, torch.arange(L)[None], torch.ones(1, L, L).bool().tril())[0, -1],
                                         -1)
                top = logp.topk(k)
                toks.append(top.indices)
                lps.append(top.values)
                ids = torch.cat([ids, top.indices[:1][None]], 1)
            cand_tok.append(torch.stack(toks))
            cand_lp.append(torch.stack(lps))
        root = torch.tensor([s[-1] for s in seqs])
        tree = build_tree(torch.stack(cand_tok), torch.stack(cand_lp), root, mode=mode,
                          budget=1 + depth * k // 2 if mode == "topk_expand" else None)
        size = tree.tokens.shape[1]
        words = tree.mask
        anc = ((words[..., None] >> torch.arange(32)) & 1).bool().flatten(2)[..., :size]  # [B, T, T]
        logits_rows = []
        for b in range(batch):
            prefix = torch.tensor(seqs[b][:-1])
            P, n = len(prefix), int(tree.num_nodes[b])
            ids = torch.cat([prefix, tree.tokens[b, :n]])[None]
            pos = torch.cat([torch.arange(P), P + tree.depths[b, :n]])[None]
            mask = torch.zeros(P + n, P + n, dtype=torch.bool)
            mask[:P, :P] = torch.ones(P, P).bool().tril()
            mask[P:, :P] = True
            mask[P:, P:] = anc[b, :n, :n]
            row = torch.zeros(size, target.out.shape[1])
            row[:n] = target(ids, pos, mask[None])[0, P:]
            logits_rows.append(row)
        ver = verify_greedy(tree.tokens, tree.parents, torch.stack(logits_rows), tree.num_nodes)
        for b in range(batch):
            n_acc = int(ver.accept_len[b])
            new = tree.tokens[b, ver.accepted_nodes[b, 1:n_acc + 1]].tolist() + [int(ver.next_token[b])]
            seqs[b] += new
            out[b] += new
    return torch.tensor([o[:steps] for o in out])


@pytest.mark.parametrize("mode", ["backbone", "topk_expand"])
def test_tree_greedy_reproduces_plain_greedy(mode):
    torch.manual_seed(0)
    vocab, dim = 23, 32
    target, drafter = TinyLM(vocab, dim, seed=1), TinyLM(vocab, dim, seed=2)
    # Make the drafter agree with the target part of the time, so paths get accepted.
    with torch.no_grad():
        drafter.emb.copy_(target.emb + 0.3 * drafter.emb)
        drafter.pos.copy_(target.pos)
        drafter.qkv.copy_(target.qkv)
        drafter.mlp.copy_(target.mlp)
        drafter.out.copy_(target.out + 0.3 * drafter.out)
    prompt = torch.randint(0, vocab, (3, 5))
    with torch.no_grad():
        expected = plain_greedy(target, prompt, 20)
        got = tree_greedy(target, drafter, prompt, 20, depth=4, k=3, mode=mode)
    assert torch.equal(got, expected)
