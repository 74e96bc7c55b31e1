"""Multi-process checks of SDPACoreAttention under context parallelism (gloo).

Launched by tests/test_core_attention.py with 4 ranks. Runs every scenario with
CP=4 (all ranks) and CP=2 (groups [0,1] and [2,3], which run the same scenarios
independently), comparing each rank's outputs and q/k/v gradients with the
full-sequence reference at that rank's global positions. Writes
OUT/rank{RANK}.json: {"cp4": {scenario: {...errors...}}, "cp2": {...}}.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from core_attention_reference import (bshd_rank_rows, causal_allowed, document_allowed,
                                      reference_attention, thd_rank_rows)

HEADS, GROUPS, HN, BATCH = 4, 2, 8, 2
SEQ = 16
DOC_VALID = [8, 13, 22]
DOC_PADDED = [8, 16, 24]  # multiples of 2*cp for cp = 2 and 4


def make_config(cp, dtype=torch.float64, hidden=None):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(num_layers=1, hidden_size=hidden or HEADS * HN, num_attention_heads=HEADS,
                             num_query_groups=GROUPS, kv_channels=HN, use_cpu_initialization=True,
                             attention_dropout=0.0, context_parallel_size=cp, params_dtype=dtype)


def make_module(cp, group, mask_type, dtype=torch.float64):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron_harpe.parallel.core_attention import SDPACoreAttention
    pgc = ProcessGroupCollection(cp=group)
    return SDPACoreAttention(make_config(cp, dtype), layer_number=1, attn_mask_type=mask_type,
                             attention_type="self", pg_collection=pgc)


def err(a, b):
    return float((a - b).abs().max())


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(module, q, k, v, allowed, rows, thd_params=None, feed_rows=None):
    """Reference on the full sequence vs the module on this rank's rows.

    `rows`: global positions of the local rows (true layout); `feed_rows`: the rows
    actually fed to the module (differs only for the deliberately broken layout).
    Returns errors of output and of q/k/v gradients (loss = sum(out * G)).
    """
    feed_rows = rows if feed_rows is None else feed_rows
    gen = torch.Generator().manual_seed(123)
    out_shape = (q.size(0), q.size(1), q.size(2) * q.size(3))
    G = torch.randn(out_shape, generator=gen, dtype=q.dtype)

    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qf, kf, vf, allowed, scale=1.0 / math.sqrt(HN))
    (ref * G).sum().backward()

    idx = torch.tensor(feed_rows)
    ql, kl, vl = (t.index_select(0, idx).clone().requires_grad_() for t in (q, k, v))
    if thd_params is not None:  # THD: batch dim squeezed
        out = module(ql[:, 0], kl[:, 0], vl[:, 0], None, packed_seq_params=thd_params)
        out = out.unsqueeze(1)
    else:
        out = module(ql, kl, vl, None)
    tidx = torch.tensor(rows)
    (out * G.index_select(0, tidx)).sum().backward()
    return {
        "out": err(out, ref.detach().index_select(0, tidx)),
        "dq": err(ql.grad, qf.grad.index_select(0, tidx)),
        "dk": err(kl.grad, kf.grad.index_select(0, tidx)),
        "dv": err(vl.grad, vf.grad.index_select(0, tidx)),
    }


def qkv(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, BATCH, HEADS, HN, generator=gen, dtype=dtype),
            torch.randn(n, BATCH, GROUPS, HN, generator=gen, dtype=dtype),
            torch.randn(n, BATCH, GROUPS, HN, generator=gen, dtype=dtype))


def thd_qkv(dtype, seed=1):
    q, k, v = qkv(sum(DOC_PADDED), dtype, seed)
    return q[:, :1], k[:, :1], v[:, :1]  # batch 1


def thd_params():
    from megatron.core.packed_seq_params import PackedSeqParams
    cu = torch.tensor([0] + [sum(DOC_VALID[:i + 1]) for i in range(len(DOC_VALID))], dtype=torch.int32)
    cu_pad = torch.tensor([0] + [sum(DOC_PADDED[:i + 1]) for i in range(len(DOC_PADDED))], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                           cu_seqlens_kv_padded=cu_pad, max_seqlen_q=max(DOC_PADDED),
                           max_seqlen_kv=max(DOC_PADDED))


def self_attention_check(cp, group, tp_group, single_group, thd=False):
    """megatron SelfAttention (local spec, RoPE applied by megatron) with
    SDPACoreAttention plugged in: the CP run's output rows and CP-summed weight
    gradients equal the CP=1 full-sequence run (relative errors)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module
    from megatron_harpe.parallel.core_attention import SDPACoreAttention

    spec = copy.deepcopy(get_gpt_layer_local_spec().submodules.self_attention)
    spec.submodules.core_attention = SDPACoreAttention
    hidden = 32
    torch.manual_seed(1234)  # same weights on every rank (CP ranks share the layer)
    full = build_module(spec, config=make_config(1, hidden=hidden), layer_number=1,
                        pg_collection=ProcessGroupCollection(tp=tp_group, cp=single_group))
    par = build_module(spec, config=make_config(cp, hidden=hidden), layer_number=1,
                       pg_collection=ProcessGroupCollection(tp=tp_group, cp=group))
    par.load_state_dict(full.state_dict())

    n, batch = (sum(DOC_PADDED), 1) if thd else (SEQ, BATCH)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, batch, hidden, generator=gen, dtype=torch.float64)
    G = torch.randn(n, batch, hidden, generator=gen, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, HN, 2, dtype=torch.float64) / HN))
    # THD: a table of max-document length, so megatron restarts positions per document
    n_emb = max(DOC_PADDED) if thd else n
    ang = torch.outer(torch.arange(n_emb, dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], dim=-1)[:, None, None, :]
    r = dist.get_rank(group)
    if thd:
        # megatron slices RoPE per document and CP rank itself (_apply_rotary_pos_emb_thd)
        rows = torch.tensor(thd_rank_rows(DOC_PADDED, cp, r))
        kw_full = kw_par = dict(packed_seq_params=thd_params())
        emb_par = emb
    else:
        rows = torch.tensor(bshd_rank_rows(SEQ, cp, r))
        kw_full = kw_par = {}
        emb_par = emb.index_select(0, rows)  # what megatron's RotaryEmbedding does under CP

    out_full, _ = full(x, None, rotary_pos_emb=(emb, emb), **kw_full)
    (out_full * G).sum().backward()
    out_l, _ = par(x.index_select(0, rows), None, rotary_pos_emb=(emb_par, emb_par), **kw_par)
    (out_l * G.index_select(0, rows)).sum().backward()
    res = {"out": rel_err(out_l, out_full.detach().index_select(0, rows))}
    grads_full = dict(full.named_parameters())
    for name, p in par.named_parameters():
        if p.grad is None:  # linear_proj's bias is returned separately, unused here
            continue
        g = p.grad.clone()
        dist.all_reduce(g, group=group)  # what megatron's DP x CP gradient reduction does
        res["d_" + name] = rel_err(g, grads_full[name].grad)
    return res


def run_scenarios(cp, group, tp_group, single_group):
    from megatron.core.transformer.enums import AttnMaskType
    r = dist.get_rank(group)
    res = {}
    rows = bshd_rank_rows(SEQ, cp, r)
    for dtype, tag in ((torch.float64, ""), (torch.float32, "_fp32")):
        q, k, v = qkv(SEQ, dtype)
        m = make_module(cp, group, AttnMaskType.causal, dtype)
        res["bshd_causal" + tag] = check(m, q, k, v, causal_allowed(SEQ), rows)
    q, k, v = qkv(SEQ, torch.float64)
    res["bshd_no_mask"] = check(make_module(cp, group, AttnMaskType.no_mask), q, k, v,
                                torch.ones(SEQ, SEQ, dtype=torch.bool), rows)
    # Break the layout on purpose: feed the rank its chunks in swapped order while the
    # comparison expects megatron's layout. The check must notice (large errors).
    c = SEQ // (2 * cp)
    swapped = rows[c:] + rows[:c]
    res["bshd_swapped_layout"] = check(make_module(cp, group, AttnMaskType.causal), q, k, v,
                                       causal_allowed(SEQ), rows, feed_rows=swapped)
    # ... and feed contiguous (non-load-balanced) chunks: rank r holds [r*S/cp, (r+1)*S/cp).
    contiguous = list(range(r * SEQ // cp, (r + 1) * SEQ // cp))
    res["bshd_contiguous_layout"] = check(make_module(cp, group, AttnMaskType.causal), q, k, v,
                                          causal_allowed(SEQ), rows, feed_rows=contiguous)

    tq, tk, tv = thd_qkv(torch.float64)
    trows = thd_rank_rows(DOC_PADDED, cp, r)
    res["thd_causal"] = check(make_module(cp, group, AttnMaskType.causal), tq, tk, tv,
                              document_allowed(DOC_VALID, DOC_PADDED, causal=True), trows, thd_params())
    res["thd_padding_causal"] = check(make_module(cp, group, AttnMaskType.padding_causal), tq, tk, tv,
                                      document_allowed(DOC_VALID, DOC_PADDED, causal=True), trows,
                                      thd_params())
    res["thd_no_mask"] = check(make_module(cp, group, AttnMaskType.no_mask), tq, tk, tv,
                               document_allowed(DOC_VALID, DOC_PADDED, causal=False), trows, thd_params())
    # THD layout broken: whole-sequence chunking instead of per-document chunking.
    total = sum(DOC_PADDED)
    res["thd_whole_sequence_layout"] = check(
        make_module(cp, group, AttnMaskType.causal), tq, tk, tv,
        document_allowed(DOC_VALID, DOC_PADDED, causal=True), trows, thd_params(),
        feed_rows=bshd_rank_rows(total, cp, r))
    res["self_attention"] = self_attention_check(cp, group, tp_group, single_group)
    res["self_attention_thd"] = self_attention_check(cp, group, tp_group, single_group, thd=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4, "run with 4 ranks"
    singles = [dist.new_group([i]) for i in range(world)]
    cp4 = dist.new_group(list(range(world)))
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = singles[rank]
    result = {
        "cp4": run_scenarios(4, cp4, mine, mine),
        "cp2": run_scenarios(2, pairs[rank // 2], mine, mine),
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
