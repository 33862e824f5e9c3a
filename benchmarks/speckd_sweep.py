"""Tuning sweep of the fused SpecKD kernel alone (forward + gradient) at the issue's shapes.

The launch shape is read from the environment once per process, so run one process per
setting, e.g.:
    SPECX_SPECKD_MAX_CLUSTER=8 SPECX_SPECKD_SLICE_KB=72 python benchmarks/speckd_sweep.py
"""

import os

import torch

import specx  # noqa: F401  (registers the ops)
from specx.bench.common import time_ms

device = torch.device("cuda")
setting = (f"cluster<={os.environ.get('SPECX_SPECKD_MAX_CLUSTER', '8')} "
           f"slice={os.environ.get('SPECX_SPECKD_SLICE_KB', '72')}KB")
for rows, vocab in [(8192, 128256), (8192, 32000)]:
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16, generator=gen) * 2
    student = (teacher.float() + torch.randn(rows, vocab, device=device, generator=gen)).bfloat16()
    cells = []
    for divergence, gate, grad in [("fkl", "topk", True), ("fkl", "none", True), ("fkl", "spec", True),
                                   ("jsd", "topk", True), ("fkl", "topk", False)]:
        ms = time_ms(lambda: torch.ops.specx.speckd_rows(student, teacher, None, -100, divergence, gate, 5, 0.0,
                                                         1.0, 0.5, 0, 0, None, grad), device)
        cells.append(f"{divergence}/{gate}{'' if grad else ' fwd-only'} {ms:.3f}")
    print(f"{setting} {rows}x{vocab}: " + ", ".join(cells) + " ms", flush=True)
