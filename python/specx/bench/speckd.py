"""SpecKD loss, forward + backward: specx's fused kernel against torch eager, torch.compile and
Liger-Kernel (plain KD: Liger has no gate) on the same inputs."""

from __future__ import annotations

import torch

import specx
from specx.bench.common import Ceilings, measure
from specx.bench.registry import Benchmark, register

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases(device: torch.device, quick: bool) -> list[dict]:
    if quick:
        return [{"shape": {"rows": r, "vocab": v}, "dtype": "fp32" if device.type == "cpu" else "bf16",
                 "divergence": "fkl", "gate": "topk", "peers": True} for r, v in [(64, 4096), (128, 32000)]]
    out = []
    for vocab in (32000, 128256, 151936):
        for rows in (1024, 4096, 8192, 16384, 32768):
            out.append({"shape": {"rows": rows, "vocab": vocab}, "dtype": "bf16", "divergence": "fkl",
                        "gate": "topk", "peers": rows == 8192})
    for divergence, gate in [("fkl", "none"), ("fkl", "spec"), ("rkl", "topk"), ("jsd", "topk"),
                             ("skl", "topk"), ("srkl", "topk")]:
        out.append({"shape": {"rows": 8192, "vocab": 128256}, "dtype": "bf16", "divergence": divergence,
                    "gate": gate, "peers": divergence == "jsd"})
    return out


def torch_speckd(student, teacher, divergence: str, gate: str, k: int = 5):
    """The loss in plain PyTorch (fp32 math), as a user would write it."""
    lq = torch.log_softmax(student.float(), -1)
    lp = torch.log_softmax(teacher.float(), -1)
    if divergence == "fkl":
        d = (lp.exp() * (lp - lq)).sum(-1)
    elif divergence == "rkl":
        d = (lq.exp() * (lq - lp)).sum(-1)
    else:  # jsd, beta = 0.5
        lm = torch.logaddexp(lp, lq) - 0.6931471805599453
        d = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
    if gate == "topk":
        y = student.argmax(-1, keepdim=True)
        d = d * ((teacher > teacher.gather(-1, y)).sum(-1) < k)
    return d.mean()


_compiled = {}


def run_case(case: dict, device: torch.device, ceilings: Ceilings) -> list[dict]:
    rows, vocab = case["shape"]["rows"], case["shape"]["vocab"]
    dtype = DTYPES[case["dtype"]]
    divergence, gate = case["divergence"], case["gate"]
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(rows, vocab, device=device, dtype=dtype, generator=gen) * 2
    student = (teacher.float() + torch.randn(rows, vocab, device=device, generator=gen, dtype=dtype)).to(dtype)
    student.requires_grad_(True)
    elem = student.element_size()
    grad_mib = rows * vocab * elem / 2 ** 20
    moved = 3 * rows * vocab * elem  # read both logits, write the gradient

    def fwd_bwd(loss_fn):
        def step():
            student.grad = None
            loss_fn().backward()
        return step

    impls = {"specx": fwd_bwd(lambda: specx.distill.speckd_loss(student, teacher, divergence=divergence,
                                                                gate=gate, k=5))}
    if case.get("peers"):
        impls["specx_recompute"] = lambda: (
            torch.ops.specx.speckd_rows(student.detach(), teacher, None, -100, divergence, gate, 5, 0.0, 1.0,
                                        0.5, 0, 0, None, False),
            torch.ops.specx.speckd_rows(student.detach(), teacher, None, -100, divergence, gate, 5, 0.0, 1.0,
                                        0.5, 0, 0, None, True))
        impls["torch_eager"] = fwd_bwd(lambda: torch_speckd(student, teacher, divergence, gate))
        key = (divergence, gate)
        if key not in _compiled:
            _compiled[key] = torch.compile(lambda s, t: torch_speckd(s, t, divergence, gate))
        impls["torch_compile"] = fwd_bwd(lambda: _compiled[key](student, teacher))
        try:
            from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
        except ImportError:
            pass
        else:
            if divergence == "fkl":
                kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
                impls["liger"] = fwd_bwd(lambda: kl(torch.log_softmax(student.float(), -1),
                                                    torch.log_softmax(teacher.float(), -1)))
            elif divergence == "jsd":
                jsd = LigerJSD(beta=0.5)
                impls["liger"] = fwd_bwd(lambda: jsd(torch.log_softmax(student.float(), -1),
                                                     torch.log_softmax(teacher.float(), -1)))
    records = []
    for impl, fn in impls.items():
        result = measure(fn, device)
        rec = {"op": "speckd", "impl": impl, "shape": dict(case["shape"]), "dtype": case["dtype"],
               "variant": f"{divergence}/{gate}", "divergence": divergence, "gate": gate, **result}
        if result.get("ms"):
            rec["gbps"] = moved / (result["ms"] * 1e-3) / 1e9
            rec["pct_of_copy"] = 100 * rec["gbps"] / (ceilings.copy_tbps * 1e3)
            rec["floor_ms"] = moved / (ceilings.copy_tbps * 1e12) * 1e3
            rec["extra_beyond_grad_mib"] = result["extra_peak_mib"] - grad_mib
        if impl == "liger":
            rec["note"] = "Liger has no gate: plain KD on log-softmax inputs"
        records.append(rec)
    return records


register(Benchmark(name="speckd", title="SpecKD loss, forward + backward", cases=cases, run_case=run_case,
                   label_keys=["rows", "vocab"]))
