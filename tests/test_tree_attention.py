"""specx.decode.tree_attention against the float64 reference and masked SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import specx  # noqa: F401
from specx import reference
from specx.decode import tree_attention

CUDA = torch.cuda.is_available() and specx.cuda_built
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and the CUDA build")

# (atol, rtol) of the output against float64; the lse is checked tighter.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
LSE_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (2e-3, 1e-3)}


# ---- random trees (independent of specx.decode.build_tree) ----

def random_parents(kind: str, size: int, gen: torch.Generator) -> list[int]:
    """Parent of each node in topological order; node 0 is the root (parent -1)."""
    if kind == "chain":
        return [i - 1 for i in range(size)]
    if kind == "star":
        return [-1][:size] + [0] * (size - 1)
    return [-1][:size] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, size)]


def ancestor_mask(parents_per_seq: list[list[int]], size: int) -> torch.Tensor:
    """``[batch, T, ceil(T/32)]`` int32 words: bit j%32 of word j//32 of row i iff j is i or an
    ancestor of i."""
    words = (size + 31) // 32
    out = torch.zeros(len(parents_per_seq), size, words, dtype=torch.int64)
    for b, parents in enumerate(parents_per_seq):
        seen: list[set[int]] = []
        for i, parent in enumerate(parents):
            seen.append({i} | (seen[parent] if parent >= 0 else set()))
            for j in seen[i]:
                out[b, i, j // 32] |= 1 << (j % 32)
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out)  # two's complement into int32
    return out.to(torch.int32)


def make_inputs(batch, size, heads_q, heads_kv, head_dim, max_prefix, dtype, device, *, tree="random",
                seed=0, lens_dtype=torch.int32, extra_len=3):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, max_prefix + 1, (batch,), generator=gen)
    if batch:
        lens[0] = max_prefix  # the longest sequence fixes max_len; the others are shorter
    max_len = max_prefix + size + extra_len
    q = torch.randn(batch, size, heads_q, head_dim, generator=gen)
    k = torch.randn(batch, max_len, heads_kv, head_dim, generator=gen)
    v = torch.randn(batch, max_len, heads_kv, head_dim, generator=gen)
    mask = None
    if tree is not None:
        mask = ancestor_mask([random_parents(tree, size, gen) for _ in range(batch)], size).to(device)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), lens.to(device=device, dtype=lens_dtype), mask


def check(q, k, v, lens, mask, *, scale=None, **kwargs):
    out, lse = tree_attention(q, k, v, lens, mask, scale=scale, return_lse=True, **kwargs)
    ref_out, ref_lse = reference.tree_attention(q, k, v, lens, mask, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    atol, rtol = OUT_TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    atol, rtol = LSE_TOL[q.dtype]
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=rtol)


# ---- CPU ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree", ["chain", "star", "random", None])
@pytest.mark.parametrize("ratio", [1, 4, 8])
def test_cpu_matches_reference(dtype, tree, ratio):
    q, k, v, lens, mask = make_inputs(3, 37, 2 * ratio if ratio < 8 else 8, 2 if ratio < 8 else 1, 64, 45,
                                      dtype, "cpu", tree=tree, seed=ratio)
    check(q, k, v, lens, mask)


@pytest.mark.parametrize("size", [1, 2, 32, 33, 70])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cpu_sizes(size, head_dim):
    q, k, v, lens, mask = make_inputs(2, size, 4, 2, head_dim, 20, torch.float32, "cpu", seed=size,
                                      lens_dtype=torch.int64)
    check(q, k, v, lens, mask, scale=0.3)


def test_cpu_matches_sdpa_float64():
    q, k, v, lens, mask = make_inputs(2, 19, 8, 2, 64, 30, torch.float64, "cpu")
    # the op takes float32 at most; SDPA runs in float64 on the same values
    out = tree_attention(q.float(), k.float(), v.float(), lens, mask)
    visible = reference.tree_attention_visibility(lens, q.shape[1], k.shape[1], mask)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2),
                                          v.repeat_interleave(4, 2).transpose(1, 2),
                                          attn_mask=visible.unsqueeze(1)).transpose(1, 2)
    torch.testing.assert_close(out.double(), sdpa, atol=1e-5, rtol=1e-5)


def test_decode_and_empty_prefix():
    # T = 1 without a mask is plain decode attention; a zero prefix leaves the node itself.
    q, k, v, lens, _ = make_inputs(4, 1, 8, 8, 64, 12, torch.float32, "cpu")
    lens[1] = 0
    check(q, k, v, lens, None)
    out = tree_attention(q, k, v, torch.zeros_like(lens), None)
    torch.testing.assert_close(out, v[:, :1])


def test_node_seeing_nothing_gives_zeros_and_neg_inf_lse():
    q, k, v, lens, _ = make_inputs(1, 3, 2, 2, 64, 0, torch.float32, "cpu")
    mask = torch.zeros(1, 3, 1, dtype=torch.int32)  # padding nodes: no bits, no prefix
    out, lse = tree_attention(q, k, v, torch.zeros(1, dtype=torch.int32), mask, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_empty_shapes():
    for batch, size in [(0, 4), (2, 0)]:
        q, k, v, lens, mask = make_inputs(batch, size, 4, 2, 64, 5, torch.float32, "cpu")
        out, lse = tree_attention(q, k, v, lens, mask, return_lse=True)
        assert out.shape == q.shape and lse.shape == (batch, 4, size)


def test_non_contiguous_cache_and_query():
    q, k, v, lens, mask = make_inputs(4, 9, 4, 2, 64, 16, torch.float32, "cpu")
    big_k = torch.randn(6, k.shape[1], 2, 64)
    big_k[1:5] = k  # a batch slice of a larger cache: used in place
    q_strided = torch.randn(4, 4, 9, 64).transpose(1, 2)
    q_strided.copy_(q)
    v_strided = v.transpose(2, 3).contiguous().transpose(2, 3)  # head_dim not innermost: copied
    out = tree_attention(q_strided, big_k[1:5], v_strided, lens, mask)
    ref, _ = reference.tree_attention(q, k, v, lens, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_argument():
    q, k, v, lens, mask = make_inputs(2, 5, 4, 2, 64, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="head_dim"):
        tree_attention(q[..., :48], k[..., :48], v[..., :48], lens, mask)
    with pytest.raises(ValueError, match="tree_mask"):
        tree_attention(q, k, v, lens, mask[:, :4])
    with pytest.raises(ValueError, match="tree_mask"):
        tree_attention(q, k, v, lens, mask.long())
    with pytest.raises(ValueError, match="k_cache"):
        tree_attention(q, k[:1], v[:1], lens, mask)
    with pytest.raises(ValueError, match="cache_lens"):
        tree_attention(q, k, v, lens[:1], mask)
    with pytest.raises(ValueError, match="cache_lens"):
        tree_attention(q, k, v, lens + k.shape[1], mask)
    with pytest.raises(ValueError, match="heads_kv"):
        tree_attention(q[:, :, :3], k, v, lens, mask)
    with pytest.raises(ValueError, match="v_cache"):
        tree_attention(q, k, v[:, :-1], lens, mask)
    with pytest.raises(ValueError, match="dtype"):
        tree_attention(q, k.double(), v.double(), lens, mask)


def test_opcheck_cpu():
    q, k, v, lens, mask = make_inputs(2, 6, 4, 2, 64, 7, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.specx.tree_attention, (q, k, v, lens, mask, None, 0))
    torch.library.opcheck(torch.ops.specx.tree_attention, (q, k, v, lens, None, 0.5, 0))


# ---- CUDA ----

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("ratio", [1, 4, 8])
@pytest.mark.parametrize("tree", ["chain", "star", "random", None])
def test_cuda_matches_reference(dtype, head_dim, ratio, tree):
    q, k, v, lens, mask = make_inputs(3, 45, 8 if ratio < 8 else 16, 8 // ratio if ratio < 8 else 2, head_dim,
                                      300, dtype, "cuda", tree=tree, seed=ratio + head_dim)
    check(q, k, v, lens, mask)


@needs_cuda
@pytest.mark.parametrize("batch,size,max_prefix", [(1, 64, 4096), (16, 64, 1500), (5, 128, 8192), (3, 1, 8192),
                                                   (7, 33, 0), (2, 100, 63), (16, 1, 2048), (4, 30, 2048)])
@pytest.mark.parametrize("num_splits", [0, 1, 5])
@pytest.mark.parametrize("wgmma", ["1", "0"])  # on Hopper, "0" forces the mma.sync kernel
def test_cuda_long_prefixes_and_splits(batch, size, max_prefix, num_splits, wgmma, monkeypatch):
    monkeypatch.setenv("SPECX_TREE_ATTN_WGMMA", wgmma)
    q, k, v, lens, mask = make_inputs(batch, size, 32, 8, 128, max_prefix, torch.bfloat16, "cuda",
                                      seed=batch * size, lens_dtype=torch.int64)
    check(q, k, v, lens, mask, num_splits=num_splits)
    check(q, k, v, lens, None, num_splits=num_splits)


@needs_cuda
def test_cuda_float32_and_cpu_agree():
    q, k, v, lens, mask = make_inputs(3, 20, 8, 2, 64, 100, torch.float32, "cuda")
    check(q, k, v, lens, mask)
    out_cpu = tree_attention(q.cpu(), k.cpu(), v.cpu(), lens.cpu(), mask.cpu())
    torch.testing.assert_close(out_cpu, tree_attention(q, k, v, lens, mask).cpu(), atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cuda_empty_rows_and_zero_prefix():
    q, k, v, lens, _ = make_inputs(4, 70, 8, 2, 128, 0, torch.bfloat16, "cuda")
    mask = torch.zeros(4, 70, 3, dtype=torch.int32, device="cuda")
    mask[:, :, 0] = 1  # every node sees node 0 only
    check(q, k, v, lens, mask)
    out, lse = tree_attention(q, k, v, lens, torch.zeros_like(mask), return_lse=True, num_splits=3)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


@needs_cuda
def test_cuda_non_contiguous_cache():
    q, k, v, lens, mask = make_inputs(3, 24, 8, 2, 128, 500, torch.bfloat16, "cuda")
    layers = torch.randn(2, 3, k.shape[1], 2, 128, device="cuda", dtype=torch.bfloat16)
    layers[1] = k
    big_v = torch.randn(5, v.shape[1], 2, 128, device="cuda", dtype=torch.bfloat16)
    big_v[2:] = v
    out = tree_attention(q, layers[1], big_v[2:], lens, mask)
    torch.testing.assert_close(out, tree_attention(q, k, v, lens, mask))


@needs_cuda
def test_opcheck_cuda():
    q, k, v, lens, mask = make_inputs(2, 6, 4, 2, 128, 300, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.specx.tree_attention, (q, k, v, lens, mask, None, 0))

