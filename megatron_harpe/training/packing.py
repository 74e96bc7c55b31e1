"""Document masking: a micro-batch of EOD-separated documents -> this CP rank's packed (THD) stream.

Why this module exists
----------------------
GPTDataset samples are windows over one stream of documents joined by EOD tokens; trained as
plain [b, s] sequences, every token attends to the documents before it in its sample and its
RoPE/HARPE position counts from the start of the sample, not of its document. With
``data.document_mask: true`` the trainer instead hands the model each micro-batch as ONE packed
sequence in megatron-core's THD format, with ``PackedSeqParams`` built here from the EOD
positions, so attention and rotary positions restart at every document. Both core attentions read
the same contract: this project's SDPA attention (parallel/core_attention.py) and Transformer
Engine's (megatron-core's TEDotProductAttention hands ``PackedSeqParams`` to TE unchanged);
megatron-core's rotary apply (and HARPE's fused kernel) take each token's position inside its
document from ``cu_seqlens_q_padded``.

megatron-core's ``get_batch_on_this_cp_rank`` does not handle THD, and TE's
``thd_get_partitioned_indices`` exists only with TE on CUDA: the partition is computed here, in
plain torch, for every machine.

The layout
----------
* The ``b`` samples of a micro-batch are concatenated into one stream of ``b*s`` tokens. A document
  ends after every EOD token (the EOD belongs to the document it ends, as in Megatron-LM's
  ``reset_attention_mask``) and at every sample end (a sample boundary is a document boundary:
  the samples of a micro-batch are not contiguous text).
* ``cu_seqlens`` (int32, ``[n+1]``): cumulative real document lengths, ``cu_seqlens[-1] == b*s``.
* ``cu_seqlens_padded`` (int32, ``[n+1]``): with context parallelism (cp > 1) every document is
  padded to a multiple of ``2*cp`` so that it cuts into ``2*cp`` equal chunks; the last document's
  padding also rounds the whole stream up to ``total_multiple`` (``2*cp*tp`` with sequence
  parallelism, whose TP ranks split the local stream evenly; x 32 with FP8, see
  :func:`stream_multiple`). Without CP, SP and FP8 nothing is padded and
  ``cu_seqlens_padded == cu_seqlens``.
* ``max_seqlen`` (python int): the longest PADDED document. GPTModel sizes the rotary table by it,
  and megatron-core's THD rotary apply indexes positions 0..padded-1 of each document.
* CP rank ``r`` holds, of EVERY document in order, its chunks ``r`` and ``2*cp-1-r`` (each
  ``padded/(2*cp)`` long): megatron-core's load-balanced THD layout, the one TE and
  ``SDPACoreAttention`` expect. Its local stream has ``cu_seqlens_padded[-1] / cp`` rows.
* Padding rows: token and label ``pad_id`` (any valid id; the EOD id in the trainer), loss_mask 0
  (no loss, no gradient, not counted in the per-token normalisation), position id = its position
  in the padded document. Core attention never lets a real token attend to a padding row
  (``cu_seqlens`` bounds every document's keys).
* ``position_ids`` are each token's position inside its document. RoPE-family models do not read
  them (their positions come from ``cu_seqlens_padded``); they are returned so that the two agree
  by construction and any model that reads position ids gets the same positions.

Everything is computed on the host from the CPU batch the dataset yields (no device sync); the
trainer moves the results to the device afterwards. ``pack_micro_batch`` is vectorised (no Python
loop over documents): a 128k-token micro-batch of 4000 documents takes tens of milliseconds of one CPU core.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = ["DocumentLayout", "stream_multiple", "document_layout", "rank_rows", "pack_micro_batch", "packed_seq_params"]


@dataclass(frozen=True)
class DocumentLayout:
    """Where the documents of one packed micro-batch are (host tensors)."""

    cu_seqlens: Tensor  # int32 [n+1], real lengths
    cu_seqlens_padded: Tensor  # int32 [n+1], lengths padded for CP (and the stream for SP)
    max_seqlen: int  # longest padded document

    @property
    def num_documents(self) -> int:
        return self.cu_seqlens.numel() - 1


def stream_multiple(context: int, tensor: int = 1, sequence_parallel: bool = False, fp8: bool = False) -> int:
    """What the padded stream length must be a multiple of in a layout: 2*cp (CP's equal chunks), times
    tp with sequence parallelism (each TP rank holds an equal share of the local stream), times 32 with
    FP8 (Transformer Engine's FP8 GEMMs need token counts divisible by 8, 32 for its MXFP8/blockwise
    recipes). The extra padding goes to the last document."""
    multiple = 2 * context if context > 1 else 1
    if sequence_parallel:
        multiple *= tensor
    return multiple * 32 if fp8 else multiple


def document_layout(tokens: Tensor, eod_id: int, *, cp_size: int = 1, total_multiple: Optional[int] = None
                    ) -> DocumentLayout:
    """The documents of ``tokens`` [b, s] (or [s]) packed into one stream, padded for ``cp_size``.

    ``total_multiple``: the padded stream length must be a multiple of it (default ``2*cp_size``
    with CP, else 1); it must itself be a multiple of the per-document padding ``2*cp_size``.
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"document masking needs token ids shaped [micro_batch, seq_length], "
                         f"got {tuple(tokens.shape)}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    doc_multiple = 2 * cp_size if cp_size > 1 else 1
    total_multiple = doc_multiple if total_multiple is None else int(total_multiple)
    if total_multiple < 1 or total_multiple % doc_multiple:
        raise ValueError(f"total_multiple ({total_multiple}) must be a positive multiple of 2*cp_size ({doc_multiple})")
    ends = tokens.detach().cpu() == eod_id
    ends[:, -1] = True  # a sample end is a document end
    ends = torch.nonzero(ends.reshape(-1)).squeeze(1) + 1  # exclusive ends in the flat stream, increasing
    lengths = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (lengths + doc_multiple - 1) // doc_multiple * doc_multiple
    padded[-1] += (-int(padded.sum())) % total_multiple
    zero = lengths.new_zeros(1)
    cu = torch.cat([zero, ends]).to(torch.int32)
    cu_padded = torch.cat([zero, torch.cumsum(padded, 0)]).to(torch.int32)
    return DocumentLayout(cu_seqlens=cu, cu_seqlens_padded=cu_padded, max_seqlen=int(padded.max()))


def rank_rows(layout: DocumentLayout, cp_size: int = 1, cp_rank: int = 0) -> tuple[Tensor, Tensor]:
    """(source, position) of every local row of CP rank ``cp_rank``, int64, ``cu_seqlens_padded[-1]/cp`` long.

    source: index into the flat real stream (``tokens.reshape(-1)``), -1 for a padding row.
    position: the row's position inside its (padded) document.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside the context-parallel group of {cp_size}")
    cu = layout.cu_seqlens.to(torch.int64)
    cu_pad = layout.cu_seqlens_padded.to(torch.int64)
    padded, lengths = torch.diff(cu_pad), torch.diff(cu)
    if cp_size > 1 and bool((padded % (2 * cp_size)).any()):
        raise ValueError(f"every padded document must be a multiple of 2*cp_size ({2 * cp_size}); "
                         f"build the layout with document_layout(..., cp_size={cp_size})")
    local = padded // cp_size  # rows each document has on every rank
    doc = torch.repeat_interleave(torch.arange(local.numel()), local)
    j = torch.arange(doc.numel()) - torch.repeat_interleave(cu_pad[:-1] // cp_size, local)  # row within the doc
    if cp_size > 1:
        chunk = (padded // (2 * cp_size))[doc]
        position = torch.where(j < chunk, cp_rank * chunk + j, (2 * cp_size - 1 - cp_rank) * chunk + (j - chunk))
    else:
        position = j
    source = torch.where(position < lengths[doc], cu[:-1][doc] + position, torch.full_like(position, -1))
    return source, position


def pack_micro_batch(batch: Dict[str, Tensor], eod_id: int, *, cp_size: int = 1, cp_rank: int = 0,
                     total_multiple: Optional[int] = None, pad_id: Optional[int] = None
                     ) -> tuple[Dict[str, Tensor], DocumentLayout]:
    """This CP rank's packed rows of a micro-batch, and the layout of the whole micro-batch.

    ``batch``: ``tokens``, ``labels``, ``loss_mask`` shaped [b, s] (host tensors; other keys are
    ignored). Returns ``{tokens, labels, loss_mask, position_ids}`` shaped [1, t_local] and the
    :class:`DocumentLayout`; :func:`packed_seq_params` turns the layout into megatron-core's
    ``PackedSeqParams``.
    """
    tokens = batch["tokens"]
    layout = document_layout(tokens, eod_id, cp_size=cp_size, total_multiple=total_multiple)
    source, position = rank_rows(layout, cp_size, cp_rank)
    real = source >= 0
    index = source.clamp(min=0)
    pad = eod_id if pad_id is None else pad_id
    out = {}
    for key, fill in (("tokens", pad), ("labels", pad), ("loss_mask", 0)):
        flat = batch[key].reshape(-1)
        out[key] = torch.where(real, flat[index], fill)[None]
    out["position_ids"] = position[None]
    return out, layout


def packed_seq_params(layout: DocumentLayout, device=None):
    """megatron-core ``PackedSeqParams`` (qkv_format 'thd') for ``layout``, its tensors on ``device``.

    Self-attention: the key/value fields equal the query fields. ``cp_group`` and ``local_cp_size``
    stay None: the model's own CP group is used (setting them would switch TE to another group).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = layout.cu_seqlens.to(device)
    cu_padded = layout.cu_seqlens_padded.to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                           cu_seqlens_kv_padded=cu_padded, max_seqlen_q=layout.max_seqlen,
                           max_seqlen_kv=layout.max_seqlen)
