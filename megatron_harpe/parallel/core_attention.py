"""Core attention for megatron-core when Transformer Engine is absent.

megatron-core's local ``DotProductAttention`` materialises the full ``[b, np, sq, sk]``
score tensor, refuses context parallelism (CP) and refuses packed (THD) sequences.
:class:`SDPACoreAttention` is a drop-in replacement built on
``torch.nn.functional.scaled_dot_product_attention`` (SDPA); inject it through a layer
spec::

    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention

It is the core attention on GPUs without TE and on CPU.

Inputs and outputs (what megatron's ``Attention.forward`` passes / expects)
---------------------------------------------------------------------------
* BSHD (``sbhd`` in megatron's words): query ``[sq, b, np, hn]``, key/value
  ``[sk, b, ng, hn]``; output ``[sq, b, np*hn]`` (what ``linear_proj`` takes).
* THD (``packed_seq_params.qkv_format == 'thd'``; megatron squeezes the batch dim):
  query ``[t, np, hn]``, key/value ``[t, ng, hn]``; output ``[t, np*hn]``.
* GQA: ``ng`` K/V groups, query head ``i`` uses group ``i // (np // ng)``.

What is supported
-----------------
=====================  =========================================================
no CP, BSHD            causal (``is_causal=True``: flash kernels on GPUs),
                       causal_bottom_right, no_mask; padding / padding_causal /
                       arbitrary with an explicit boolean ``attention_mask``
                       (megatron convention: True = masked out). With
                       ``attn_mask_type=causal`` the ``attention_mask`` argument is
                       ignored, exactly as TE and megatron's fused softmax do.
CP, BSHD               causal, causal_bottom_right, no_mask (and padding types with
                       ``attention_mask=None``). An explicit mask under CP raises;
                       with causal types the mask argument is ignored as above.
THD (with or without   causal-type masks -> causal within each document;
CP)                    no_mask / padding -> bidirectional within each document.
                       ``cu_seqlens_*_padded`` are honoured (tokens in the padding of
                       a document, or after the last document, produce zeros and
                       receive zero gradient). ``attention_mask`` is ignored.
=====================  =========================================================

Rejected with an error naming the option: sliding-window attention
(``config.window_size``), ``config.softmax_type`` other than ``'vanilla'``,
``config.qk_clip`` / ``config.log_max_attention_logit`` (SDPA does not expose the
logits), ``attention_bias``, THD with ``cu_seqlens_kv != cu_seqlens_q``,
an explicit ``attention_mask`` under CP or with ``attn_mask_type=arbitrary`` in THD.
``cp_comm_type`` is accepted and ignored: this module always all-gathers K/V
(hierarchical ``a2a+p2p`` groups are not used).

Scale: ``softmax_scale`` (megatron passes ``config.softmax_scale``) or
``1/sqrt(hn)``. ``config.apply_query_key_layer_scaling`` is a numerical trick that
megatron cancels out (it divides the scale by the layer number and multiplies the
scores back by it in the softmax), so the effective scale is the same and SDPA, which
computes the softmax in fp32 internally, does not need it.

A query row with no admissible key (fully masked by an explicit mask, or a padding
token of a packed document) yields zeros, as TE/flash do (megatron's unfused
softmax would instead average over all keys).

Context parallelism
-------------------
megatron's load-balanced layout: the sequence of length S (for THD: EACH packed
document, padded to a multiple of 2*cp) is cut into 2*cp chunks and CP rank r holds
chunks r and 2*cp-1-r, concatenated (see ``get_batch_on_this_cp_rank`` and
``_get_thd_freqs_on_this_cp_rank`` in megatron-core).

Every rank all-gathers K and V over the CP group (one collective for both), puts the
gathered rows back in natural (global) order with one ``index_select``, and then, for
each of its two local query chunks (global chunk j, positions [j*c, (j+1)*c) of the
document), attends to the keys of positions [0, (j+1)*c): the lower-right-aligned
causal mask over that key prefix is exactly "query position >= key position" in
global positions. On CUDA the lower-right mask is expressed with
``torch.nn.attention.bias.causal_lower_right`` so flash / memory-efficient kernels run
without a materialised mask; on CPU a ``[c, (j+1)*c]`` boolean mask is built.

Backward of the all-gather: each rank's gradient w.r.t. the gathered K/V holds
contributions for every owner's rows; they must be summed over ranks and each rank
keeps its own slice (a reduce-scatter). gloo has no reduce_scatter, so on gloo (and
any non-NCCL backend) the gradient is ``all_reduce``-d and each rank slices its rows
out (2x the traffic of a reduce-scatter, irrelevant at the sizes CPU runs use); with
NCCL on CUDA ``reduce_scatter_tensor`` is used.

Memory cost: every rank holds the all-gathered K and V of the whole sequence, O(S)
per rank per layer (for S = 32k, micro-batch 1, 8 K/V groups, hn = 128, bf16: 128 MiB
for K+V per layer, kept for backward), plus, on CUDA with GQA, the K/V prefix expanded to the
query heads for the lower-right chunk. The attention itself never materialises an
O(s*S) score matrix on GPUs (flash/efficient kernels). This is meant for CP on CPU,
in tests, and on GPUs without TE at moderate lengths; at 128k on GPUs use TE's ring
attention (``TEDotProductAttention`` with ``cp_comm_type='p2p'``), which overlaps the
K/V exchange with compute and never holds the whole sequence.

THD packing is computed document by document (one SDPA call per document and local
chunk) rather than with one ``[t, T]`` document mask, which at 128k would be 16 GiB of
booleans; it costs one host sync per forward to read ``cu_seqlens`` and one kernel
launch per document.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from megatron_harpe.profile_ranges import profiled

try:  # lower-right causal without a materialised mask (flash / efficient kernels)
    from torch.nn.attention.bias import causal_lower_right as _causal_lower_right
except ImportError:  # pragma: no cover - old torch
    _causal_lower_right = None

__all__ = ["SDPACoreAttention", "all_gather_sequence", "cp_local_positions"]

_CAUSAL_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal,
                 AttnMaskType.causal_bottom_right)


# --------------------------------------------------------------------------------------
# All-gather along the sequence dim with a gloo-compatible backward
# --------------------------------------------------------------------------------------
def _is_nccl(group, tensor: Tensor) -> bool:
    return tensor.is_cuda and "nccl" in str(dist.get_backend(group)).lower()


class _AllGatherSequence(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0 (rank order); backward sums the
    gradient over ranks and returns each rank its own rows (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        if _is_nccl(group, x):
            out = x.new_empty((world * x.size(0),) + tuple(x.shape[1:]))
            dist.all_gather_into_tensor(out, x, group=group)
            return out
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        n = grad.size(0) // world
        grad = grad.contiguous()
        if _is_nccl(group, grad):
            out = grad.new_empty((n,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        # gloo has no reduce_scatter: sum everything everywhere, keep our rows.
        total = grad.clone()
        dist.all_reduce(total, group=group)
        return total.narrow(0, rank * n, n).contiguous(), None


def all_gather_sequence(x: Tensor, group) -> Tensor:
    """All-gather ``x`` along dim 0 over ``group`` (rank-major), differentiably."""
    return _AllGatherSequence.apply(x, group)


# --------------------------------------------------------------------------------------
# Layout: which global positions does each rank hold
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Doc:
    """One sequence of the (padded) global layout."""

    start: int  # global start row (padded layout)
    padded: int  # rows it occupies (divisible by 2*cp when cp > 1)
    valid: int  # real tokens: positions [0, valid) of the document


def _local_segments(docs: List[_Doc], cp: int, rank: int) -> List[Tuple[int, int, int, int]]:
    """Local rows of ``rank`` as (doc index, local row start, position in doc, length).

    cp == 1: each document is one segment. cp > 1: document d contributes its chunks
    ``rank`` and ``2*cp-1-rank`` (each ``padded / (2*cp)`` long), in that order.
    """
    segs = []
    for i, d in enumerate(docs):
        if cp == 1:
            segs.append((i, d.start, 0, d.padded))
            continue
        c = d.padded // (2 * cp)
        local_start = d.start // cp
        segs.append((i, local_start, rank * c, c))
        segs.append((i, local_start + c, (2 * cp - 1 - rank) * c, c))
    return segs


def cp_local_positions(docs: List[Tuple[int, int, int]], cp: int, rank: int, total_local: int) -> Tensor:
    """Global row (padded layout) of every local row of ``rank``; -1 for trailing rows.

    ``docs`` are (start, padded_len, valid_len) triples. Exposed for tests and for
    other code that needs the CP layout (e.g. slicing labels or position ids).
    """
    ds = [_Doc(*d) for d in docs]
    pos = torch.full((total_local,), -1, dtype=torch.long)
    for i, row, p, n in _local_segments(ds, cp, rank):
        pos[row:row + n] = torch.arange(ds[i].start + p, ds[i].start + p + n)
    return pos


def _natural_order_index(docs: List[_Doc], cp: int, total_local: int, device) -> Tensor:
    """Index into the rank-major gathered rows that yields the padded global order."""
    total = docs[-1].start + docs[-1].padded if docs else 0
    src = torch.empty(total, dtype=torch.long)
    for r in range(cp):
        for i, row, p, n in _local_segments(docs, cp, r):
            g = docs[i].start + p
            src[g:g + n] = torch.arange(r * total_local + row, r * total_local + row + n)
    return src.to(device)


# --------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------
class SDPACoreAttention(MegatronModule):
    """Core attention on ``scaled_dot_product_attention`` with CP and THD support.

    Same constructor and forward signature as megatron-core 0.16.1
    ``DotProductAttention``; see the module docstring for what is supported.
    Process groups come from ``pg_collection.cp`` (plain ``torch.distributed`` groups
    work), else from ``parallel_state`` when it is initialised, else CP = 1.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type  # accepted, ignored: K/V are always all-gathered
        self.pg_collection = pg_collection
        # Attention.forward reads this only when qk_clip/log_max_attention_logit is on,
        # which is rejected below.
        self.current_max_attn_logits = None

        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise NotImplementedError(
                f"SDPACoreAttention does not support sliding-window attention "
                f"(config.window_size={config.window_size}); unset window_size or use "
                f"Transformer Engine's TEDotProductAttention.")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(
                f"SDPACoreAttention supports only config.softmax_type='vanilla' "
                f"(got {config.softmax_type!r}); use TEDotProductAttention for it.")
        if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
            raise NotImplementedError(
                "SDPACoreAttention cannot report attention logits: set config.qk_clip=False and "
                "config.log_max_attention_logit=False, or use TEDotProductAttention.")

        self.num_attention_heads = config.num_attention_heads
        self.num_query_groups = config.num_query_groups or config.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"config.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"config.num_query_groups={self.num_query_groups}.")
        kv_channels = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.hidden_size_per_attention_head = kv_channels
        # A given scale is used as is; apply_query_key_layer_scaling cancels out in
        # megatron (see module docstring), so it does not change the effective scale.
        self.softmax_scale = (1.0 / math.sqrt(kv_channels)) if softmax_scale is None else softmax_scale
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

        self.cp_group = self._resolve_cp_group(pg_collection, config)
        self.cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        if self.cp_size != config.context_parallel_size:
            raise ValueError(
                f"config.context_parallel_size={config.context_parallel_size} but the context-"
                f"parallel process group has {self.cp_size} rank(s); pass pg_collection with "
                f".cp set to the CP group (or initialise parallel_state) so they agree.")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """No parameters or buffers: nothing to checkpoint (megatron's default would
        need parallel_state's TP group)."""
        return {}

    @staticmethod
    def _resolve_cp_group(pg_collection, config):
        group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if group is None:
            group = parallel_state.get_context_parallel_group(check_initialized=False)
        if group is None and config.context_parallel_size > 1:
            raise ValueError(
                f"config.context_parallel_size={config.context_parallel_size} needs a CP process "
                f"group: pass pg_collection with .cp set, or initialise parallel_state first.")
        return group

    # ----------------------------------------------------------------------------------
    @profiled("harpe/core_attention")
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np*hn];
        THD: [t, np, hn], [t, ng, hn] -> [t, np*hn]."""
        if attention_bias is not None:
            raise NotImplementedError(
                "SDPACoreAttention does not support attention_bias; use TEDotProductAttention.")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if not isinstance(mask_type, AttnMaskType):  # checkpointed path may pass a tensor
            mask_type = AttnMaskType(int(mask_type))
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed_seq_params is not None and not thd:
            raise NotImplementedError(
                f"SDPACoreAttention supports packed_seq_params only with qkv_format='thd' "
                f"(got {packed_seq_params.qkv_format!r}).")

        if thd:
            if query.dim() != 3:
                raise ValueError(f"THD query must be [t, np, hn], got shape {tuple(query.shape)}")
            q, k, v = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        else:
            if query.dim() != 4:
                raise ValueError(f"query must be [sq, b, np, hn], got shape {tuple(query.shape)}")
            q, k, v = query, key, value
        if q.size(2) % k.size(2):
            raise ValueError(f"query heads ({q.size(2)}) must be a multiple of K/V groups ({k.size(2)}).")

        with self._dropout_rng(q):
            if thd:
                out = self._forward_thd(q, k, v, mask_type, attention_mask, packed_seq_params)
            elif self.cp_size > 1:
                out = self._forward_cp_bshd(q, k, v, mask_type, attention_mask)
            else:
                out = self._forward_bshd(q, k, v, mask_type, attention_mask)

        # [s, b, np, hn] -> [s, b, np*hn] (THD: [t, np*hn])
        out = out.reshape(out.size(0), out.size(1), -1)
        return out.squeeze(1) if thd else out

    # ----------------------------------------------------------------------------------
    @property
    def _p(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _dropout_rng(self, x: Tensor):
        """Attention dropout under megatron's model-parallel CUDA RNG, like DotProductAttention."""
        if self._p > 0 and x.is_cuda and not self.config.sequence_parallel:
            tracker = tensor_parallel.get_cuda_rng_tracker()
            if tracker.is_initialized():
                return tracker.fork()
        return contextlib.nullcontext()

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, mask: Optional[Tensor] = None) -> Tensor:
        """q [b, np, n_q, hn], k/v [b, ng, n_k, hn]. causal aligns bottom-right (equal to
        top-left when n_q == n_k): query a may see keys <= a + n_k - n_q."""
        n_q, n_k = q.size(2), k.size(2)
        gqa = q.size(1) != k.size(1)
        kwargs = dict(dropout_p=self._p, scale=self.softmax_scale)
        if mask is None and causal and n_q != n_k:
            if q.is_cuda and _causal_lower_right is not None:
                # CausalBias dispatches to flash/efficient kernels without enable_gqa
                # support on every path: expand K/V to the query heads here.
                if gqa:
                    rep = q.size(1) // k.size(1)
                    k = k.repeat_interleave(rep, dim=1)
                    v = v.repeat_interleave(rep, dim=1)
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=_causal_lower_right(n_q, n_k), **kwargs)
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            causal = False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa, **kwargs)

    @staticmethod
    def _to_bhsd(x: Tensor) -> Tensor:  # [s, b, h, d] -> [b, h, s, d]
        return x.permute(1, 2, 0, 3)

    @staticmethod
    def _from_bhsd(x: Tensor) -> Tensor:  # [b, h, s, d] -> [s, b, h, d]
        return x.permute(2, 0, 1, 3)

    # ---- BSHD, no CP ------------------------------------------------------------------
    def _forward_bshd(self, q, k, v, mask_type, attention_mask):
        sq, sk = q.size(0), k.size(0)
        qb, kb, vb = self._to_bhsd(q), self._to_bhsd(k), self._to_bhsd(v)
        explicit = attention_mask is not None and mask_type in (
            AttnMaskType.padding, AttnMaskType.padding_causal, AttnMaskType.arbitrary)
        if explicit:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"attention_mask must be boolean (True = masked out, megatron's convention), "
                    f"got dtype {attention_mask.dtype}.")
            allowed = ~attention_mask
            while allowed.dim() < 4:
                allowed = allowed.unsqueeze(0)
            if mask_type == AttnMaskType.padding_causal:
                allowed = allowed & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            # Rows with no admissible key give zeros (not NaN): let them see everything,
            # then zero them.
            has_key = allowed.any(dim=-1, keepdim=True)
            allowed = allowed | ~has_key
            out = self._sdpa(qb, kb, vb, causal=False, mask=allowed)
            out = out * has_key.to(out.dtype)
            return self._from_bhsd(out)
        if mask_type == AttnMaskType.arbitrary:
            raise ValueError("attn_mask_type=arbitrary needs an attention_mask.")
        causal = mask_type in _CAUSAL_TYPES
        if causal and sq != sk and mask_type != AttnMaskType.causal_bottom_right:
            if sq == 1:  # decoding with a KV cache: one query sees the whole cache
                causal = False
            else:
                raise ValueError(
                    f"attn_mask_type={mask_type.name} with sq={sq} != sk={sk} is ambiguous; use "
                    f"AttnMaskType.causal_bottom_right for queries aligned to the end of the keys.")
        return self._from_bhsd(self._sdpa(qb, kb, vb, causal=causal))

    # ---- BSHD under CP ----------------------------------------------------------------
    def _forward_cp_bshd(self, q, k, v, mask_type, attention_mask):
        if mask_type == AttnMaskType.arbitrary or (
                attention_mask is not None and mask_type in (AttnMaskType.padding, AttnMaskType.padding_causal)):
            raise NotImplementedError(
                f"SDPACoreAttention under context parallelism (context_parallel_size={self.cp_size}) "
                f"supports causal/no_mask attention without an explicit attention_mask "
                f"(got attn_mask_type={mask_type.name}); use THD packing for document masks.")
        s_local = q.size(0)
        if k.size(0) != s_local:
            raise ValueError(f"under CP, key must have as many rows as query ({k.size(0)} != {s_local}).")
        if s_local % 2:
            raise ValueError(
                f"under CP each rank holds 2 equal chunks; local sequence length {s_local} is odd "
                f"(the global sequence must be divisible by 2*context_parallel_size={2 * self.cp_size}).")
        S = s_local * self.cp_size
        docs = [_Doc(0, S, S)]
        return self._attend_docs(q, k, v, docs, causal=mask_type in _CAUSAL_TYPES)

    # ---- THD (packed), with or without CP ---------------------------------------------
    def _forward_thd(self, q, k, v, mask_type, attention_mask, psp: PackedSeqParams):
        if mask_type == AttnMaskType.arbitrary:
            raise NotImplementedError(
                "SDPACoreAttention with packed (THD) sequences supports causal and no_mask/padding "
                "masks per document, not attn_mask_type=arbitrary.")
        cu = psp.cu_seqlens_q
        if cu is None:
            raise ValueError("packed_seq_params.cu_seqlens_q is required for qkv_format='thd'.")
        cu_pad = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else cu
        for name, a, b in (("cu_seqlens_kv", psp.cu_seqlens_kv, cu),
                           ("cu_seqlens_kv_padded", psp.cu_seqlens_kv_padded, psp.cu_seqlens_q_padded)):
            if a is not None and b is not None and not torch.equal(a.cpu(), b.cpu()):
                raise NotImplementedError(
                    f"SDPACoreAttention supports THD self-attention only: packed_seq_params.{name} "
                    f"must equal its *_q counterpart.")
        cu_l, pad_l = cu.tolist(), cu_pad.tolist()
        if len(cu_l) != len(pad_l):
            raise ValueError("cu_seqlens_q and cu_seqlens_q_padded must have the same length.")
        cp = self.cp_size
        docs = []
        for i in range(len(cu_l) - 1):
            d = _Doc(int(pad_l[i]), int(pad_l[i + 1] - pad_l[i]), int(cu_l[i + 1] - cu_l[i]))
            if d.valid > d.padded or d.valid < 0:
                raise ValueError(f"document {i}: length {d.valid} exceeds its padded length {d.padded}.")
            if cp > 1 and d.padded % (2 * cp):
                raise ValueError(
                    f"document {i}: padded length {d.padded} is not divisible by "
                    f"2*context_parallel_size={2 * cp}; pad each sequence (cu_seqlens_q_padded).")
            docs.append(d)
        t_local = q.size(0)
        if docs and (docs[-1].start + docs[-1].padded) > t_local * cp:
            raise ValueError(
                f"packed sequences cover {docs[-1].start + docs[-1].padded} tokens but the input has "
                f"{t_local} local tokens x context_parallel_size={cp}.")
        if k.size(0) != t_local:
            raise ValueError(f"THD key must have as many rows as query ({k.size(0)} != {t_local}).")
        return self._attend_docs(q, k, v, docs, causal=mask_type in _CAUSAL_TYPES)

    # ---- the general path: documents x local chunks -----------------------------------
    def _attend_docs(self, q, k, v, docs: List[_Doc], causal: bool) -> Tensor:
        """q [t_local, b, np, hn], k/v [t_local, b, ng, hn] in the CP layout of ``docs``;
        returns [t_local, b, np, hn] with zeros on padding rows."""
        cp, t_local = self.cp_size, q.size(0)
        if cp > 1:
            hk = k.size(-1)
            kv = all_gather_sequence(torch.cat([k, v], dim=-1), self.cp_group)
            kv = kv.index_select(0, _natural_order_index(docs, cp, t_local, kv.device))
            k_nat, v_nat = kv[..., :hk], kv[..., hk:]
        else:
            k_nat, v_nat = k, v
        kb, vb = self._to_bhsd(k_nat), self._to_bhsd(v_nat)

        pieces, row = [], 0
        out_shape = lambda n: (n,) + tuple(q.shape[1:-1]) + (v.size(-1),)  # noqa: E731
        for i, seg_row, pos, n in _local_segments(docs, cp, self.cp_rank):
            d = docs[i]
            if seg_row > row:  # gap (cannot happen with consistent layouts; kept safe)
                pieces.append(q.new_zeros(out_shape(seg_row - row)))
            n_q = max(0, min(n, d.valid - pos))  # real query tokens in this chunk
            if n_q > 0:
                n_k = min(pos + n, d.valid) if causal else d.valid
                qs = self._to_bhsd(q[seg_row:seg_row + n_q])
                ks = kb[:, :, d.start:d.start + n_k]
                vs = vb[:, :, d.start:d.start + n_k]
                pieces.append(self._from_bhsd(self._sdpa(qs, ks, vs, causal=causal)))
            if n > n_q:
                pieces.append(q.new_zeros(out_shape(n - n_q)))
            row = seg_row + n
        if row < t_local:
            pieces.append(q.new_zeros(out_shape(t_local - row)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
