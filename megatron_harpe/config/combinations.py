"""What Transformer Engine (by version) and the GPU (by compute capability) can run: the one place that knows.

A config can be valid key by key and still be a combination that TE or megatron-core cannot run: it crashes at
the first step after a queue wait ("No dot product attention backend is available"), or, worse, runs and is
wrong. Every such combination found by reading upstream's source is a rule here, with its source cited
(docs/gpu.md "Combinations" has the table). Three callers, three states of knowledge:

- config validation (config/validate.py), before torch is imported: TE and the GPU are unknown, so only the
  rules that hold for every TE version and GPU this project supports apply;
- the machine check at start-up (training/runtime.py check_runtime), on every rank before any process group:
  the installed TE version and the GPU's compute capability are known, so every rule applies;
- harpe-plan's search (planning/spec.py check_plan): a planned GPU (H100/H200: sm90) with the TE spec.

Rules take plain values (not a Config) so the planner can ask them about its own layouts. Each refusal names the
keys involved, the reason and what to set instead; callers turn it into exit 2 (ConfigError, LayoutError).

Read for these rules: Transformer Engine v2.9, v2.11 and v2.18 (the newest tag read; 2.19/2.20 were not
available to read), megatron-core core_v0.16.1 and core_v0.19.0. Abbreviations in the sources below: TE `CP` =
transformer_engine/pytorch/attention/dot_product_attention/context_parallel.py, `U` = .../utils.py, `DPA` =
.../dot_product_attention.py, `FA` = transformer_engine/common/fused_attn/fused_attn.cpp; MCore `TEX` =
megatron/core/extensions/transformer_engine.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

#: The compute capability below which TE's fused attention refuses FP8 current scaling and needs head dim 128
#: for FP8 attention training (Blackwell is sm100).
BLACKWELL = (10, 0)


@dataclass(frozen=True)
class Platform:
    """What the rules may know about the machine. None = unknown (config time): rules that depend on it are
    skipped there and applied at start-up, where the machine is known."""

    te_version: Optional[str] = None  # Transformer Engine's version; None: unknown, or TE absent (see `te`)
    capability: Optional[Tuple[int, int]] = None  # the GPU's compute capability
    te: Optional[bool] = None  # True: the TE spec runs; False: the local spec (cp_comm_type is not used)


@dataclass(frozen=True)
class Refusal:
    keys: Tuple[str, ...]
    reason: str
    instead: str
    source: str

    def message(self) -> str:
        return f"{' + '.join(self.keys)}: {self.reason}; {self.instead} (upstream: {self.source})"


def _version(text: str):
    from packaging.version import Version

    return Version(Version(text).base_version)


def _te_before(platform: Platform, version: str) -> Optional[bool]:
    """True/False when the TE version is known, None when it is not."""
    if not platform.te_version:
        return None
    return _version(platform.te_version) < _version(version)


# ---------------------------------------------------------------------------------------------- context parallel
def context_parallel_refusals(*, cp: int, cp_comm_type: str, packed: bool, query_heads_per_tp: int,
                              groups_per_tp: int, hierarchical_sizes: Optional[Sequence[int]],
                              platform: Platform = Platform()) -> List[Refusal]:
    """TE's context-parallel attention: which communication type runs with packed (THD) documents and which head
    counts. Nothing applies without CP or on the local spec (whose SDPA attention always all-gathers K/V)."""
    if cp <= 1 or platform.te is False:
        return []
    out: List[Refusal] = []
    if cp_comm_type == "a2a+p2p" and packed:
        out.append(Refusal(("parallel.cp_comm_type=a2a+p2p", "data.document_mask"),
                           "Transformer Engine's hierarchical CP has no packed (THD) path in any version read",
                           "use parallel.cp_comm_type p2p (any TE) or a2a (TE >= 2.10) with document masking",
                           "TE CP v2.9:3772, v2.11:3992, v2.18:5023 'format is not supported with hierarchical CP'"))
    if cp_comm_type == "a2a" and (query_heads_per_tp % cp or groups_per_tp % cp):
        out.append(Refusal(("parallel.cp_comm_type=a2a", "parallel.context", "parallel.tensor"),
                           f"a2a splits the heads of a TP rank over CP: {query_heads_per_tp} query and "
                           f"{groups_per_tp} K/V heads per TP rank are not divisible by CP {cp}",
                           "use parallel.cp_comm_type p2p, or a CP size that divides both head counts",
                           "TE CP v2.9:3189-3191, v2.11:3365-3367, v2.18:4243 'heads ... divisible by CP size'"))
    if cp_comm_type == "a2a+p2p" and hierarchical_sizes and len(hierarchical_sizes) == 2:
        a2a = hierarchical_sizes[0]
        if query_heads_per_tp % a2a or groups_per_tp % a2a:
            out.append(Refusal(("parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_context_sizes"),
                               f"the a2a level ({a2a}) splits the heads of a TP rank: {query_heads_per_tp} query and "
                               f"{groups_per_tp} K/V heads are not divisible by it (TE fails in a reshape)",
                               "choose an a2a size that divides both head counts",
                               "TE CP v2.11:456 (heads viewed as [cp_size, heads / cp_size])"))
    if packed and cp_comm_type == "all_gather" and _te_before(platform, "2.18"):
        out.append(Refusal(("parallel.cp_comm_type=all_gather", "data.document_mask"),
                           f"Transformer Engine {platform.te_version} has no packed (THD) path for all_gather "
                           f"context parallelism (added in 2.18)",
                           "use parallel.cp_comm_type p2p, or TE >= 2.18",
                           "TE CP v2.9:2670, v2.11:2842 assert qkv_format != 'thd'; v2.17:3064; accepted v2.18:3075"))
    if packed and cp_comm_type == "a2a" and _te_before(platform, "2.10"):
        out.append(Refusal(("parallel.cp_comm_type=a2a", "data.document_mask"),
                           f"Transformer Engine {platform.te_version} has no packed (THD) path for a2a context "
                           f"parallelism (added in 2.10)",
                           "use parallel.cp_comm_type p2p, or TE >= 2.10",
                           "TE CP v2.9:3193 assert qkv_format != 'thd' (gone in v2.10)"))
    return out


# ---------------------------------------------------------------------------------------------- FP8
def fp8_refusals(*, fp8: bool, dot_product_attention: bool, recipe: str, packed: bool, head_dim: int,
                 cp: int, cp_comm_type: str, tokens_per_rank: Sequence[Tuple[str, int]],
                 linear_dims: Sequence[Tuple[str, int, int]], platform: Platform = Platform()) -> List[Refusal]:
    """FP8 GEMM shapes and FP8 attention (TE's fused attention is the only FP8 attention backend in training:
    FlashAttention 2 is disabled for FP8 attention and FlashAttention 3 for FP8 training, U v2.11:468-480)."""
    if not fp8:
        return []
    out: List[Refusal] = []
    for what, tokens in tokens_per_rank:
        if tokens % 8:
            out.append(Refusal((what, "fp8.format"),
                               f"FP8 GEMMs need the tokens a rank feeds a linear layer divisible by 8; {what} "
                               f"gives {tokens}",
                               "choose lengths (and micro-batch) so that length x micro-batch / (CP x TP with "
                               "sequence parallelism) is a multiple of 8",
                               "TE pytorch/utils.py assert_dim_for_fp8_exec v2.11:439-447 (ValueError from v2.14)"))
    for what, out_features, in_features in linear_dims:
        if out_features % 8 or in_features % 16:
            out.append(Refusal((what, "fp8.format"),
                               f"FP8 GEMMs need a weight's output features per TP rank divisible by 8 and input "
                               f"features by 16; {what} has {out_features} x {in_features}",
                               "choose hidden/FFN sizes (and TP) that keep both multiples of 16",
                               "TE pytorch/utils.py assert_dim_for_fp8_exec v2.11:439-447"))
    if not dot_product_attention:
        return out
    if packed:
        out.append(Refusal(("fp8.dot_product_attention", "data.document_mask"),
                           "Transformer Engine's FP8 fused attention takes only bshd/sbhd layouts, not packed (THD) "
                           "documents, and no other backend runs FP8 attention in training: 'No dot product "
                           "attention backend is available' at the first step",
                           "turn fp8.dot_product_attention off (FP8 GEMMs stay on) or data.document_mask off",
                           "TE FA v2.9:187, v2.11:255, v2.18:284-291; U v2.11:468-480, 998-1000; DPA v2.11:1398"))
    if cp > 1 and cp_comm_type == "all_gather":
        out.append(Refusal(("fp8.dot_product_attention", "parallel.cp_comm_type=all_gather"),
                           "Transformer Engine has no FP8 path for all_gather context parallelism (FP8 attention)",
                           "use parallel.cp_comm_type p2p, a2a or a2a+p2p", "TE CP v2.9-v2.11 all_gather path"))
    if platform.capability is not None and tuple(platform.capability) < BLACKWELL:
        if recipe == "tensorwise":
            out.append(Refusal(("fp8.dot_product_attention", "fp8.recipe=tensorwise"),
                               f"Transformer Engine disables fused attention for FP8 current scaling below sm100, "
                               f"and this GPU is sm{platform.capability[0]}{platform.capability[1]}: no attention "
                               f"backend is left",
                               "use fp8.recipe delayed, or fp8.dot_product_attention false",
                               "TE U v2.9:476-479, v2.11:484-487, v2.18:604-607"))
        if head_dim != 128:
            out.append(Refusal(("fp8.dot_product_attention", "model head dim"),
                               f"Transformer Engine's FP8 attention trains only with head dim 128 below sm100; "
                               f"this model's is {head_dim} on sm{platform.capability[0]}{platform.capability[1]}",
                               "turn fp8.dot_product_attention off (FP8 GEMMs stay on)",
                               "TE FA v2.9:170-181, v2.11:238-249, v2.18:261-272 (head_dim_qk == head_dim_v == 128)"))
    return out


def fp8_linear_dims(*, hidden: int, ffn: int, heads: int, groups: int, head_dim: int,
                    tp: int) -> List[Tuple[str, int, int]]:
    """(name, output features, input features) per TP rank of a Llama layer's linears, as TE's FP8 GEMMs see them."""
    return [("attention QKV", (heads + 2 * groups) * head_dim // tp, hidden),
            ("attention output", hidden, heads * head_dim // tp),
            ("MLP fc1", 2 * ffn // tp, hidden),
            ("MLP fc2", hidden, ffn // tp)]


# ---------------------------------------------------------------------------------------------- a whole config
def config_refusals(cfg, platform: Platform = Platform()) -> List[Refusal]:
    """Every rule for a run's Config (config/schema.py) on `platform`."""
    from megatron_harpe.config.stages import build_schedule

    m, p, f, d = cfg.model, cfg.parallel, cfg.fp8, cfg.data
    tp, cp = p.tensor, p.context
    groups = m.num_query_groups or m.num_attention_heads
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    out = context_parallel_refusals(cp=cp, cp_comm_type=p.cp_comm_type, packed=d.document_mask,
                                    query_heads_per_tp=m.num_attention_heads // tp, groups_per_tp=groups // tp,
                                    hierarchical_sizes=p.hierarchical_context_sizes, platform=platform)
    split = cp * (tp if p.sequence_parallel and tp > 1 else 1)
    lengths = [(f"stage {s.index} seq_length {s.seq_length}", s.seq_length) for s in build_schedule(cfg)]
    lengths += [(f"training.probe.lengths {n}", n) for n in cfg.training.probe.lengths]
    tokens = [(what, length * d.micro_batch_size // split) for what, length in lengths]
    linear_dims = fp8_linear_dims(hidden=m.hidden_size, ffn=m.ffn_hidden_size, heads=m.num_attention_heads,
                                  groups=groups, head_dim=head_dim, tp=tp)
    out += fp8_refusals(fp8=f.format is not None, dot_product_attention=f.dot_product_attention, recipe=f.recipe,
                        packed=d.document_mask, head_dim=head_dim, cp=cp, cp_comm_type=p.cp_comm_type,
                        tokens_per_rank=tokens, linear_dims=linear_dims, platform=platform)
    return out
