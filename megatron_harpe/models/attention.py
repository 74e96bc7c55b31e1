"""HarpeSelfAttention: megatron-core's SelfAttention, told how to apply HARPE's per-group rotation.

Why a subclass chosen by the layer spec (models/spec.py), and why the rotation is resolved here:
GPTModel hands every layer one `rotary_pos_emb`, which also crosses megatron-core's activation
checkpointing (full recompute saves it with save_for_backward, so it must be one tensor). HARPE's
rotary module therefore returns one tensor per step, shared by all layers:
- table mode: the K/V groups' angles [s_local, 1, groups_local, rot_dim]. Here each query head gets
  its group's angles (a GQA model has more query heads than groups) and megatron-core's own apply
  path rotates q and k, as for one-base RoPE.
- fused mode: the groups' inverse frequencies [groups_local, rot_dim / 2] (no table). Here q and k
  are rotated right after the QKV projection by the Triton kernel (rope/fused_kernel.py), which
  computes every angle from the token's position (CP chunk, packed document, inference offset) and
  the group's frequency; megatron-core's apply path is then skipped.
Everything else (QKV projection, core attention: SDPA or Transformer Engine, output projection) is
megatron-core's SelfAttention unchanged.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from megatron.core.transformer.attention import SelfAttention

from megatron_harpe.profile_ranges import profiled
from megatron_harpe.rope.harpe_rotary import query_and_key_angles


class HarpeSelfAttention(SelfAttention):
    """SelfAttention for HARPE models (used by both the local and the Transformer Engine spec)."""

    _fused_rotation: Optional[dict] = None

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, *args, packed_seq_params=None, **kwargs):
        if isinstance(rotary_pos_emb, Tensor) and rotary_pos_emb.dim() == 2:  # fused mode: inverse frequencies
            self._fused_rotation = {"inv_freq": rotary_pos_emb, "packed_seq_params": packed_seq_params,
                                    "inference_context": inference_context}
            rotary_pos_emb = None
        elif isinstance(rotary_pos_emb, Tensor):
            rotary_pos_emb = self._query_and_key_angles(rotary_pos_emb)
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                                   rotary_pos_emb, *args, packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._fused_rotation = None

    @profiled("harpe/query_key_angles")  # table mode; megatron-core's apply path then rotates q and k
    def _query_and_key_angles(self, group_angles: Tensor):
        """(query angles, key angles): query head h of this rank uses its K/V group's angles."""
        if group_angles.size(2) != self.num_query_groups_per_partition:
            raise ValueError(f"HARPE angles for {group_angles.size(2)} K/V groups, but this rank's attention holds "
                             f"{self.num_query_groups_per_partition}: the rotary module and the layer disagree on "
                             f"the tensor-parallel layout")
        per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        return query_and_key_angles(group_angles, per_group)

    def get_query_key_value_tensors(self, *args, **kwargs):
        qkv = super().get_query_key_value_tensors(*args, **kwargs)
        if self._fused_rotation is None:
            return qkv
        query, key, *rest = qkv
        query, key = self._rotate_fused(query, key, **self._fused_rotation)
        return (query, key, *rest)

    @profiled("harpe/apply_rotary")  # fused mode: the Triton kernel rotates q and k
    def _rotate_fused(self, query: Tensor, key: Tensor, *, inv_freq: Tensor, packed_seq_params,
                      inference_context):
        from megatron_harpe.rope.fused_kernel import apply_harpe_rotary_qk

        cp = self.pg_collection.cp
        cp_size, cp_rank = (cp.size(), cp.rank()) if cp is not None else (1, 0)
        offset = 0
        if inference_context is not None:
            if not inference_context.is_static_batching():
                raise NotImplementedError("HARPE's fused RoPE kernel supports static-batching inference only; "
                                          "build the model with model.position.kernel=unfused")
            offset = int(inference_context.sequence_len_offset or 0)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu_seqlens = packed_seq_params.cu_seqlens_q_padded
            if cu_seqlens is None:
                cu_seqlens = packed_seq_params.cu_seqlens_q
            # query/key are [t, 1, heads, dim] here (megatron-core squeezes the batch dim later)
            q, k = apply_harpe_rotary_qk(query.squeeze(1), key.squeeze(1), inv_freq,
                                         interleaved=self.config.rotary_interleaved, cu_seqlens=cu_seqlens,
                                         cp_size=cp_size, cp_rank=cp_rank)
            return q.unsqueeze(1), k.unsqueeze(1)
        return apply_harpe_rotary_qk(query, key, inv_freq, interleaved=self.config.rotary_interleaved,
                                     cp_size=cp_size, cp_rank=cp_rank, offset=offset)
