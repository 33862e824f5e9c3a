"""DeepKD (arXiv 2505.15133): decoupled KD whose task, target-class and non-target-class
gradients each get their own momentum, with a dynamic top-k mask (DTM) over the non-target
classes whose K grows over training."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from specx.ops import eager_deepkd_losses

__all__ = ["deepkd_losses", "dtm_k", "DeepKDOptimizer", "deepkd_train_step"]


def deepkd_losses(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, k: int | None = None,
                  temperature: float = 4.0, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """DeepKD's three losses over ``[..., C]`` logits and ``target`` of the leading shape (int64).

    Returns ``(ce, tckd, nckd)``, 0-d float32 tensors, each the mean over the rows whose target is
    not ``ignore_index`` (0 when there are none):

    - ``ce``: the student's cross-entropy at temperature 1;
    - ``tckd``: ``T^2`` KL between the binary ``[p_gt, 1 - p_gt]`` of teacher and student at ``T``;
    - ``nckd``: ``T^2`` KL between teacher and student softmaxes at ``T`` over the kept set,
      renormalised: the teacher's top-``k`` classes by raw logit (ties: lowest index first) minus
      the target class; ``k=None`` keeps every non-target class (plain DKD).

    One fused pass computes the three losses and, when ``student_logits`` requires grad, the
    gradient of each; each loss backpropagates on its own (``ce.backward(retain_graph=True)``,
    then ``tckd``, then ``nckd``), which is what :class:`DeepKDOptimizer` needs. The teacher gets
    no gradient. On CUDA a target outside ``[0, C)`` (other than ``ignore_index``) makes that
    row's losses NaN; on CPU it raises ``ValueError``.
    """
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    ce, tckd, nckd, *_ = eager_deepkd_losses(student_logits, teacher_logits.detach(), target, k, float(temperature),
                                             ignore_index, compute_grad)
    return ce, tckd, nckd


def dtm_k(step: int, total_steps: int, num_classes: int, start_frac: float = 0.05, end_frac: float = 1.0) -> int:
    """The dynamic top-k mask's K at ``step`` of ``total_steps``: grows linearly from
    ``start_frac * num_classes`` (step 0) to ``end_frac * num_classes`` (step >= total_steps),
    rounded to the nearest integer and clamped to ``[1, num_classes]``."""
    if num_classes < 1:
        raise ValueError(f"dtm_k: num_classes must be >= 1; got {num_classes}")
    if not 0.0 <= start_frac <= 1.0 or not 0.0 <= end_frac <= 1.0:
        raise ValueError(f"dtm_k: start_frac and end_frac must be in [0, 1]; got {start_frac}, {end_frac}")
    progress = 1.0 if total_steps <= 0 else min(max(step, 0) / total_steps, 1.0)
    frac = start_frac + (end_frac - start_frac) * progress
    return min(max(round(frac * num_classes), 1), num_classes)


GradList = Sequence[Tensor | None]


class DeepKDOptimizer(torch.optim.Optimizer):
    """SGD with DeepKD's three momentum buffers per parameter (the paper's equations).

    With ``m = momentum`` and ``d = delta``, per parameter ``p`` and its task / target-class /
    non-target-class gradients ``g0, g1, g2``::

        v0 = (m + d) v0 + g0 + weight_decay * p
        v1 = (m - d) v1 + g1
        v2 = (m + d) v2 + g2
        p  = p - lr * (v0 + v1 + v2)

    The released DeepKD code differs in two ways that we do not copy: its task buffer decays with
    the target-class momentum ``m - d``, and it adds weight decay in the target-class pass only.

    :meth:`step` takes the three gradients as lists aligned with the parameters (all groups, in
    order); :meth:`backward_and_step` runs the three backward passes and the step. On CUDA the
    update is one fused multi-tensor kernel launch per dtype (per param group and device).
    The buffers live in ``state[p]`` as ``task_buffer``, ``tckd_buffer``, ``nckd_buffer``.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"DeepKDOptimizer: lr must be >= 0; got {lr}")
        if weight_decay < 0:
            raise ValueError(f"DeepKDOptimizer: weight_decay must be >= 0; got {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, weight_decay=weight_decay))

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, grads_task: GradList, grads_tckd: GradList, grads_nckd: GradList) -> None:
        """Applies one update from the three gradient lists (one entry per parameter, ``None``
        for a zero gradient; a parameter with three ``None`` is left alone, buffers included)."""
        n = len(self._all_params())
        if not len(grads_task) == len(grads_tckd) == len(grads_nckd) == n:
            raise ValueError(f"DeepKDOptimizer.step: each gradient list needs {n} entries (one per param); "
                             f"got {len(grads_task)}, {len(grads_tckd)}, {len(grads_nckd)}")
        index = 0
        for group in self.param_groups:
            by_device: dict[torch.device, list[list]] = {}
            for p in group["params"]:
                grads = (grads_task[index], grads_tckd[index], grads_nckd[index])
                index += 1
                if all(g is None for g in grads):
                    continue
                state = self.state[p]
                if not state:
                    for name in ("task_buffer", "tckd_buffer", "nckd_buffer"):
                        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lists = by_device.setdefault(p.device, [[] for _ in range(7)])
                for dst, value in zip(lists, (p, *grads, state["task_buffer"], state["tckd_buffer"],
                                              state["nckd_buffer"])):
                    dst.append(value)
            for lists in by_device.values():
                torch.ops.specx.deepkd_sgd_step_(*lists, group["lr"], group["momentum"], group["delta"],
                                                 group["weight_decay"])

    def backward_and_step(self, ce: Tensor, tckd: Tensor, nckd: Tensor, *,
                          weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        """Backpropagates ``weights[0] * ce``, ``weights[1] * tckd`` and ``weights[2] * nckd`` one
        at a time, collects each one's parameter gradients, and applies :meth:`step`. The
        parameters' ``.grad`` are left as ``None``."""
        params = self._all_params()
        collected = []
        for i, (loss, weight) in enumerate(zip((ce, tckd, nckd), weights)):
            for p in params:
                p.grad = None
            if loss.requires_grad:
                (loss if weight == 1.0 else loss * weight).backward(retain_graph=i < 2)
            collected.append([p.grad for p in params])
        for p in params:
            p.grad = None
        self.step(*collected)


def deepkd_train_step(student: nn.Module | Callable[..., Tensor], teacher: nn.Module | Callable[..., Tensor],
                      inputs, target: Tensor, optimizer: DeepKDOptimizer, *, k: int | None = None,
                      temperature: float = 4.0, ignore_index: int = -100,
                      weights: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, Tensor]:
    """One DeepKD training step on a batch: teacher logits (no grad), student logits, the three
    losses, their three backward passes and the optimizer step. ``student(inputs)`` and
    ``teacher(inputs)`` return ``[..., C]`` logits (a tuple or list input is unpacked). Returns
    the detached losses as ``{"ce", "tckd", "nckd"}``."""
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    with torch.no_grad():
        teacher_logits = teacher(*args)
    student_logits = student(*args)
    ce, tckd, nckd = deepkd_losses(student_logits, teacher_logits, target, k=k, temperature=temperature,
                                   ignore_index=ignore_index)
    optimizer.backward_and_step(ce, tckd, nckd, weights=weights)
    return {"ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach()}
