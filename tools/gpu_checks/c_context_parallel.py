"""Section c, context-parallel slicing: megatron-core's get_pos_emb_on_this_cp_rank on the full HARPE table
equals the rotary module's own table for that rank (cp 2, 4, 8, every rank), and the fused kernel given
cp_size / cp_rank rotates with the same positions."""
from __future__ import annotations

from .common import Env, Section, group_bases
from .reference import TOL_FP32, pair_mag


class _StandInGroup:
    """What megatron-core's get_pos_emb_on_this_cp_rank and the rotary module ask a CP group: size(), rank()."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def run(sec: Section, env: Env) -> None:
    import torch
    from megatron.core.models.common.embeddings.rope_utils import (_apply_rotary_pos_emb_bshd,
                                                                   get_pos_emb_on_this_cp_rank)

    from megatron_harpe.rope.fused_kernel import apply_harpe_rotary_qk
    from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

    z = env.sizes["c"]
    S, hq, hk, d = z["seq"], z["hq"], z["hk"], z["d"]
    bases = group_bases(hk, env.cpu)
    kw = dict(kv_channels=d, rotary_percent=1.0, bases=bases, num_attention_heads=hq, num_query_groups=hk)
    # get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group) is the same function in megatron-core 0.16.1 and
    # 0.19.2 (megatron/core/models/common/embeddings/rope_utils.py, lines 48-70 in both: cp_group.size() and
    # .rank(), a pinned CPU index [r, 2cp-1-r] moved with .cuda(), index_select on seq_dim). RotaryEmbedding's
    # constructor (rotary_pos_embedding.py) only stores the group it is given, in both releases.
    sec.note("megatron-core's get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group) (0.16.1 and 0.19.2 alike) "
             "asks the group only for size() and rank() (then index_selects chunks r and 2cp-1-r on the device), so "
             "a stand-in object answering those two stands for each rank of a CP group: no torch.distributed, one "
             "device" + (" (on CPU its pin_memory/.cuda() go through the project's CPU backend)" if env.cpu else ""))
    full = HarpeRotaryEmbedding(**kw)(S)  # [S, 1, hk, d], no CP
    fused_inv = HarpeRotaryEmbedding(**kw, fused=True)(S)
    gen = torch.Generator(device=env.device).manual_seed(2)
    rows = []
    for cp in z["cps"]:
        equal_all, worst = True, 0.0
        for r in range(cp):
            group = _StandInGroup(cp, r)
            theirs = get_pos_emb_on_this_cp_rank(full, 0, group)
            ours = HarpeRotaryEmbedding(**kw, cp_group=group)(S)
            equal = theirs.shape == ours.shape and torch.equal(theirs, ours)
            equal_all &= equal
            if not equal:
                sec.log(f"  cp {cp} rank {r}: tables differ (shapes {tuple(theirs.shape)} / {tuple(ours.shape)})")
            # the fused kernel with cp_size/cp_rank rotates this rank's rows with the same positions
            s_local = S // cp
            q = torch.randn(s_local, 1, hq, d, device=env.device, dtype=torch.float32, generator=gen)
            k = torch.randn(s_local, 1, hk, d, device=env.device, dtype=torch.float32, generator=gen)
            hpg = hq // hk
            ref_q = _apply_rotary_pos_emb_bshd(q, theirs.repeat_interleave(hpg, dim=2) if hpg > 1 else theirs)
            ref_k = _apply_rotary_pos_emb_bshd(k, theirs)
            fq, fk = apply_harpe_rotary_qk(q, k, fused_inv, cp_size=cp, cp_rank=r)
            e = max(((fq.double() - ref_q.double()).abs() / pair_mag(q)).max().item(),
                    ((fk.double() - ref_k.double()).abs() / pair_mag(k)).max().item())
            worst = max(worst, e)
        sec.check(f"cp {cp}: every rank's HARPE table == get_pos_emb_on_this_cp_rank(full table) (torch.equal)",
                  equal_all, value=f"{cp} ranks, local tables [{S // cp}, 1, {hk}, {d}]", tolerance="bit-identical")
        sec.check(f"cp {cp}: fused kernel (cp_size, cp_rank) == megatron-core apply on the sliced table, every rank",
                  worst <= 2 * TOL_FP32, value={"max_diff_over_pair_mag": worst},
                  tolerance=f"{2 * TOL_FP32:g} x |z| (fp32)")
        rows.append([cp, cp, equal_all, worst])
        sec.need(1, f"cp sizes after {cp}")
    sec.table("per CP size", ["cp", "ranks checked", "tables equal", "fused vs sliced-table max err / |z|"], rows)

