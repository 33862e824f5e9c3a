"""DeepKD benchmarks: the top-k threshold against torch.topk, the fused DeepKD losses (forward and
forward + the three gradients) against a plain-PyTorch mdistiller-DKD-style implementation (eager
and torch.compile), and the optimizer step against a torch._foreach implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import specx
from specx.bench.common import Ceilings, measure
from specx.bench.registry import Benchmark, register

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bandwidth(rec: dict, moved: int, ceilings: Ceilings) -> dict:
    """gbps, pct_of_copy and floor_ms of a record that moves `moved` bytes."""
    if rec.get("ms"):
        rec["gbps"] = moved / (rec["ms"] * 1e-3) / 1e9
        rec["pct_of_copy"] = 100 * rec["gbps"] / (ceilings.copy_tbps * 1e3)
        rec["floor_ms"] = moved / (ceilings.copy_tbps * 1e12) * 1e3
    return rec


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- top-k threshold ----------------------------------------------------------------------------

def topk_cases(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        dtype = "fp32" if device.type == "cpu" else "bf16"
        return [{"shape": {"rows": 64, "vocab": 4096, "k": k}, "dtype": dtype} for k in (4, 205)]
    return [{"shape": {"rows": 8192, "vocab": 128256, "k": k}, "dtype": "bf16"} for k in (64, 6413, 64128)]


def topk_run_case(case: dict, device: torch.device, ceilings: Ceilings) -> list[dict]:
    rows, vocab, k = case["shape"]["rows"], case["shape"]["vocab"], case["shape"]["k"]
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(rows, vocab, device=device, generator=gen) * 3).to(DTYPES[case["dtype"]])
    impls = {
        "specx": lambda: torch.ops.specx.topk_threshold(logits, k),
        "torch_topk": lambda: torch.topk(logits, k, dim=-1).values[:, -1],
        "torch_kthvalue": lambda: torch.kthvalue(logits, vocab - k + 1, dim=-1).values,
    }
    moved = logits.numel() * logits.element_size()  # one read of the logits
    records = []
    for impl, fn in impls.items():
        rec = {"op": "topk_threshold", "impl": impl, "shape": dict(case["shape"]), "dtype": case["dtype"],
               **measure(fn, device, reps=20)}
        records.append(_bandwidth(rec, moved, ceilings))
    del logits
    _free(device)
    return records


register(Benchmark(name="topk_threshold", title="Top-k threshold (k-th largest per row)", cases=topk_cases,
                   run_case=topk_run_case, label_keys=["rows", "vocab", "k"]))


# ---- DeepKD losses -----------------------------------------------------------------------------

def torch_deepkd(student, teacher, target, k: int | None, temperature: float):
    """DeepKD's losses in plain PyTorch in the style of mdistiller's DKD: dense masks, torch.topk for
    the DTM mask, fp32 softmaxes."""
    s, t = student.float(), teacher.float()
    ce = F.cross_entropy(s, target)
    gt_mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, target.unsqueeze(1), True)
    other_mask = ~gt_mask
    if k is None:
        kept = other_mask
    else:
        kept = torch.zeros_like(s, dtype=torch.bool).scatter_(1, t.topk(k, dim=1).indices, True) & other_mask
    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    b_s = torch.stack([(p_s * gt_mask).sum(1), (p_s * other_mask).sum(1)], 1)
    b_t = torch.stack([(p_t * gt_mask).sum(1), (p_t * other_mask).sum(1)], 1)
    rows = s.shape[0]
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature ** 2 / rows
    log_q = F.log_softmax(s / temperature - 1000.0 * (~kept), dim=1)
    p_k = F.softmax(t / temperature - 1000.0 * (~kept), dim=1)
    nckd = F.kl_div(log_q, p_k, reduction="sum") * temperature ** 2 / rows
    return ce, tckd, nckd


_compiled_deepkd = {}


def deepkd_cases(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        dtype = "fp32" if device.type == "cpu" else "bf16"
        return [{"shape": {"rows": 64, "vocab": 4096, "k": k}, "dtype": dtype, "variant": v, "peers": True}
                for k in (205, None) for v in ("fwd_bwd", "fwd")]
    out = []
    for k in (6413, None):
        for variant in ("fwd_bwd", "fwd"):
            out.append({"shape": {"rows": 8192, "vocab": 128256, "k": k}, "dtype": "bf16", "variant": variant,
                        "peers": True})
    out += [{"shape": {"rows": rows, "vocab": vocab, "k": vocab // 20}, "dtype": "bf16", "variant": "fwd_bwd",
             "peers": False} for rows, vocab in ((4096, 128256), (16384, 128256), (8192, 151936), (8192, 32000))]
    return out


def deepkd_run_case(case: dict, device: torch.device, ceilings: Ceilings) -> list[dict]:
    rows, vocab, k = case["shape"]["rows"], case["shape"]["vocab"], case["shape"]["k"]
    dtype = DTYPES[case["dtype"]]
    variant, temperature = case["variant"], 4.0
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = (torch.randn(rows, vocab, device=device, generator=gen) * 2).to(dtype)
    student = (teacher.float() + torch.randn(rows, vocab, device=device, generator=gen)).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    student.requires_grad_(variant == "fwd_bwd")
    elem = student.element_size()
    moved = rows * vocab * elem * (5 if variant == "fwd_bwd" else 2)  # read both logits (+ write 3 gradients)

    def three_grads(loss_fn):
        def step():
            losses = loss_fn()
            for i, loss in enumerate(losses):  # each gradient on its own, as DeepKD's optimizer needs
                torch.autograd.grad(loss, student, retain_graph=i < 2)
        return step

    def forward(loss_fn):
        def step():
            with torch.no_grad():
                loss_fn()
        return step

    wrap = three_grads if variant == "fwd_bwd" else forward
    impls = {"specx": wrap(lambda: specx.distill.deepkd_losses(student, teacher, target, k=k,
                                                              temperature=temperature))}
    if case.get("peers"):
        impls["torch_eager"] = wrap(lambda: torch_deepkd(student, teacher, target, k, temperature))
        key = (k, temperature)
        if key not in _compiled_deepkd:
            _compiled_deepkd[key] = torch.compile(lambda s, t, y: torch_deepkd(s, t, y, k, temperature))
        impls["torch_compile"] = wrap(lambda: _compiled_deepkd[key](student, teacher, target))
    records = []
    for impl, fn in impls.items():
        rec = {"op": "deepkd", "impl": impl, "shape": dict(case["shape"]), "dtype": case["dtype"],
               "variant": variant, **measure(fn, device, reps=10)}
        records.append(_bandwidth(rec, moved, ceilings))
    del student, teacher
    _free(device)
    return records


register(Benchmark(name="deepkd", title="DeepKD losses (CE, TCKD, top-k NCKD): forward, and forward + 3 gradients",
                   cases=deepkd_cases, run_case=deepkd_run_case, label_keys=["rows", "vocab", "k"]))


# ---- DeepKD optimizer ----------------------------------------------------------------------------

def smollm_135m_shapes(hidden=576, layers=30, intermediate=1536, vocab=49152, kv_dim=192) -> list[tuple]:
    """Parameter shapes of a SmolLM2-135M-like model (tied embeddings): about 134.5M parameters."""
    shapes = [(vocab, hidden), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),
                   (intermediate, hidden), (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return shapes


def foreach_deepkd_step(params, grads, buffers, *, lr, momentum, delta, weight_decay):
    """The paper's update with torch._foreach ops (the peer)."""
    g_task = torch._foreach_add(grads[0], params, alpha=weight_decay) if weight_decay else grads[0]
    for buf, g, decay in zip(buffers, (g_task, grads[1], grads[2]), (momentum + delta, momentum - delta,
                                                                      momentum + delta)):
        torch._foreach_mul_(buf, decay)
        torch._foreach_add_(buf, g)
    update = torch._foreach_add(buffers[0], buffers[1])
    torch._foreach_add_(update, buffers[2])
    torch._foreach_add_(params, update, alpha=-lr)


def optimizer_cases(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        return [{"shape": {"params": 1_000_000, "tensors": 20}, "dtype": "fp32", "model": "small"}]
    return [{"shape": {"params": sum(torch.Size(s).numel() for s in smollm_135m_shapes()),
                       "tensors": len(smollm_135m_shapes())}, "dtype": d, "model": "smollm2-135m"}
            for d in ("fp32", "bf16")]


def optimizer_run_case(case: dict, device: torch.device, ceilings: Ceilings) -> list[dict]:
    dtype = DTYPES[case["dtype"]]
    if case["model"] == "small":
        shapes = [(case["shape"]["params"] // case["shape"]["tensors"],)] * case["shape"]["tensors"]
    else:
        shapes = smollm_135m_shapes()
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, device=device, generator=gen).to(dtype) * 1e-3 for s in shapes] for _ in range(3)]
    buffers = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    kw = dict(lr=1e-4, momentum=0.9, delta=0.075, weight_decay=1e-4)
    opt = specx.distill.DeepKDOptimizer(params, **kw)
    impls = {"specx": lambda: opt.step(*grads),
             "torch_foreach": lambda: foreach_deepkd_step(params, grads, buffers, **kw)}
    n = sum(p.numel() for p in params)
    moved = n * params[0].element_size() * 11  # params r+w, 3 gradients read, 3 buffers r+w
    records = []
    for impl, fn in impls.items():
        rec = {"op": "deepkd_optimizer", "impl": impl, "shape": dict(case["shape"]), "dtype": case["dtype"],
               "variant": case["model"], **measure(fn, device, reps=20)}
        records.append(_bandwidth(rec, moved, ceilings))
    del params, grads, buffers, opt
    _free(device)
    return records


register(Benchmark(name="deepkd_optimizer", title="DeepKD optimizer step (three momentum buffers)",
                   cases=optimizer_cases, run_case=optimizer_run_case, label_keys=["params", "tensors"]))
