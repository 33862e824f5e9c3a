import math

import pytest
import torch

import specx
from specx import reference
from conftest import DEVICES, rel_err, requires_cuda

DIVERGENCES = ["fkl", "rkl", "jsd", "skl", "srkl"]
GATES = ["none", "topk", "spec"]
REDUCTIONS = ["mean", "sum", "accepted", "none"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_logits(rows, vocab, dtype, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, vocab, generator=gen) * scale
    student = teacher + torch.randn(rows, vocab, generator=gen) * scale
    labels = torch.randint(0, max(vocab, 1), (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.2] = -100
    return student.to(dtype).to(device), teacher.to(dtype).to(device), labels.to(device)


def check_against_reference(student, teacher, labels, *, atol=1e-6, **kw):
    dtype = student.dtype
    s = student.detach().clone().requires_grad_(True)
    loss, stats = specx.distill.speckd_loss(s, teacher, labels, return_stats=True, **kw)
    grad_out = torch.rand_like(loss) + 0.5 if loss.dim() else None
    (loss * grad_out).sum().backward() if grad_out is not None else loss.backward()

    s64 = student.detach().cpu().double().requires_grad_(True)
    ref_loss, ref_div, ref_acc = reference.speckd_loss(s64, teacher.cpu(), None if labels is None else labels.cpu(),
                                                       **kw)
    (ref_loss * grad_out.cpu().double()).sum().backward() if grad_out is not None else ref_loss.backward()

    tol = TOL[dtype]
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= tol or (loss.double().cpu() - ref_loss).abs().max() <= tol
    assert rel_err(s.grad, s64.grad) <= tol or (s.grad.double().cpu() - s64.grad).abs().max() <= atol
    valid = torch.ones_like(ref_acc) if labels is None else labels.cpu().reshape(-1).ne(kw.get("ignore_index", -100))
    expected_rate = (ref_acc & valid).double().sum() / valid.sum().clamp_min(1)
    assert abs(stats["acceptance_rate"].item() - expected_rate.item()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("gate", GATES)
def test_matches_reference(device, dtype, divergence, gate):
    shapes = [(7, 33), (3, 1), (0, 17), (5, 1000)]
    if device == "cuda":
        shapes += [(9, 50257), (4, 128256), (3, 151936)]
    for i, (rows, vocab) in enumerate(shapes):
        student, teacher, labels = make_logits(rows, vocab, dtype, device, seed=i)
        for reduction in REDUCTIONS:
            check_against_reference(student, teacher, labels, divergence=divergence, gate=gate, k=3,
                                    reduction=reduction, temperature=1.7, reject_weight=0.25, jsd_beta=0.3,
                                    skew=0.2, seed=11)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_shape_noncontiguous_and_fp16(device):
    student, teacher, labels = make_logits(24, 67, torch.float16, device)
    student = student.reshape(2, 12, 67).transpose(0, 1)  # non-contiguous, leading shape [12, 2]
    teacher = teacher.reshape(2, 12, 67).transpose(0, 1)
    labels = labels.reshape(2, 12).transpose(0, 1)
    for reduction in REDUCTIONS:
        check_against_reference(student, teacher, labels, divergence="fkl", gate="topk", reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_jsd_end_points_are_the_kls(device):
    student, teacher, _ = make_logits(6, 50, torch.float32, device)
    for beta, plain in [(0.0, "fkl"), (1.0, "rkl")]:
        a = specx.distill.speckd_loss(student, teacher, divergence="jsd", jsd_beta=beta, gate="none")
        b = specx.distill.speckd_loss(student, teacher, divergence=plain, gate="none")
        assert torch.allclose(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_gives_zero_not_nan(device):
    student, teacher, labels = make_logits(5, 40, torch.float32, device)
    labels[:] = -100
    student.requires_grad_(True)
    for reduction in ["mean", "accepted", "sum"]:
        student.grad = None
        loss, stats = specx.distill.speckd_loss(student, teacher, labels, reduction=reduction, return_stats=True)
        loss.backward()
        assert loss.item() == 0.0 and stats["acceptance_rate"].item() == 0.0
        assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits_stay_finite(device, dtype):
    student, teacher, _ = make_logits(4, 300, torch.float32, device, scale=1e4)
    student, teacher = student.to(dtype).requires_grad_(True), teacher.to(dtype)
    for divergence in DIVERGENCES:
        student.grad = None
        loss = specx.distill.speckd_loss(student, teacher, divergence=divergence, gate="none")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_tokens_count_as_absent(device, dtype, divergence):
    # Tokens that both models mask with -inf (a padded vocabulary) leave the loss and the other
    # tokens' gradients as if they were not there, and get no gradient themselves (0 log 0 = 0).
    student, teacher, _ = make_logits(6, 90, torch.float32, "cpu", seed=12)
    masked = torch.zeros(90, dtype=torch.bool)
    masked[::7] = True
    masked[80:] = True
    labels = torch.tensor([0, -100, 0, 0, -100, 0])
    for gate in GATES:
        def loss_and_grad(s, t):
            s = s.to(dtype).to(device).requires_grad_(True)
            loss = specx.distill.speckd_loss(s, t.to(dtype).to(device), labels.to(device), divergence=divergence,
                                             gate=gate, k=3, seed=5)
            loss.backward()
            return loss.double().cpu(), s.grad.double().cpu()

        loss_masked, grad_masked = loss_and_grad(student.masked_fill(masked, float("-inf")),
                                                 teacher.masked_fill(masked, float("-inf")))
        loss_kept, grad_kept = loss_and_grad(student[:, ~masked], teacher[:, ~masked])
        assert torch.allclose(loss_masked, loss_kept, rtol=1e-4, atol=1e-6), (gate, loss_masked, loss_kept)
        assert torch.equal(grad_masked[:, masked], torch.zeros_like(grad_masked[:, masked]))
        # bf16 gradients may round the other way where fp32 sums differ in order (another slicing).
        rtol = 1e-3 if dtype == torch.float32 else 1e-2
        assert torch.allclose(grad_masked[:, ~masked], grad_kept, rtol=rtol, atol=1e-6), gate


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["fkl", "jsd", "skl", "srkl"])
def test_teacher_kept_to_its_top_tokens(device, divergence):
    # Offline distillation often stores only the teacher's top logits and sets the rest to -inf.
    # Every divergence but rkl (infinite there) stays finite and matches the reference.
    student, teacher, labels = make_logits(6, 90, torch.float32, "cpu", seed=13)
    teacher = teacher.masked_fill(teacher < teacher.topk(20, dim=-1).values[:, -1:], float("-inf"))
    for gate in GATES:
        check_against_reference(student.to(device), teacher.to(device), labels.to(device), divergence=divergence,
                                gate=gate, k=3)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_gate_ties_take_lowest_index(device):
    # Student argmax ties between 1 and 3: index 1 wins; the teacher ranks index 1 third, index 3 first.
    student = torch.tensor([[0.0, 5.0, 1.0, 5.0]], device=device)
    teacher = torch.tensor([[3.0, 2.0, 1.0, 4.0]], device=device)
    _, acc2, _ = torch.ops.specx.speckd_rows(student, teacher, None, -100, "fkl", "topk", 2, 0.0, 1.0, 0.5, 0, 0,
                                             None, False)
    _, acc3, _ = torch.ops.specx.speckd_rows(student, teacher, None, -100, "fkl", "topk", 3, 0.0, 1.0, 0.5, 0, 0,
                                             None, False)
    assert not acc2.item() and acc3.item()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_scales_and_retains(device):
    student, teacher, labels = make_logits(6, 90, torch.float32, device)
    student.requires_grad_(True)
    loss = specx.distill.speckd_loss(student, teacher, labels, gate="none")
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    (loss * 3.0).backward()  # second backward over the same graph: recomputed, then scaled
    assert torch.allclose(student.grad, 3.0 * first, rtol=1e-5, atol=1e-8)


@requires_cuda
def test_cuda_fwd_bwd_allocates_only_the_gradient():
    # The gradient is computed in the forward and handed to autograd in the backward; nothing else
    # of [rows, vocab] size may be allocated (for example a zero "gradient" of that stored output).
    student, teacher, labels = make_logits(512, 32000, torch.bfloat16, "cuda")
    student.requires_grad_(True)
    grad_bytes = student.numel() * student.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    specx.distill.speckd_loss(student, teacher, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - grad_bytes
    assert extra < 1 << 20, f"{extra} bytes beyond the gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_names_the_argument(device):
    student, teacher, labels = make_logits(3, 10, torch.float32, device)
    f = specx.distill.speckd_loss
    cases = [
        (lambda: f(student, teacher[:, :9]), "same shape"),
        (lambda: f(student, teacher.double()), "same dtype"),
        (lambda: f(student, teacher, divergence="kl"), "divergence"),
        (lambda: f(student, teacher, gate="maybe"), "gate"),
        (lambda: f(student, teacher, reduction="avg"), "reduction"),
        (lambda: f(student, teacher, k=0), "k must"),
        (lambda: f(student, teacher, temperature=0.0), "temperature"),
        (lambda: f(student, teacher, reject_weight=1.5), "reject_weight"),
        (lambda: f(student, teacher, labels[:2]), "labels"),
        (lambda: f(student, teacher, labels.int()), "labels"),
        (lambda: f(student.int(), teacher.int()), "float32"),
    ]
    if device == "cuda":
        cases.append((lambda: f(student, teacher.cpu()), "same device"))
    for call, words in cases:
        with pytest.raises((ValueError, RuntimeError), match=words):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    student, teacher, labels = make_logits(5, 37, torch.float32, device)
    student.requires_grad_(True)
    base = (-100, "fkl", "topk", 2, 0.1, 1.5, 0.5)
    torch.library.opcheck(torch.ops.specx.speckd_rows,
                          (student.detach(), teacher, labels, *base, 3, 0, torch.tensor(0.5, device=device), True))
    torch.library.opcheck(torch.ops.specx.speckd_loss, (student, teacher, labels, *base, "mean", 3, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    torch.library.opcheck(torch.ops.specx.scale_grad_,
                          (torch.randn(4, 6, device=device), torch.tensor(2.0, device=device)))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    student, teacher, labels = make_logits(8, 64, torch.float32, device)

    def step(s, t, l):
        loss, stats = specx.distill.speckd_loss(s, t, l, divergence="jsd", gate="spec", return_stats=True)
        return loss * 2.0, stats["acceptance_rate"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    loss1, rate1 = compiled(s1, teacher, labels)
    loss1.backward()
    loss2, rate2 = step(s2, teacher, labels)
    loss2.backward()
    assert torch.allclose(loss1, loss2) and torch.equal(rate1, rate2)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_spec_gate_acceptance_rate_matches_theory(device):
    # Every row has the same p and q; rows differ only in their random numbers.
    rows, vocab, k = 20000, 12, 3
    gen = torch.Generator().manual_seed(5)
    s_row, t_row = torch.randn(vocab, generator=gen) * 2, torch.randn(vocab, generator=gen) * 2
    student = s_row.expand(rows, vocab).contiguous().to(device)
    teacher = t_row.expand(rows, vocab).contiguous().to(device)
    _, accepted, _ = torch.ops.specx.speckd_rows(student, teacher, None, -100, "fkl", "spec", k, 0.0, 1.0, 0.5, 123,
                                                 0, None, False)
    overlap = torch.minimum(torch.softmax(s_row.double(), 0), torch.softmax(t_row.double(), 0)).sum().item()
    expected = 1 - (1 - overlap) ** k
    observed = accepted.double().mean().item()
    sigma = math.sqrt(expected * (1 - expected) / rows)
    assert abs(observed - expected) < 5 * sigma, (observed, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_spec_gate_independent_of_chunking(device):
    student, teacher, _ = make_logits(64, 500, torch.float32, device)
    args = (None, -100, "fkl", "spec", 2, 0.0, 1.3, 0.5, 99)
    _, whole, _ = torch.ops.specx.speckd_rows(student, teacher, *args, 0, None, False)
    parts = [torch.ops.specx.speckd_rows(student[i:i + 5], teacher[i:i + 5], *args, i, None, False)[1]
             for i in range(0, 64, 5)]
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(whole.cpu(), reference.spec_gate(student, teacher, k=2, temperature=1.3, seed=99).cpu())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 33, 4096, 50257, 151936, 262144])
def test_cpu_and_cuda_gates_agree(dtype, vocab):
    rows = 40 if vocab < 100000 else 6
    student, teacher, labels = make_logits(rows, vocab, dtype, "cpu", seed=vocab)
    for gate in ["topk", "spec"]:
        args = (-100, "rkl", gate, 4, 0.0, 0.9, 0.5, 2024, 0, None, True)
        div_c, acc_c, grad_c = torch.ops.specx.speckd_rows(student, teacher, labels, *args)
        div_g, acc_g, grad_g = torch.ops.specx.speckd_rows(student.cuda(), teacher.cuda(), labels.cuda(), *args)
        assert torch.equal(acc_c, acc_g.cpu())
        assert rel_err(div_g, div_c) < TOL[dtype] and rel_err(grad_g, grad_c) < TOL[dtype]


@requires_cuda
@pytest.mark.parametrize("k", [1, 7, 40])
def test_cpu_and_cuda_spec_gates_agree_for_peaked_students(k):
    # A peaked student puts most proposals in one warp's chunk; k = 40 takes two rounds of draws.
    student, teacher, labels = make_logits(64, 50257, torch.bfloat16, "cpu", seed=k)
    student = (student.float() * 4).bfloat16()
    args = (-100, "fkl", "spec", k, 0.0, 1.0, 0.5, 7, 0, None, False)
    acc_c = torch.ops.specx.speckd_rows(student, teacher, labels, *args)[1]
    acc_g = torch.ops.specx.speckd_rows(student.cuda(), teacher.cuda(), labels.cuda(), *args)[1]
    assert torch.equal(acc_c, acc_g.cpu())


@requires_cuda
def test_cuda_large_rows_all_paths():
    # fp32 at vocab 262144 needs more shared memory than a cluster has: the uncached path.
    for dtype, vocab in [(torch.float32, 262144), (torch.bfloat16, 262144), (torch.float32, 100003)]:
        student, teacher, labels = make_logits(3, vocab, dtype, "cuda", seed=vocab)
        check_against_reference(student, teacher, labels, divergence="jsd", gate="spec", k=2)
