"""One launch of each hot CUDA kernel at its benchmark shape, for Nsight Compute:

    ncu --set full -k regex:"speckd_rows_kernel|topk_threshold_kernel|deepkd_rows_kernel|tree_attention_kernel|verify_sample_kernel" \
        --launch-count 8 -o hot python benchmarks/profile_hot_kernels.py

Each op runs once (no warm-up), so `--launch-count` covers every kernel of interest.
"""
import torch

import specx
import specx.decode
from specx.bench.tree_attention import random_tree_mask
from specx.bench.tree_ops import random_parents

dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
rows, vocab = 8192, 128256
teacher = torch.randn(rows, vocab, device=dev, dtype=torch.bfloat16, generator=g) * 2
student = (teacher.float() + torch.randn(rows, vocab, device=dev, generator=g)).bfloat16()
labels = torch.randint(0, vocab, (rows,), device=dev, generator=g)
for gate in ("topk", "spec"):
    torch.ops.specx.speckd_rows(student, teacher, None, -100, "fkl", gate, 5, 0.0, 1.0, 0.5, 0, 0, None, True)
torch.ops.specx.topk_threshold(teacher, 6413)
s = student.detach().requires_grad_()
ce, tckd, nckd = specx.distill.deepkd_losses(s, teacher, labels, k=6413)
(ce + tckd + nckd).backward()
cpu = torch.Generator().manual_seed(0)
for b, kv, t in [(16, 4096, 64), (1, 4096, 64)]:
    q = torch.randn(b, t, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, kv + t, 8, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    lens = torch.full((b,), kv, dtype=torch.int32, device=dev)
    specx.decode.tree_attention(q, k, v, lens, random_tree_mask(b, t, cpu).to(dev))
parents = random_parents(16, 64, cpu).to(dev)
logits = (3 * torch.randn(16, 64, vocab, device=dev)).bfloat16()
tokens = logits.float().argmax(-1).gather(1, parents.clamp_min(0))
specx.decode.verify_sample(tokens, parents, logits, temperature=0.8, top_p=0.9, check=False)
torch.cuda.synchronize(); print("profile script done")
