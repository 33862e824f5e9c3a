"""Python face of ``torch.ops.specx.*``: fake (meta) kernels so ``torch.compile`` traces the
ops without graph breaks, and the autograd formulas of the differentiable ones.

The schemas themselves live in ``csrc/registration.cpp``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["eager_speckd_loss", "row_weights", "speckd_loss", "speckd_rows", "valid_rows"]

speckd_rows = torch.ops.specx.speckd_rows
speckd_loss = torch.ops.specx.speckd_loss


def _register_autograd(op, backward, setup_context):
    """Registers the autograd formula of ``op`` (what ``torch.compile`` and direct
    ``torch.ops.specx`` callers use) and returns a call of ``op`` with the same formula as a
    ``torch.autograd.Function`` for the Python API's eager calls: the registered wrapper fills in
    the schema's defaults on every call (``torch._library.utils.fill_defaults``), tens of
    microseconds of host time, more than a small loss's kernel takes."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return op(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        if torch.compiler.is_compiling() or not (
                torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return op(*args)
        return EagerFunction.apply(*args)

    return call


def _leading_shape(logits: Tensor) -> tuple:
    return tuple(logits.shape[:-1])


@torch.library.register_fake("specx::speckd_rows")
def _speckd_rows_fake(student_logits, teacher_logits, labels, ignore_index, divergence, gate, k,
                      reject_weight, temperature, mix, seed, row_offset, grad_scale, compute_grad, grad_dtype=None):
    rows = math.prod(_leading_shape(student_logits))
    row_divergence = student_logits.new_empty((rows,), dtype=torch.float32)
    row_accepted = student_logits.new_empty((rows,), dtype=torch.bool)
    grad = student_logits.new_empty(student_logits.shape if compute_grad else (0,),
                                    dtype=grad_dtype or student_logits.dtype)
    return row_divergence, row_accepted, grad


@torch.library.register_fake("specx::speckd_loss")
def _speckd_loss_fake(student_logits, teacher_logits, labels, ignore_index, divergence, gate, k,
                      reject_weight, temperature, mix, reduction, seed, compute_grad):
    row_divergence, row_accepted, grad = _speckd_rows_fake(
        student_logits, teacher_logits, labels, ignore_index, divergence, gate, k, reject_weight,
        temperature, mix, seed, 0, None, compute_grad)
    loss_shape = _leading_shape(student_logits) if reduction == "none" else ()
    loss = student_logits.new_empty(loss_shape, dtype=torch.float32)
    return loss, row_divergence, row_accepted, grad


@torch.library.register_fake("specx::scale_grad_")
def _scale_grad_fake(grad, scale):
    return None


def _speckd_loss_setup_context(ctx, inputs, output):
    (student, teacher, labels, ignore_index, divergence, gate, k, reject_weight, temperature, mix,
     reduction, seed, compute_grad) = inputs
    _, row_divergence, row_accepted, grad = output
    ctx.mark_non_differentiable(row_divergence, row_accepted, grad)
    # Without this, autograd would fill a [rows, vocab] zero tensor as the "gradient" of the
    # stored-gradient output on every backward: a full extra write (0.6 ms at 8192 x 128256 bf16).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student, teacher, labels, row_accepted, grad)
    ctx.row_args = (ignore_index, divergence, gate, k, reject_weight, temperature, mix, seed)
    ctx.reduction = reduction
    # The stored gradient is scaled in place by the first backward; a second backward over
    # the same graph (retain_graph=True) recomputes it instead.
    ctx.stored_grad_fresh = compute_grad


def valid_rows(labels: Tensor | None, ignore_index: int, rows: int, device) -> Tensor:
    """1.0 for each row that counts (its label is not ``ignore_index``), else 0.0."""
    if labels is None:
        return torch.ones(rows, dtype=torch.float32, device=device)
    return labels.reshape(-1).ne(ignore_index).float()


def row_weights(row_accepted: Tensor, valid: Tensor, reject_weight: float) -> Tensor:
    """SpecKD's per-row weight w = reject_weight + (1 - reject_weight) * a, 0 on ignored rows."""
    return valid * (reject_weight + (1.0 - reject_weight) * row_accepted.float())


def _speckd_loss_backward(ctx, grad_loss, _grad_row_divergence, _grad_row_accepted, _grad_grad):
    student, teacher, labels, row_accepted, grad = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return (None,) * 13
    ignore_index, divergence, gate, k, reject_weight, temperature, mix, seed = ctx.row_args
    reduction = ctx.reduction
    rows = row_accepted.numel()
    if not ctx.stored_grad_fresh:
        kernel_scale = None
        if reduction == "mean":
            kernel_scale = valid_rows(labels, ignore_index, rows, student.device).sum().clamp_min(1.0).reciprocal()
        _, _, grad = speckd_rows(student, teacher, labels, ignore_index, divergence, gate, k, reject_weight,
                                 temperature, mix, seed, 0, kernel_scale, True)
    ctx.stored_grad_fresh = False

    # The kernel already divided by the row count for "mean"; what is left is d(loss).
    if reduction == "none":
        scale = grad_loss.reshape(-1)
    elif reduction == "accepted":
        weight = row_weights(row_accepted, valid_rows(labels, ignore_index, rows, student.device), reject_weight)
        total = weight.sum()
        scale = torch.where(total > 0, grad_loss / total.clamp_min(1e-30), torch.zeros_like(grad_loss))
    else:
        scale = grad_loss.reshape(())
    if type(grad) is not torch.Tensor:
        # Traced (torch.compile / AOTAutograd): stay functional and let the compiler fuse it.
        factor = scale.reshape(*grad.shape[:-1], 1) if reduction == "none" else scale
        return (grad * factor.to(grad.dtype),) + (None,) * 12
    # Eager: in place, so the common d(loss) == 1 case costs no pass. The version counter is
    # kept because the saved tensor is only read again through the recompute path above.
    with torch.autograd._unsafe_preserve_version_counter(grad):
        torch.ops.specx.scale_grad_(grad, scale.float())
    return (grad,) + (None,) * 12


eager_speckd_loss = _register_autograd(torch.ops.specx.speckd_loss.default, _speckd_loss_backward,
                                       _speckd_loss_setup_context)


# ---------------------------------------------------------------------------------------------
# Tree attention
# ---------------------------------------------------------------------------------------------

tree_attention = torch.ops.specx.tree_attention
__all__ += ["tree_attention"]


@torch.library.register_fake("specx::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, cache_lens, tree_mask=None, scale=None, num_splits=0):
    batch, tree_size, heads_q, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads_q, tree_size), dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Decoding: draft trees, verification, KV compaction
# ---------------------------------------------------------------------------------------------

@torch.library.register_fake("specx::build_tree")
def _build_tree_fake(candidate_tokens, candidate_log_probs, root_tokens, mode, budget):
    batch, depth, k = candidate_tokens.shape[0], candidate_tokens.shape[1], candidate_tokens.shape[-1]
    size = 1 + depth * k if mode == "backbone" else budget
    new = candidate_tokens.new_empty
    return (new((batch, size)), new((batch, size)), new((batch, size)),
            new((batch, size), dtype=torch.float32), new((batch, size, (size + 31) // 32), dtype=torch.int32),
            new((batch, size, depth + 1)), new((batch,)))


def _verify_fake(node_tokens):
    batch, size = node_tokens.shape
    return node_tokens.new_empty((batch, size)), node_tokens.new_empty((batch,)), node_tokens.new_empty((batch,))


@torch.library.register_fake("specx::verify_greedy")
def _verify_greedy_fake(node_tokens, parents, num_nodes, target):
    return _verify_fake(node_tokens)


@torch.library.register_fake("specx::verify_sample")
def _verify_sample_fake(node_tokens, parents, num_nodes, target_logits, draft_probs, temperature, top_p, seed,
                        offset):
    return _verify_fake(node_tokens)


@torch.library.register_fake("specx::compact_kv")
def _compact_kv_fake(k_cache, v_cache, lengths, accepted_nodes, accept_len):
    return None


# ---------------------------------------------------------------------------------------------
# DeepKD
# ---------------------------------------------------------------------------------------------

topk_threshold = torch.ops.specx.topk_threshold
deepkd_losses = torch.ops.specx.deepkd_losses
deepkd_sgd_step_ = torch.ops.specx.deepkd_sgd_step_
__all__ += ["topk_threshold", "deepkd_losses", "deepkd_sgd_step_", "eager_deepkd_losses"]


@torch.library.register_fake("specx::topk_threshold")
def _topk_threshold_fake(logits, k):
    lead = _leading_shape(logits)
    return logits.new_empty(lead), logits.new_empty(lead, dtype=torch.int64)


@torch.library.register_fake("specx::deepkd_losses")
def _deepkd_losses_fake(student_logits, teacher_logits, target, k, temperature, ignore_index, compute_grad):
    losses = tuple(student_logits.new_empty((), dtype=torch.float32) for _ in range(3))
    grads = tuple(student_logits.new_empty(student_logits.shape if compute_grad else (0,)) for _ in range(3))
    return losses + grads


@torch.library.register_fake("specx::deepkd_sgd_step_")
def _deepkd_sgd_step_fake(params, grads_task, grads_tckd, grads_nckd, task_buffers, tckd_buffers, nckd_buffers,
                          lr, momentum, delta, weight_decay):
    return None


def _is_traced(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))
            or torch._is_functional_tensor(t))


def _deepkd_losses_setup_context(ctx, inputs, output):
    student, teacher, target, k, temperature, ignore_index, compute_grad = inputs
    grads = output[3:]
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)  # a loss that is not backpropagated arrives as None, not zeros
    ctx.save_for_backward(student, teacher, target, *grads)
    ctx.loss_args = (k, temperature, ignore_index)
    # Each stored gradient is scaled in place by the first backward that reaches its loss; a
    # second backward of the same loss (retain_graph=True) recomputes it instead.
    ctx.stored_grad_fresh = [compute_grad] * 3


def _deepkd_losses_backward(ctx, grad_ce, grad_tckd, grad_nckd, _grad_ce, _grad_tckd, _grad_nckd):
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    student, teacher, target, *stored = ctx.saved_tensors
    total = None
    for i, scale in enumerate((grad_ce, grad_tckd, grad_nckd)):
        if scale is None:
            continue
        grad = stored[i]
        if not ctx.stored_grad_fresh[i]:
            grad = deepkd_losses(student, teacher, target, *ctx.loss_args, True)[3 + i]
        ctx.stored_grad_fresh[i] = False
        if _is_traced(grad):
            # Under torch.compile / AOT tracing, in-place scaling of several op outputs trips the
            # partitioner; the compiler can fuse this product into the consumer instead.
            grad = grad * scale
        else:
            # In place, so the usual d(loss) == 1 costs no pass (the CUDA kernel returns at once).
            with torch.autograd._unsafe_preserve_version_counter(grad):
                torch.ops.specx.scale_grad_(grad, scale.float())
        total = grad if total is None else total + grad
    if total is None:
        total = torch.zeros_like(student)
    return (total,) + (None,) * 6


eager_deepkd_losses = _register_autograd(torch.ops.specx.deepkd_losses.default, _deepkd_losses_backward,
                                         _deepkd_losses_setup_context)
