"""HARPE rotary embedding: one RoPE base per K/V group, as a drop-in for megatron-core's.

Why a module and not a patch: megatron-core's GPTModel asks its `rotary_pos_emb` module for
rotation angles (`forward(max_seq_len, offset, packed_seq, cp_group)`) and hands the result to
every layer; its attention applies them with `apply_rotary_pos_emb`, which only multiplies q/k
by cos/sin of those angles with broadcasting. Standard RoPE returns angles [seq, 1, 1, rot_dim];
this module returns one tensor per step:
- table mode (default): the local K/V groups' angles [seq, 1, groups_local, rot_dim]; the
  attention (models/attention.py, HarpeSelfAttention) gives each query head its group's angles
  (`query_and_key_angles`) and megatron-core's apply paths (bshd, packed thd, CP slicing of thd,
  inference offsets) do the rest unchanged.
- fused mode: the local groups' inverse frequencies [groups_local, rot_dim / 2]; the attention's
  Triton kernel computes every angle itself (rope/fused_kernel.py): no table at all.
One tensor, not a (q, k) pair, because the same object crosses megatron-core's activation
checkpointing, which saves its inputs with save_for_backward (tensors only).

What must hold (HARPE.md, "Consequences an implementation must get right"):
- q and k of one head use the same base. With GQA a query head shares its K/V group, so bases
  are per K/V group: query head i of the local slice uses group i // (q_heads / groups).
- Under tensor parallelism a rank holds a contiguous slice of groups; it uses exactly their bases.
- Under context parallelism a rank holds chunks r and 2*cp-1-r of the sequence (megatron-core's
  load-balanced layout); only the angles of those positions are computed. For packed (thd)
  sequences megatron-core's apply function does the per-document CP slicing itself from a
  table over one document's positions, so the table is returned unsliced, as megatron-core does.
- A full [seq, all heads, dim] table is never built: only the local heads and local positions.

Numerics: inverse frequencies and angles are computed exactly as megatron-core's
RotaryEmbedding computes them (fp32 arange / dim, base ** that, 1 / ..., position * inv_freq),
so HARPE with all bases equal is bit-identical to megatron-core's RoPE.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_harpe.profile_ranges import profiled
from megatron_harpe.rope.bases import validate_bases



def _group_size(group: Optional[torch.distributed.ProcessGroup]) -> int:
    return 1 if group is None else group.size()


def _group_rank(group: Optional[torch.distributed.ProcessGroup]) -> int:
    return 0 if group is None else group.rank()


def rotary_dim(kv_channels: int, rotary_percent: float) -> int:
    """The rotated part of a head, computed as megatron-core does."""
    return int(kv_channels * rotary_percent) if rotary_percent < 1.0 else kv_channels


def inverse_frequencies(bases: Sequence[float], dim: int) -> Tensor:
    """[len(bases), dim/2] inverse frequencies theta_{h,i} = b_h^(-2i/dim), fp32.

    Written as the same fp32 operations megatron-core's RotaryEmbedding uses, one row per base,
    so that a row equals megatron-core's inv_freq for that base bit for bit.
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    return torch.stack([1.0 / (float(base) ** exponents) for base in bases])


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int) -> Tensor:
    """Global positions held by CP rank r: chunks r and 2*cp-1-r of 2*cp equal chunks."""
    if cp_size == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 * context_parallel_size "
            f"({2 * cp_size}); pad or choose a sequence length that is"
        )
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def query_and_key_angles(group_angles: Tensor, query_heads_per_group: int) -> Tuple[Tensor, Tensor]:
    """(query angles, key angles) from K/V-group angles [s, 1, groups, dim]: query head h uses group
    h // query_heads_per_group, the order megatron-core's fused QKV projection gives query heads."""
    if query_heads_per_group == 1:
        return group_angles, group_angles
    return group_angles.repeat_interleave(query_heads_per_group, dim=2), group_angles


class HarpeRotaryEmbedding(RotaryEmbedding):
    """Rotary embedding with one base per K/V group (HARPE), sliced to this rank's heads.

    Args:
        kv_channels: head dimension.
        rotary_percent: fraction of the head that is rotated (megatron-core semantics).
        bases: one base per K/V group of the WHOLE model (all TP ranks), in group order.
        num_attention_heads: query heads of the whole model.
        num_query_groups: K/V groups of the whole model (== num_attention_heads for MHA).
        rotary_interleaved: rotate interleaved pairs (megatron-core semantics).
        fused: return the inverse frequencies for the fused kernel instead of an angle table.
        tp_group / cp_group: the groups whose slice this rank holds (None = no parallelism).
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float,
        bases: Sequence[float],
        num_attention_heads: int,
        num_query_groups: Optional[int] = None,
        rotary_interleaved: bool = False,
        fused: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> None:
        num_query_groups = num_query_groups or num_attention_heads
        bases = validate_bases(bases, num_groups=num_query_groups)
        _check_layout(num_attention_heads, num_query_groups, _group_size(tp_group))
        # The parent's constructor is reused for its bookkeeping (rotary_interleaved, cp_group)
        # and its methods (get_rotary_seq_len, dropping a stale inv_freq from old checkpoints);
        # its single-base inv_freq is replaced below.
        super().__init__(
            kv_channels=kv_channels,
            rotary_percent=rotary_percent,
            rotary_interleaved=rotary_interleaved,
            rotary_base=bases[0],
            use_cpu_initialization=True,
            cp_group=cp_group,
        )
        self.bases = tuple(bases)
        self.fused = fused
        self.dim = rotary_dim(kv_channels, rotary_percent)
        self.tp_group = tp_group
        tp_size, tp_rank = _group_size(tp_group), _group_rank(tp_group)
        groups_local = num_query_groups // tp_size
        self.local_group_slice = slice(tp_rank * groups_local, (tp_rank + 1) * groups_local)
        self.local_bases = self.bases[self.local_group_slice]
        self.query_heads_per_group = num_attention_heads // num_query_groups
        # [groups_local, dim/2]; plain attribute like megatron-core's inv_freq (not a buffer,
        # so it never enters a checkpoint: the base set travels in the config/metadata).
        self.inv_freq = inverse_frequencies(self.local_bases, self.dim)
        self._cache_key = None
        self._cache_value = None

    # ------------------------------------------------------------------ angles
    def _angles_for_positions(self, positions: Tensor) -> Tensor:
        """[len(positions), 1, groups_local, dim] angles for the local K/V groups."""
        inv_freq = self.inv_freq
        seq = positions.to(device=inv_freq.device, dtype=inv_freq.dtype)
        freqs = seq[:, None, None] * inv_freq[None, :, :]  # [s, groups_local, dim/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        return emb.unsqueeze(1)

    def query_and_key_angles(self, group_angles: Tensor) -> Tuple[Tensor, Tensor]:
        """(query angles, key angles) from this module's table-mode output."""
        return query_and_key_angles(group_angles, self.query_heads_per_group)

    def _move_to_compute_device(self) -> None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if device is not None and self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)

    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        """K/V-group angles for positions offset..offset+max_seq_len-1 (no CP slicing)."""
        self._move_to_compute_device()
        return self._angles_for_positions(torch.arange(max_seq_len) + offset)

    @profiled("harpe/rotary")
    def forward(
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: Optional[torch.distributed.ProcessGroup] = None,
    ) -> Tensor:
        """Table mode: the angles of this rank's K/V groups at its positions (its CP chunks unless
        packed), [s_local, 1, groups_local, dim]; cached, training asks for the same length every
        step. Fused mode: this rank's inverse frequencies [groups_local, dim / 2]."""
        if self.fused:
            self._move_to_compute_device()
            return self.inv_freq
        cp_group = cp_group if cp_group is not None else self.cp_group
        cp_size, cp_rank = _group_size(cp_group), _group_rank(cp_group)
        key = (max_seq_len, offset, packed_seq, cp_size, cp_rank)
        if key == self._cache_key:
            return self._cache_value
        self._move_to_compute_device()
        if packed_seq or cp_size == 1:
            positions = torch.arange(max_seq_len) + offset
        else:
            positions = context_parallel_positions(max_seq_len, cp_size, cp_rank) + offset
        result = self._angles_for_positions(positions)
        self._cache_key, self._cache_value = key, result
        return result

    def get_cos_sin(self, max_seq_len: int, offset: int = 0):
        raise NotImplementedError(
            "HARPE has one base per head; megatron-core's flash-decode / flashinfer RoPE paths take "
            "a single [seq, dim/2] cos/sin table. Disable config.flash_decode for HARPE models."
        )

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, local_bases={list(self.local_bases)}, "
                f"query_heads_per_group={self.query_heads_per_group}")


def _check_layout(num_attention_heads: int, num_query_groups: int, tp_size: int) -> None:
    """What the module's slicing relies on (config/model.py checks the same when a config is made)."""
    if num_attention_heads % num_query_groups != 0:
        raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of num_query_groups "
                         f"({num_query_groups})")
    if num_query_groups % tp_size != 0:
        raise ValueError(f"num_query_groups ({num_query_groups}) must be divisible by tensor_model_parallel_size "
                         f"({tp_size}) so that each TP rank holds whole K/V groups and their bases")
