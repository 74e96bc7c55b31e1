"""The fused HARPE RoPE kernel against megatron-core's unfused path and a float64 reference.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
imported: `@triton.jit` picks interpreter or compiler when it decorates). Sizes are tiny on
purpose; every comparison is also checked to be able to fail (a position off by one, or query
heads mapped to the wrong K/V group, must be detected by the same tolerance).

Tolerances (measured values in docs/fused_rope.md):
- fp32, fused vs unfused (the same fp32 angle products): 2e-6 absolute, forward and grads.
- fp32 vs the float64 reference: the fp32 rounding of the angle p * theta (<= p_max * 2^-24 rad)
  and of inv_freq, times |x|: `_fp32_bound`.
- bf16 vs the float64 reference: the fused output is the exact rotation rounded ONCE to bf16, so
  elementwise |err| <= 2^-8 |ref| (half a bf16 ulp) + a tiny fp32 term; the unfused path rounds
  cos/sin and each product to bf16 and is allowed 2^-6 |ref| (two ulps) + one ulp of max|x|.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

pytest.importorskip("triton")

from megatron.core.models.common.embeddings.rope_utils import (  # noqa: E402
    _apply_rotary_pos_emb_bshd,
    _apply_rotary_pos_emb_thd,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding  # noqa: E402

from megatron_harpe.rope import fused_kernel  # noqa: E402
from megatron_harpe.rope.fused_kernel import apply_harpe_rotary_qk, fused_rope_available  # noqa: E402
from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding  # noqa: E402

if not fused_rope_available():
    pytest.skip("fused RoPE cannot run here (no CUDA and TRITON_INTERPRET != 1)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
BASES2 = [10000.0, 1_000_000.0]
D = 32


# ----------------------------------------------------------------------------- helpers
def reference_rotate(x, positions, head_bases, rot_dim, interleaved, sign=1.0):
    """float64 rotation of x [n, b, h, d]: pair j of head h at position p becomes z * exp(i p theta),
    theta = base_h^(-2j/rot_dim); sign=-1 rotates back (the gradient of the forward)."""
    x = x.detach().double().clone()
    half = rot_dim // 2
    pos = torch.as_tensor(positions, dtype=torch.float64)
    for h, base in enumerate(head_bases):
        theta = torch.tensor([base ** (-2.0 * j / rot_dim) for j in range(half)], dtype=torch.float64)
        rot = torch.polar(torch.ones(len(pos), half, dtype=torch.float64), sign * pos[:, None] * theta)[:, None]
        sl = (slice(0, rot_dim, 2), slice(1, rot_dim, 2)) if interleaved else (slice(0, half), slice(half, rot_dim))
        z = torch.complex(x[:, :, h, sl[0]], x[:, :, h, sl[1]]) * rot
        x[:, :, h, sl[0]], x[:, :, h, sl[1]] = z.real, z.imag
    return x


def _fp32_bound(x, positions):
    """fp32 vs exact: angle rounding (half an ulp of p_max, plus inv_freq's few-ulp error) times |x|."""
    p_max = float(max(positions)) + 1.0
    return float(x.detach().abs().max()) * (p_max * 2.0 ** -21 + 2.0 ** -20)


def _head_bases(bases, hq, hk, swapped=False):
    hpg = hq // hk
    q = [bases[(h % hk) if swapped else (h // hpg)] for h in range(hq)]
    return q, list(bases)


def _module(bases, hq, rotary_percent=1.0, interleaved=False, cp_group=None):
    return HarpeRotaryEmbedding(kv_channels=D, rotary_percent=rotary_percent, bases=bases, num_attention_heads=hq,
                                num_query_groups=len(bases), rotary_interleaved=interleaved, cp_group=cp_group)


def _split(module, angles):
    """(query, key) angles from the module's one table-mode tensor (K/V-group angles)."""
    return module.query_and_key_angles(angles)


def _grads(outs, inputs, weights):
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, inputs)


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype).requires_grad_(True)


def assert_matches_reference(out, x, positions, head_bases, rot_dim, interleaved, atol, sign=1.0,
                             wrong_positions=None, wrong_bases=None):
    """out == reference within atol, and the reference with a deliberate mistake is NOT within atol."""
    ref = reference_rotate(x, positions, head_bases, rot_dim, interleaved, sign)
    err = (out.double() - ref).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:.3g}"
    mistakes = []
    if wrong_positions is not None:
        mistakes.append((wrong_positions, head_bases))
    if wrong_bases is not None:
        mistakes.append((positions, wrong_bases))
    for bad_positions, bad_bases in mistakes:
        bad = reference_rotate(x, bad_positions, bad_bases, rot_dim, interleaved, sign)
        assert (out.double() - bad).abs().max().item() > 10 * atol, "the comparison cannot see this mistake"
    return err


_GROUPS = {}


def gloo_groups(size):
    """`size` real gloo groups made in this process, one thread per rank (the constructor waits for all)."""
    if size not in _GROUPS:
        store, groups = dist.HashStore(), [None] * size

        def join(rank):
            groups[rank] = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=30))

        threads = [threading.Thread(target=join, args=(r,)) for r in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _GROUPS[size] = groups
    return _GROUPS[size]


# ----------------------------------------------------------------------------- sbhd
@pytest.mark.parametrize("hq, hk, interleaved, rotary_percent, d", [
    (2, 2, False, 1.0, D),   # MHA, half rotation
    (4, 2, False, 0.5, D),   # GQA, rotary_percent 0.5 (pass-through tail)
    (4, 2, True, 1.0, D),    # GQA, interleaved
    (2, 2, True, 0.5, D),    # MHA, interleaved, pass-through
    (4, 2, True, 0.5, 40),   # rot_dim 20: 10 pairs and a 20-channel tail, neither a power of two
    (2, 2, False, 0.75, 40),  # rot_dim 30: 15 pairs, tail 10
])
def test_sbhd_fp32_forward_and_grads(hq, hk, interleaved, rotary_percent, d):
    torch.manual_seed(0)
    s, b = 40, 2  # 40 = 2.5 token blocks of the interpreter's config: a partial block too
    bases = BASES2
    module = HarpeRotaryEmbedding(kv_channels=d, rotary_percent=rotary_percent, bases=bases, num_attention_heads=hq,
                                  num_query_groups=hk, rotary_interleaved=interleaved)
    rot = module.dim
    q, k = _leaf(s, b, hq, d), _leaf(s, b, hk, d)
    oq, ok = apply_harpe_rotary_qk(q, k, module.inv_freq, interleaved=interleaved)
    assert oq.shape == q.shape and ok.shape == k.shape and oq.is_contiguous() and ok.is_contiguous()

    qa, ka = _split(module, module(s))
    uq = _apply_rotary_pos_emb_bshd(q, qa, rotary_interleaved=interleaved)
    uk = _apply_rotary_pos_emb_bshd(k, ka, rotary_interleaved=interleaved)
    torch.testing.assert_close(oq, uq, atol=2e-6, rtol=0)
    torch.testing.assert_close(ok, uk, atol=2e-6, rtol=0)
    if rotary_percent < 1.0:
        assert torch.equal(oq[..., rot:], q[..., rot:]) and torch.equal(ok[..., rot:], k[..., rot:])

    weights = (torch.randn_like(oq), torch.randn_like(ok))
    fq, fk = _grads((oq, ok), (q, k), weights)
    gq, gk = _grads((uq, uk), (q, k), weights)
    torch.testing.assert_close(fq, gq, atol=2e-6, rtol=0)
    torch.testing.assert_close(fk, gk, atol=2e-6, rtol=0)

    pos = list(range(s))
    qb, kb = _head_bases(bases, hq, hk)
    qb_bad, _ = _head_bases(bases, hq, hk, swapped=True)
    wrong = [p + 1 for p in pos]
    tol = _fp32_bound(q, pos)
    assert_matches_reference(oq, q, pos, qb, rot, interleaved, tol, wrong_positions=wrong,
                             wrong_bases=qb_bad if hq != hk else qb[::-1])
    assert_matches_reference(ok, k, pos, kb, rot, interleaved, tol, wrong_positions=wrong)
    # gradient: the transpose of the rotation = rotation by the negative angle of the weights
    assert_matches_reference(fq, weights[0], pos, qb, rot, interleaved, _fp32_bound(weights[0], pos), sign=-1.0,
                             wrong_positions=wrong)
    assert_matches_reference(fk, weights[1], pos, kb, rot, interleaved, _fp32_bound(weights[1], pos), sign=-1.0)


def _cp_positions(s_global, cp, rank):
    chunk = s_global // (2 * cp)
    return list(range(rank * chunk, (rank + 1) * chunk)) + \
        list(range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk))


@pytest.mark.parametrize("cp, rank", [(2, 0), (2, 1), (4, 2)])
def test_sbhd_context_parallel(cp, rank):
    torch.manual_seed(cp * 10 + rank)
    chunk, hq, hk, b = 9, 4, 2, 1
    s_global, s_local = 2 * cp * chunk, 2 * chunk
    group = gloo_groups(cp)[rank]
    module = _module(BASES2, hq, cp_group=group)
    q, k = _leaf(s_local, b, hq, D), _leaf(s_local, b, hk, D)
    oq, ok = apply_harpe_rotary_qk(q, k, module.inv_freq, cp_size=cp, cp_rank=rank)
    qa, ka = _split(module, module(s_global))  # the module slices the angles to this rank's chunks
    uq, uk = _apply_rotary_pos_emb_bshd(q, qa), _apply_rotary_pos_emb_bshd(k, ka)
    torch.testing.assert_close(oq, uq, atol=2e-6, rtol=0)
    torch.testing.assert_close(ok, uk, atol=2e-6, rtol=0)
    weights = (torch.randn_like(oq), torch.randn_like(ok))
    for f, u in zip(_grads((oq, ok), (q, k), weights), _grads((uq, uk), (q, k), weights)):
        torch.testing.assert_close(f, u, atol=2e-6, rtol=0)

    pos = _cp_positions(s_global, cp, rank)
    qb, kb = _head_bases(BASES2, hq, hk)
    wrong_rank = _cp_positions(s_global, cp, (rank + 1) % cp)  # another rank's chunks
    assert_matches_reference(oq, q, pos, qb, D, False, _fp32_bound(q, pos), wrong_positions=wrong_rank)
    assert_matches_reference(ok, k, pos, kb, D, False, _fp32_bound(k, pos), wrong_positions=[p + 1 for p in pos])


def test_inference_offset_fp16():
    torch.manual_seed(1)
    s, offset, hq, hk = 5, 37, 4, 2
    module = _module(BASES2, hq, interleaved=True)
    q = torch.randn(s, 1, hq, D).half()
    k = torch.randn(s, 1, hk, D).half()
    oq, ok = apply_harpe_rotary_qk(q, k, module.inv_freq, interleaved=True, offset=offset)
    assert oq.dtype == torch.float16
    qa, ka = _split(module, module(s, offset=offset))
    uq = _apply_rotary_pos_emb_bshd(q, qa, rotary_interleaved=True)
    torch.testing.assert_close(oq.float(), uq.float(), atol=8e-3, rtol=0)  # fp16: one or two ulps of |x| <= 4
    pos = list(range(offset, offset + s))
    qb, kb = _head_bases(BASES2, hq, hk)
    # fp16 output rounded once: half an ulp (2^-11 relative) plus the fp32 angle term
    tol = 2.0 ** -11 * float(q.abs().max()) * 2 + _fp32_bound(q.float(), pos)
    assert_matches_reference(oq, q, pos, qb, D, True, tol, wrong_positions=[p - offset for p in pos])
    assert_matches_reference(ok, k, pos, kb, D, True, tol, wrong_positions=[p + 1 for p in pos])


def test_long_context_positions_fp32():
    """At p ~ 131k both paths share the fp32 rounding of the angle (up to p * 2^-24 ~ 8e-3 rad off
    exact), so they still agree with each other to ~1e-6 - the kernel forms the same product."""
    torch.manual_seed(8)
    s, offset = 6, 131_000
    module = _module(BASES2, 2)
    q, k = torch.randn(s, 1, 2, D), torch.randn(s, 1, 2, D)
    oq, ok = apply_harpe_rotary_qk(q, k, module.inv_freq, offset=offset)
    angles = module(s, offset=offset)
    torch.testing.assert_close(oq, _apply_rotary_pos_emb_bshd(q, angles), atol=2e-6, rtol=0)
    torch.testing.assert_close(ok, _apply_rotary_pos_emb_bshd(k, angles), atol=2e-6, rtol=0)
    shifted = _apply_rotary_pos_emb_bshd(q, module(s, offset=offset + 1))
    assert (oq - shifted).abs().max() > 0.1


def test_single_base_equals_megatron_rope():
    """All groups on one base (the benchmark's 'fused one-base'): megatron-core's own RoPE table."""
    torch.manual_seed(2)
    s, base = 24, 500000.0
    inv = HarpeRotaryEmbedding(kv_channels=D, rotary_percent=1.0, bases=[base] * 2, num_attention_heads=2).inv_freq
    theirs = RotaryEmbedding(kv_channels=D, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    half = theirs.get_freqs_non_repeated(s)  # [s, D/2]: megatron-core's own angles
    freqs = torch.cat((half, half), dim=-1)[:, None, None, :]
    q, k = torch.randn(s, 2, 2, D), torch.randn(s, 2, 2, D)
    oq, ok = apply_harpe_rotary_qk(q, k, inv)
    torch.testing.assert_close(oq, _apply_rotary_pos_emb_bshd(q, freqs), atol=2e-6, rtol=0)
    torch.testing.assert_close(ok, _apply_rotary_pos_emb_bshd(k, freqs), atol=2e-6, rtol=0)


# ----------------------------------------------------------------------------- thd
def _thd_positions(lengths, cp, rank):
    pos = []
    for L in lengths:
        seg = L // (2 * cp)
        if cp == 1:
            pos += list(range(L))
        else:
            pos += list(range(rank * seg, (rank + 1) * seg)) + list(range(L - seg * (rank + 1), L - seg * rank))
    return pos


@pytest.mark.parametrize("cp, rank, interleaved", [(1, 0, False), (2, 0, True), (2, 1, False)])
def test_thd_packed_documents(cp, rank, interleaved):
    torch.manual_seed(3 + rank)
    lengths = [8, 20, 12]  # global, padded to multiples of 2 * cp
    cu = torch.tensor([0, 8, 28, 40], dtype=torch.int32)
    hq, hk = 4, 2
    t_local = sum(lengths) // cp
    group = gloo_groups(cp)[rank]
    module = _module(BASES2, hq, interleaved=interleaved, cp_group=group)
    q, k = _leaf(t_local, hq, D), _leaf(t_local, hk, D)
    oq, ok = apply_harpe_rotary_qk(q, k, module.inv_freq, interleaved=interleaved, cu_seqlens=cu,
                                   cp_size=cp, cp_rank=rank)
    qa, ka = _split(module, module(max(lengths), packed_seq=True))  # table over one document's positions, unsliced
    assert qa.shape[0] != cu[-1]  # (megatron-core switches to absolute positions when they are equal)
    uq = _apply_rotary_pos_emb_thd(q, cu, qa, rotary_interleaved=interleaved, cp_group=group)
    uk = _apply_rotary_pos_emb_thd(k, cu, ka, rotary_interleaved=interleaved, cp_group=group)
    torch.testing.assert_close(oq, uq, atol=2e-6, rtol=0)
    torch.testing.assert_close(ok, uk, atol=2e-6, rtol=0)
    weights = (torch.randn_like(oq), torch.randn_like(ok))
    fq, fk = _grads((oq, ok), (q, k), weights)
    for f, u in zip((fq, fk), _grads((uq, uk), (q, k), weights)):
        torch.testing.assert_close(f, u, atol=2e-6, rtol=0)

    pos = _thd_positions(lengths, cp, rank)
    qb, kb = _head_bases(BASES2, hq, hk)
    qb_bad, _ = _head_bases(BASES2, hq, hk, swapped=True)
    no_restart = list(range(t_local))  # positions that do not restart per document
    assert_matches_reference(oq.unsqueeze(1), q.unsqueeze(1), pos, qb, D, interleaved, _fp32_bound(q, pos),
                             wrong_positions=no_restart, wrong_bases=qb_bad)
    assert_matches_reference(ok.unsqueeze(1), k.unsqueeze(1), pos, kb, D, interleaved, _fp32_bound(k, pos),
                             wrong_positions=[p + 1 for p in pos])
    assert_matches_reference(fq.unsqueeze(1), weights[0].unsqueeze(1), pos, qb, D, interleaved,
                             _fp32_bound(weights[0], pos), sign=-1.0, wrong_positions=no_restart)


def test_thd_empty_document_and_single_document():
    torch.manual_seed(4)
    inv = HarpeRotaryEmbedding(kv_channels=D, rotary_percent=1.0, bases=BASES2, num_attention_heads=2).inv_freq
    for lengths in ([6, 0, 11, 3], [17]):
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        q, k = torch.randn(sum(lengths), 2, D), torch.randn(sum(lengths), 2, D)
        oq, _ = apply_harpe_rotary_qk(q, k, inv, cu_seqlens=cu)
        pos = _thd_positions(lengths, 1, 0)
        assert_matches_reference(oq.unsqueeze(1), q.unsqueeze(1), pos, BASES2, D, False, _fp32_bound(q, pos),
                                 wrong_positions=[p + 1 for p in pos])


# ----------------------------------------------------------------------------- bf16
def test_bf16_rounds_once_and_is_closer_to_exact_than_the_table_path():
    torch.manual_seed(5)
    s, b, hq, hk = 40, 1, 4, 2
    module = _module(BASES2, hq)
    q, k = _leaf(s, b, hq, D, dtype=torch.bfloat16), _leaf(s, b, hk, D, dtype=torch.bfloat16)
    oq, ok = apply_harpe_rotary_qk(q, k, module.inv_freq)
    assert oq.dtype == ok.dtype == torch.bfloat16
    qa, ka = _split(module, module(s))
    uq, uk = _apply_rotary_pos_emb_bshd(q, qa), _apply_rotary_pos_emb_bshd(k, ka)
    pos = list(range(s))
    qb, kb = _head_bases(BASES2, hq, hk)
    worst = {}
    for name, x, fused, unfused, hb in (("q", q, oq, uq, qb), ("k", k, ok, uk, kb)):
        ref = reference_rotate(x, pos, hb, D, False)
        tiny = _fp32_bound(x.float(), pos)
        fused_err = (fused.double() - ref).abs()
        unfused_err = (unfused.double() - ref).abs()
        assert (fused_err <= 2.0 ** -8 * ref.abs() + tiny).all(), f"{name}: fused is not within half a bf16 ulp"
        ulp_x = 2.0 ** -7 * float(x.detach().abs().max())
        assert (unfused_err <= 2.0 ** -6 * ref.abs() + ulp_x).all(), f"{name}: unfused outside two bf16 ulps"
        assert fused_err.max() <= unfused_err.max()
        worst[name] = (fused_err.max().item(), unfused_err.max().item())
        # the same check sees a one-position shift
        shifted = reference_rotate(x, [p + 1 for p in pos], hb, D, False)
        assert not (fused.double() - shifted).abs().le(2.0 ** -8 * shifted.abs() + tiny).all()
    # and the bf16 output IS the fp32 computation rounded once, to nearest even
    with torch.no_grad():
        f32q, f32k = apply_harpe_rotary_qk(q.float(), k.float(), module.inv_freq)
    assert torch.equal(oq, f32q.bfloat16()) and torch.equal(ok, f32k.bfloat16())
    weights = (torch.randn(oq.shape), torch.randn(ok.shape))
    fq, fk = _grads((oq, ok), (q, k), weights)
    gq, gk = _grads((uq, uk), (q, k), weights)
    # bf16 gradients: both are bf16 roundings of the same exact value (|w| <= ~4.5): within 2 ulps
    ulp_w = 2.0 ** -7 * max(float(w.abs().max()) for w in weights)
    torch.testing.assert_close(fq.float(), gq.float(), atol=2 * ulp_w, rtol=0)
    torch.testing.assert_close(fk.float(), gk.float(), atol=2 * ulp_w, rtol=0)
    ref_gq = reference_rotate(weights[0].to(torch.bfloat16), pos, qb, D, False, sign=-1.0)
    assert (fq.double() - ref_gq).abs().max() <= 2.0 ** -8 * float(ref_gq.abs().max()) + ulp_w / 2


# ----------------------------------------------------------------------------- strides
def test_non_contiguous_views_give_the_same_result():
    torch.manual_seed(6)
    s, b, hq, hk = 20, 2, 4, 2
    module = _module(BASES2, hq)
    inv = module.inv_freq
    fused_qkv = torch.randn(s, b, hq + 2 * hk, D)  # like the fused QKV projection, split by head
    q, k = fused_qkv[:, :, :hq], fused_qkv[:, :, hq:hq + hk]
    assert not q.is_contiguous() and not k.is_contiguous()
    oq, ok = apply_harpe_rotary_qk(q, k, inv)
    cq, ck = apply_harpe_rotary_qk(q.contiguous(), k.contiguous(), inv)
    assert torch.equal(oq, cq) and torch.equal(ok, ck) and oq.is_contiguous()
    qa, ka = _split(module, module(s))
    torch.testing.assert_close(oq, _apply_rotary_pos_emb_bshd(q, qa), atol=2e-6, rtol=0)
    # batch-major storage seen as [s, b, h, d]
    qt = torch.randn(b, s, hq, D).transpose(0, 1)
    kt = torch.randn(b, s, hk, D).transpose(0, 1)
    oq, ok = apply_harpe_rotary_qk(qt, kt, inv)
    cq, ck = apply_harpe_rotary_qk(qt.contiguous(), kt.contiguous(), inv)
    assert torch.equal(oq, cq) and torch.equal(ok, ck)
    # packed thd slices, with a gradient flowing back into the fused tensor
    packed = torch.randn(s, hq + 2 * hk, D, requires_grad=True)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    oq, ok = apply_harpe_rotary_qk(packed[:, :hq], packed[:, hq:hq + hk], inv, cu_seqlens=cu)
    q2, k2 = packed.detach()[:, :hq].clone(), packed.detach()[:, hq:hq + hk].clone()
    cq, ck = apply_harpe_rotary_qk(q2, k2, inv, cu_seqlens=cu)
    assert torch.equal(oq, cq) and torch.equal(ok, ck)
    weights = (torch.randn_like(oq), torch.randn_like(ok))
    (grad,) = _grads((oq, ok), (packed,), weights)
    q2.requires_grad_(True)
    k2.requires_grad_(True)
    gq, gk = _grads(apply_harpe_rotary_qk(q2, k2, inv, cu_seqlens=cu), (q2, k2), weights)
    assert torch.equal(grad[:, :hq], gq) and torch.equal(grad[:, hq:hq + hk], gk)
    assert torch.equal(grad[:, hq + hk:], torch.zeros_like(grad[:, hq + hk:]))  # v untouched


def test_batch_loop_and_batch_grid_agree(monkeypatch):
    """Short sequences spread the batch over the grid; long ones loop over it inside a program."""
    torch.manual_seed(7)
    inv = _module(BASES2, 4).inv_freq
    q, k = torch.randn(18, 3, 4, D), torch.randn(18, 3, 2, D)
    spread = apply_harpe_rotary_qk(q, k, inv, interleaved=True)
    monkeypatch.setattr(fused_kernel, "_MIN_PROGRAMS", 1)
    looped = apply_harpe_rotary_qk(q, k, inv, interleaved=True)
    assert torch.equal(spread[0], looped[0]) and torch.equal(spread[1], looped[1])
    qb, kb = _head_bases(BASES2, 4, 2)
    pos = list(range(18))
    assert_matches_reference(looped[0], q, pos, qb, D, True, _fp32_bound(q, pos), wrong_positions=[p + 1 for p in pos])


def test_one_launch_forward_and_one_backward(monkeypatch):
    calls = []
    real = fused_kernel._launch
    monkeypatch.setattr(fused_kernel, "_launch", lambda *a, **kw: calls.append(kw["backward"]) or real(*a, **kw))
    inv = HarpeRotaryEmbedding(kv_channels=D, rotary_percent=1.0, bases=BASES2, num_attention_heads=4,
                               num_query_groups=2).inv_freq
    q, k = _leaf(6, 1, 4, D), _leaf(6, 1, 2, D)
    oq, ok = apply_harpe_rotary_qk(q, k, inv)
    assert calls == [False]
    (oq.sum() + ok.sum()).backward()
    assert calls == [False, True]


# ----------------------------------------------------------------------------- bad input
def _bad(**overrides):
    inv = HarpeRotaryEmbedding(kv_channels=D, rotary_percent=1.0, bases=BASES2, num_attention_heads=4,
                               num_query_groups=2).inv_freq
    args = dict(q=torch.randn(8, 1, 4, D), k=torch.randn(8, 1, 2, D), inv_freq=inv)
    args.update(overrides)
    q, k, inv = args.pop("q"), args.pop("k"), args.pop("inv_freq")
    return lambda: apply_harpe_rotary_qk(q, k, inv, **args)


@pytest.mark.parametrize("call, message", [
    (_bad(inv_freq=torch.ones(2, 16, dtype=torch.float64)), "inv_freq must be float32"),
    (_bad(q=torch.randn(8, 1, 3, D)), "q has 3 heads, not a multiple of the 2 K/V groups"),
    (_bad(k=torch.randn(8, 1, 4, D)), "inv_freq has 2 rows but k has 4 heads"),
    (_bad(q=torch.randn(8, 1, 4, 2 * D)[..., ::2]), "q's last dimension must have stride 1"),
    (_bad(k=torch.randn(8, 1, 2, D, 2)[..., 0]), "k's last dimension must have stride 1"),
    (_bad(inv_freq=torch.ones(2, D)), "rot_dim = 2 \\* inv_freq.shape\\[1\\] = 64 exceeds the head dimension 32"),
    (_bad(q=torch.randn(8, 4, D), k=torch.randn(8, 2, D), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32),
          offset=3), "offset must be 0 with packed"),
    (_bad(q=torch.randn(8, 4, D), k=torch.randn(8, 2, D), cu_seqlens=torch.tensor([0, 8])), "1-D int32"),
    (_bad(q=torch.randn(8, 4, D), k=torch.randn(8, 2, D), cu_seqlens=torch.tensor([0, 6, 16], dtype=torch.int32),
          cp_size=2), "divisible by 2 \\* cp_size"),
    (_bad(q=torch.randn(8, 4, D), k=torch.randn(8, 2, D), cu_seqlens=torch.tensor([0, 12], dtype=torch.int32)),
     "must equal the number of local tokens"),
    (_bad(q=torch.randn(7, 1, 4, D), k=torch.randn(7, 1, 2, D), cp_size=2), "local sequence length must be even"),
    (_bad(cp_size=2, cp_rank=2), "0 <= cp_rank < cp_size"),
    (_bad(q=torch.randn(8, 1, 4, D).to(torch.int32)), "q has dtype torch.int32"),
    (_bad(k=torch.randn(8, 1, 2, D).half()), "same dtype"),
    (_bad(k=torch.randn(9, 1, 2, D)), "same leading"),
    (_bad(q=torch.randn(8, 4, D)), "q must be 4-D for the sbhd layout"),
    (_bad(inv_freq=torch.ones(2, 16, requires_grad=True)), "inv_freq requires grad"),
])
def test_bad_inputs_are_refused_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from megatron_harpe.rope import fused_kernel as f\n"
            "print(f.fused_rope_available())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_rope.py"), "--seq", "64", "--repeat", "1",
                          "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "CPU (interpreter): not a performance measurement" in run.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-interpreter"
    assert report["rows"] and all(r["fused_matches_unfused"] for r in report["rows"])
