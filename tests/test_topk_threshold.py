"""torch.ops.specx.topk_threshold against reference.py, on CPU and (if present) CUDA."""

import pytest
import torch

from specx import reference
from conftest import DEVICES, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_logits(rows, cols, dtype, device, *, ties, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties at every threshold
        x = torch.randint(-6, 7, (rows, cols), generator=gen).float() / 2
    else:
        x = torch.randn(rows, cols, generator=gen) * 3
    return x.to(dtype).to(device)


def check(x, k):
    threshold, count = torch.ops.specx.topk_threshold(x, k)
    ref_threshold, ref_count = reference.topk_threshold(x.cpu(), k)
    assert threshold.dtype == x.dtype and count.dtype == torch.int64
    assert threshold.shape == x.shape[:-1] and count.shape == x.shape[:-1]
    torch.testing.assert_close(threshold.cpu(), ref_threshold, rtol=0, atol=0)
    torch.testing.assert_close(count.cpu(), ref_count, rtol=0, atol=0)
    # The definition: fewer than k entries above, at least k at or above.
    xd = x.double()
    assert bool((count < k).all())
    assert bool(((xd >= threshold.double().unsqueeze(-1)).sum(-1) >= k).all())
    return threshold, count


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (3, 2), (5, 33), (4, 1000), (2, 3, 77)])
def test_matches_reference(device, dtype, ties, shape):
    x = make_logits(int(torch.tensor(shape[:-1]).prod()), shape[-1], dtype, device, ties=ties).reshape(shape)
    cols = shape[-1]
    for k in sorted({1, max(1, cols // 3), max(1, cols - 1), cols}):
        check(x, k)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("cols", [2, 31, 4097, 32000, 128256, 151936, 500000])
def test_cuda_large_vocab(dtype, ties, cols):
    rows = 3
    x = make_logits(rows, cols, dtype, "cuda", ties=ties, seed=cols)
    for k in sorted({1, 64, max(1, cols // 20), max(1, cols // 2), cols}):
        if k <= cols:
            threshold, count = check(x, k)
            # CPU and CUDA agree exactly.
            cpu_threshold, cpu_count = torch.ops.specx.topk_threshold(x.cpu(), k)
            assert torch.equal(threshold.cpu(), cpu_threshold) and torch.equal(count.cpu(), cpu_count)


@requires_cuda
def test_cuda_many_rows_matches_topk():
    x = torch.randn(257, 50000, device="cuda", dtype=torch.bfloat16)
    threshold, count = torch.ops.specx.topk_threshold(x, 2500)
    assert torch.equal(threshold, x.topk(2500, dim=-1).values[:, -1])


@pytest.mark.parametrize("device", DEVICES)
def test_signed_zero_ties_and_infinities(device):
    x = torch.tensor([[-0.0, 0.0, -0.0, -1.0], [float("inf"), 1.0, float("-inf"), float("inf")]], device=device)
    threshold, count = torch.ops.specx.topk_threshold(x, 2)
    assert threshold.tolist() == [0.0, float("inf")] and count.tolist() == [0, 0]
    threshold, count = torch.ops.specx.topk_threshold(x, 4)
    assert threshold.tolist() == [-1.0, float("-inf")] and count.tolist() == [3, 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_value(device, dtype):
    # Every non-NaN bit pattern, shuffled into rows: the key of each value (two per 32-bit word on
    # CUDA) must order them as their values, with -0.0 and +0.0 tied.
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    x = x[~x.isnan()]
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))][: 8 * 7000].reshape(8, 7000)
    for k in (1, 2, 700, 3500, 6999, 7000):
        threshold, count = check(x.to(device), k)
        assert torch.equal(threshold.cpu(), x.topk(k, dim=-1).values[:, -1])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_one_block_per_row_kernel(dtype):
    """16-bit rows of 16384 or more columns take the sampled one-block-per-row kernel: its every
    path against the reference."""
    gen = torch.Generator().manual_seed(1)
    # Every non-NaN 16-bit value, shuffled into rows of 20000 and 20001 (odd: rows start unaligned).
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = bits[~bits.isnan()]
    values = values[torch.randperm(values.numel(), generator=gen)]
    # Outliers at every 128th element, where the sample looks: its range misses, and the row is read
    # again for the exact coarse bin.
    periodic = torch.randn(3, 40960, generator=gen)
    periodic[:, ::128] += 100
    # Around the median of normal rows the range spans the tiny magnitudes of both signs, more than
    # 16384 keys: 16-bit counters. Zeros everywhere but in the sampled packs (one in 16) pass 65535
    # in one counter; a constant row with k = 1 has a wide range the sample says is full.
    zeros = torch.zeros(2, 150000)
    in_sample = torch.arange(150000) // 8 % 16 == 0
    zeros[:, in_sample] = torch.randn(2, int(in_sample.sum()), generator=gen) * 3
    cases = {
        "every value": values[: 3 * 20000].reshape(3, 20000),
        "every value, odd rows": values[: 3 * 20001].reshape(3, 20001),
        "constant": torch.full((2, 50000), 1.5),
        "two values": torch.randint(0, 2, (2, 70001), generator=gen).float(),
        "sample misses": periodic,
        "normal": torch.randn(2, 128256, generator=gen),
        "zeros the sample misses": zeros,
    }
    for name, x in cases.items():
        x = x.to(dtype)
        cols = x.shape[-1]
        for k in sorted({1, 2, 64, cols // 128, cols // 128 + 1, cols // 20, cols // 2, cols - 1, cols}):
            threshold, count = check(x.cuda(), k)
            cpu_threshold, cpu_count = torch.ops.specx.topk_threshold(x, k)
            assert torch.equal(threshold.cpu(), cpu_threshold) and torch.equal(count.cpu(), cpu_count), (name, k)


def _keys16(bits):
    b = bits.long() & 0xFFFF
    return torch.where(b & 0x8000 != 0, 0x8000 - (b & 0x7FFF), b | 0x8000)


def _value_of_key16(key, dtype):
    bits = torch.where(key & 0x8000 != 0, key & 0x7FFF, 0x8000 | (0x8000 - key))
    return bits.to(torch.int32).to(torch.int16).view(dtype).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_count_by_value_matches_keys(dtype):
    """The one-block-per-row kernel counts a range of keys by comparing values against the values
    of its ends. Where both ends are normal or infinite, that decides exactly as the keys do for
    every non-NaN value, whether or not the compare flushes subnormal operands to zero; a range
    ending at zero would not (so the kernel counts such ranges by key)."""
    inf_bits = 0x7C00 if dtype == torch.float16 else 0x7F80
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).float()
    keep = ~values.isnan()
    bits, values = bits[keep], values[keep]
    keys = _keys16(bits)
    flushed = torch.where(bits.long() & inf_bits == 0, torch.zeros_like(values), values)
    lowest, highest = int(_keys16(torch.tensor([inf_bits | 0x8000]))), int(_keys16(torch.tensor([inf_bits])))
    ends = torch.arange(lowest, highest + 1)
    ends = ends[_value_of_key16(ends, dtype).abs() >= torch.finfo(dtype).tiny]  # normal or infinite
    gen = torch.Generator().manual_seed(0)
    pairs = torch.stack([ends[torch.randint(0, len(ends), (400,), generator=gen)] for _ in range(2)], 1).sort(1).values
    pairs = torch.cat([pairs, torch.tensor([[lowest, highest], [lowest, lowest], [highest, highest]])])
    for first, last in pairs.tolist():
        v_first, v_last = _value_of_key16(torch.tensor(first), dtype), _value_of_key16(torch.tensor(last), dtype)
        for x in (values, flushed):
            assert torch.equal((x >= v_first) & ~(x > v_last), (keys >= first) & (keys <= last)), (first, last)
            assert torch.equal(x > v_last, keys > last), (first, last)
    zero = int(_keys16(torch.tensor([0])))
    assert not torch.equal((flushed >= 0) & ~(flushed > 0), keys == zero)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_nan_rows_rank_by_key(dtype):
    """NaNs rank by key: above +inf with the sign bit clear, below -inf with it set. Long rows with
    NaNs (the one-block-per-row kernel counts them by key, not by value) match the CPU bit for bit."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 40000, generator=gen) * 3).to(dtype)
    bits = x.view(torch.int16)
    # Quiet NaN bits; as int16, minus 0x8000 is the same NaN with the sign bit set.
    nan = 0x7E00 if dtype == torch.float16 else 0x7FC0
    bits[0, ::997] = nan  # positive NaNs: the largest keys
    bits[1, ::1009] = nan - 0x8000  # negative NaNs: the smallest keys
    bits[2, 123] = nan
    bits[3, 7::2003] = nan
    bits[3, 11::2011] = nan - 0x8000
    x[3, 5] = float("inf")
    # Rows of an odd length start unaligned: NaNs in the elements before the first 16-byte pack and
    # after the last one.
    odd = (torch.randn(3, 40003, generator=gen) * 3).to(dtype)
    odd_bits = odd.view(torch.int16)
    odd_bits[:, 0] = nan
    odd_bits[:, -1] = nan - 0x8000
    odd_bits[1, 1:4] = nan
    for rows in (x, odd):
        cols = rows.shape[-1]
        for k in (1, 5, 40, 41, 64, 2000, 20000, cols - 50, cols - 1, cols):
            threshold, count = torch.ops.specx.topk_threshold(rows.cuda(), k)
            cpu_threshold, cpu_count = torch.ops.specx.topk_threshold(rows, k)
            assert torch.equal(threshold.cpu().view(torch.int16), cpu_threshold.view(torch.int16)), (cols, k)
            assert torch.equal(count.cpu(), cpu_count), (cols, k)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    x = torch.randn(40, 6, device=device).t()  # [6, 40], stride (1, 6)
    check(x, 7)


def test_bad_arguments():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="k"):
        torch.ops.specx.topk_threshold(x, 0)
    with pytest.raises(ValueError, match="k"):
        torch.ops.specx.topk_threshold(x, 6)
    with pytest.raises(ValueError, match="logits"):
        torch.ops.specx.topk_threshold(x.long(), 1)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = make_logits(4, 37, torch.float32, device, ties=True)
    torch.library.opcheck(torch.ops.specx.topk_threshold, (x, 5))
