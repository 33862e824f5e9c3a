"""specx.distill.DeepKDOptimizer against a plain-PyTorch implementation of the paper's equations
(reference.deepkd_sgd_step), the pinned difference from the released DeepKD code, state_dict round
trips, and the training-step helper."""

import copy

import pytest
import torch
from torch import nn

import specx
from specx import reference
from specx.distill import DeepKDOptimizer, deepkd_losses, deepkd_train_step
from conftest import DEVICES, requires_cuda

LR, MOMENTUM, DELTA = 0.05, 0.9, 0.075


def make_mlp(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 10)).to(device=device, dtype=dtype)


def make_batch(step, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 12, generator=gen)
    teacher_logits = torch.randn(16, 10, generator=gen) * 2
    target = torch.randint(0, 10, (16,), generator=gen)
    target[::7] = -100
    return x.to(device, dtype), teacher_logits.to(device, dtype), target.to(device)


def three_grads(model, x, teacher_logits, target, k):
    """Each loss's parameter gradients, from three separate backward passes."""
    params = list(model.parameters())
    losses = deepkd_losses(model(x), teacher_logits, target, k=k)
    grads = []
    for i, loss in enumerate(losses):
        for p in params:
            p.grad = None
        loss.backward(retain_graph=i < 2)
        grads.append([p.grad.clone() for p in params])
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 5e-3])
def test_matches_paper_equations_over_20_steps(device, weight_decay):
    model = make_mlp(device)
    ref_model = copy.deepcopy(model)
    opt = DeepKDOptimizer(model.parameters(), lr=LR, momentum=MOMENTUM, delta=DELTA, weight_decay=weight_decay)
    ref_buffers = [[torch.zeros_like(p) for _ in range(3)] for p in ref_model.parameters()]
    for step in range(20):
        x, teacher_logits, target = make_batch(step, device)
        k = specx.distill.dtm_k(step, 20, 10, start_frac=0.3)
        opt.backward_and_step(*deepkd_losses(model(x), teacher_logits, target, k=k))
        grads = three_grads(ref_model, x, teacher_logits, target, k)
        reference.deepkd_sgd_step(list(ref_model.parameters()), *grads, ref_buffers, lr=LR, momentum=MOMENTUM,
                                  delta=DELTA, weight_decay=weight_decay)
        for p, ref_p in zip(model.parameters(), ref_model.parameters()):
            assert (p - ref_p).abs().max().item() <= 1e-6, step
            assert p.grad is None
    for p, bufs in zip(model.parameters(), ref_buffers):
        state = opt.state[p]
        for name, ref_buf in zip(("task_buffer", "tckd_buffer", "nckd_buffer"), bufs):
            assert (state[name] - ref_buf).abs().max().item() <= 1e-6


def released_deepkd_step(p, grads, buffers, *, lr, momentum, delta, weight_decay):
    """The update of the released DeepKD code (haiduo/DeepKD, mdistiller/engine/deepkd.py), for a
    parameter that has all three gradients: three sequential updates, the task buffer decaying with
    the target-class momentum, weight decay only in the target-class pass (after the other two)."""
    g_task, g_tckd, g_nckd = grads
    v_task, v_tckd, v_nckd = buffers
    v_task.mul_(momentum - delta).add_(g_task)
    p.sub_(v_task, alpha=lr)
    v_nckd.mul_(momentum + delta).add_(g_nckd)
    p.sub_(v_nckd, alpha=lr)
    v_tckd.mul_(momentum - delta).add_(g_tckd.add(p, alpha=weight_decay))
    p.sub_(v_tckd, alpha=lr)


@pytest.mark.parametrize("device", DEVICES)
def test_follows_paper_not_released_code(device):
    """Pins our choice: the paper's equations (task momentum m + delta, weight decay with the task
    gradient, one combined update), which the released code does not implement."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, generator=gen)
    grads = [[torch.randn(64, generator=gen) for _ in range(3)] for _ in range(6)]
    kw = dict(lr=0.1, momentum=MOMENTUM, delta=DELTA, weight_decay=0.05)
    ours = p0.clone().to(device)
    opt = DeepKDOptimizer([ours], **kw)
    paper, released = p0.clone(), p0.clone()
    paper_bufs = [[torch.zeros(64) for _ in range(3)]]
    released_bufs = [torch.zeros(64) for _ in range(3)]
    for g in grads:
        opt.step(*([gi.to(device)] for gi in g))
        reference.deepkd_sgd_step([paper], *([gi] for gi in g), paper_bufs, **kw)
        released_deepkd_step(released, g, released_bufs, **kw)
    assert (ours.cpu() - paper).abs().max().item() <= 1e-6
    assert (ours.cpu() - released).abs().max().item() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip(device):
    model = make_mlp(device)
    opt = DeepKDOptimizer(model.parameters(), lr=LR, weight_decay=1e-3)
    for step in range(5):
        x, teacher_logits, target = make_batch(step, device)
        opt.backward_and_step(*deepkd_losses(model(x), teacher_logits, target, k=5))
    saved = copy.deepcopy(opt.state_dict())
    clone = copy.deepcopy(model)
    clone_opt = DeepKDOptimizer(clone.parameters(), lr=1.0)  # hyperparameters come from the state dict
    clone_opt.load_state_dict(saved)
    assert clone_opt.param_groups[0]["lr"] == LR
    for step in range(5, 10):
        x, teacher_logits, target = make_batch(step, device)
        opt.backward_and_step(*deepkd_losses(model(x), teacher_logits, target, k=5))
        clone_opt.backward_and_step(*deepkd_losses(clone(x), teacher_logits, target, k=5))
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), clone.parameters()):
        for name in ("task_buffer", "tckd_buffer", "nckd_buffer"):
            assert torch.equal(opt.state[p][name], clone_opt.state[q][name])


@pytest.mark.parametrize("device", DEVICES)
def test_missing_gradients(device):
    a = torch.ones(5, device=device)
    b = torch.ones(3, device=device)
    opt = DeepKDOptimizer([a, b], lr=0.5, momentum=0.5, delta=0.1)
    opt.step([torch.ones(5, device=device), None], [None, None], [2 * torch.ones(5, device=device), None])
    assert torch.allclose(a.cpu(), torch.full((5,), 1 - 0.5 * 3))
    assert torch.equal(b.cpu(), torch.ones(3)) and len(opt.state[b]) == 0
    with pytest.raises(ValueError, match="entries"):
        opt.step([None], [None], [None])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params(device, dtype):
    gen = torch.Generator().manual_seed(1)
    p32 = torch.randn(1000, generator=gen)
    p = p32.to(device, dtype)
    opt = DeepKDOptimizer([p], lr=0.01, weight_decay=0.01)
    bufs = [[torch.zeros(1000) for _ in range(3)]]
    for _ in range(3):
        g = [torch.randn(1000, generator=gen).to(dtype) for _ in range(3)]
        opt.step(*([gi.to(device)] for gi in g))
        reference.deepkd_sgd_step([p32], *([gi.float()] for gi in g), bufs, lr=0.01, momentum=MOMENTUM,
                                  delta=DELTA, weight_decay=0.01)
    assert p.dtype == dtype and opt.state[p]["task_buffer"].dtype == dtype
    torch.testing.assert_close(p.float().cpu(), p32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_and_non_contiguous(device):
    """One step over fp32, bf16 and a non-contiguous parameter (the tensor-op fallback)."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(300, generator=gen), torch.randn(40, 7, generator=gen).t(),
              torch.randn(257, generator=gen).bfloat16()]
    params = [p.to(device) for p in params]
    expected = [p.float().cpu().clone() for p in params]
    grads = [[torch.randn(p.shape, generator=gen).to(p.dtype).to(device) for p in params] for _ in range(3)]
    opt = DeepKDOptimizer(params, lr=0.1, weight_decay=0.01)
    bufs = [[torch.zeros(p.shape) for _ in range(3)] for p in params]
    for _ in range(2):
        opt.step(*grads)
        reference.deepkd_sgd_step(expected, *([g.float().cpu() for g in gs] for gs in grads), bufs, lr=0.1,
                                  momentum=MOMENTUM, delta=DELTA, weight_decay=0.01)
    for p, e in zip(params, expected):
        tol = 1e-6 if p.dtype == torch.float32 else 3e-2
        torch.testing.assert_close(p.float().cpu(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_train_step_helper(device):
    student, teacher = make_mlp(device, seed=0), make_mlp(device, seed=1)
    opt = DeepKDOptimizer(student.parameters(), lr=0.1)
    before = [p.clone() for p in student.parameters()]
    x, _, target = make_batch(0, device)
    losses = deepkd_train_step(student, teacher, x, target, opt, k=4, weights=(1.0, 1.0, 2.0))
    assert set(losses) == {"ce", "tckd", "nckd"} and all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(p, b) for p, b in zip(student.parameters(), before))
    assert all(p.grad is None for p in teacher.parameters())


@requires_cuda
def test_cuda_matches_cpu_many_tensors():
    gen = torch.Generator().manual_seed(3)
    shapes = [(1,), (33,), (32768,), (32769,), (100, 1000), (3, 5, 7)]
    cpu = [torch.randn(s, generator=gen) for s in shapes]
    gpu = [p.cuda() for p in cpu]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    opt_cpu, opt_gpu = DeepKDOptimizer(cpu, lr=0.1, weight_decay=0.01), DeepKDOptimizer(gpu, lr=0.1, weight_decay=0.01)
    for _ in range(3):
        opt_cpu.step(*grads)
        opt_gpu.step(*([g.cuda() for g in gs] for gs in grads))
    for c, g in zip(cpu, gpu):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    params = [torch.randn(10, device=device), torch.randn(3, 4, device=device)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    grads[1][0] = None
    bufs = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    torch.library.opcheck(torch.ops.specx.deepkd_sgd_step_, (params, *grads, *bufs, 0.1, 0.9, 0.075, 0.01))


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        DeepKDOptimizer([torch.zeros(2)], lr=-1.0)
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.specx.deepkd_sgd_step_([p], [torch.zeros(5)], [None], [None], [torch.zeros(4)],
                                         [torch.zeros(4)], [torch.zeros(4)], 0.1, 0.9, 0.075, 0.0)
