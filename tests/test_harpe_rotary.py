"""The HARPE rotary module against an independent complex-number reference and megatron-core.

The reference below rotates each 2-D pair as a complex number z * exp(i * m * theta_{h,j}) in
float64, with theta computed from the head's own base; it shares no code with the module.
"""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from megatron.core.models.common.embeddings.rope_utils import (
    _apply_rotary_pos_emb_bshd,
    _apply_rotary_pos_emb_thd,
)
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding, context_parallel_positions


# ----------------------------------------------------------------------------- reference
def reference_rotate(x, positions, head_bases, rot_dim, interleaved=False):
    """Rotate x [s, b, h, d] per head with complex multiplication (float64)."""
    x = x.double().clone()
    half = rot_dim // 2
    for h, base in enumerate(head_bases):
        theta = torch.tensor([base ** (-2.0 * j / rot_dim) for j in range(half)], dtype=torch.float64)
        angle = positions.double()[:, None] * theta[None, :]  # [s, half]
        rot = torch.polar(torch.ones_like(angle), angle)[:, None, :]  # [s, 1, half]
        if interleaved:
            re, im = x[:, :, h, 0:rot_dim:2], x[:, :, h, 1:rot_dim:2]
        else:
            re, im = x[:, :, h, :half], x[:, :, h, half:rot_dim]
        z = torch.complex(re, im) * rot
        if interleaved:
            x[:, :, h, 0:rot_dim:2], x[:, :, h, 1:rot_dim:2] = z.real, z.imag
        else:
            x[:, :, h, :half], x[:, :, h, half:rot_dim] = z.real, z.imag
    return x


def make_module(bases, heads=None, **kw):
    heads = heads or len(bases)
    return HarpeRotaryEmbedding(kv_channels=kw.pop("kv_channels", 16), rotary_percent=kw.pop("rotary_percent", 1.0),
                                bases=bases, num_attention_heads=heads, num_query_groups=len(bases), **kw)


BASES4 = [10000.0, 50000.0, 250000.0, 1_000_000.0]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_matches_complex_reference_per_head(interleaved, rotary_percent):
    torch.manual_seed(0)
    seq, d = 64, 16
    module = make_module(BASES4, kv_channels=d, rotary_percent=rotary_percent, rotary_interleaved=interleaved)
    x = torch.randn(seq, 2, 4, d)
    out = _apply_rotary_pos_emb_bshd(x, module(seq), rotary_interleaved=interleaved)
    ref = reference_rotate(x, torch.arange(seq), BASES4, int(d * rotary_percent), interleaved)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    if rotary_percent < 1.0:  # the unrotated tail passes through untouched
        assert torch.equal(out[..., d // 2:], x[..., d // 2:])


def test_gqa_query_heads_use_their_groups_base():
    torch.manual_seed(0)
    bases = [10000.0, 1_000_000.0]
    module = make_module(bases, heads=4)  # 4 query heads, 2 K/V groups
    group_angles = module(32)
    assert group_angles.shape == (32, 1, 2, 16)  # one tensor (it crosses activation checkpointing)
    q_emb, k_emb = module.query_and_key_angles(group_angles)
    assert q_emb.shape == (32, 1, 4, 16) and k_emb.shape == (32, 1, 2, 16)
    for head in range(4):
        assert torch.equal(q_emb[:, :, head], k_emb[:, :, head // 2])
    q = torch.randn(32, 1, 4, 16)
    ref = reference_rotate(q, torch.arange(32), [bases[h // 2] for h in range(4)], 16)
    torch.testing.assert_close(_apply_rotary_pos_emb_bshd(q, q_emb).double(), ref, atol=2e-5, rtol=1e-5)


def test_all_bases_equal_is_bit_identical_to_megatron_rope():
    torch.manual_seed(0)
    seq, d, base = 128, 32, 500000.0
    ours = make_module([base] * 4, kv_channels=d)
    theirs = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)
    freqs = theirs.get_freqs_non_repeated(seq)
    megatron_emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    our_emb = ours(seq)
    assert torch.equal(our_emb, megatron_emb.expand_as(our_emb))
    x = torch.randn(seq, 2, 4, d)
    assert torch.equal(_apply_rotary_pos_emb_bshd(x, our_emb), _apply_rotary_pos_emb_bshd(x, megatron_emb))


def test_scores_depend_only_on_relative_position_per_head():
    torch.manual_seed(0)
    d = 16
    module = make_module(BASES4, kv_channels=d)
    emb = module(400)
    q = torch.randn(1, 1, 4, d).expand(400, 1, 4, d)
    k = torch.randn(1, 1, 4, d).expand(400, 1, 4, d)
    q_rot = _apply_rotary_pos_emb_bshd(q, emb).double()
    k_rot = _apply_rotary_pos_emb_bshd(k, emb).double()

    def score(m, n):  # per-head <q_m, k_n>
        return (q_rot[m, 0] * k_rot[n, 0]).sum(-1)

    for delta in (0, 3, 57, 200):
        scores = torch.stack([score(n + delta, n) for n in (0, 11, 100, 150)])
        torch.testing.assert_close(scores, scores[:1].expand_as(scores), atol=1e-4, rtol=1e-4)
    # and each head has its own function of the distance (different bases, different scores)
    far = score(300, 0)
    assert len({round(v, 3) for v in far.tolist()}) == 4


def test_inference_offset_matches_shifted_positions():
    """Decoding asks for the same length at growing offsets: the cached table must follow the offset."""
    module = make_module(BASES4)
    full = module(48).clone()
    for offset in (32, 0, 8, 32):  # cache hits and misses in between, never cleared by hand
        assert torch.equal(module(16, offset=offset), full[offset:offset + 16]), offset


def test_context_parallel_positions_follow_megatron_chunking():
    # megatron-core: 2*cp chunks, rank r holds chunks r and 2cp-1-r
    assert context_parallel_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert context_parallel_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible by 2 \\* context_parallel_size"):
        context_parallel_positions(10, 2, 0)


@pytest.fixture(scope="module")
def single_rank_group():
    """A real one-rank gloo process group (megatron-core's thd apply wants a CP group)."""
    if not dist.is_initialized():
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return dist.new_group([0])


def test_packed_thd_positions_restart_per_document(single_rank_group):
    torch.manual_seed(0)
    lengths = [5, 12, 7]
    cu_seqlens = torch.tensor([0, 5, 17, 24], dtype=torch.int32)
    module = make_module(BASES4, cp_group=single_rank_group)
    freqs = module(max(lengths), packed_seq=True)
    t = torch.randn(sum(lengths), 4, 16)
    out = _apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_group=single_rank_group)
    positions = torch.cat([torch.arange(n) for n in lengths])
    ref = reference_rotate(t.unsqueeze(1), positions, BASES4, 16).squeeze(1)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


def _tensor_parallel_groups(size: int):
    """`size` real gloo process groups, one per TP rank, made in one process (each rank's group is
    created in its own thread: the constructor waits until every rank has joined)."""
    import threading
    from datetime import timedelta

    store = dist.HashStore()
    groups = [None] * size

    def join(rank):
        groups[rank] = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=30))

    threads = [threading.Thread(target=join, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return groups


def test_tensor_parallel_ranks_hold_only_their_groups():
    """GQA, 8 query heads in 4 K/V groups, TP=2: rank r computes only groups 2r, 2r+1 (two bases,
    four query heads), and the ranks' angles side by side are the whole model's."""
    full = make_module(BASES4, heads=8)
    full_q, full_k = full.query_and_key_angles(full(24))
    for rank, group in enumerate(_tensor_parallel_groups(2)):
        module = make_module(BASES4, heads=8, tp_group=group)
        assert module.local_bases == tuple(BASES4[2 * rank:2 * rank + 2])
        assert module.inv_freq.shape == (2, 8)  # never a row for another rank's group
        q, k = module.query_and_key_angles(module(24))
        assert q.shape == (24, 1, 4, 16) and k.shape == (24, 1, 2, 16)
        assert torch.equal(q, full_q[:, :, 4 * rank:4 * rank + 4]) and torch.equal(k, full_k[:, :, 2 * rank:2 * rank + 2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bases=[1e4, 2e4, 3e4], num_attention_heads=4, num_query_groups=4), "3 bases but the model has 4 K/V groups"),
        (dict(bases=[1e4, 2e4], num_attention_heads=3, num_query_groups=2), "multiple of num_query_groups"),
        (dict(bases=[1e4, 0.5], num_attention_heads=2, num_query_groups=2), "every RoPE base must be > 1"),
    ],
)
def test_bad_layouts_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HarpeRotaryEmbedding(kv_channels=16, rotary_percent=1.0, **kwargs)


def test_groups_must_divide_by_tensor_parallel(single_rank_group):
    class TwoRankGroupShape:  # only size()/rank() are read when validating the layout
        def size(self):
            return 4

        def rank(self):
            return 0

    with pytest.raises(ValueError, match="divisible by tensor_model_parallel_size"):
        make_module([1e4, 2e4], heads=4, tp_group=TwoRankGroupShape())
