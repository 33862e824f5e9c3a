"""The benchmark registry: each op's module registers one :class:`Benchmark`."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from specx.bench.common import Ceilings


@dataclasses.dataclass
class Benchmark:
    name: str  # results go to benchmarks/results/<device>/<name>.json and <name>.png
    title: str
    # (device, quick) -> the cases to run, each {"shape": {...}, "dtype": ..., ...}
    cases: Callable[[torch.device, bool], list[dict]]
    # (case, device, ceilings) -> one record per implementation (specx and its peers)
    run_case: Callable[[dict, torch.device, Ceilings], list[dict]]
    label_keys: list[str]


REGISTRY: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    REGISTRY[bench.name] = bench
    return bench


def load_all() -> dict[str, Benchmark]:
    """Imports every benchmark module (each registers itself)."""
    from specx.bench import deepkd, speckd, speckd_fused_linear, tree_attention, tree_ops  # noqa: F401

    return REGISTRY
