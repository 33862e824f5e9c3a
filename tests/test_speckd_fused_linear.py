import pytest
import torch

import specx
from conftest import DEVICES, rel_err, requires_cuda

KW = dict(divergence="jsd", gate="topk", k=3, temperature=1.3, reject_weight=0.2, jsd_beta=0.4)


def make_inputs(rows, hs, ht, vocab, dtype, device, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t_w = torch.randn(vocab, ht, generator=gen) / ht ** 0.5
    s_w = torch.randn(vocab, hs, generator=gen) / hs ** 0.5
    s_h = torch.randn(rows, hs, generator=gen) * 2
    t_h = torch.randn(rows, ht, generator=gen) * 2
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.25] = -100
    s_b = torch.randn(vocab, generator=gen) * 0.1 if bias else None
    t_b = torch.randn(vocab, generator=gen) * 0.1 if bias else None
    cast = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return cast(s_h), cast(s_w), cast(t_h), cast(t_w), labels.to(device), cast(s_b), cast(t_b)


def fused_and_materialized(s_h, s_w, t_h, t_w, labels, s_b, t_b, chunk_rows, loss_scale=1.0, **kw):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (s_h, s_w, s_b)]
    loss = specx.distill.speckd_fused_linear_loss(leaves[0], leaves[1], t_h, t_w, labels, student_bias=leaves[2],
                                                  teacher_bias=t_b, chunk_rows=chunk_rows, **kw)
    g = (torch.rand_like(loss) + 0.5) * loss_scale
    (loss * g).sum().backward()
    ref_leaves = [x.detach().float().clone().requires_grad_(True) if x is not None else None for x in (s_h, s_w, s_b)]
    s_logits = ref_leaves[0] @ ref_leaves[1].t() + (ref_leaves[2] if s_b is not None else 0)
    t_logits = t_h.float() @ t_w.float().t() + (t_b.float() if t_b is not None else 0)
    ref = specx.distill.speckd_loss(s_logits, t_logits, labels, **kw)
    (ref * g).sum().backward()
    return loss, ref, leaves, ref_leaves


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "accepted", "none"])
@pytest.mark.parametrize("gate", ["none", "topk", "spec"])
def test_fp32_matches_materialized_logits(device, bias, reduction, gate):
    inputs = make_inputs(10, 24, 40, 300, torch.float32, device, bias=bias)
    kw = {**KW, "gate": gate, "reduction": reduction}
    loss, ref, leaves, ref_leaves = fused_and_materialized(*inputs, chunk_rows=3, **kw)  # partial last chunk
    assert rel_err(loss, ref) <= 1e-5
    for got, want in zip(leaves, ref_leaves):
        if got is not None:
            assert rel_err(got.grad, want.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_auto_chunk_and_stats(device):
    inputs = make_inputs(33, 16, 16, 70, torch.float32, device)
    loss, stats = specx.distill.speckd_fused_linear_loss(*inputs[:5], return_stats=True)
    s_logits = inputs[0] @ inputs[1].t()
    t_logits = inputs[2] @ inputs[3].t()
    ref, ref_stats = specx.distill.speckd_loss(s_logits, t_logits, inputs[4], return_stats=True)
    assert rel_err(loss, ref) <= 1e-5
    assert stats["acceptance_rate"].item() == ref_stats["acceptance_rate"].item()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cuda(dtype):
    inputs = make_inputs(300, 256, 512, 5000, dtype, "cuda", bias=True)
    # fp16 training scales the loss (these gradients are ~1e-6, subnormal in fp16); the scale
    # must reach the gradients before they are rounded to fp16.
    loss_scale = 4096.0 if dtype == torch.float16 else 1.0
    loss, ref, leaves, ref_leaves = fused_and_materialized(*inputs, chunk_rows=128, loss_scale=loss_scale, **KW)
    assert rel_err(loss, ref) <= 1e-3
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) <= 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_retain_graph_second_backward(device):
    s_h, s_w, t_h, t_w, labels, _, _ = make_inputs(8, 12, 12, 50, torch.float32, device)
    s_h.requires_grad_(True)
    loss = specx.distill.speckd_fused_linear_loss(s_h, s_w, t_h, t_w, labels, chunk_rows=3)
    loss.backward(retain_graph=True)
    first = s_h.grad.clone()
    s_h.grad = None
    (2 * loss).backward()
    assert torch.allclose(s_h.grad, 2 * first, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_tied_frozen_and_autocast(device):
    s_h, s_w, t_h, t_w, labels, _, _ = make_inputs(6, 16, 20, 40, torch.float32, device)
    # Tied embeddings: the LM head is the input embedding, so both paths add into one grad.
    emb = torch.nn.Embedding(40, 16).to(device)
    emb.weight.data.copy_(s_w)
    tokens = torch.randint(0, 40, (6,), device=device)
    hidden = emb(tokens) + s_h
    specx.distill.speckd_fused_linear_loss(hidden, emb.weight, t_h, t_w, labels).backward()
    assert emb.weight.grad is not None and torch.isfinite(emb.weight.grad).all()
    # Frozen head: only the hidden states get a gradient.
    h = s_h.clone().requires_grad_(True)
    specx.distill.speckd_fused_linear_loss(h, s_w, t_h, t_w, labels).backward()
    assert h.grad is not None and s_w.grad is None
    # Under autocast the loss still comes from fp32 logits of the fp32 operands.
    h2 = s_h.clone().requires_grad_(True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = specx.distill.speckd_fused_linear_loss(h2, s_w, t_h, t_w, labels)
    loss.backward()
    assert torch.allclose(h2.grad, h.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    s_h, s_w, t_h, t_w, labels, _, _ = make_inputs(4, 8, 8, 30, torch.float32, device)
    f = specx.distill.speckd_fused_linear_loss
    with pytest.raises(ValueError, match="30 rows.*29"):
        f(s_h, s_w, t_h, t_w[:29])
    with pytest.raises(ValueError, match="student_hidden"):
        f(s_h[:, :7], s_w, t_h, t_w)
    with pytest.raises(ValueError, match="leading shape"):
        f(s_h, s_w, t_h[:3], t_w)
    with pytest.raises(ValueError, match="chunk_rows"):
        f(s_h, s_w, t_h, t_w, chunk_rows=0)
    with pytest.raises(ValueError, match="student_bias"):
        f(s_h, s_w, t_h, t_w, student_bias=torch.zeros(3, device=device))


def test_readme_example_with_tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "hidden_size": 48,
                                                                       "tie_word_embeddings": False}))
    input_ids = torch.randint(0, 128, (2, 12))
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt tokens: no loss, as in TRL
    # The final norm's output: the input of the LM head.
    s_hidden = student.model(input_ids).last_hidden_state
    with torch.no_grad():
        t_hidden = teacher.model(input_ids).last_hidden_state
    loss = specx.distill.speckd_fused_linear_loss(
        s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight, labels,
        divergence="fkl", gate="topk", k=5, temperature=2.0)
    loss.backward()
    assert student.lm_head.weight.grad is not None and student.model.layers[0].mlp.up_proj.weight.grad is not None
    s_logits = student(input_ids).logits
    ref = specx.distill.speckd_loss(s_logits, teacher(input_ids).logits, labels, divergence="fkl", gate="topk", k=5,
                                    temperature=2.0)
    assert rel_err(loss, ref) <= 1e-5
