"""Fused-linear SpecKD, forward + backward, against Liger's chunked distillation loss, the
materialized path (logits, then speckd_loss) and the same four GEMMs alone."""

from __future__ import annotations

import torch

import specx
from specx.bench.common import Ceilings, measure
from specx.bench.registry import Benchmark, register

STUDENT_HIDDEN, TEACHER_HIDDEN = 2048, 4096


def cases(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        return [{"shape": {"rows": 64, "vocab": 2000, "hidden": 64, "teacher_hidden": 128},
                 "dtype": "fp32" if device.type == "cpu" else "bf16"}]
    return [{"shape": {"rows": rows, "vocab": vocab, "hidden": STUDENT_HIDDEN, "teacher_hidden": TEACHER_HIDDEN},
             "dtype": "bf16"}
            for rows, vocab in ((2048, 128256), (8192, 128256), (16384, 128256), (8192, 151936))]


def run_case(case: dict, device: torch.device, ceilings: Ceilings) -> list[dict]:
    shape = case["shape"]
    rows, vocab, hs, ht = shape["rows"], shape["vocab"], shape["hidden"], shape["teacher_hidden"]
    dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen)  # noqa: E731
    s_w = (rand(vocab, hs) / hs ** 0.5).requires_grad_(True)
    t_w = rand(vocab, ht) / ht ** 0.5
    s_h = (rand(rows, hs) * 2).requires_grad_(True)
    t_h = rand(rows, ht) * 2
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    flops = 2 * rows * vocab * (3 * hs + ht)  # student logits, teacher logits, d(hidden), d(weight)

    def fwd_bwd(loss_fn):
        def step():
            s_h.grad = s_w.grad = None
            loss_fn().backward()
        return step

    impls = {
        "specx": fwd_bwd(lambda: specx.distill.speckd_fused_linear_loss(s_h, s_w, t_h, t_w, labels,
                                                                        divergence="fkl", gate="topk")),
        "specx_materialized": fwd_bwd(lambda: specx.distill.speckd_loss(s_h @ s_w.t(), t_h @ t_w.t(), labels,
                                                                        divergence="fkl", gate="topk")),
    }
    dlogits = rand(rows, vocab) * 1e-3

    def gemms_alone():
        with torch.no_grad():
            s_h @ s_w.t()
            t_h @ t_w.t()
            dlogits @ s_w
            dlogits.t() @ s_h

    impls["gemms_alone"] = gemms_alone
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0)
        impls["liger"] = fwd_bwd(lambda: liger(s_h, s_w, t_h, t_w, labels))
    records = []
    for impl, fn in impls.items():
        result = measure(fn, device, reps=10)
        rec = {"op": "speckd_fused_linear", "impl": impl, "shape": dict(shape), "dtype": case["dtype"], **result}
        if result.get("ms"):
            rec["tflops"] = flops / (result["ms"] * 1e-3) / 1e12
            rec["pct_of_peak"] = 100 * rec["tflops"] / ceilings.bf16_tflops
        if impl == "liger":
            rec["note"] = "LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0, weight_soft_loss=1): forward KL, no gate"
        if impl == "gemms_alone":
            rec["note"] = "the four GEMMs through torch (cuBLAS), no loss: the floor"
        records.append(rec)
    gemm_ms = next((r["ms"] for r in records if r["impl"] == "gemms_alone"), None)
    for rec in records:
        if gemm_ms and rec.get("ms") and rec["impl"] != "gemms_alone":
            rec["matmul_share"] = gemm_ms / rec["ms"]
    if device.type == "cuda":
        del dlogits
        torch.cuda.empty_cache()
    return records


register(Benchmark(name="speckd_fused_linear", title="Fused-linear SpecKD, forward + backward", cases=cases,
                   run_case=run_case, label_keys=["rows", "vocab"]))
