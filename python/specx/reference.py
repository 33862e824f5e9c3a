"""Plain-PyTorch versions of every specx op: readable, unfused, the ground truth of the tests.

Computed in float64 unless the op's contract fixes a narrower arithmetic (the ``spec`` gate's
deterministic sampling, which is defined in float32 / integer steps so that every device
agrees bit for bit).
"""

from __future__ import annotations

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# SpecKD
# ---------------------------------------------------------------------------------------------

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_SPEC_TAG = 0x53504B44  # "SPKD"
_FIXED_BITS = 40
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1, 1.0)


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al. 2011) on Python ints."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32)
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _uniform53(hi: int, lo: int) -> float:
    return ((hi << 32 | lo) >> 11) * 2.0 ** -53


def proposal_draw(seed: int, row: int, i: int) -> tuple[float, float]:
    """(pick, coin) uniforms of proposal ``i`` of global row ``row``."""
    seed &= (1 << 64) - 1
    r = philox4x32_10((row & _MASK32, row >> 32, i, _SPEC_TAG), (seed & _MASK32, seed >> 32))
    return _uniform53(r[0], r[1]), _uniform53(r[2], r[3])


def _det_exp(x: Tensor) -> tuple[Tensor, Tensor]:
    """exp(x) = mant * 2**exp2 for float32 x <= 0, using only separately rounded float32 ops."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    y = x * f32(1.44269504088896341)
    keep = y >= -100.0
    y = torch.where(keep, y, torch.zeros_like(y))
    n = torch.round(y)
    f = y - n
    mant = f32(_EXP2_POLY[0]).expand_as(f)
    for c in _EXP2_POLY[1:]:
        mant = mant * f + f32(c)
    return torch.where(keep, mant, torch.zeros_like(mant)), n.to(torch.int64)


def _det_scaled(v: Tensor, vmax: Tensor, inv_t: Tensor) -> tuple[Tensor, Tensor]:
    return _det_exp((v - vmax) * inv_t)


def det_weight(v: Tensor, vmax: Tensor, inv_t: Tensor) -> Tensor:
    """Fixed-point (2**-40) unnormalised probabilities, int64."""
    mant, exp2 = _det_scaled(v, vmax, inv_t)
    shift = exp2 + _FIXED_BITS
    w = torch.floor(mant.double() * torch.exp2(shift.clamp_min(0).double())).to(torch.int64)
    return torch.where(shift >= 0, w, torch.zeros_like(w))


_MASS_BITS = 31
_MASS_POLY = (1.867130748e-3, 9.017028846e-3, 5.579991266e-2, 2.401644439e-1, 6.931512952e-1, 1.0)


def _fma32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 ``a * b + c`` rounded once, as a fused multiply-add: the float64 sum rounded to odd
    (TwoSum's exact error picks the odd neighbour), then to float32, is correctly rounded."""
    ab, c = a.double() * b.double(), c.double()  # the product of two float32 is exact in float64
    s = ab + c
    bb = s - ab
    err = (ab - (s - bb)) + (c - bb)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, torch.full_like(s, float("inf")), torch.full_like(s, float("-inf")))
    return torch.where((err != 0) & even, torch.nextafter(s, toward), s).float()


def spec_mass(v: Tensor, vmax: Tensor, inv_t: Tensor) -> Tensor:
    """The ``spec`` gate's fixed-point masses ``floor(2**31 * 2**y)``, ``y = (v - vmax) log2(e) / T``
    in float32 steps, ``2**frac(y)`` as a polynomial in fused multiply-adds; int64."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    y = torch.fmax((v.float() - vmax) * (inv_t * f32(1.44269504088896341)), f32(-64.0))  # NaN -> -64
    n = torch.floor(y)
    f = y - n
    p = f32(_MASS_POLY[0]).expand_as(f)
    for coef in _MASS_POLY[1:]:
        p = _fma32(p, f, f32(coef).expand_as(f))
    return torch.floor(p.double() * torch.exp2(n.double() + _MASS_BITS)).to(torch.int64)


def spec_gate(student_logits: Tensor, teacher_logits: Tensor, *, k: int, temperature: float, seed: int,
              row_offset: int = 0) -> Tensor:
    """The ``spec`` gate of each row of ``[rows, V]`` logits: ``k`` proposals ``x ~ q`` (inverse
    CDF over fixed-point masses), each accepted iff ``coin < p(x) / q(x)`` with p and q those
    masses normalised; the row passes if any proposal does."""
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    s_all = student_logits.detach().float().cpu()
    t_all = teacher_logits.detach().float().cpu()
    gates = []
    for row in range(s_all.shape[0]):
        s, t = s_all[row], t_all[row]
        s_max, t_max = s.max(), t.max()
        cum_q = torch.cumsum(spec_mass(s, s_max, inv_t), 0)
        zq, zp = int(cum_q[-1]), int(spec_mass(t, t_max, inv_t).sum())
        accepted = False
        for i in range(k if zq > 0 else 0):
            pick, coin = proposal_draw(seed, row_offset + row, i)
            target = min(int(pick * float(zq)), zq - 1)
            x = int(torch.searchsorted(cum_q, torch.tensor(target), right=True))
            p_mass = int(spec_mass(t[x:x + 1], t_max, inv_t)[0])
            q_mass = int(spec_mass(s[x:x + 1], s_max, inv_t)[0])
            if coin < (p_mass * float(zq)) / (q_mass * float(zp)):
                accepted = True
                break
        gates.append(accepted)
    return torch.tensor(gates, dtype=torch.bool, device=student_logits.device)


def topk_gate(student_logits: Tensor, teacher_logits: Tensor, *, k: int) -> Tensor:
    """Accepted iff fewer than ``k`` teacher logits are strictly above the teacher's logit at the
    student's argmax (lowest index on ties)."""
    y = student_logits.double().argmax(-1, keepdim=True)
    t = teacher_logits.double()
    return (t > t.gather(-1, y)).sum(-1) < k


def divergence_rows(student_logits: Tensor, teacher_logits: Tensor, *, divergence: str, temperature: float,
                    jsd_beta: float = 0.5, skew: float = 0.1) -> Tensor:
    """Per-row divergence D between p = softmax(teacher / T) and q = softmax(student / T)."""
    lq = torch.log_softmax(student_logits / temperature, -1)
    lp = torch.log_softmax(teacher_logits / temperature, -1)
    p, q = lp.exp(), lq.exp()

    def kl(pa, la, lb):  # KL(a || b), 0 * log 0 = 0
        return torch.where(pa > 0, pa * (la - lb), torch.zeros_like(pa)).sum(-1)

    def log_mix(wp, wq):  # log(wp * p + wq * q), stable in log space
        lwp = torch.log(torch.tensor(wp, dtype=lp.dtype)) if wp > 0 else torch.tensor(float("-inf"), dtype=lp.dtype)
        lwq = torch.log(torch.tensor(wq, dtype=lp.dtype)) if wq > 0 else torch.tensor(float("-inf"), dtype=lp.dtype)
        return torch.logaddexp(lp + lwp.to(lp.device), lq + lwq.to(lp.device))

    if divergence == "fkl" or (divergence == "jsd" and jsd_beta == 0.0):
        return kl(p, lp, lq)
    if divergence == "rkl" or (divergence == "jsd" and jsd_beta == 1.0):
        return kl(q, lq, lp)
    if divergence == "jsd":
        lm = log_mix(jsd_beta, 1.0 - jsd_beta)
        return jsd_beta * kl(p, lp, lm) + (1.0 - jsd_beta) * kl(q, lq, lm)
    if divergence == "skl":
        return kl(p, lp, log_mix(skew, 1.0 - skew))
    if divergence == "srkl":
        return kl(q, lq, log_mix(1.0 - skew, skew))
    raise ValueError(f"unknown divergence {divergence!r}")


def speckd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
                divergence: str = "fkl", gate: str = "topk", k: int = 5, reject_weight: float = 0.0,
                temperature: float = 1.0, jsd_beta: float = 0.5, skew: float = 0.1, ignore_index: int = -100,
                reduction: str = "mean", seed: int = 0, row_offset: int = 0):
    """SpecKD loss in float64; returns ``(loss, row_divergence, row_accepted)``. Differentiable
    with respect to ``student_logits`` (a float64 leaf in the tests)."""
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, vocab).double()
    t = teacher_logits.reshape(-1, vocab).double().detach()
    valid = (torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if labels is None
             else labels.reshape(-1).ne(ignore_index))
    div = divergence_rows(s, t, divergence=divergence, temperature=temperature, jsd_beta=jsd_beta, skew=skew)
    if gate == "none":
        accepted = torch.ones_like(valid)
    elif gate == "topk":
        accepted = topk_gate(s, t, k=k)
    elif gate == "spec":
        accepted = spec_gate(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), k=k,
                             temperature=temperature, seed=seed, row_offset=row_offset)
    else:
        raise ValueError(f"unknown gate {gate!r}")
    accepted = accepted & valid
    div = torch.where(valid, div, torch.zeros_like(div))
    weight = valid.double() * (reject_weight + (1.0 - reject_weight) * accepted.double())
    row_loss = weight * div
    if reduction == "none":
        loss = row_loss.reshape(lead)
    elif reduction == "sum":
        loss = row_loss.sum()
    elif reduction == "mean":
        loss = row_loss.sum() / valid.sum().clamp_min(1)
    elif reduction == "accepted":
        total = weight.sum()
        loss = row_loss.sum() / total if total > 0 else row_loss.sum() * 0.0
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    return loss, div, accepted


# ---------------------------------------------------------------------------------------------
# Tree attention
# ---------------------------------------------------------------------------------------------

def unpack_tree_mask(tree_mask: Tensor, tree_size: int) -> Tensor:
    """``[batch, T, ceil(T/32)]`` int32 words -> ``[batch, T, T]`` bool: bit ``j % 32`` of word
    ``j // 32`` of row ``i`` says whether node ``i`` sees node ``j``."""
    shifts = torch.arange(32, device=tree_mask.device, dtype=torch.int32)
    bits = (tree_mask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :tree_size].bool()


def tree_attention_visibility(cache_lens: Tensor, tree_size: int, max_len: int,
                              tree_mask: Tensor | None = None) -> Tensor:
    """``[batch, T, max_len]`` bool: node ``i`` of sequence ``b`` sees key position ``k`` iff
    ``k < len`` (the prefix) or ``k = len + j`` with node ``j`` an ancestor of ``i`` or ``i``
    itself (``tree_mask``; ``None``: ``j <= i``)."""
    batch = cache_lens.shape[0]
    device = cache_lens.device
    if tree_mask is None:
        node_sees = torch.ones(tree_size, tree_size, dtype=torch.bool, device=device).tril()
        node_sees = node_sees.expand(batch, tree_size, tree_size)
    else:
        node_sees = unpack_tree_mask(tree_mask, tree_size)
    visible = torch.zeros(batch, tree_size, max_len, dtype=torch.bool, device=device)
    for b in range(batch):
        length = int(cache_lens[b])
        visible[b, :, :length] = True
        visible[b, :, length:length + tree_size] = node_sees[b]
    return visible


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                   tree_mask: Tensor | None = None, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Tree attention in float64: GQA heads expanded, masked softmax over the whole cache.
    Returns ``(out [batch, T, heads_q, head_dim], lse [batch, heads_q, T])``; a node that sees
    no key gets zeros and ``-inf``."""
    batch, tree_size, heads_q, head_dim = q.shape
    max_len, heads_kv = k_cache.shape[1], k_cache.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    group = heads_q // heads_kv
    qd = q.double().transpose(1, 2)                                     # [B, Hq, T, D]
    kd = k_cache.double().repeat_interleave(group, dim=2).transpose(1, 2)  # [B, Hq, L, D]
    vd = v_cache.double().repeat_interleave(group, dim=2).transpose(1, 2)
    visible = tree_attention_visibility(cache_lens, tree_size, max_len, tree_mask).unsqueeze(1)
    scores = (qd @ kd.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                               # [B, Hq, T]
    weights = torch.nan_to_num((scores - lse.unsqueeze(-1)).exp(), nan=0.0)
    out = (weights @ vd).transpose(1, 2)                                 # [B, T, Hq, D]
    return out, lse


# ---------------------------------------------------------------------------------------------
# Decoding: draft trees, verification, KV compaction
# ---------------------------------------------------------------------------------------------

_TREE_VERIFY_TAG = 0x54525653  # "TRVS": the sampling verifier's Philox streams
_FINAL_TRIAL = 0xFFFF  # trial number of the draw that samples the emitted (residual or bonus) token


def _candidate_valid(token: int, log_prob: float) -> bool:
    return token >= 0 and log_prob == log_prob and log_prob > float("-inf")


def _candidate(tokens: Tensor, log_probs: Tensor, b: int, d: int, parent_slot: int, c: int):
    """(token, log-prob) of candidate ``c`` at depth ``d`` for a parent in candidate slot
    ``parent_slot``: 3-d inputs share one list per depth, 4-d inputs give one list per parent slot
    (depth 0, whose parent is the root, reads slot 0)."""
    if tokens.dim() == 3:
        return int(tokens[b, d, c]), float(log_probs[b, d, c])
    slot = 0 if d == 0 else parent_slot
    return int(tokens[b, d, slot, c]), float(log_probs[b, d, slot, c])


def _f32_add(a: float, b: float) -> float:
    return float(torch.tensor(a, dtype=torch.float32) + torch.tensor(b, dtype=torch.float32))


def _to_int32_bits(words: Tensor) -> Tensor:
    return ((words + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)


def tree_layout(parents: list[int], num_words: int, max_path: int):
    """Depths, bit-packed ancestor mask rows (as Python ints) and root-to-leaf paths of a tree
    given by ``parents`` (``parents[0] = -1``, ``parents[i] < i``)."""
    n = len(parents)
    depths = [0] * n
    rows = [0] * n
    has_child = [False] * n
    for i in range(n):
        if i > 0:
            depths[i] = depths[parents[i]] + 1
            rows[i] = rows[parents[i]]
            has_child[parents[i]] = True
        rows[i] |= 1 << i
    paths = []
    for i in range(n):
        if not has_child[i]:
            path, j = [], i
            while j >= 0:
                path.append(j)
                j = parents[j]
            paths.append(path[::-1] + [-1] * (max_path - len(path)))
    return depths, rows, paths


def build_tree(tokens: Tensor, log_probs: Tensor, root_tokens: Tensor, *, mode: str = "backbone",
               budget: int | None = None) -> dict:
    """Reference of :func:`specx.decode.build_tree` (same outputs, same order)."""
    batch, depth, k = tokens.shape[0], tokens.shape[1], tokens.shape[-1]
    tokens = tokens.cpu()
    log_probs = log_probs.float().cpu()
    size = 1 + depth * k if mode == "backbone" else budget
    words = (size + 31) // 32
    out = {
        "tokens": torch.full((batch, size), -1, dtype=torch.int64),
        "parents": torch.full((batch, size), -1, dtype=torch.int64),
        "depths": torch.zeros((batch, size), dtype=torch.int64),
        "scores": torch.full((batch, size), float("-inf"), dtype=torch.float32),
        "mask": torch.zeros((batch, size, words), dtype=torch.int32),
        "paths": torch.full((batch, size, depth + 1), -1, dtype=torch.int64),
        "num_nodes": torch.zeros(batch, dtype=torch.int64),
    }
    for b in range(batch):
        # nodes: (token, parent, score) in output order
        nodes = [(int(root_tokens[b]), -1, 0.0)]
        if mode == "backbone":
            spine = 0
            for d in range(depth):
                next_spine = None
                for c in range(k):
                    t, lp = _candidate(tokens, log_probs, b, d, 0, c)
                    if _candidate_valid(t, lp):
                        if c == 0:
                            next_spine = len(nodes)
                        nodes.append((t, spine, _f32_add(nodes[spine][2], min(lp, 0.0))))
                if next_spine is None:
                    break
                spine = next_spine
        else:
            keep = size - 1
            prev = [(0.0, 0, 0)]  # (score, index in the previous depth's list, candidate slot)
            levels = []
            for d in range(depth):
                cands = []
                for pi, (ps, _, pslot) in enumerate(prev):
                    for c in range(k):
                        t, lp = _candidate(tokens, log_probs, b, d, pslot, c)
                        if _candidate_valid(t, lp):
                            cands.append((_f32_add(ps, min(lp, 0.0)), pi, c, t))
                cands.sort(key=lambda e: (-e[0], e[1], e[2]))
                cands = cands[:keep]
                levels.append(cands)
                prev = [(s, pi, c) for s, pi, c, _ in cands]
                if not prev:
                    break
            ranked = sorted(((s, d, r) for d, lvl in enumerate(levels) for r, (s, _, _, _) in enumerate(lvl)),
                            key=lambda e: (-e[0], e[1], e[2]))[:keep]
            chosen = sorted((d, r) for _, d, r in ranked)
            index = {dr: i + 1 for i, dr in enumerate(chosen)}
            for d, r in chosen:
                s, pi, _, t = levels[d][r]
                parent = 0 if d == 0 else index[(d - 1, pi)]
                nodes.append((t, parent, s))
        n = len(nodes)
        parents = [p for _, p, _ in nodes]
        depths, rows, paths = tree_layout(parents, words, depth + 1)
        out["num_nodes"][b] = n
        for i, (t, p, s) in enumerate(nodes):
            out["tokens"][b, i] = t
            out["parents"][b, i] = p
            out["depths"][b, i] = depths[i]
            out["scores"][b, i] = s
            out["mask"][b, i] = _to_int32_bits(torch.tensor([(rows[i] >> (32 * w)) & 0xFFFFFFFF
                                                             for w in range(words)], dtype=torch.int64))
        for li, path in enumerate(paths):
            out["paths"][b, li] = torch.tensor(path)
    return out


def _accepted_outputs(paths: list[list[int]], next_tokens: list[int], size: int):
    accepted = torch.full((len(paths), size), -1, dtype=torch.int64)
    for b, path in enumerate(paths):
        accepted[b, :len(path)] = torch.tensor(path, dtype=torch.int64)
    return (accepted, torch.tensor([len(p) - 1 for p in paths], dtype=torch.int64),
            torch.tensor(next_tokens, dtype=torch.int64))


def verify_greedy(node_tokens: Tensor, parents: Tensor, num_nodes: Tensor, target: Tensor):
    """Longest root-to-leaf path whose every node's token is the target's argmax at its parent
    (ties: the lowest node index), its length, and the argmax after its last node."""
    argmax = target.double().argmax(-1) if target.is_floating_point() else target
    argmax, node_tokens, parents = argmax.cpu(), node_tokens.cpu(), parents.cpu()
    paths, nexts = [], []
    for b in range(node_tokens.shape[0]):
        n = int(num_nodes[b])
        ok, depth = [True] + [False] * (n - 1), [0] * n
        best = 0
        for i in range(1, n):
            p = int(parents[b, i])
            ok[i] = ok[p] and int(node_tokens[b, i]) == int(argmax[b, p])
            depth[i] = depth[p] + 1
            if ok[i] and depth[i] > depth[best]:
                best = i
        path, j = [], best
        while j >= 0:
            path.append(j)
            j = int(parents[b, j]) if j > 0 else -1
        paths.append(path[::-1])
        nexts.append(int(argmax[b, best]))
    return _accepted_outputs(paths, nexts, node_tokens.shape[1])


def tree_verify_draw(seed: int, seq: int, offset: int, depth: int, trial: int) -> tuple[float, float]:
    """(coin, pick) uniforms of the sampling verifier for one trial at one depth of one sequence."""
    seed &= (1 << 64) - 1
    r = philox4x32_10((seq & _MASK32, offset & _MASK32, ((depth << 16) | trial) & _MASK32, _TREE_VERIFY_TAG),
                      (seed & _MASK32, seed >> 32))
    return _uniform53(r[0], r[1]), _uniform53(r[2], r[3])


def _target_weights(logits: Tensor, inv_t: Tensor, top_p: float) -> list[int]:
    """Fixed-point target weights of one node's row after temperature and top-p: the kept set is
    every token whose weight is >= the largest threshold whose kept mass reaches top_p of the total."""
    l = logits.float()
    w = det_weight(l, l.max(), inv_t)
    if top_p < 1.0:
        total = int(w.sum())
        need = max(int(top_p * float(total)), 1)
        sorted_w = torch.sort(w, descending=True).values
        cum = torch.cumsum(sorted_w, 0)
        first = int(torch.searchsorted(cum, torch.tensor(need), right=False))
        tau = int(sorted_w[min(first, len(sorted_w) - 1)])
        w = torch.where(w >= tau, w, torch.zeros_like(w))
    return [int(x) for x in w]


def _sample_weights(weights: list[int], pick: float) -> int:
    total = sum(weights)
    target = min(int(pick * float(total)), total - 1)
    acc = 0
    for v, w in enumerate(weights):
        acc += w
        if acc > target:
            return v
    return len(weights) - 1


_FIXED52 = 2.0 ** 52


def verify_sample(node_tokens: Tensor, parents: Tensor, num_nodes: Tensor, target_logits: Tensor,
                  draft_probs: Tensor | None = None, *, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, offset: int = 0):
    """Multi-candidate rejection sampling over the tree, the exact arithmetic of the kernels.

    Target p at a node: fixed-point ``det_weight`` of the logits at ``temperature`` (top-p
    filtered). Deterministic drafts (``draft_probs is None``): child x is accepted iff
    ``coin < P(x) / S`` with S the mass left, and on rejection x's mass is removed. With draft
    probabilities q (row of the parent node): the residual after j rejections is
    ``max(p - c_j q, 0)`` in 2**-52 fixed point, ``c_{j+1} = c_j + S_j``; accept iff
    ``coin < R_j(x) / (S_j q(x))``. All rejected: sample from the residual; a leaf accepted:
    sample the bonus token from p at the leaf.
    """
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    logits = target_logits.detach().float().cpu()
    q_all = draft_probs.detach().float().cpu() if draft_probs is not None else None
    vocab = logits.shape[-1]
    paths, nexts = [], []
    for b in range(node_tokens.shape[0]):
        n = int(num_nodes[b])
        children = [[] for _ in range(n)]
        for i in range(1, n):
            children[int(parents[b, i])].append(i)
        cur, depth, path = 0, 0, [0]
        while True:
            w = _target_weights(logits[b, cur], inv_t, top_p)
            if not children[cur]:
                nexts.append(_sample_weights(w, tree_verify_draw(seed, b, offset, depth, _FINAL_TRIAL)[1]))
                break
            accepted = None
            if q_all is None:
                left, removed = sum(w), set()
                for j, c in enumerate(children[cur]):
                    x = int(node_tokens[b, c])
                    px = w[x] if 0 <= x < vocab and x not in removed else 0
                    coin = tree_verify_draw(seed, b, offset, depth, j)[0]
                    if left > 0 and coin < float(px) / float(left):
                        accepted = c
                        break
                    if px > 0:
                        removed.add(x)
                        left -= px
                residual = [0 if v in removed else wv for v, wv in enumerate(w)]
            else:
                q = [float(v) for v in q_all[b, cur].double()]
                total = float(sum(w))
                p = [float(wv) / total for wv in w]
                coef = 0.0
                for j, c in enumerate(children[cur]):
                    r = [int(max(pv - coef * qv, 0.0) * _FIXED52) for pv, qv in zip(p, q)]
                    s = sum(r)
                    x = int(node_tokens[b, c])
                    coin = tree_verify_draw(seed, b, offset, depth, j)[0]
                    if 0 <= x < vocab:
                        rx, qx = float(r[x]), q[x]
                        ratio = (rx / (float(s) * qx) if qx > 0 else (float("inf") if rx > 0 else 0.0)) \
                            if s > 0 else 0.0
                        if coin < ratio:
                            accepted = c
                            break
                    coef = coef + float(s) / _FIXED52
                residual = [int(max(pv - coef * qv, 0.0) * _FIXED52) for pv, qv in zip(p, q)]
            if accepted is None:
                if sum(residual) == 0:
                    residual = w
                nexts.append(_sample_weights(residual, tree_verify_draw(seed, b, offset, depth, _FINAL_TRIAL)[1]))
                break
            cur, depth = accepted, depth + 1
            path.append(cur)
        paths.append(path)
    return _accepted_outputs(paths, nexts, node_tokens.shape[1])


def compact_kv(k_cache: Tensor, v_cache: Tensor, lengths: Tensor, accepted_nodes: Tensor,
               accept_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of the caches with the accepted path's entries (root included) moved to
    ``lengths + 0 .. lengths + accept_len``, and the new lengths ``lengths + accept_len + 1``."""
    k_out, v_out, new_len = k_cache.clone(), v_cache.clone(), lengths.clone()
    for b in range(k_cache.shape[0]):
        base, n = int(lengths[b]), int(accept_len[b]) + 1
        src = base + accepted_nodes[b, :n].to(k_cache.device)
        k_out[b, base:base + n] = k_cache[b, src]
        v_out[b, base:base + n] = v_cache[b, src]
        new_len[b] = base + n
    return k_out, v_out, new_len
# DeepKD
# ---------------------------------------------------------------------------------------------


def topk_threshold(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row of ``[..., C]`` logits: the k-th largest value (counting multiplicity, in the logits
    dtype) and the number of entries strictly greater. NaN-free inputs."""
    x = logits.double()
    threshold = torch.sort(x, dim=-1, descending=True).values[..., k - 1]
    count = (x > threshold.unsqueeze(-1)).sum(-1)
    return threshold.to(logits.dtype), count


def topk_mask(logits: Tensor, k: int | None) -> Tensor:
    """The kept top-k set of each row: entries above the threshold, then the lowest-index entries
    equal to it until ``k`` are kept (``k=None``: every entry)."""
    if k is None:
        return torch.ones_like(logits, dtype=torch.bool)
    x = logits.double()
    threshold, greater = topk_threshold(logits, k)
    threshold = threshold.double().unsqueeze(-1)
    ties = x == threshold
    tie_rank = torch.cumsum(ties.long(), -1)  # 1-based rank of each tie in index order
    return (x > threshold) | (ties & (tie_rank <= (k - greater).unsqueeze(-1)))


def deepkd_losses(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, k: int | None = None,
                  temperature: float = 4.0, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """DeepKD's (ce, tckd, nckd) in float64, each the mean over non-ignored rows (0 if none).

    Per row at temperature T: ce is the student's cross-entropy at T=1; tckd is T^2 KL between the
    binary [p_gt, 1 - p_gt] of teacher and student; nckd is T^2 KL between teacher and student
    softmaxes over the kept set (teacher top-k minus the target, renormalised). Differentiable with
    respect to ``student_logits`` (a float64 leaf in the tests)."""
    classes = student_logits.shape[-1]
    s = student_logits.reshape(-1, classes).double()
    t = teacher_logits.reshape(-1, classes).double().detach()
    y_all = target.reshape(-1)
    valid = y_all.ne(ignore_index)
    y = torch.where(valid, y_all, torch.zeros_like(y_all)).unsqueeze(-1)
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, y, True)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)

    ce = torch.logsumexp(s, -1) - s.gather(-1, y).squeeze(-1)

    def binary_logs(z):  # log p_gt and log(1 - p_gt) of softmax(z)
        lse = torch.logsumexp(z, -1)
        lse_nt = torch.logsumexp(torch.where(is_target, neg_inf, z), -1)
        return z.gather(-1, y).squeeze(-1) - lse, lse_nt - lse

    a, b = s / temperature, t / temperature
    log_ps, log_1mps = binary_logs(a)
    log_pt, log_1mpt = binary_logs(b)
    pt, one_m_pt = log_pt.exp(), log_1mpt.exp()
    zero = torch.zeros_like(pt)
    tckd = (torch.where(pt > 0, pt * (log_pt - log_ps), zero)
            + torch.where(one_m_pt > 0, one_m_pt * (log_1mpt - log_1mps), zero)) * temperature ** 2

    kept = topk_mask(teacher_logits.reshape(-1, classes), k) & ~is_target
    kept_any = kept.any(-1, keepdim=True)  # rows with an empty kept set get nckd 0 (and no NaN)
    lq = torch.log_softmax(torch.where(kept, a, neg_inf).where(kept_any, 0.0), -1)
    lp = torch.log_softmax(torch.where(kept, b, neg_inf).where(kept_any, 0.0), -1)
    nckd = torch.where(kept, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1) * temperature ** 2

    count = valid.sum().clamp_min(1)
    return tuple(torch.where(valid, v, zero).sum() / count for v in (ce, tckd, nckd))


def deepkd_sgd_step(params: list[Tensor], grads_task: list, grads_tckd: list, grads_nckd: list,
                    buffers: list[list[Tensor]], *, lr: float, momentum: float = 0.9, delta: float = 0.075,
                    weight_decay: float = 0.0) -> None:
    """The paper's DeepKD update, in place, with ``torch._foreach``-free plain ops: per param,
    v0 = (m+d) v0 + g_task + wd p, v1 = (m-d) v1 + g_tckd, v2 = (m+d) v2 + g_nckd,
    p -= lr (v0 + v1 + v2). ``buffers[i]`` holds param i's three buffers; a None gradient is 0."""
    with torch.no_grad():
        for p, g0, g1, g2, (v0, v1, v2) in zip(params, grads_task, grads_tckd, grads_nckd, buffers):
            g0 = torch.zeros_like(p) if g0 is None else g0
            if weight_decay != 0:
                g0 = g0.add(p, alpha=weight_decay)
            v0.mul_(momentum + delta).add_(g0)
            v1.mul_(momentum - delta)
            if g1 is not None:
                v1.add_(g1)
            v2.mul_(momentum + delta)
            if g2 is not None:
                v2.add_(g2)
            p.sub_(v0.add(v1).add_(v2), alpha=lr)
