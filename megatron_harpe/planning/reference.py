"""What Megatron-LM's own theoretical-memory estimate would print for a plan (validation (b)).

Megatron-LM (the training framework around megatron-core; file megatron/training/
theoretical_memory_usage.py at tag core_v0.16.1) reports, for a run's arguments, "weight and
optimizer" memory and "activation" memory of the most loaded GPU. Its method, restated here in our
words (the code below is this project's own, written from that reading):

* parameters of the most loaded shard: (transformer block / PP + one embedding) / TP, plus the output
  layer / TP when embeddings are untied and PP = 1; a layer has 2h(1.5f + 1) + 2h^2 (1 + g/a)(ad/h)
  parameters for SwiGLU with RMSNorm; the vocabulary is Megatron-LM's padded one (a multiple of
  128 x TP).
* bytes per parameter: 18 (bf16 weight 2 + fp32 gradient 4 + fp32 master and Adam moments 12), or
  6 + 12 / DP with the distributed optimizer (DP = data-parallel size, context parallelism excluded).
* activations, on the first pipeline stage, after Korthikanti et al. 2022 (flash attention: no s^2
  term). With sequence parallelism AND selective recompute: s b h (18 + 4 f/h) per layer; otherwise
  s b h (10 + 24/TP) per layer. Plus embedding terms (8 s b PP + s b h PP), the interleaving penalty
  or min(1, m/PP), and with PP = 1 the output layer and loss (SP branch: 4 s b h (1 + V/h); other
  branch: 2 (s b V/TP + s b h)); all divided by TP in the SP branch, times 1.05 in the other.
  The sequence length s is the full one: context parallelism is not in the formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_harpe.planning.memory import num_microbatches
from megatron_harpe.planning.spec import Plan


@dataclass
class MegatronLMEstimate:
    weight_and_optimizer: float  # bytes
    activations: float  # bytes
    branch: str  # which activation formula applies
    padded_vocab: int
    parameters_most_loaded: float

    @property
    def total(self) -> float:
        return self.weight_and_optimizer + self.activations


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab / multiple) * multiple)


def megatron_lm_estimate(plan: Plan, seq_length: int | None = None) -> MegatronLMEstimate:
    """Megatron-LM core_v0.16.1's theoretical memory for `plan` (`seq_length` replaces the run's, e.g.
    to see what dividing by CP would give)."""
    m, p, w = plan.model, plan.layout, plan.workload
    h, f, a, g, d, L = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.num_layers
    V = padded_vocab(m.vocab_size, p.tp)
    s, b = seq_length or w.seq_length, w.micro_batch
    tp, pp, vpp = p.tp, p.pp, p.vpp

    attention = 2 * h * h * ((1 + g / a) * (a * d / h))
    layer = 2 * h * (f * 1.5 + 1) + attention
    block = layer * L + h  # + final RMSNorm
    embedding = h * V
    shard = (block / pp + embedding) / tp
    if not m.tie_embeddings and pp == 1:
        shard += embedding / tp
    per_param = 6 + 12 / p.dp if p.dist_opt else 18
    weights_optimizer = shard * per_param

    mbs = num_microbatches(p, w)
    if p.sequence_parallel and p.recompute == "selective":
        branch = "SP + selective: s*b*h*(18 + 4f/h) per layer, / TP"
        act = s * b * h * (18 + 4 * f / h) * L
        act += 8 * s * b * pp + s * b * h * pp
        if vpp:
            act *= 1 + (pp - 1) / (pp * vpp)
        elif pp > 1:
            act *= min(1, mbs / pp)
        if pp == 1:
            act += s * b * h * 4 * (1 + V / h)
        act /= tp
    else:
        branch = "without SP/selective: s*b*h*(10 + 24/TP) per layer, x 1.05"
        act = s * b * h * (10 + 24 / tp) * L
        act += 8 * s * b * pp + s * b * h * pp
        if vpp:
            act *= 1 + (pp - 1) / (pp * vpp)
        elif pp > 1:
            act *= min(1, mbs / pp)
        if pp == 1:
            act += (s * b * V / tp + s * b * h) * 2
        act *= 1.05
    return MegatronLMEstimate(weights_optimizer, act, branch, V, shard)
