"""What the planner plans: a model shape, a parallel layout and a workload, as plain frozen data.

They come from a run's config (:func:`from_config`) or from flags (a model preset, sequence length,
GPU count). Nothing here imports torch or megatron-core: `harpe-plan` answers in a fraction of a
second, and a 1000-layout search is arithmetic.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

from megatron_harpe.config.model import ModelConfig, check_layout

RECOMPUTE = (None, "selective", "full")
BACKENDS = ("te", "local")
DEVICES = ("gpu", "cpu")
CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder (RMSNorm, SwiGLU, no biases), as the provider builds it."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    rotary_dim: int = 0  # 0 = head_dim (rotary_percent 1)
    position: str = "harpe"  # rope | pi | yarn | harpe
    name: str = ""

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def parameters(self) -> int:
        """All parameters of the model (TP=PP=1)."""
        h, L = self.hidden_size, self.num_layers
        layer = (2 * h + h * (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim
                 + self.num_attention_heads * self.head_dim * h + 3 * h * self.ffn_hidden_size)
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return L * layer + h + embeddings

    @classmethod
    def from_model_config(cls, m: ModelConfig, name: str = "") -> "ModelShape":
        return cls(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                   num_attention_heads=m.num_attention_heads, num_query_groups=m.groups, head_dim=m.head_dim,
                   vocab_size=m.vocab_size, tie_embeddings=m.tie_embeddings,
                   rotary_dim=int(m.head_dim * m.rotary_percent) if m.rotary_percent < 1.0 else m.head_dim,
                   position=m.position.kind, name=name)


#: Models a user can name with --model (Llama-2/3 shapes as published; vocabularies unpadded).
PRESETS = {
    "llama2-7b": ModelShape(32, 4096, 11008, 32, 32, 128, 32000, name="llama2-7b"),
    "llama2-13b": ModelShape(40, 5120, 13824, 40, 40, 128, 32000, name="llama2-13b"),
    "llama2-70b": ModelShape(80, 8192, 28672, 64, 8, 128, 32000, name="llama2-70b"),
    "llama3-8b": ModelShape(32, 4096, 14336, 32, 8, 128, 128256, name="llama3-8b"),
    "llama3-70b": ModelShape(80, 8192, 28672, 64, 8, 128, 128256, name="llama3-70b"),
    "tiny": ModelShape(2, 64, 176, 4, 2, 16, 256, name="tiny"),
}


@dataclass(frozen=True)
class Layout:
    """How the model is spread over the GPUs of one run (megatron-core's terms).

    recompute: None | "selective" (recompute_modules) | "full" (recompute_method uniform|block with
    recompute_num_layers). The distributed optimizer shards over data x context parallel ranks
    (megatron-core's intra_dp_cp group).
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    dist_opt: bool = False
    recompute: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Tuple[str, ...] = ()
    cp_comm: str = "p2p"
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sequence_parallel(self) -> bool:
        """What megatron-core does: SP only means something with TP > 1 (the builder drops it at TP 1)."""
        return self.sp and self.tp > 1

    @property
    def selective_modules(self) -> Tuple[str, ...]:
        if self.recompute != "selective":
            return ()
        return self.recompute_modules or ("core_attn",)

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"CP{self.cp}", f"PP{self.pp}" + (f"x{self.vpp}" if self.vpp else ""), f"DP{self.dp}"]
        flags = []
        if self.sequence_parallel:
            flags.append("SP")
        if self.dist_opt:
            flags.append("DO")
        if self.recompute == "full":
            flags.append(f"full({self.recompute_method or 'uniform'},{self.recompute_num_layers or 1})")
        elif self.recompute == "selective":
            flags.append("sel(" + ",".join(self.selective_modules) + ")")
        return " ".join(parts) + (" " + " ".join(flags) if flags else "")


@dataclass(frozen=True)
class Workload:
    """What one training step does, and on what software path.

    precision: bf16 (GPU runs) | fp32 (CPU runs). fp8: None | "hybrid" | "e4m3" (Transformer Engine).
    backend: "te" = Transformer Engine spec (fused norm+linear, TE fused/flash attention, its ring CP);
             "local" = megatron-core's linears + this project's RMSNorm and SDPA core attention.
    device: "gpu" (CUDA fusions on: SwiGLU, cross entropy) | "cpu" (everything unfused).
    rope_kernel: "fused" (HARPE: the Triton kernel, no angle table; rope/pi: TE's fused RoPE) | "unfused".
    """

    seq_length: int
    micro_batch: int = 1
    global_batch: int = 1
    precision: str = "bf16"
    fp8: Optional[str] = None
    fp8_dot_product_attention: bool = False
    fp8_bf16_layers: Tuple[int, int] = (0, 0)  # first / last layers kept in bf16
    backend: str = "te"
    device: str = "gpu"
    rope_kernel: str = "fused"
    hidden_dropout: float = 0.0

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


@dataclass(frozen=True)
class Plan:
    """One thing to evaluate: model x layout x workload (plus where it came from, for the report)."""

    model: ModelShape
    layout: Layout
    workload: Workload
    notes: Tuple[str, ...] = field(default_factory=tuple)

    def with_layout(self, layout: Layout) -> "Plan":
        return replace(self, layout=layout)


def plan_to_dict(plan: Plan) -> dict:
    return {"model": dataclasses.asdict(plan.model), "layout": dataclasses.asdict(plan.layout),
            "workload": dataclasses.asdict(plan.workload), "notes": list(plan.notes)}


def plan_from_dict(data: dict) -> Plan:
    layout = dict(data["layout"])
    layout["recompute_modules"] = tuple(layout.get("recompute_modules") or ())
    workload = dict(data["workload"])
    workload["fp8_bf16_layers"] = tuple(workload.get("fp8_bf16_layers") or (0, 0))
    return Plan(model=ModelShape(**data["model"]), layout=Layout(**layout), workload=Workload(**workload),
                notes=tuple(data.get("notes") or ()))


class LayoutError(ValueError):
    """A layout that cannot run this model at all (divisibility), with the reason."""


def check_plan(plan: Plan) -> None:
    """Every divisibility megatron-core and this project need, as LayoutError with the reason."""
    m, p, w = plan.model, plan.layout, plan.workload
    for name in ("tp", "pp", "cp", "dp"):
        if getattr(p, name) < 1:
            raise LayoutError(f"{name} must be >= 1")
    config = ModelConfig(num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                         num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                         kv_channels=m.head_dim, vocab_size=m.vocab_size,
                         position={"kind": "rope"})  # the base set does not change any divisibility
    try:
        check_layout(config, tensor=p.tp, pipeline=p.pp, virtual_pipeline=p.vpp, context=p.cp,
                     seq_length=w.seq_length)
    except ValueError as err:
        raise LayoutError(str(err)) from None
    if p.sequence_parallel and (w.seq_length // p.cp) % p.tp:
        raise LayoutError(f"sequence parallelism splits the {w.seq_length // p.cp} tokens of a CP rank over TP "
                          f"{p.tp}: they must divide")
    if p.cp_comm not in CP_COMM_TYPES:
        raise LayoutError(f"cp_comm_type must be one of {CP_COMM_TYPES}, got {p.cp_comm!r}")
    if p.cp > 1 and p.cp_comm == "a2a+p2p" and w.backend == "te":
        # the plan has no hierarchical sizes: ask for what any a2a level would need at most
        if (m.num_attention_heads // p.tp) % p.cp or (m.num_query_groups // p.tp) % p.cp:
            raise LayoutError(f"cp_comm_type {p.cp_comm} needs the heads of a TP rank ({m.num_attention_heads // p.tp} "
                              f"query, {m.num_query_groups // p.tp} K/V) divisible by CP {p.cp}")
    _raise_combinations(plan)
    if w.micro_batch < 1 or w.global_batch < 1:
        raise LayoutError("micro-batch and global batch must be >= 1")
    if w.global_batch % (w.micro_batch * p.dp):
        raise LayoutError(f"global batch {w.global_batch} is not divisible by micro-batch {w.micro_batch} x DP {p.dp}")
    if p.vpp is not None and (w.global_batch // (w.micro_batch * p.dp)) % p.pp:
        raise LayoutError("with virtual pipeline stages the micro-batches per step must be a multiple of PP")
    if p.recompute not in RECOMPUTE:
        raise LayoutError(f"recompute must be one of none, selective, full; got {p.recompute!r}")
    if p.recompute == "full":
        if p.recompute_method not in (None, "uniform", "block"):
            raise LayoutError(f"recompute_method must be uniform or block, got {p.recompute_method!r}")
        layers = m.num_layers // (p.pp * (p.vpp or 1))
        n = p.recompute_num_layers or 1
        if (p.recompute_method or "uniform") == "uniform" and layers % n:
            raise LayoutError(f"full uniform recompute of {n} layers per chunk needs the {layers} layers of a "
                              f"model chunk divisible by {n}")
    if "layernorm" in p.selective_modules and w.backend == "local":
        raise LayoutError("selective recompute of layernorm does not run on the local (non-TE) spec with "
                          "megatron-core 0.16.1 (its CheckpointWithoutOutput needs Transformer Engine); on the TE "
                          "spec the norms are fused into the linears and it changes nothing")
    if w.backend not in BACKENDS or w.device not in DEVICES:
        raise LayoutError(f"backend must be one of {BACKENDS} and device one of {DEVICES}")
    if w.fp8 and w.backend != "te":
        raise LayoutError("FP8 needs the Transformer Engine spec (backend te)")


#: The GPUs harpe-plan plans for (H100, H200) are sm90.
PLANNED_GPU_CAPABILITY = (9, 0)


def _raise_combinations(plan: Plan) -> None:
    """config/combinations.py's rules for the planned machine: the TE spec (or not) on an sm90 GPU, TE version
    unknown (so only rules that hold for every TE version read apply)."""
    from megatron_harpe.config.combinations import Platform, context_parallel_refusals, fp8_linear_dims, fp8_refusals

    m, p, w = plan.model, plan.layout, plan.workload
    platform = Platform(capability=PLANNED_GPU_CAPABILITY if w.device == "gpu" else None, te=w.backend == "te")
    refusals = context_parallel_refusals(cp=p.cp, cp_comm_type=p.cp_comm, packed=False,
                                         query_heads_per_tp=m.num_attention_heads // p.tp,
                                         groups_per_tp=m.num_query_groups // p.tp, hierarchical_sizes=None,
                                         platform=platform)
    split = p.cp * (p.tp if p.sequence_parallel and p.tp > 1 else 1)
    d = m.head_dim
    refusals += fp8_refusals(
        fp8=w.fp8 is not None, dot_product_attention=w.fp8_dot_product_attention, recipe="delayed", packed=False,
        head_dim=d, cp=p.cp, cp_comm_type=p.cp_comm,
        tokens_per_rank=[(f"seq_length {w.seq_length}", w.seq_length * w.micro_batch // split)],
        linear_dims=fp8_linear_dims(hidden=m.hidden_size, ffn=m.ffn_hidden_size, heads=m.num_attention_heads,
                                    groups=m.num_query_groups, head_dim=d, tp=p.tp),
        platform=platform)
    if refusals:
        raise LayoutError("; ".join(r.message() for r in refusals))


def resolve_rope_kernel(position: str, kernel: str, backend: str, device: str) -> str:
    """What `model.position.kernel` becomes on the planned machine (models/transformer_config.rope_kernel's
    rule, with a GPU assumed to have Triton, and Transformer Engine exactly when backend is te)."""
    if position == "yarn" or kernel == "unfused" or device == "cpu":
        return "unfused"
    if position == "harpe":
        return "fused"  # the Triton kernel
    return "fused" if backend == "te" else "unfused"


def plan_from_config(cfg, gpus: Optional[int] = None, backend: str = "te", device: str = "gpu") -> Plan:
    """The plan of a harpe-train Config on `gpus` GPUs (None: one model replica, DP 1).

    A staged run is planned at its longest sequence (its most memory-hungry stage)."""
    from megatron_harpe.config.stages import build_schedule

    p, d, t, f = cfg.parallel, cfg.data, cfg.training, cfg.fp8
    stages = build_schedule(cfg)
    stage = max(stages, key=lambda s: s.seq_length)
    notes = []
    if len(stages) > 1:
        notes.append(f"{len(stages)} stages; planned at the longest, {stage.name or stage.index} "
                     f"(seq_length {stage.seq_length})")
    replica = p.tensor * p.pipeline * p.context
    if gpus is None:
        gpus = replica
        notes.append(f"no --gpus: one model replica, {replica} GPU(s), DP 1")
    if gpus < 1 or gpus % replica:
        raise LayoutError(f"{gpus} GPUs is not a multiple of parallel.tensor x pipeline x context = {p.tensor} x "
                          f"{p.pipeline} x {p.context} = {replica}")
    model_cfg = stage.model_cfg
    precision = t.precision if t.precision != "auto" else ("fp32" if device == "cpu" else "bf16")
    layout = Layout(tp=p.tensor, pp=p.pipeline, cp=p.context, dp=gpus // replica, vpp=p.virtual_pipeline,
                    sp=p.sequence_parallel, dist_opt=p.distributed_optimizer, recompute=t.recompute_granularity,
                    recompute_method=t.recompute_method, recompute_num_layers=t.recompute_num_layers,
                    recompute_modules=tuple(t.recompute_modules or ()), cp_comm=p.cp_comm_type,
                    overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=p.overlap_param_gather)
    bf16_layers = (f.num_layers_at_start_in_bf16, f.num_layers_at_end_in_bf16) if f.first_last_layers_bf16 else (0, 0)
    workload = Workload(seq_length=stage.seq_length, micro_batch=d.micro_batch_size, global_batch=d.global_batch_size,
                        precision=precision, fp8=f.format, fp8_dot_product_attention=bool(f.format and
                                                                                          f.dot_product_attention),
                        fp8_bf16_layers=bf16_layers if f.format else (0, 0), backend=backend, device=device,
                        rope_kernel=resolve_rope_kernel(model_cfg.position.kind, model_cfg.position.kernel,
                                                        backend, device),
                        hidden_dropout=model_cfg.hidden_dropout)
    return Plan(ModelShape.from_model_config(model_cfg, name=getattr(cfg, "run_dir", "")), layout, workload, tuple(notes))
