"""specx.distill.deepkd_losses (fused CE / TCKD / top-k NCKD and their separate gradients) against
reference.py in float64, and dtm_k."""

import pytest
import torch

import specx
from specx import reference
from conftest import DEVICES, rel_err, requires_cuda

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_inputs(rows, classes, dtype, device, *, seed=0, scale=3.0, ties=False, ignore_frac=0.2):
    gen = torch.Generator().manual_seed(seed)
    if ties:  # a handful of distinct teacher values: many ties at the top-k threshold
        teacher = torch.randint(-4, 5, (rows, classes), generator=gen).float()
    else:
        teacher = torch.randn(rows, classes, generator=gen) * scale
    student = teacher + torch.randn(rows, classes, generator=gen) * scale
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[torch.rand(rows, generator=gen) < ignore_frac] = -100
    return student.to(dtype).to(device), teacher.to(dtype).to(device), target.to(device)


def check_against_reference(student, teacher, target, **kw):
    """Losses and each loss's own gradient (backpropagated separately) against float64."""
    tol = TOL[student.dtype]
    s = student.detach().clone().requires_grad_(True)
    losses = specx.distill.deepkd_losses(s, teacher, target, **kw)
    s64 = student.detach().cpu().double().requires_grad_(True)
    ref = reference.deepkd_losses(s64, teacher.cpu(), target.cpu(), **kw)
    for i, (loss, ref_loss) in enumerate(zip(losses, ref)):
        assert loss.shape == () and loss.dtype == torch.float32
        assert torch.isfinite(loss)
        assert rel_err(loss, ref_loss) <= tol or abs(loss.item() - ref_loss.item()) <= tol, (i, loss, ref_loss)
        s.grad, s64.grad = None, None
        weight = 0.75 + i  # a grad_output other than 1 takes the scaling path
        (loss * weight).backward(retain_graph=True)
        (ref_loss * weight).backward(retain_graph=True)
        assert rel_err(s.grad, s64.grad) <= tol or (s.grad.double().cpu() - s64.grad).abs().max() <= 1e-6, i
    return losses, s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(device, dtype, ties):
    shapes = [(7, 33), (3, 2), (0, 17), (5, 1000), (4, 1)]
    if device == "cuda":
        shapes += [(9, 50257), (4, 128256), (3, 151936), (2, 300000)]
    for i, (rows, classes) in enumerate(shapes):
        student, teacher, target = make_inputs(rows, classes, dtype, device, seed=i, ties=ties)
        for k in sorted({1, max(1, classes // 20), classes}) + [None]:
            check_against_reference(student, teacher, target, k=k, temperature=4.0 if i % 2 else 2.5)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims_and_non_contiguous(device):
    student, teacher, target = make_inputs(12, 40, torch.float32, device, seed=3)
    student3 = student.reshape(3, 4, 40)
    teacher_t = teacher.t().contiguous().t()  # same values, column-major strides
    check_against_reference(student3, teacher_t.reshape(3, 4, 40), target.reshape(3, 4), k=7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_excludes_non_kept_exactly(device, dtype):
    """The NCKD gradient is exactly zero outside the kept set (teacher top-k, lowest index first
    among ties, minus the target), so CPU and CUDA apply the same mask."""
    rows, classes, k = 16, 300 if device == "cpu" else 70000, 37
    student, teacher, target = make_inputs(rows, classes, dtype, device, seed=5, ties=True, ignore_frac=0.0)
    s = student.detach().clone().requires_grad_(True)
    _, _, nckd = specx.distill.deepkd_losses(s, teacher, target, k=k)
    nckd.backward()
    kept = reference.topk_mask(teacher.cpu(), k)
    kept[torch.arange(rows), target.cpu()] = False
    assert kept.sum(-1).le(k).all() and kept.sum(-1).ge(k - 1).all()
    assert (s.grad.cpu()[~kept] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_few_ties_cut_anywhere(device):
    """A few ties with the threshold at random places, of which only some are kept: on the GPU the
    cut lands inside a block's slice, at a warp's chunk boundary, or between two blocks."""
    rows, classes, above, ties = 64, 3000 if device == "cpu" else 128256, 20, 4
    gen = torch.Generator().manual_seed(11)
    teacher = torch.randn(rows, classes, generator=gen)
    for r in range(rows):
        at = torch.randperm(classes, generator=gen)[: above + ties]
        teacher[r, at[:above]] = 60.0 + torch.arange(above).float()  # distinct, exact in bf16
        teacher[r, at[above:]] = 50.0
    student = teacher + torch.randn(rows, classes, generator=gen)
    target = torch.randint(0, classes, (rows,), generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        s, t = student.to(dtype).to(device), teacher.to(dtype).to(device)
        for kept_ties in range(1, ties + 1):
            check_against_reference(s, t, target.to(device), k=above + kept_ties, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_ignored_and_empty(device):
    student, teacher, _ = make_inputs(4, 9, torch.float32, device)
    target = torch.full((4,), -1, device=device)
    s = student.clone().requires_grad_(True)
    losses = specx.distill.deepkd_losses(s, teacher, target, ignore_index=-1, k=3)
    assert all(loss.item() == 0.0 for loss in losses)
    sum(losses).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    empty = torch.empty(0, 9, device=device, requires_grad=True)
    losses = specx.distill.deepkd_losses(empty, empty.detach(), torch.empty(0, dtype=torch.long, device=device))
    assert all(loss.item() == 0.0 for loss in losses)


@pytest.mark.parametrize("device", DEVICES)
def test_huge_logits(device):
    student, teacher, target = make_inputs(6, 50, torch.float32, device, seed=7, scale=1e3, ignore_frac=0.0)
    check_against_reference(student, teacher, target, k=5, temperature=1.0)
    check_against_reference(student, teacher, target, k=None, temperature=4.0)
    if device == "cuda":  # rows over many blocks: K's student sum underflows under N's maximum
        for dtype in (torch.float32, torch.bfloat16):
            student, teacher, target = make_inputs(3, 50257, dtype, device, seed=8, scale=1e3, ignore_frac=0.0)
            check_against_reference(student, teacher, target, k=2500, temperature=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_separate_backward_passes_and_repeats(device):
    """ce, tckd, nckd backpropagated one after the other, one of them twice (recompute path)."""
    student, teacher, target = make_inputs(5, 64, torch.float32, device, seed=9)
    s = student.clone().requires_grad_(True)
    s64 = student.cpu().double().requires_grad_(True)
    ce, tckd, nckd = specx.distill.deepkd_losses(s, teacher, target, k=10)
    ref = reference.deepkd_losses(s64, teacher.cpu(), target.cpu(), k=10)
    for loss, ref_loss in [(ce, ref[0]), (tckd, ref[1]), (nckd, ref[2]), (tckd, ref[1])]:
        s.grad, s64.grad = None, None
        loss.backward(retain_graph=True)
        ref_loss.backward(retain_graph=True)
        assert rel_err(s.grad, s64.grad) <= 2e-5
    # All three at once: the sum of the three gradients.
    s.grad, s64.grad = None, None
    (ce + 2 * tckd + nckd).backward()
    (ref[0] + 2 * ref[1] + ref[2]).backward()
    assert rel_err(s.grad, s64.grad) <= 2e-5


@pytest.mark.parametrize("device", DEVICES)
def test_one_pass_serves_three_backwards(device, monkeypatch):
    """The three separate backward passes reuse the gradients of the forward's fused pass."""
    calls = []
    op = specx.ops.deepkd_losses
    monkeypatch.setattr(specx.ops, "deepkd_losses", lambda *a: calls.append(1) or op(*a))
    student, teacher, target = make_inputs(5, 64, torch.float32, device, seed=2)
    s = student.clone().requires_grad_(True)
    losses = specx.distill.deepkd_losses(s, teacher, target, k=6)
    grads = [torch.autograd.grad(loss, s, retain_graph=i < 2)[0] for i, loss in enumerate(losses)]
    assert calls == []
    assert not torch.equal(grads[0], grads[1]) and not torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_forward(device):
    student, teacher, target = make_inputs(5, 30, torch.float32, device)
    with torch.no_grad():
        losses = specx.distill.deepkd_losses(student, teacher, target, k=4)
    ref = reference.deepkd_losses(student.cpu(), teacher.cpu(), target.cpu(), k=4)
    for loss, ref_loss in zip(losses, ref):
        assert rel_err(loss, ref_loss) <= 2e-5


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    student, teacher, target = make_inputs(8, 64, torch.float32, device, ties=True)

    def step(s, t, y):
        ce, tckd, nckd = specx.distill.deepkd_losses(s, t, y, k=9)
        return ce + 0.5 * tckd + 2.0 * nckd

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    loss1 = compiled(s1, teacher, target)
    loss1.backward()
    loss2 = step(s2, teacher, target)
    loss2.backward()
    assert torch.allclose(loss1, loss2)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


def test_bad_arguments():
    student, teacher, target = make_inputs(3, 8, torch.float32, "cpu", ignore_frac=0.0)
    with pytest.raises(ValueError, match="k"):
        specx.distill.deepkd_losses(student, teacher, target, k=0)
    with pytest.raises(ValueError, match="k"):
        specx.distill.deepkd_losses(student, teacher, target, k=9)
    with pytest.raises(ValueError, match="target"):
        specx.distill.deepkd_losses(student, teacher, torch.tensor([0, 8, 1]))
    with pytest.raises(ValueError, match="target"):
        specx.distill.deepkd_losses(student, teacher, target.int())
    with pytest.raises(ValueError, match="shape"):
        specx.distill.deepkd_losses(student, teacher[:, :4], target)
    with pytest.raises(ValueError, match="temperature"):
        specx.distill.deepkd_losses(student, teacher, target, temperature=0.0)


@requires_cuda
def test_cuda_bad_target_is_nan():
    student, teacher, _ = make_inputs(3, 8, torch.float32, "cuda", ignore_frac=0.0)
    ce, _, _ = specx.distill.deepkd_losses(student, teacher, torch.tensor([0, 8, 1], device="cuda"))
    assert torch.isnan(ce)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_grad", [False, True])
def test_opcheck(device, compute_grad):
    student, teacher, target = make_inputs(6, 29, torch.float32, device, ties=True)
    student.requires_grad_(compute_grad)
    for k in (3, None):
        torch.library.opcheck(torch.ops.specx.deepkd_losses, (student, teacher, target, k, 4.0, -100, compute_grad))


def test_dtm_k():
    assert specx.distill.dtm_k(0, 100, 128256) == 6413
    assert specx.distill.dtm_k(100, 100, 128256) == 128256
    assert specx.distill.dtm_k(500, 100, 1000) == 1000
    assert specx.distill.dtm_k(50, 100, 1000) == 525
    assert specx.distill.dtm_k(0, 100, 10, start_frac=0.0) == 1
    ks = [specx.distill.dtm_k(step, 1000, 5000) for step in range(0, 1001, 50)]
    assert ks == sorted(ks) and ks[0] == 250 and ks[-1] == 5000
    with pytest.raises(ValueError):
        specx.distill.dtm_k(0, 10, 0)
