"""Shared machinery of the microbenchmarks: timing, memory, ceilings, results files, plots."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import statistics
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

# Measured on the lent H200 (2026-11-28): device copy counting read + write, and an 8192^3
# bf16 matmul on random data. `specx-bench --measure-ceilings` measures them again.
H200_COPY_TBPS = 4.17
H200_BF16_TFLOPS = 799.0


@dataclasses.dataclass
class Ceilings:
    copy_tbps: float
    bf16_tflops: float
    measured: bool = False


def measure_ceilings(device: torch.device) -> Ceilings:
    """Copy bandwidth (read + write) and bf16 matmul rate of this device."""
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    copy = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e12
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device)
    return Ceilings(copy, 2 * 8192 ** 3 / (ms * 1e-3) / 1e12, measured=True)


def default_ceilings(device: torch.device) -> Ceilings:
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return Ceilings(H200_COPY_TBPS, H200_BF16_TFLOPS)
    if device.type == "cuda":
        return measure_ceilings(device)
    return Ceilings(copy_tbps=float("nan"), bf16_tflops=float("nan"))


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup`` runs (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def extra_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak device memory ``fn`` allocates beyond what was live before it (GPU only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


GRAPH_CALLS = 20


def graphed(fn: Callable[[], object], device: torch.device, calls: int = 1) -> Callable[[], object] | None:
    """The replay of ``calls`` back-to-back calls of ``fn`` captured in one CUDA graph, or None
    off the GPU. Launch-bound ops are timed this way too: one call's replay still pays the
    graph launch; ``GRAPH_CALLS`` calls per replay give the op's cost inside a captured step."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def measure(fn: Callable[[], object], device: torch.device, *, reps: int = 30, calls: int = 1) -> dict:
    """Time (per call, when one ``fn`` makes ``calls`` calls) and extra peak memory of ``fn``; an
    exception (out of memory, a peer that fails to compile) is recorded as ``error`` instead of
    stopping the run."""
    try:
        ms = time_ms(fn, device, reps=reps) / calls
        mib = extra_peak_mib(fn, device)
    except Exception as exc:  # noqa: BLE001  (a failing peer is a result, not a crash)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"ms": None, "extra_peak_mib": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"ms": ms, "extra_peak_mib": mib}


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")
    return "cpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def results_header(device: torch.device, ceilings: Ceilings) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "git": os.environ.get("SPECX_GIT_COMMIT", git_commit()),
        "ceilings": {"copy_tbps": ceilings.copy_tbps, "bf16_tflops": ceilings.bf16_tflops,
                     "measured_in_this_run": ceilings.measured},
    }


def write_results(out_dir: Path, op: str, header: dict, records: list[dict]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{op}.json"
    path.write_text(json.dumps({**header, "records": records}, indent=1) + "\n")
    return path


def shape_label(shape: dict, keys: Iterable[str] | None = None) -> str:
    keys = list(keys) if keys is not None else list(shape)
    return " ".join(f"{k}={shape[k]}" for k in keys if k in shape)


def record_label(record: dict, label_keys: list[str]) -> str:
    parts = [shape_label(record["shape"], label_keys), record.get("dtype") or "", record.get("variant") or ""]
    return " ".join(p for p in parts if p)


def plot_records(path: Path, title: str, records: list[dict], label_keys: list[str]) -> None:
    """Grouped bars: milliseconds of each implementation for each shape (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, impls = [], []
    for r in records:
        lab = record_label(r, label_keys)
        if lab not in labels:
            labels.append(lab)
        if r["impl"] not in impls:
            impls.append(r["impl"])
    width = 0.8 / max(1, len(impls))
    fig, ax = plt.subplots(figsize=(min(22, max(7, 0.75 * len(labels))), 5))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, lab in enumerate(labels):
            for r in records:
                if r["impl"] == impl and record_label(r, label_keys) == lab and r.get("ms"):
                    xs.append(j + i * width)
                    ys.append(r["ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, lower is better)")
    ax.set_title(textwrap.fill(title, width=int(9 * fig.get_figwidth())), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
