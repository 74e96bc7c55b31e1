"""SDPACoreAttention (megatron_harpe.parallel.core_attention) against a plain reference.

Single-process tests cover CP = 1 (BSHD with GQA, explicit masks, packed THD documents,
errors). One 4-rank gloo launch (tests/workers/core_attention_cp.py) covers CP = 2 and
CP = 4: outputs and q/k/v gradients of every rank equal the full-sequence reference at
that rank's global positions, megatron's SelfAttention with the module plugged in
matches its CP = 1 run, and deliberately wrong layouts are detected.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.launch import REPO_ROOT, run_workers
from tests.workers.core_attention_reference import (causal_allowed, document_allowed,
                                                    reference_attention)

megatron = pytest.importorskip("megatron.core")

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from megatron_harpe.parallel.core_attention import SDPACoreAttention, cp_local_positions  # noqa: E402

HEADS, GROUPS, HN = 4, 2, 8
WORKER = REPO_ROOT / "tests" / "workers" / "core_attention_cp.py"


def config(**kw):
    base = dict(num_layers=1, hidden_size=HEADS * HN, num_attention_heads=HEADS, num_query_groups=GROUPS,
                kv_channels=HN, use_cpu_initialization=True, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def module(mask_type=AttnMaskType.causal, **kw):
    return SDPACoreAttention(config(**kw), layer_number=1, attn_mask_type=mask_type, attention_type="self")


def rand_qkv(s, b, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, HEADS, HN, generator=g, dtype=dtype),
            torch.randn(s, b, GROUPS, HN, generator=g, dtype=dtype),
            torch.randn(s, b, GROUPS, HN, generator=g, dtype=dtype))


def compare(run_module, q, k, v, allowed, tol=1e-10):
    """Outputs and q/k/v gradients of the module vs the float64 reference."""
    g = torch.randn(q.size(0), q.size(1), HEADS * HN, generator=torch.Generator().manual_seed(9), dtype=q.dtype)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qr, kr, vr, allowed, 1.0 / math.sqrt(HN))
    (ref * g).sum().backward()
    qm, km, vm = (t.clone().requires_grad_() for t in (q, k, v))
    out = run_module(qm, km, vm)
    assert out.shape == ref.shape
    (out * g).sum().backward()
    torch.testing.assert_close(out, ref.detach(), atol=tol, rtol=0)
    for name, a, b in (("dq", qm, qr), ("dk", km, kr), ("dv", vm, vr)):
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=0, msg=lambda m: f"{name}: {m}")
    return out


# ---------------------------------------------------------------------------------------
# CP = 1
# ---------------------------------------------------------------------------------------
def test_bshd_causal_gqa_matches_reference():
    q, k, v = rand_qkv(12, 2)
    m = module()
    compare(lambda q, k, v: m(q, k, v, None), q, k, v, causal_allowed(12))


def test_bshd_causal_fp32_and_output_shape():
    q, k, v = rand_qkv(10, 3, dtype=torch.float32)
    m = module()
    out = compare(lambda q, k, v: m(q, k, v, None), q, k, v, causal_allowed(10), tol=2e-6)
    assert out.shape == (10, 3, HEADS * HN) and out.dtype == torch.float32


def test_causal_ignores_attention_mask_like_te():
    q, k, v = rand_qkv(6, 1)
    m = module()
    junk = torch.ones(1, 1, 6, 6, dtype=torch.bool)  # would mask everything if honoured
    torch.testing.assert_close(m(q, k, v, junk), m(q, k, v, None))


def test_no_mask_and_explicit_padding_mask():
    s, b = 7, 2
    q, k, v = rand_qkv(s, b)
    compare(lambda q, k, v: module(AttnMaskType.no_mask)(q, k, v, None), q, k, v,
            torch.ones(s, s, dtype=torch.bool))
    # padding: batch element 1 has its last 3 keys padded; megatron convention True = masked
    mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    mask[1, :, :, 4:] = True
    m = module(AttnMaskType.padding)
    out = m(q, k, v, mask)
    for bi in range(b):
        ref = reference_attention(q[:, bi:bi + 1], k[:, bi:bi + 1], v[:, bi:bi + 1], ~mask[bi, 0],
                                  1.0 / math.sqrt(HN))
        torch.testing.assert_close(out[:, bi:bi + 1], ref, atol=1e-10, rtol=0)
    # padding_causal combines the mask with causality; a fully masked row gives zeros
    mask2 = mask.clone()
    mask2[0, :, 2, :] = True
    out = module(AttnMaskType.padding_causal)(q, k, v, mask2)
    for bi in range(b):
        allowed = ~mask2[bi, 0] & causal_allowed(s)
        ref = reference_attention(q[:, bi:bi + 1], k[:, bi:bi + 1], v[:, bi:bi + 1], allowed,
                                  1.0 / math.sqrt(HN))
        torch.testing.assert_close(out[:, bi:bi + 1], ref, atol=1e-10, rtol=0)
    assert out[2, 0].abs().max() == 0


def test_causal_bottom_right_and_decode_step():
    q, k, v = rand_qkv(9, 1)
    m = module(AttnMaskType.causal_bottom_right)
    allowed = causal_allowed(9)[5:]  # the last 4 queries against all 9 keys
    out = m(q[5:], k, v, None)
    ref = reference_attention(q[5:], k, v, allowed, 1.0 / math.sqrt(HN))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # causal with one query (KV-cache decode): sees every key, as megatron does
    out = module()(q[8:], k, v, None)
    torch.testing.assert_close(out, reference_attention(q[8:], k, v, torch.ones(1, 9, dtype=torch.bool),
                                                        1.0 / math.sqrt(HN)), atol=1e-10, rtol=0)


def packed(valid, padded=None):
    cu = torch.tensor([0] + list(torch.tensor(valid).cumsum(0)), dtype=torch.int32)
    kw = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    if padded is not None:
        cup = torch.tensor([0] + list(torch.tensor(padded).cumsum(0)), dtype=torch.int32)
        kw.update(cu_seqlens_q_padded=cup, cu_seqlens_kv_padded=cup)
    return PackedSeqParams(**kw)


def thd_runner(m, psp):
    return lambda q, k, v: m(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=psp).unsqueeze(1)


def test_thd_three_documents_never_attend_across():
    valid = [5, 9, 3]
    q, k, v = rand_qkv(sum(valid), 1)
    m = module()
    out = compare(thd_runner(m, packed(valid)), q, k, v, document_allowed(valid, valid, causal=True))
    assert out.shape == (17, 1, HEADS * HN)
    # Changing document 1's keys/values leaves documents 0 and 2 untouched.
    k2, v2 = k.clone(), v.clone()
    k2[5:14] += 3.0
    v2[5:14] -= 2.0
    out2 = thd_runner(m, packed(valid))(q, k2, v2)
    torch.testing.assert_close(out2[:5], out[:5].detach(), atol=0, rtol=0)
    torch.testing.assert_close(out2[14:], out[14:].detach(), atol=0, rtol=0)
    assert (out2[5:14] - out[5:14]).abs().max() > 1e-3


def test_thd_padded_documents_and_no_mask():
    valid, padded = [5, 9, 3], [8, 12, 4]
    q, k, v = rand_qkv(sum(padded) + 2, 1)  # 2 trailing rows beyond the last document
    allowed = torch.zeros(26, 26, dtype=torch.bool)
    allowed[:24, :24] = document_allowed(valid, padded, causal=True)
    out = compare(thd_runner(module(), packed(valid, padded)), q, k, v, allowed)
    pad_rows = [5, 6, 7, 17, 18, 19, 23, 24, 25]
    assert out[pad_rows].abs().max() == 0
    allowed[:24, :24] = document_allowed(valid, padded, causal=False)
    compare(thd_runner(module(AttnMaskType.no_mask), packed(valid, padded)), q, k, v, allowed)


def test_dropout_only_in_training():
    q, k, v = rand_qkv(8, 2)
    m = module(attention_dropout=0.5)
    m.eval()
    torch.testing.assert_close(m(q, k, v, None), m(q, k, v, None))
    m.train()
    torch.manual_seed(0)
    a = m(q, k, v, None)
    torch.manual_seed(1)
    assert (a - m(q, k, v, None)).abs().max() > 1e-3
    m0 = SDPACoreAttention(config(attention_dropout=0.5), 1, AttnMaskType.causal, "self", attention_dropout=0.0)
    m0.train()
    torch.testing.assert_close(m0(q, k, v, None), module()(q, k, v, None))


def test_softmax_scale_and_query_key_layer_scaling():
    q, k, v = rand_qkv(6, 1)
    m = SDPACoreAttention(config(), 1, AttnMaskType.causal, "self", softmax_scale=0.05)
    torch.testing.assert_close(m(q, k, v, None), reference_attention(q, k, v, causal_allowed(6), 0.05),
                               atol=1e-10, rtol=0)
    # apply_query_key_layer_scaling cancels out in megatron: the effective scale is unchanged
    m = SDPACoreAttention(config(apply_query_key_layer_scaling=True, fp16=True, params_dtype=torch.float16),
                          3, AttnMaskType.causal, "self")
    torch.testing.assert_close(m(q, k, v, None), module()(q, k, v, None))


def test_cp_layout_helper_matches_megatron_layout():
    # cp=2, one 16-token sequence: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert cp_local_positions([(0, 16, 16)], 2, 0, 8).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert cp_local_positions([(0, 16, 16)], 2, 1, 8).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # THD: every document split separately
    pos = cp_local_positions([(0, 4, 4), (4, 8, 6)], 2, 1, 7).tolist()
    assert pos == [1, 2, 6, 7, 8, 9, -1]


def test_clear_errors_for_unsupported_options():
    with pytest.raises(NotImplementedError, match="window_size"):
        module(window_size=(4, 0))
    with pytest.raises(NotImplementedError, match="softmax_type"):
        module(softmax_type="off-by-one")
    with pytest.raises(ValueError, match="context_parallel_size"):
        module(context_parallel_size=2)
    q, k, v = rand_qkv(4, 1)
    with pytest.raises(NotImplementedError, match="attention_bias"):
        module()(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="causal_bottom_right"):
        module()(q[:2], k, v, None)
    with pytest.raises(TypeError, match="boolean"):
        module(AttnMaskType.padding)(q, k, v, torch.zeros(1, 1, 4, 4))
    with pytest.raises(NotImplementedError, match="arbitrary"):
        module(AttnMaskType.arbitrary)(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=packed([4]))
    psp = packed([4])
    psp.cu_seqlens_kv = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cu_seqlens_kv"):
        module()(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=psp)


# ---------------------------------------------------------------------------------------
# CP = 2 and CP = 4 (one 4-rank gloo launch)
# ---------------------------------------------------------------------------------------
GOOD = ["bshd_causal", "bshd_causal_fp32", "bshd_no_mask", "thd_causal", "thd_padding_causal",
        "thd_no_mask", "self_attention", "self_attention_thd"]
BROKEN = ["bshd_swapped_layout", "bshd_contiguous_layout", "thd_whole_sequence_layout"]


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    return run_workers(WORKER, 4, tmp_path_factory.mktemp("core_attention_cp"))


@pytest.mark.parametrize("cp", ["cp2", "cp4"])
@pytest.mark.parametrize("scenario", GOOD)
def test_cp_matches_full_sequence_reference(cp_results, cp, scenario):
    """Each rank's outputs and q/k/v gradients (for SelfAttention: output and the
    CP-summed weight gradients) equal the full-sequence reference at its positions."""
    tol = 5e-6 if scenario.endswith("fp32") else 1e-10
    for rank, res in enumerate(cp_results):
        errors = res[cp][scenario]
        bad = {k: e for k, e in errors.items() if not e <= tol}
        assert not bad, f"rank {rank} {cp} {scenario}: errors above {tol}: {bad}"


@pytest.mark.parametrize("cp", ["cp2", "cp4"])
@pytest.mark.parametrize("scenario", BROKEN)
def test_cp_check_detects_wrong_layout(cp_results, cp, scenario):
    """Feeding a rank chunks in another order than megatron's must break the match on
    every rank: the comparison above is sensitive to the layout."""
    for rank, res in enumerate(cp_results):
        assert res[cp][scenario]["out"] > 1e-2, f"rank {rank} {cp} {scenario} not detected"


def test_megatron_plumbing_without_parallel_state():
    """pg_collection without .cp and no parallel_state -> CP = 1; nothing to checkpoint."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    m = SDPACoreAttention(config(), 1, AttnMaskType.causal, "self", pg_collection=ProcessGroupCollection())
    assert m.cp_size == 1
    assert m.sharded_state_dict(prefix="layer.", metadata={"dp_cp_group": None}) == {}
