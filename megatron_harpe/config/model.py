"""The model a run trains: a Llama-family architecture and how it encodes positions.

Pure description (no torch, no megatron-core): the trainer turns it into a megatron-core
TransformerConfig (models/transformer_config.py), the converters into a Hugging Face config.

The HARPE base set is resolved here, once, when a ModelConfig is made (from YAML, a checkpoint
record, a Hugging Face config or code): `position.bases` is then the explicit list, one base per
K/V group, and it is the only list anything reads — the saved config.yaml, the rotary module,
the checkpoint's position record and the HF export. A strategy (`base_strategy` and its
settings) is kept beside the list as the record of how it was made. Given both, they must
agree (a deterministic strategy is re-run and compared; a `file` strategy is provenance only,
so a saved config still loads after the file moved).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron_harpe.rope.bases import STRATEGIES, make_base_set, validate_bases

POSITION_KINDS = ("rope", "pi", "yarn", "llama3", "harpe")
ROPE_KERNELS = ("auto", "fused", "unfused")
DEFAULT_ROPE_BASE = 10000.0

#: Keys that only one kind of position encoding reads; set with another kind they would be
#: silently ignored, so they are refused. (PI on top of HARPE is refused this way: neither the
#: checkpoint record nor the HF export could carry it.)
_KIND_ONLY_KEYS = {
    "interpolation_factor": ("pi",),
    "yarn_factor": ("yarn",),
    "yarn_original_max_position_embeddings": ("yarn",),
    "llama3_factor": ("llama3",),
    "bases": ("harpe",),
    "base_strategy": ("harpe",),
    "base_min": ("harpe",),
    "base_max": ("harpe",),
    "base_stride": ("harpe",),
    "bases_file": ("harpe",),
}

#: Which strategy settings each base strategy takes (make_base_set refuses the others).
_STRATEGY_SETTINGS = {
    "uniform": ("base_min", "base_max"),
    "uniform-desc": ("base_min", "base_max"),
    "peak-valley": ("base_min", "base_max", "base_stride"),
    "paper-llama2-7b": (),
    "file": ("bases_file",),
}
_SETTING_DEFAULTS = {"base_min": 1.0e6, "base_max": 5.0e6, "base_stride": 3.0e4}  # the paper's (Sec. 3.2)


@dataclass
class PositionEmbeddingConfig:
    """How positions are encoded.

    kind:
      rope  — one base for all heads (`base`, default 10000); ABF ("adjusted base frequency")
              is rope with a larger base, e.g. 5e6 for the paper's single-stage baseline.
      pi    — rope with linear position interpolation by `interpolation_factor` (paper: 32).
      yarn  — megatron-core's YaRN with `yarn_factor` over `yarn_original_max_position_embeddings`.
      llama3 — Llama 3.1/3.2's frequency-dependent scaling of one base (`llama3_factor`, low/high
              frequency factors, the original context): what Llama-3.x checkpoints are trained with;
              megatron-core's RotaryEmbedding(rope_scaling=True) applies it.
      harpe — one base per K/V group: `bases`, or made by `base_strategy` (uniform | uniform-desc |
              peak-valley | paper-llama2-7b | file) from base_min/base_max/base_stride or
              `bases_file`. After loading, `bases` always holds the list (see the module doc).

    kernel: how q and k are rotated. fused — harpe: this project's Triton kernel (angles computed
    in the kernel, no table; needs CUDA and Triton); rope/pi: Transformer Engine's fused RoPE.
    unfused — megatron-core's element-wise path over an angle table. auto — fused where it is
    available (decided when the model is built), else unfused.
    """

    kind: str = "rope"
    base: Optional[float] = None
    interpolation_factor: Optional[float] = None
    yarn_factor: Optional[float] = None
    yarn_original_max_position_embeddings: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    llama3_factor: Optional[float] = None
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    llama3_original_max_position_embeddings: int = 8192
    bases: Optional[List[float]] = None
    base_strategy: Optional[str] = None
    base_min: Optional[float] = None
    base_max: Optional[float] = None
    base_stride: Optional[float] = None
    bases_file: Optional[str] = None
    kernel: str = "auto"

    def __post_init__(self):
        if self.kind not in POSITION_KINDS:
            raise ValueError(f"position.kind must be one of {POSITION_KINDS}; got {self.kind!r}")
        if self.kernel not in ROPE_KERNELS:
            raise ValueError(f"position.kernel must be one of {ROPE_KERNELS}; got {self.kernel!r}")
        if self.kind == "yarn" and self.kernel == "fused":
            raise ValueError("position.kernel=fused is not available for yarn (no fused kernel applies YaRN's "
                             "attention scaling); use auto or unfused")
        for key, kinds in _KIND_ONLY_KEYS.items():
            if getattr(self, key) is not None and self.kind not in kinds:
                raise ValueError(f"position.{key} applies to position.kind={'/'.join(kinds)}, not {self.kind!r}; "
                                 f"remove it or change the kind")
        if self.kind == "harpe":
            if self.base is not None:
                raise ValueError("position.base is one base for all heads; HARPE takes position.bases (one per "
                                 "K/V group) or position.base_strategy")
            if self.base_strategy is not None and self.base_strategy not in STRATEGIES:
                raise ValueError(f"position.base_strategy must be one of {', '.join(STRATEGIES)}; "
                                 f"got {self.base_strategy!r}")
            return
        if self.base is None:
            self.base = DEFAULT_ROPE_BASE
        self.base = float(self.base)
        if not self.base > 1:
            raise ValueError(f"position.base must be > 1; got {self.base}")
        if self.kind == "pi" and not (self.interpolation_factor and self.interpolation_factor > 1):
            raise ValueError("position.kind=pi needs position.interpolation_factor > 1 "
                             "(target length / original length, e.g. 32 for 4k -> 128k)")
        if self.kind == "llama3":
            if not (self.llama3_factor and self.llama3_factor >= 1):
                raise ValueError("position.kind=llama3 needs position.llama3_factor >= 1 (Llama 3.1: 8, 3.2: 32)")
            if not 0 < self.llama3_low_freq_factor < self.llama3_high_freq_factor:
                raise ValueError("position.llama3_low_freq_factor must be > 0 and below llama3_high_freq_factor")
        if self.kind == "yarn":
            if not (self.yarn_factor and self.yarn_factor > 1):
                raise ValueError("position.kind=yarn needs position.yarn_factor > 1 (e.g. 32)")
            if not self.yarn_original_max_position_embeddings:
                raise ValueError("position.kind=yarn needs position.yarn_original_max_position_embeddings "
                                 "(the pretrained context length, e.g. 4096)")

    def describe(self) -> str:
        """One short phrase for logs and summaries ("HARPE 32 bases [1e+06, 1.15e+06, ...]", "RoPE base 5e+06")."""
        if self.kind == "harpe":
            bases = self.bases or []
            shown = ", ".join(f"{b:g}" for b in bases[:4]) + (", ..." if len(bases) > 4 else "")
            return f"HARPE {len(bases)} bases [{shown}]"
        if self.kind == "pi":
            return f"RoPE base {self.base:g} + PI x{self.interpolation_factor:g}"
        if self.kind == "yarn":
            return f"YaRN base {self.base:g} x{self.yarn_factor:g}"
        if self.kind == "llama3":
            return f"RoPE base {self.base:g} + Llama-3 scaling x{self.llama3_factor:g}"
        return f"RoPE base {self.base:g}"

    def with_base_set(self, num_query_groups: int, head_dim: int) -> "PositionEmbeddingConfig":
        """This encoding with the HARPE base set written out (and the strategy settings used filled in)."""
        if self.kind != "harpe":
            return self
        settings = {name: getattr(self, name) if getattr(self, name) is not None else _SETTING_DEFAULTS.get(name)
                    for name in _STRATEGY_SETTINGS.get(self.base_strategy, ())}
        made = self._bases_from_strategy(settings, num_query_groups, head_dim)
        if self.bases is None and made is None:
            raise ValueError("position.kind=harpe needs position.bases (a list, one per K/V group) or "
                             f"position.base_strategy ({', '.join(STRATEGIES)})")
        try:
            bases = validate_bases(self.bases if self.bases is not None else made, num_groups=num_query_groups,
                                   hint=f"list exactly {num_query_groups} bases in model.position.bases, or set "
                                        f"model.num_query_groups (K/V groups; default model.num_attention_heads) "
                                        f"to their number")
        except ValueError as err:
            raise ValueError(f"position.bases: {err}") from None
        if self.bases is not None and made is not None and list(made) != bases:
            raise ValueError(f"position.bases {bases} and position.base_strategy={self.base_strategy!r} (which gives "
                             f"{list(made)}) disagree; keep one of them")
        return dataclasses.replace(self, bases=bases, **settings)

    def _bases_from_strategy(self, settings: dict, num_groups: int, head_dim: int) -> Optional[List[float]]:
        if self.base_strategy is None:
            return None
        if self.base_strategy == "file" and self.bases is not None:
            return None  # provenance only: the list is what counts, the file may have moved since
        try:
            if self.base_strategy == "file":  # read every time: the file is outside the config
                return make_base_set("file", num_bases=num_groups, path=settings["bases_file"])
            return list(_searched_base_set(self.base_strategy, num_groups, head_dim, tuple(sorted(settings.items()))))
        except ValueError as err:
            raise ValueError(f"position.base_strategy={self.base_strategy!r}: {err}") from None


@functools.lru_cache(maxsize=64)
def _searched_base_set(strategy: str, num_bases: int, head_dim: int, settings: Tuple) -> Tuple[float, ...]:
    """make_base_set, cached: a config is rebuilt (stages, copies) far more often than its bases
    change, and a peak-valley search costs ~50 ms."""
    names = {"base_min": "b_min", "base_max": "b_max", "base_stride": "stride"}
    return tuple(make_base_set(strategy, num_bases=num_bases, head_dim=head_dim,
                               **{names[k]: v for k, v in settings}))


@dataclass
class ModelConfig:
    """A Llama-family decoder: RMSNorm, SwiGLU, no biases, untied embeddings, GQA.

    Checked when made: what does not depend on the parallel layout (head counts, head size, the
    base set); `check_layout` checks the rest once the layout is known.
    """

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None = MHA (one K/V group per head)
    kv_channels: Optional[int] = None  # None = hidden_size / num_attention_heads
    vocab_size: int = 256
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-5
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0  # Llama trains without dropout; continual pretraining usually keeps it so
    attention_dropout: float = 0.0
    position: PositionEmbeddingConfig = field(default_factory=PositionEmbeddingConfig)

    def __post_init__(self):
        if isinstance(self.position, dict):
            self.position = PositionEmbeddingConfig(**self.position)
        if self.num_attention_heads < 1 or self.groups < 1:
            raise ValueError("num_attention_heads and num_query_groups must be >= 1")
        if self.num_attention_heads % self.groups:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_query_groups ({self.groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads}), or set kv_channels")
        if self.head_dim % 2:
            raise ValueError(f"head dimension ({self.head_dim}) must be even for RoPE")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1]; got {self.rotary_percent}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        self.position = self.position.with_base_set(self.groups, self.head_dim)

    @property
    def groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def check_layout(model_cfg: ModelConfig, *, tensor: int = 1, pipeline: int = 1, virtual_pipeline: Optional[int] = None,
                 context: int = 1, seq_length: Optional[int] = None) -> None:
    """Every divisibility a parallel layout needs, checked before any process group exists.

    The one place these rules live: the trainer's config check, the converter's `--tp/--pp`
    check and the model builder all call it, so they cannot drift apart.
    """
    for name, value in (("tensor", tensor), ("pipeline", pipeline), ("context", context)):
        if value < 1:
            raise ValueError(f"parallel.{name} must be >= 1, got {value}")
    m = model_cfg
    for name, value, why in (("num_attention_heads", m.num_attention_heads, ""),
                             ("num_query_groups", m.groups, ": each TP rank holds whole K/V groups"),
                             ("ffn_hidden_size", m.ffn_hidden_size, ""),
                             ("vocab_size", m.vocab_size, "; pad the vocabulary")):
        if value % tensor:
            raise ValueError(f"{name} ({value}) must be divisible by tensor_model_parallel_size ({tensor}){why}")
    if m.num_layers % pipeline:
        raise ValueError(f"num_layers ({m.num_layers}) must be divisible by pipeline_model_parallel_size "
                         f"({pipeline}): each pipeline stage holds the same number of layers")
    if virtual_pipeline is not None:
        if pipeline < 2:
            raise ValueError("virtual pipeline stages need pipeline_model_parallel_size >= 2")
        if m.num_layers % (pipeline * virtual_pipeline):
            raise ValueError(f"num_layers ({m.num_layers}) must be divisible by pipeline x virtual pipeline "
                             f"({pipeline} x {virtual_pipeline})")
    if seq_length is not None and context > 1 and seq_length % (2 * context):
        raise ValueError(f"sequence length ({seq_length}) must be divisible by 2 * context_parallel_size "
                         f"({2 * context})")

