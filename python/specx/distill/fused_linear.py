"""SpecKD from hidden states and LM-head weights, without ever holding ``[rows, vocab]`` logits.

Rows are processed in chunks. For each chunk the student and teacher logits are computed in
float32 (from bf16 / fp16 operands, accumulated in fp32 by the GEMM, never rounded to bf16),
the fused SpecKD kernel turns them into the loss, the gate and d(logits), and the gradients
of the student hidden states, weight and bias are accumulated in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specx.distill.speckd import speckd_stats
from specx.ops import row_weights, valid_rows

__all__ = ["speckd_fused_linear_loss", "SpecKDFusedLinearLoss"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Chunk logits (student + teacher fp32, d(logits) in the weight dtype) stay near this size.
_DEFAULT_CHUNK_BYTES = 1 << 30


def _matmul_nt_fp32(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """hidden @ weight.T (+ bias) in float32, without rounding the product to the operands' dtype."""
    if hidden.is_cuda and hidden.dtype in _LOW_PRECISION:
        out = torch.ops.aten.mm.dtype(hidden, weight.t(), torch.float32)
    else:
        out = hidden.float() @ weight.float().t()
    return out if bias is None else out.add_(bias.float())


def _accumulate_weight_grad(acc: Tensor, dlogits: Tensor, hidden: Tensor) -> None:
    """acc (fp32, [V, H]) += dlogits.T @ hidden, accumulating in fp32."""
    if acc.is_cuda and dlogits.dtype in _LOW_PRECISION:
        torch.ops.aten.addmm.dtype_out(acc, dlogits.t(), hidden, torch.float32, out=acc)
    else:
        acc.addmm_(dlogits.t().float(), hidden.float())


def auto_chunk_rows(rows: int, vocab: int, grad_bytes: int, budget_bytes: int = _DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's logits (two fp32 copies) and d(logits) fit the budget."""
    per_row = vocab * (4 + 4 + grad_bytes)
    return max(1, min(rows, budget_bytes // per_row))


def _chunked_pass(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts, chunk_rows,
                  want_hidden, want_weight, want_bias, grad_scale, row_scale=None):
    """One pass over the row chunks: per-row divergence and gate, and (when asked) the gradients.
    ``grad_scale`` multiplies every gradient (a 0-d tensor); ``row_scale`` ([rows]) each row's."""
    rows = s_hidden.shape[0]
    vocab = s_weight.shape[0]
    device = s_hidden.device
    want_grad = want_hidden or want_weight or want_bias
    grad_dtype = s_weight.dtype if s_weight.dtype in _LOW_PRECISION else torch.float32
    row_div = torch.empty(rows, dtype=torch.float32, device=device)
    row_acc = torch.empty(rows, dtype=torch.bool, device=device)
    g_hidden = torch.empty(s_hidden.shape, dtype=torch.float32, device=device) if want_hidden else None
    g_weight = torch.zeros(s_weight.shape, dtype=torch.float32, device=device) if want_weight else None
    g_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if want_bias else None
    # fp16 lacks the range for d(logits) of a mean over many rows (they fall into subnormals):
    # scale them by 2^12 in the kernel and divide the fp32 GEMM results back (exact).
    unit = 4096.0 if grad_dtype == torch.float16 else 1.0
    if unit != 1.0:
        grad_scale = torch.tensor(unit, device=device) if grad_scale is None else grad_scale * unit
    for start in range(0, rows, chunk_rows):
        stop = min(rows, start + chunk_rows)
        h = s_hidden[start:stop]
        s_logits = _matmul_nt_fp32(h, s_weight, s_bias)
        with torch.no_grad():
            t_logits = _matmul_nt_fp32(t_hidden[start:stop], t_weight, t_bias)
        div, acc, dlogits = torch.ops.specx.speckd_rows(
            s_logits, t_logits, None if labels is None else labels[start:stop], opts["ignore_index"],
            opts["divergence"], opts["gate"], opts["k"], opts["reject_weight"], opts["temperature"], opts["mix"],
            opts["seed"], start, grad_scale, want_grad, grad_dtype)
        del s_logits, t_logits
        row_div[start:stop] = div
        row_acc[start:stop] = acc
        if not want_grad:
            continue
        if row_scale is not None:
            dlogits.mul_(row_scale[start:stop, None].to(dlogits.dtype))
        if want_hidden:
            g_chunk = _matmul_nt_fp32(dlogits, s_weight.to(dlogits.dtype).t(), None)
            g_hidden[start:stop] = g_chunk if unit == 1.0 else g_chunk.div_(unit)
        if want_weight:
            _accumulate_weight_grad(g_weight, dlogits, h.to(dlogits.dtype) if h.dtype != dlogits.dtype else h)
        if want_bias:
            g_bias += dlogits.float().sum(0)
    for g in (g_weight, g_bias):
        if g is not None and unit != 1.0:
            g.div_(unit)
    return row_div, row_acc, g_hidden, g_weight, g_bias


class _SpecKDFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts, chunk_rows):
        valid = valid_rows(labels, opts["ignore_index"], s_hidden.shape[0], s_hidden.device)
        n_valid = valid.sum()
        want = ctx.needs_input_grad[0], ctx.needs_input_grad[1], s_bias is not None and ctx.needs_input_grad[2]
        reduction = opts["reduction"]
        # "none" needs each row's d(loss), known only in backward: the gradients wait for it.
        eager_grads = any(want) and reduction != "none"
        grad_scale = n_valid.clamp_min(1.0).reciprocal() if reduction == "mean" else None
        row_div, row_acc, g_h, g_w, g_b = _chunked_pass(
            s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts, chunk_rows,
            *(w and eager_grads for w in want), grad_scale)
        weight = row_weights(row_acc, valid, opts["reject_weight"])
        row_loss = weight * row_div
        if reduction == "none":
            loss = row_loss
        elif reduction == "sum":
            loss = row_loss.sum()
        elif reduction == "mean":
            loss = row_loss.sum() / n_valid.clamp_min(1.0)
        else:  # accepted: its divisor is known only now
            total = weight.sum()
            inv = torch.where(total > 0, 1.0 / total.clamp_min(1e-30), torch.zeros_like(total))
            loss = row_loss.sum() * inv
            for g in (g_h, g_w, g_b):
                if g is not None:
                    g.mul_(inv.to(g.dtype))
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, row_acc)
        ctx.opts, ctx.chunk_rows, ctx.want = opts, chunk_rows, want
        # Kept in fp32 until backward, so d(loss) (a loss scale, say) is applied before rounding.
        ctx.grads = (g_h, g_w, g_b) if eager_grads else None
        ctx.mark_non_differentiable(row_div, row_acc)
        return loss, row_div, row_acc

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_acc):
        if ctx.grads is None:  # reduction "none", or a second backward over the same graph
            s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, row_acc = ctx.saved_tensors
            opts = ctx.opts
            valid = valid_rows(labels, opts["ignore_index"], s_hidden.shape[0], s_hidden.device)
            *_, g_h, g_w, g_b = _chunked_pass(
                s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts, ctx.chunk_rows, *ctx.want,
                None, _row_grad_scale(grad_loss, opts, valid, row_acc))
        else:
            (g_h, g_w, g_b), ctx.grads = ctx.grads, None
            for g in (g_h, g_w, g_b):
                if g is not None:
                    torch.ops.specx.scale_grad_(g, grad_loss.reshape(()).float())
        s_hidden, s_weight, s_bias = ctx.saved_tensors[:3]
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return cast(g_h, s_hidden), cast(g_w, s_weight), cast(g_b, s_bias), None, None, None, None, None, None


def _row_grad_scale(grad_loss, opts, valid, row_acc):
    """d(loss)/d(row) for the recompute path: the reduction's weights times grad_loss."""
    reduction = opts["reduction"]
    if reduction == "none":
        return grad_loss.reshape(-1).float()
    if reduction == "sum":
        return grad_loss.float().expand(valid.shape[0])
    if reduction == "mean":
        return (grad_loss.float() / valid.sum().clamp_min(1.0)).expand(valid.shape[0])
    total = row_weights(row_acc, valid, opts["reject_weight"]).sum()
    inv = torch.where(total > 0, 1.0 / total.clamp_min(1e-30), torch.zeros_like(total))
    return (grad_loss.float() * inv).expand(valid.shape[0])


def speckd_fused_linear_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                             teacher_weight: Tensor, labels: Tensor | None = None, *,
                             student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                             divergence: str = "fkl", gate: str = "topk", k: int = 5, reject_weight: float = 0.0,
                             temperature: float = 1.0, jsd_beta: float = 0.5, skew: float = 0.1,
                             ignore_index: int = -100, reduction: str = "mean", seed: int = 0,
                             return_stats: bool = False, chunk_rows: int | None = None):
    """:func:`specx.distill.speckd_loss` of ``student_hidden @ student_weight.T (+ student_bias)``
    against the teacher's logits, computed chunk by chunk (``chunk_rows`` rows at a time; by
    default sized from the vocabulary so a chunk's logits take about 1 GiB).

    ``student_hidden [..., Hs]`` and ``teacher_hidden [..., Ht]`` share their leading shape;
    ``student_weight [V, Hs]`` and ``teacher_weight [V, Ht]`` share the vocabulary ``V``. The
    teacher gets no gradient. Same keywords and return value as ``speckd_loss``.
    """
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError("speckd_fused_linear_loss: student_weight and teacher_weight must be [vocab, hidden]")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"speckd_fused_linear_loss: vocabularies differ: student_weight has "
                         f"{student_weight.shape[0]} rows, teacher_weight has {teacher_weight.shape[0]}")
    if student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"speckd_fused_linear_loss: student_hidden's last dimension {student_hidden.shape[-1]} "
                         f"does not match student_weight's hidden size {student_weight.shape[1]}")
    if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"speckd_fused_linear_loss: teacher_hidden's last dimension {teacher_hidden.shape[-1]} "
                         f"does not match teacher_weight's hidden size {teacher_weight.shape[1]}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"speckd_fused_linear_loss: student_hidden and teacher_hidden must share their leading "
                         f"shape; got {tuple(student_hidden.shape[:-1])} and {tuple(teacher_hidden.shape[:-1])}")
    for name, bias, w in (("student_bias", student_bias, student_weight), ("teacher_bias", teacher_bias,
                                                                            teacher_weight)):
        if bias is not None and bias.shape != (w.shape[0],):
            raise ValueError(f"speckd_fused_linear_loss: {name} must have shape ({w.shape[0]},); "
                             f"got {tuple(bias.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"speckd_fused_linear_loss: chunk_rows must be >= 1; got {chunk_rows}")
    lead = student_hidden.shape[:-1]
    device_type = student_hidden.device.type
    # Run in the operands' own precision even under autocast: the logits are fp32 regardless.
    with torch.autocast(device_type=device_type, enabled=False):
        s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        if s_hidden.dtype != student_weight.dtype:
            s_hidden = s_hidden.to(student_weight.dtype)
        t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).to(teacher_weight.dtype)
        flat_labels = None if labels is None else labels.reshape(-1)
        if flat_labels is not None and flat_labels.shape[0] != s_hidden.shape[0]:
            raise ValueError(f"speckd_fused_linear_loss: labels must have the leading shape {tuple(lead)}; "
                             f"got {tuple(labels.shape)}")
        grad_bytes = student_weight.element_size() if student_weight.dtype in _LOW_PRECISION else 4
        rows = s_hidden.shape[0]
        chunk = chunk_rows or auto_chunk_rows(rows, student_weight.shape[0], grad_bytes)
        opts = {"divergence": divergence, "gate": gate, "k": k, "reject_weight": reject_weight,
                "temperature": temperature, "mix": jsd_beta if divergence == "jsd" else skew,
                "ignore_index": ignore_index, "reduction": reduction, "seed": seed}
        if reduction not in ("mean", "sum", "accepted", "none"):
            raise ValueError(f"speckd_fused_linear_loss: reduction must be one of mean, sum, accepted, none; "
                             f"got {reduction!r}")
        loss, row_div, row_acc = _SpecKDFusedLinear.apply(
            s_hidden, student_weight, student_bias, t_hidden, teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(), flat_labels, opts, max(1, chunk))
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    return loss, speckd_stats(row_div, row_acc, flat_labels, ignore_index)


class SpecKDFusedLinearLoss(nn.Module):
    """``nn.Module`` form of :func:`speckd_fused_linear_loss`; keywords fixed at construction."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, **kwargs):
        return speckd_fused_linear_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                        **{**self.kwargs, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
