"""The training run's typed configuration: one tree of dataclasses, one YAML file.

Every field has a default that runs on a laptop; the example configs in examples/ set the
paper's values. The tree is validated as a whole (`validate_config`) before any process group
is created, so a bad config fails on every rank with the same clear message instead of
leaving some ranks waiting in a collective.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_harpe.config.model import ModelConfig


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallelism is whatever remains: world / (tp * pp * cp)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # How Transformer Engine's attention exchanges K/V across the CP group: p2p (ring, overlapped with
    # compute; TE's default), all_gather, a2a (Ulysses-style, needs heads divisible by CP), a2a+p2p.
    # Without TE the SDPA core attention always all-gathers K/V (parallel/core_attention.py).
    cp_comm_type: str = "p2p"
    # a2a+p2p only: [a2a size, p2p size], product = context. a2a inside each inner group (put it within a
    # node's NVLink domain), p2p ring across the groups. megatron-core builds these groups only when
    # initialize_model_parallel is given the sizes; without them TE's attention gets no CP group and runs each
    # rank's chunks alone, silently (Megatron-Bridge #2667) - so the sizes are required, not guessed.
    hierarchical_context_sizes: Optional[List[int]] = None


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's get_megatron_optimizer (paper: lr 2e-5, betas 0.9/0.95)."""

    lr: float = 2.0e-5
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0


@dataclass
class SchedulerConfig:
    """megatron-core's OptimizerParamScheduler: linear warmup, then constant/cosine/linear decay."""

    warmup_iterations: int = 0
    decay_style: str = "cosine"  # constant | cosine | linear
    decay_iterations: Optional[int] = None  # None = the whole run
    # a resumed run whose schedule (iterations, tokens, lr, warmup, decay) differs from its checkpoint's:
    # false = refuse (say what changed); true = continue on the new schedule from the checkpoint's iteration
    replan_on_resume: bool = False


@dataclass
class DataConfig:
    """Training data: megatron indexed datasets (`.bin/.idx` prefixes), or a mock source.

    blend: prefixes, optionally weighted: ["path/a_text_document"] or
           [0.7, "path/a_text_document", 0.3, "path/b_text_document"].
    """

    kind: str = "mock"  # mock | indexed
    blend: List = field(default_factory=list)
    split: str = "98,2,0"
    seq_length: int = 256
    micro_batch_size: int = 1
    global_batch_size: int = 8
    tokenizer_type: Optional[str] = None  # sentencepiece | huggingface
    tokenizer_model: Optional[str] = None
    # the end-of-document token the data was made with (harpe-preprocess --eod-token), read by document_mask and
    # eod_mask_loss; None = the tokenizer's EOS, harpe-preprocess's default. Chat models' EOS ends a turn, not a
    # document: SmolLM2-Instruct's data is separated by '<|endoftext|>', Llama-3-Instruct's by '<|end_of_text|>'
    eod_token: Optional[str] = None
    cache_dir: Optional[str] = None  # GPTDataset index cache; None = <run_dir>/data_cache
    reset_position_ids: bool = False  # GPTDataset's position_ids restart after EOD; RoPE models read positions
    #   from the sequence, not position_ids, so this needs document_mask (validate.py refuses it alone)
    eod_mask_loss: bool = False  # no loss on EOD positions (predicting the next document's first token)
    # Document masking (docs/training.md, "Document masking"): each micro-batch becomes ONE packed (THD)
    # sequence whose documents end at EOD tokens (the EOD belongs to the document it ends) and at sample
    # ends; attention stays inside a document and RoPE/HARPE positions restart at 0 in each. Needs the EOD
    # id (data.kind=indexed with data.tokenizer_model). With CP every document is padded to a multiple of
    # 2 x parallel.context (padding: loss_mask 0, not counted). training/packing.py builds the layout.
    document_mask: bool = False

    def __post_init__(self):
        if self.tokenizer_model is not None and self.tokenizer_type is None:
            # the two kinds have distinct file names; say it once here rather than fail later
            name = str(self.tokenizer_model).rstrip("/")
            self.tokenizer_type = "sentencepiece" if name.endswith(".model") else "huggingface"


def parse_blend(blend: List) -> Tuple[List[str], Optional[List[float]]]:
    """`data.blend` as (prefixes, weights or None): ["a", "b"] or [w1, "a", w2, "b"]."""
    if not blend:
        raise ValueError("data.blend is empty: list the .bin/.idx prefixes to train on "
                         "(e.g. [data/corpus_text_document]) or set data.kind=mock")
    if all(isinstance(x, str) for x in blend):
        return [str(p) for p in blend], None
    if len(blend) % 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and isinstance(p, str)
                                 for w, p in zip(blend[::2], blend[1::2])):
        raise ValueError(f"data.blend must be prefixes, or alternating weight, prefix; got {blend!r}")
    return [str(p) for p in blend[1::2]], [float(w) for w in blend[::2]]


@dataclass
class StageConfig:
    """One stage of a staged schedule (multi-stage ABF). A single stage is the HARPE way.

    Any field left unset keeps the value of the model/data config. The stage ends after
    `iterations`, or after `tokens` (converted to iterations with the global batch size).
    """

    name: str = ""
    seq_length: Optional[int] = None
    base: Optional[float] = None  # rope/ABF base for this stage
    bases: Optional[List[float]] = None  # HARPE base set for this stage
    iterations: Optional[int] = None
    tokens: Optional[int] = None


@dataclass
class ProbeConfig:
    """Passkey retrieval scored in-process on the training model while it trains (no export).

    Each probe is one prompt of exactly `length` tokens: filler text with "The pass key is N."
    placed at an evenly spread depth, ending in the question; the model is scored teacher-forced on
    the passkey's tokens (greedy exact match, token accuracy, mean negative log-likelihood). It shows,
    long before the run ends, whether the model is learning to use its context. Needs
    data.tokenizer_model (the prompts are text).
    """

    lengths: List[int] = field(default_factory=list)  # [] = off; e.g. [4096, 32768, 131072]
    interval: Optional[int] = None  # None = training.eval_interval
    prompts: int = 4  # per length
    seed: int = 0  # passkeys and filler order


@dataclass
class TrainingConfig:
    iterations: int = 10  # total over all stages when `stages` is empty
    tokens: Optional[int] = None  # alternative budget; converted with the global batch size
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    recompute_granularity: Optional[str] = None  # None | selective | full
    recompute_method: Optional[str] = None  # uniform | block (with full)
    recompute_num_layers: Optional[int] = None
    # with selective recompute: megatron-core's submodules to recompute (default [core_attn]); of
    # megatron-core's choices, a dense Llama uses core_attn, mlp and layernorm
    recompute_modules: Optional[List[str]] = None
    init_from: Optional[str] = None  # a converted checkpoint: weights only, fresh optimizer
    # a non-finite loss or gradient (training/nonfinite.py): the update is never applied; `stop` exits 3,
    # `skip` goes on with the next batch, at most max_skipped_iterations times over the run
    on_nonfinite: str = "stop"
    max_skipped_iterations: int = 10
    # validation loss on the held-out split (data.split's second part; a separate stream for mock
    # data) every eval_interval iterations and at the end; 0 = off. Each evaluation reads the same
    # eval_iterations global batches, so the numbers along a run are comparable.
    eval_interval: int = 0
    eval_iterations: int = 4
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class Fp8Config:
    """FP8 matmuls through Transformer Engine (Hopper and newer GPUs). Off unless `format` is set.

    What changes: the GEMMs of the linear layers run in FP8 with per-tensor scales (weights,
    activations; gradients in e5m2 with `hybrid`), master weights and optimizer state stay fp32,
    norms, softmax, RoPE and the loss stay bf16/fp32. `dot_product_attention` also runs the attention
    matmuls in FP8 (TE's fused attention). megatron-core's names: fp8, fp8_recipe, fp8_*.
    """

    format: Optional[str] = None  # None (bf16) | hybrid (e4m3 forward, e5m2 gradients) | e4m3
    recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8 (Blackwell)
    dot_product_attention: bool = False  # attention in FP8 (recipes delayed, tensorwise)
    multi_head_attention: bool = False  # QKV and output projections hand FP8 to attention (delayed)
    amax_history_len: int = 1024  # delayed scaling: window of past amax values
    amax_compute_algo: str = "max"  # max | most_recent
    margin: int = 0
    wgrad: bool = True  # false: weight gradients in bf16
    first_last_layers_bf16: bool = False  # keep the first/last layers below in bf16
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None = <run_dir>/checkpoints
    save_interval: int = 0  # 0 = only at the end (and on signals / stage ends)
    keep_last: int = 2
    resume: bool = True  # resume automatically from the latest checkpoint in dir
    exit_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # [] = no stop on signals
    # How the distributed optimizer's state is saved (parallel.distributed_optimizer only):
    #   auto: fully_reshardable with torch's AdamW (CPU, or GPUs without TE/apex: the only format its per-parameter
    #         'step' survives, megatron_harpe/compat.py), dp_reshardable with TE's or apex's FusedAdam;
    #   fully_reshardable: resumes at any TP/PP/CP/DP, but every save gathers the whole DP group's optimizer state
    #         into each rank's host memory (~12 bytes per parameter of the rank's TP/PP shard: ~10 GB at TP=8 for 7B);
    #   dp_reshardable: each rank writes its own shard, no gather; resumes at another DP size only (Megatron-LM's
    #         default). To change TP/PP/CP, save one checkpoint with fully_reshardable first.
    optimizer_format: str = "auto"


@dataclass
class WandbConfig:
    """Weights & Biases logging (training/metrics/wandb.py). Off unless `project` is set.

    Needs the optional package (`pip install 'megatron-harpe[wandb]'`); a config that turns W&B on without
    it is refused before anything starts. A resumed run continues the same W&B run (the id is kept in
    <run_dir>/wandb_run_id).
    """

    project: Optional[str] = None  # None = W&B off
    entity: Optional[str] = None  # None = the logged-in user's default entity
    name: Optional[str] = None  # None = the run directory's name
    mode: str = "online"  # online | offline (`wandb sync` later) | disabled (off, like no project)
    dir: Optional[str] = None  # None = run_dir (W&B writes <dir>/wandb/)
    tags: List[str] = field(default_factory=list)
    group: Optional[str] = None

    @property
    def enabled(self) -> bool:
        """The one rule for "W&B is on", shared by validation (package check) and the metrics logger."""
        return self.project is not None and self.mode != "disabled"


@dataclass
class ProfileConfig:
    """A torch.profiler trace of a few iterations (training/profiling.py; docs/training.md, "Profiling").

    Off unless `start` is set. The window follows Megatron-LM's --profile-step-start/--profile-step-end:
    the profiler records the iterations that begin once `start` iterations are done and stops when
    `end` are done, i.e. iterations start+1 .. end as numbered in metrics.jsonl and on the console
    (end - start of them). The iteration before the window runs as the profiler's warm-up (set up,
    not recorded), so the first recorded step does not carry the profiler's start-up cost. Each
    listed rank writes <dir>/rank{r}_iters{start}-{end}.pt.trace.json.gz (Chrome trace format: opens
    in ui.perfetto.dev, chrome://tracing, TensorBoard's PyTorch profiler plugin).
    """

    start: Optional[int] = None  # None = off; iterations done before the first profiled one
    end: Optional[int] = None  # None = start + 1 (one iteration); exclusive like Megatron-LM's
    ranks: List[int] = field(default_factory=lambda: [0])  # global ranks that record and write a trace
    dir: Optional[str] = None  # None = <run_dir>/profile
    record_shapes: bool = False  # operator input shapes in the trace
    with_stack: bool = False  # Python stacks per operator: traces grow several times larger
    # GPU only (refused on CPU, before the run starts): the CUDA caching allocator's history over the
    # window, <dir>/rank{r}_iters{start}-{end}.memory.pickle for pytorch.org/memory_viz
    memory_snapshot: bool = False

    @property
    def enabled(self) -> bool:
        """The one rule for "profiling is on", shared by validation, the machine check and the trainer."""
        return self.start is not None

    @property
    def last(self) -> Optional[int]:
        """`end` with its default filled in: profiling stops once this many iterations are done."""
        if self.start is None:
            return None
        return self.end if self.end is not None else self.start + 1


@dataclass
class LoggingConfig:
    interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops_per_device: Optional[float] = None  # None = H100 dense peak (bf16 989, FP8 1979) on GPU, unset on CPU
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    stages: List[StageConfig] = field(default_factory=list)
