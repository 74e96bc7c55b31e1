"""The reduced twin of a run: what preflight builds and checks instead of the user's full model.

The twin keeps everything that decides where a position or a head ends up, and drops what only makes the run big:

kept    heads, K/V groups, head dim (so hidden size), the position encoding and its bases (of the run's longest
        stage: the context the run is for), TP / SP / CP / CP communication / PP / VPP / DP, packing and document
        masking, eod_mask_loss, precision, FP8 (on a GPU), recompute, the spec (Transformer Engine or local) and
        the RoPE kernel the machine picks;
reduced layers (2, or one per pipeline chunk), random weights drawn so that attention depends on positions, the sequence (the shortest multiple of what every CP chunk and
        TP/SP shard needs, at least 128 tokens), the batch (two micro-batches per DP rank), and on a CPU the FFN
        width and the vocabulary (they meet neither positions nor layout: a 32 x 128-head attention on 32 gloo
        ranks is what a CPU can still run in minutes);
off     init_from (the twin's weights are random; the initial-model check runs the real model), the distributed
        optimizer (it moves where the reduced gradient lives, not its value: see parity.py), evaluation, probes,
        logging sinks.

Far positions: the sequence is short, so the twin's second pass shifts every position by `far_offset`, making its
last token the run's last position (target_length - 1, e.g. 131,071) - the angles a 128k run applies, without a
128k attention.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from megatron_harpe.config.model import ModelConfig
from megatron_harpe.config.schema import Config
from megatron_harpe.config.stages import build_schedule
from megatron_harpe.training.packing import stream_multiple

#: the twin's shortest sequence: long enough for a few documents of a packed batch and every CP chunk
MIN_TWIN_TOKENS = 128
#: widths of a CPU twin (per TP rank for the FFN)
CPU_FFN_PER_TP_RANK = 128
CPU_VOCAB = 1024
#: the twin's weights are drawn with std ATTENTION_SCALE / sqrt(hidden): query and key entries of std ~1.6, attention
#: logits of std ~2.5, an attention that depends on positions. At megatron-core's usual 0.02 a narrow twin (hidden
#: 64) attends almost uniformly and a CP chunk-order fault moved bf16 gradients by 2% against 1% of rounding noise;
#: at this scale by 140% against 5% (measured on the CPU, docs/preflight.md).
ATTENTION_SCALE = 1.6
#: the EOD id of the twin's synthetic documents (ordinary tokens are drawn from 1..vocab-1)
TWIN_EOD = 0


@dataclass
class Twin:
    cfg: Config  # the twin's config: harpe-train's own schema, built by the trainer as any run
    full: Config  # the user's config (overrides applied)
    model_cfg: ModelConfig  # the twin's model (the longest stage's position encoding)
    full_model_cfg: ModelConfig
    world_size: int
    data_parallel: int
    seq_length: int
    target_length: int  # the run's longest sequence: the far pass ends at position target_length - 1
    micro_batches: int  # per DP rank
    notes: List[str] = field(default_factory=list)  # what differs from the run, for the report

    @property
    def far_offset(self) -> int:
        return max(self.target_length - self.seq_length, 0)

    @property
    def eod_id(self) -> Optional[int]:
        return TWIN_EOD if self.cfg.data.document_mask or self.cfg.data.eod_mask_loss else None

    def describe(self) -> str:
        m, p = self.model_cfg, self.cfg.parallel
        layout = f"TP {p.tensor}{' (SP)' if p.sequence_parallel else ''} x PP {p.pipeline}"
        layout += f" (VPP {p.virtual_pipeline})" if p.virtual_pipeline else ""
        layout += f" x CP {p.context}" + (f" ({p.cp_comm_type})" if p.context > 1 else "") + \
            f" x DP {self.data_parallel}"
        return (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads / "
                f"{m.num_query_groups} K/V groups x {m.head_dim}, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}; "
                f"{self.seq_length} tokens x {self.cfg.data.micro_batch_size} x {self.micro_batches} micro-batches "
                f"per DP rank; {layout}; {m.position.describe()}")


def longest_stage_model(cfg: Config) -> tuple[ModelConfig, int]:
    """(model config, sequence length) of the run's longest stage: the context the run is for."""
    stages = build_schedule(cfg)
    stage = max(stages, key=lambda s: s.seq_length)
    return stage.model_cfg, stage.seq_length


def twin_seq_length(cfg: Config, target: int, minimum: int = MIN_TWIN_TOKENS) -> int:
    """The shortest sequence >= `minimum` in which every CP rank holds its two chunks and every TP rank its
    sequence-parallel shard (and FP8's alignment): harpe-train's own rule for packed streams (packing.py)."""
    p = cfg.parallel
    unit = stream_multiple(p.context, p.tensor, p.sequence_parallel, fp8=cfg.fp8.format is not None)
    length = unit * max(1, math.ceil(minimum / unit))
    return min(length, target) if target % unit == 0 and target >= unit else length


def make_twin(full: Config, world_size: int, *, cuda: bool, workdir: Path, seq_length: Optional[int] = None) -> Twin:
    """The twin of `full` for a launch of `world_size` ranks (config/validate.py has already accepted `full`)."""
    cfg = copy.deepcopy(full)
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    data_parallel = world_size // model_parallel
    full_model, target = longest_stage_model(full)
    model = copy.deepcopy(full_model)
    notes: List[str] = []

    chunks = p.pipeline * (p.virtual_pipeline or 1)
    model.num_layers = max(2, chunks)
    model.init_method_std = ATTENTION_SCALE / math.sqrt(model.hidden_size)
    if not cuda:
        ffn = min(model.ffn_hidden_size, CPU_FFN_PER_TP_RANK * p.tensor)
        vocab = min(model.vocab_size, CPU_VOCAB)
        if (ffn, vocab) != (model.ffn_hidden_size, model.vocab_size):
            notes.append(f"CPU twin: ffn {model.ffn_hidden_size} -> {ffn}, vocab {model.vocab_size} -> {vocab} "
                         f"(widths that meet neither positions nor the layout)")
        model.ffn_hidden_size, model.vocab_size = ffn, vocab
    cfg.model = model
    cfg.stages = []

    length = seq_length or twin_seq_length(full, target)
    d = cfg.data
    micro_batches = max(2, p.pipeline if p.virtual_pipeline else 1)
    d.kind, d.blend, d.seq_length = "mock", [], length
    d.tokenizer_model = d.tokenizer_type = d.eod_token = None
    d.global_batch_size = d.micro_batch_size * data_parallel * micro_batches

    t = cfg.training
    t.iterations, t.tokens, t.init_from = 1, None, None
    t.eval_interval = 0
    t.probe.lengths = []
    if full.training.init_from:
        notes.append("the twin starts from random weights (training.init_from is what the initial-model check "
                     "compares)")
    if p.distributed_optimizer:
        notes.append("the twin reduces gradients without the distributed optimizer (its reduce-scatter sums the "
                     "same values into shards)")
    p.distributed_optimizer = p.overlap_param_gather = False
    if cfg.fp8.format is not None:  # parity against the fp32 reference is bf16's bound; FP8 is check 4's
        notes.append("layout parity runs without FP8 (the FP8 check compares FP8 with bf16 steps)")
        cfg.fp8.format = None
    if not cuda and t.precision == "bf16":
        notes.append("CPU twin in fp32 (precision bf16 is what the GPUs run; the CPU checks the layout)")
        t.precision = "fp32"

    cfg.run_dir = str(workdir / "twin")
    cfg.checkpoint.dir = str(workdir / "twin" / "checkpoints")
    cfg.checkpoint.resume = False
    cfg.checkpoint.exit_signals = []
    log = cfg.logging
    log.tensorboard = log.progress_bar = False
    log.wandb.project = None
    log.profile.start = None
    return Twin(cfg=cfg, full=full, model_cfg=model, full_model_cfg=full_model, world_size=world_size,
                data_parallel=data_parallel, seq_length=length, target_length=target, micro_batches=micro_batches,
                notes=notes)
