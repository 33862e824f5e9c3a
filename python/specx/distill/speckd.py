"""SpecKD (arXiv 2510.24021): knowledge distillation gated per token by a speculative-decoding
style verification of the student's proposal against the teacher."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specx.ops import eager_speckd_loss, valid_rows

__all__ = ["speckd_loss", "SpecKDLoss", "speckd_stats"]


def speckd_stats(row_divergence: Tensor, row_accepted: Tensor, labels: Tensor | None,
                 ignore_index: int) -> dict[str, Tensor]:
    """Acceptance rate (the paper's TAR) and mean divergence over the non-ignored rows, as
    0-d tensors (reading them does not synchronise until you call ``.item()``)."""
    valid = valid_rows(labels, ignore_index, row_divergence.numel(), row_divergence.device)
    count = valid.sum().clamp_min(1.0)
    return {
        "acceptance_rate": (row_accepted.float() * valid).sum() / count,
        "mean_divergence": (row_divergence * valid).sum() / count,
        "rows": valid.sum(),
    }


def speckd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                divergence: str = "fkl", gate: str = "topk", k: int = 5, reject_weight: float = 0.0,
                temperature: float = 1.0, jsd_beta: float = 0.5, skew: float = 0.1,
                ignore_index: int = -100, reduction: str = "mean", seed: int = 0,
                return_stats: bool = False):
    """Gated distillation loss over ``[..., V]`` logits (see DESIGN.md for the exact math).

    Per row, with ``q = softmax(student / T)`` and ``p = softmax(teacher / T)``: a divergence
    ``D`` (``fkl``, ``rkl``, ``jsd``, ``skl``, ``srkl``) weighted by ``w = reject_weight +
    (1 - reject_weight) * a``, where the gate ``a`` is 1 (``none``), whether the student's argmax
    is among the teacher's top-``k`` (``topk``), or whether one of ``k`` proposals drawn from
    ``q`` passes ``u < p(x) / q(x)`` (``spec``, reproducible for a given ``seed``). Rows whose
    label equals ``ignore_index`` get ``w = 0``. The teacher gets no gradient.

    Returns the reduced loss, or ``(loss, stats)`` with ``return_stats=True``; ``stats`` holds
    ``acceptance_rate``, ``mean_divergence`` and ``rows`` as 0-d tensors.
    """
    mix = jsd_beta if divergence == "jsd" else skew
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, row_divergence, row_accepted, _ = eager_speckd_loss(
        student_logits, teacher_logits.detach(), labels, ignore_index, divergence, gate, k,
        reject_weight, temperature, mix, reduction, seed, compute_grad)
    if not return_stats:
        return loss
    return loss, speckd_stats(row_divergence, row_accepted, labels, ignore_index)


class SpecKDLoss(nn.Module):
    """``nn.Module`` form of :func:`speckd_loss`; keywords are fixed at construction."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None):
        return speckd_loss(student_logits, teacher_logits, labels, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
