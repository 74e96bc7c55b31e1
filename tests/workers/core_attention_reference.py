"""Plain reference attention and CP layouts for the SDPACoreAttention tests.

Written independently of megatron_harpe.parallel.core_attention: explicit
softmax(Q K^T * scale + mask) V with einsum, GQA by explicit head->group indexing, and
the context-parallel layout spelled out with Python lists.
"""
from __future__ import annotations

import torch


def reference_attention(q, k, v, allowed, scale):
    """q [S, b, np, hn], k/v [S', b, ng, hn], allowed [S, S'] bool (True = may attend).

    Query head i uses K/V group i // (np // ng). Rows with no allowed key give zeros.
    Returns [S, b, np * hn].
    """
    n_heads, n_groups = q.size(2), k.size(2)
    group_of_head = [i // (n_heads // n_groups) for i in range(n_heads)]
    k_h = k[:, :, group_of_head]  # [S', b, np, hn]
    v_h = v[:, :, group_of_head]
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k_h) * scale
    scores = scores - scores.max(dim=-1, keepdim=True).values.detach()
    weights = torch.exp(scores) * allowed.to(scores.dtype)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhqk,kbhd->qbhd", probs, v_h)
    return out.reshape(out.size(0), out.size(1), -1)


def causal_allowed(n):
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        allowed[i, : i + 1] = True
    return allowed


def document_allowed(valid_lens, padded_lens, causal=True):
    """Mask over the padded packed layout: same document, both tokens real, and
    (if causal) query position >= key position."""
    total = sum(padded_lens)
    doc = [-1] * total
    pos = [-1] * total
    start = 0
    for d, (n_valid, n_pad) in enumerate(zip(valid_lens, padded_lens)):
        for p in range(n_valid):
            doc[start + p] = d
            pos[start + p] = p
        start += n_pad
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            if doc[i] >= 0 and doc[i] == doc[j] and (not causal or pos[i] >= pos[j]):
                allowed[i, j] = True
    return allowed


def bshd_rank_rows(seq_len, cp, rank):
    """Global positions held by CP rank `rank`: chunks rank and 2*cp-1-rank of 2*cp."""
    c = seq_len // (2 * cp)
    first = list(range(rank * c, (rank + 1) * c))
    second = list(range((2 * cp - 1 - rank) * c, (2 * cp - rank) * c))
    return first + second


def thd_rank_rows(padded_lens, cp, rank):
    """Global rows of the packed layout held by CP rank `rank`: for every document,
    its chunks rank and 2*cp-1-rank (of 2*cp), documents in order."""
    rows = []
    start = 0
    for n_pad in padded_lens:
        rows += [start + p for p in bshd_rank_rows(n_pad, cp, rank)]
        start += n_pad
    return rows
