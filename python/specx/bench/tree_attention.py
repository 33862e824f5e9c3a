"""Tree attention over a KV cache (and T = 1 decode): specx's kernel against PyTorch SDPA with a
boolean mask and expanded GQA heads, and FlexAttention with a block mask, on the same inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import specx
import specx.decode
from specx.bench.common import GRAPH_CALLS, Ceilings, graphed, measure
from specx.bench.registry import Benchmark, register
from specx.reference import tree_attention_visibility

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _shape(batch, kv_len, q_len, heads_q=32, heads_kv=8, head_dim=128):
    return {"batch": batch, "q_len": q_len, "kv_len": kv_len, "heads_q": heads_q, "heads_kv": heads_kv,
            "head_dim": head_dim}


def cases(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        dtype = "fp32" if device.type == "cpu" else "bf16"
        return [{"shape": _shape(2, 256, 16, 8, 2, 64), "dtype": dtype, "peers": True},
                {"shape": _shape(2, 256, 1, 8, 2, 64), "dtype": dtype, "peers": True}]
    out = [{"shape": _shape(b, kv, t), "dtype": "bf16", "peers": True}
           for b, kv, t in [(16, 4096, 64), (1, 4096, 64), (64, 2048, 32)]]
    out += [{"shape": _shape(b, 4096, 1), "dtype": "bf16", "peers": True} for b in (1, 16, 64)]
    return out


def random_tree_mask(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Bit-packed ancestor mask of random trees (node 0 the root, parents[i] < i)."""
    sees = torch.zeros(batch, size, size, dtype=torch.bool)
    for b in range(batch):
        for i in range(size):
            if i:
                sees[b, i] = sees[b, int(torch.randint(0, i, (1,), generator=gen))]
            sees[b, i, i] = True
    words = (size + 31) // 32
    padded = torch.zeros(batch, size, words * 32, dtype=torch.int64)
    padded[..., :size] = sees.long()
    packed = (padded.view(batch, size, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


_flex = {}


def run_case(case: dict, device: torch.device, ceilings: Ceilings) -> list[dict]:
    s = case["shape"]
    batch, q_len, kv_len = s["batch"], s["q_len"], s["kv_len"]
    heads_q, heads_kv, head_dim = s["heads_q"], s["heads_kv"], s["head_dim"]
    dtype = DTYPES[case["dtype"]]
    group = heads_q // heads_kv
    total = kv_len + q_len  # the tree nodes' K/V sit right after the prefix
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, q_len, heads_q, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, total, heads_kv, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, total, heads_kv, head_dim, generator=gen).to(device, dtype)
    lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    mask = random_tree_mask(batch, q_len, gen).to(device) if q_len > 1 else None

    impls = {"specx": lambda: specx.decode.tree_attention(q, k, v, lens, mask)}
    if device.type == "cuda":  # the kernels' own time, without the per-call launch cost
        impls[f"specx_graph{GRAPH_CALLS}"] = (graphed(impls["specx"], device, GRAPH_CALLS), GRAPH_CALLS)
    errors = {}
    if case.get("peers"):
        visible = tree_attention_visibility(lens, q_len, total, mask)  # [B, T, L + T]
        qh = q.transpose(1, 2)
        kh = k.repeat_interleave(group, 2).transpose(1, 2)  # GQA heads expanded once, outside the timing
        vh = v.repeat_interleave(group, 2).transpose(1, 2)
        sdpa_mask = visible.unsqueeze(1)
        impls["sdpa"] = lambda: F.scaled_dot_product_attention(qh, kh, vh, attn_mask=sdpa_mask)
        if device.type == "cuda":
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                def mask_mod(b, h, q_idx, kv_idx):
                    return visible[b, q_idx, kv_idx]

                block_mask = create_block_mask(mask_mod, batch, None, q_len, total, device=device)
                if "fn" not in _flex:
                    _flex["fn"] = torch.compile(flex_attention, dynamic=False)
                kf, vf = k.transpose(1, 2), v.transpose(1, 2)
                impls["flex_attention"] = lambda: _flex["fn"](qh, kf, vf, block_mask=block_mask, enable_gqa=True)
            except Exception as exc:  # noqa: BLE001  (a failing peer is a result)
                errors["flex_attention"] = f"{type(exc).__name__}: {str(exc)[:200]}"

    flops = 4 * batch * heads_q * q_len * total * head_dim
    kv_bytes = 2 * batch * total * heads_kv * head_dim * k.element_size()
    records = []
    for impl, fn in impls.items():
        fn, calls = fn if isinstance(fn, tuple) else (fn, 1)
        records.append({"impl": impl, **measure(fn, device, calls=calls)})
    records += [{"impl": impl, "ms": None, "extra_peak_mib": None, "error": err} for impl, err in errors.items()]
    out = []
    for r in records:
        rec = {"op": "tree_attention", "shape": dict(s), "dtype": case["dtype"],
               "variant": "tree" if q_len > 1 else "decode", **r}
        if rec.get("ms"):
            seconds = rec["ms"] * 1e-3
            rec["tflops"] = flops / seconds / 1e12
            rec["gbps"] = kv_bytes / seconds / 1e9
            rec["pct_of_copy"] = 100 * rec["gbps"] / (ceilings.copy_tbps * 1e3)
            rec["floor_ms"] = max(kv_bytes / (ceilings.copy_tbps * 1e12), flops / (ceilings.bf16_tflops * 1e12)) * 1e3
        if rec["impl"] == "sdpa":
            rec["note"] = "boolean mask, GQA heads expanded before timing"
        out.append(rec)
    return out


register(Benchmark(name="tree_attention", title="Tree attention over a KV cache (heads 32/8, head_dim 128)",
                   cases=cases, run_case=run_case, label_keys=["batch", "kv_len", "q_len"]))
