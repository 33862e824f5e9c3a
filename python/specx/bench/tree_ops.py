"""Draft-tree ops: tree construction, greedy and sampling verification, KV compaction, each
against a plain-PyTorch peer on the same inputs. The small ops are launch-bound, so they are
also timed as CUDA-graph replays: ``*_graph`` replays a graph of one call (launch latency
included), ``*_graph20`` a graph of 20 back-to-back calls, reported per call (the op's cost
inside a captured decoding step)."""

from __future__ import annotations

import torch

from specx.bench.common import GRAPH_CALLS, Ceilings, graphed, measure
from specx.bench.registry import Benchmark, register
from specx.decode import build_tree, compact_kv, verify_greedy, verify_sample

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def with_graphs(impls: dict, device: torch.device) -> dict:
    out = {}
    for name, fn in impls.items():
        out[name] = fn
        for suffix, calls in (("_graph", 1), (f"_graph{GRAPH_CALLS}", GRAPH_CALLS)):
            try:
                replay = graphed(fn, device, calls)
                out[name + suffix] = None if replay is None else (replay, calls)
            except Exception:  # noqa: BLE001  (a peer that cannot be captured is simply not graphed)
                out[name + suffix] = None
    return out


def timed(op: str, impls: dict, case: dict, device: torch.device, ceilings: Ceilings,
          moved_bytes: float | None = None) -> list[dict]:
    """Times each implementation; an entry ``(fn, calls)`` is a replay of ``calls`` calls, timed
    per call."""
    records = []
    for impl, fn in impls.items():
        if fn is None:
            continue
        fn, calls = fn if isinstance(fn, tuple) else (fn, 1)
        result = measure(fn, device, calls=calls)
        rec = {"op": op, "impl": impl, "shape": dict(case["shape"]), "dtype": case.get("dtype"),
               "variant": case.get("variant"), **result}
        if moved_bytes and result.get("ms"):
            rec["gbps"] = moved_bytes / (result["ms"] * 1e-3) / 1e9
            rec["pct_of_copy"] = 100 * rec["gbps"] / (ceilings.copy_tbps * 1e3)
            rec["floor_ms"] = moved_bytes / (ceilings.copy_tbps * 1e12) * 1e3
        records.append(rec)
    return records


def random_parents(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    rows = [torch.cat([torch.tensor([-1]), torch.randint(0, 1 << 30, (size - 1,), generator=gen)
                       % torch.arange(1, size)]) for _ in range(batch)]
    return torch.stack(rows)


# ---- build_tree ----

def torch_backbone(tokens, root):
    """FastEagle's backbone tree in plain PyTorch (all candidates present): tokens, parents and a
    boolean ancestor mask."""
    batch, depth, k = tokens.shape
    size = 1 + depth * k
    node = torch.arange(size, device=tokens.device)
    d = (node - 1).clamp_min(0) // k
    parents = torch.where(d == 0, 0, 1 + (d - 1) * k)
    parents[0] = -1
    tok = torch.cat([root[:, None], tokens.reshape(batch, -1)], 1)
    anc = torch.eye(size, dtype=torch.bool, device=tokens.device)
    cur = parents.clone()
    for _ in range(depth):
        valid = cur >= 0
        anc[node, cur.clamp_min(0)] |= valid
        cur = torch.where(valid, parents[cur.clamp_min(0)], cur)
    return tok, parents.expand(batch, size), anc.expand(batch, size, size)


def build_tree_cases(device, quick):
    if quick:
        return [{"shape": {"batch": 4, "q_len": 10, "depth": 3, "k": 3}, "variant": "backbone"},
                {"shape": {"batch": 4, "q_len": 8, "depth": 3, "k": 3}, "variant": "topk_expand"}]
    out = [{"shape": {"batch": b, "q_len": 64, "depth": 7, "k": 9}, "variant": "backbone"} for b in (1, 16, 64)]
    out += [{"shape": {"batch": b, "q_len": 64, "depth": 8, "k": 8}, "variant": "topk_expand"} for b in (1, 16)]
    return out


def build_tree_run(case, device, ceilings):
    s = case["shape"]
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, 128000, (s["batch"], s["depth"], s["k"]), device=device, generator=gen)
    log_probs = torch.rand(tokens.shape, device=device, generator=gen).log().sort(-1, descending=True).values
    root = torch.zeros(s["batch"], dtype=torch.int64, device=device)
    if case["variant"] == "backbone":
        impls = {"specx": lambda: build_tree(tokens, log_probs, root),
                 "torch_eager": lambda: torch_backbone(tokens, root)}
    else:
        impls = {"specx": lambda: build_tree(tokens, log_probs, root, mode="topk_expand", budget=s["q_len"])}
    return timed("build_tree", with_graphs(impls, device), case, device, ceilings)


# ---- verify_greedy ----

def torch_verify_greedy(tokens, parents, argmax):
    """Plain-PyTorch greedy verification: match flags and depths by pointer jumping."""
    ok = tokens == argmax.gather(1, parents.clamp_min(0))
    ok[:, 0] = True
    depth = (parents >= 0).long()
    anc = parents.clone()
    for _ in range(max(1, tokens.shape[1]).bit_length()):
        has = anc >= 0
        a = anc.clamp_min(0)
        ok = torch.where(has, ok & ok.gather(1, a), ok)
        depth = torch.where(has, depth + depth.gather(1, a), depth)
        anc = torch.where(has, anc.gather(1, a), anc)
    score = torch.where(ok, depth, -1)
    best = score.argmax(1, keepdim=True)
    return best, score.gather(1, best), argmax.gather(1, best)


def verify_greedy_cases(device, quick):
    if quick:
        return [{"shape": {"batch": 4, "q_len": 16}, "variant": "argmax"},
                {"shape": {"batch": 4, "q_len": 16, "vocab": 4096}, "variant": "logits", "dtype": "fp32"}]
    out = [{"shape": {"batch": b, "q_len": 64}, "variant": "argmax"} for b in (1, 16, 64)]
    out += [{"shape": {"batch": 16, "q_len": 64, "vocab": 128256}, "variant": "logits", "dtype": "bf16"}]
    return out


def verify_greedy_run(case, device, ceilings):
    s = case["shape"]
    gen = torch.Generator().manual_seed(0)
    batch, size = s["batch"], s["q_len"]
    parents = random_parents(batch, size, gen).to(device)
    tokens = torch.randint(0, 4, (batch, size), generator=gen).to(device)
    if case["variant"] == "argmax":
        argmax = torch.randint(0, 4, (batch, size), generator=gen).to(device)
        impls = {"specx": lambda: verify_greedy(tokens, parents, argmax, check=False),
                 "torch_eager": lambda: torch_verify_greedy(tokens, parents, argmax)}
        return timed("verify_greedy", with_graphs(impls, device), case, device, ceilings)
    logits = torch.randn(batch, size, s["vocab"], device=device, dtype=DTYPES[case["dtype"]])
    impls = {"specx": lambda: verify_greedy(tokens, parents, logits, check=False),
             "torch_eager": lambda: torch_verify_greedy(tokens, parents, logits.argmax(-1))}
    return timed("verify_greedy", impls, case, device, ceilings, logits.numel() * logits.element_size())


# ---- verify_sample ----

def verify_sample_cases(device, quick):
    if quick:
        return [{"shape": {"batch": 4, "q_len": 16, "vocab": 4096}, "dtype": "fp32", "variant": "top_p=1.0",
                 "top_p": 1.0}]
    return [{"shape": {"batch": 16, "q_len": 64, "vocab": 128256}, "dtype": "bf16", "variant": f"top_p={p}",
             "top_p": p} for p in (1.0, 0.9)]


def verify_sample_run(case, device, ceilings):
    s = case["shape"]
    gen = torch.Generator().manual_seed(0)
    batch, size, vocab = s["batch"], s["q_len"], s["vocab"]
    parents = random_parents(batch, size, gen).to(device)
    logits = (3 * torch.randn(batch, size, vocab, device=device)).to(DTYPES[case["dtype"]])
    tokens = logits.float().argmax(-1).gather(1, parents.clamp_min(0))  # drafts the target likes
    top_p = case["top_p"]

    def torch_peer():
        # What a user would write unfused: the full softmax of every node, then a draw.
        p = torch.softmax(logits.float() / 0.8, -1)
        return torch.multinomial(p[:, 0], 1)

    impls = {"specx": lambda: verify_sample(tokens, parents, logits, temperature=0.8, top_p=top_p, check=False),
             "torch_softmax_multinomial": torch_peer}
    # The goal: within 1.5x of one read of the target logits.
    return timed("verify_sample", impls, case, device, ceilings, logits.numel() * logits.element_size())


# ---- compact_kv ----

def compact_kv_cases(device, quick):
    if quick:
        return [{"shape": {"batch": 4, "q_len": 16, "kv_len": 64, "heads_kv": 2, "head_dim": 64}, "dtype": "fp32"}]
    return [{"shape": {"batch": b, "q_len": 64, "kv_len": 4096, "heads_kv": 8, "head_dim": 128}, "dtype": "bf16"}
            for b in (1, 16, 64)]


def compact_kv_run(case, device, ceilings):
    s = case["shape"]
    batch, size = s["batch"], s["q_len"]
    k = torch.randn(batch, s["kv_len"] + size, s["heads_kv"], s["head_dim"], device=device,
                    dtype=DTYPES[case["dtype"]])
    v = torch.randn_like(k)
    lengths = torch.full((batch,), s["kv_len"], dtype=torch.int64, device=device)
    path = sorted({0, *(n % size for n in (3, 9, 17, 25, 33, 41, 49))})  # 8 accepted nodes spread over the tree
    nodes = torch.full((batch, size), -1, dtype=torch.int64)
    nodes[:, : len(path)] = torch.tensor(path)
    nodes = nodes.to(device)
    alen = torch.full((batch,), len(path) - 1, dtype=torch.int64, device=device)
    work_lengths = lengths.clone()
    rows = torch.arange(batch, device=device)[:, None]
    src = lengths[:, None] + nodes[:, : len(path)]
    dst = lengths[:, None] + torch.arange(len(path), device=device)

    def specx_fn():
        work_lengths.copy_(lengths)
        compact_kv(k, v, work_lengths, nodes, alen)

    def torch_fn():
        k[rows, dst] = k[rows, src]
        v[rows, dst] = v[rows, src]
        return lengths + alen + 1

    moved = 4 * batch * len(path) * s["heads_kv"] * s["head_dim"] * k.element_size()  # read + write, K and V
    return timed("compact_kv", with_graphs({"specx": specx_fn, "torch_eager": torch_fn}, device), case, device,
                 ceilings, moved)


register(Benchmark(name="build_tree", title="Draft-tree construction", cases=build_tree_cases,
                   run_case=build_tree_run, label_keys=["batch", "q_len"]))
register(Benchmark(name="verify_greedy", title="Greedy tree verification", cases=verify_greedy_cases,
                   run_case=verify_greedy_run, label_keys=["batch", "q_len", "vocab"]))
register(Benchmark(name="verify_sample", title="Sampling tree verification (temperature 0.8)",
                   cases=verify_sample_cases, run_case=verify_sample_run, label_keys=["batch", "q_len", "vocab"]))
register(Benchmark(name="compact_kv", title="KV compaction after verification", cases=compact_kv_cases,
                   run_case=compact_kv_run, label_keys=["batch", "kv_len", "heads_kv", "head_dim"]))
