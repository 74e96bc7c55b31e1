"""Check 3: the run starts from the model it names, and leaves as the model it trained.

Two parts, both about a pretrained model's positions and weights surviving the trip through our converter:

- start (with training.init_from): the step-0 check of `harpe-train --check-init` (training/init_check.py, reused,
  not rewritten): the run's first forward - built as training builds it, in the user's real layout and model,
  weights from init_from - against Hugging Face's loss on the same tokens, labels and loss mask. A wrong
  init_from, a model: section unlike the checkpoint, another tokenizer's data or a wrong EOD all fail it. The
  Hugging Face directory is --hf-dir, else the one the conversion recorded (harpe-convert hf-to-megatron keeps it).
- finish (every run): what `harpe-convert megatron-to-hf` will write for this run's position encoding
  (hf_config_dict), read back by transformers' own rotary code (LlamaRotaryEmbedding: rope_theta, rope_scaling)
  or, for HARPE, the harpe_bases record, rotates as the run does: inverse frequencies against the float64 ones
  of the configured encoding (rotary_check.expected_inverse_frequencies). A converter that drops a RoPE scaling
  (Megatron-Bridge PR #5097: a PI/YaRN/Llama-3 model exported as plain RoPE, which looks fine at short
  positions) fails here before training, not after the export. Tolerance 1e-6 relative: both sides compute the
  same closed form, transformers in fp32.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from megatron_harpe.config.model import ModelConfig
from megatron_harpe.config.schema import Config
from megatron_harpe.preflight.result import FAIL, NOT_RUN, PASS, CheckResult
from megatron_harpe.preflight.rotary_check import expected_inverse_frequencies

NAME = "initial model"
EXPORT_NAME = "export keeps positions"
EXPORT_RTOL = 1e-6


def recorded_hf_dir(cfg: Config) -> Optional[str]:
    """The Hugging Face directory init_from was converted from, as the conversion recorded it (None if none)."""
    from megatron_harpe.convert.megatron_io import CONVERSION_KEY
    from megatron_harpe.models.checkpoint import read_common_state
    from megatron_harpe.training.checkpointing import resolve_checkpoint_path

    try:
        common = read_common_state(resolve_checkpoint_path(cfg.training.init_from))
    except (OSError, ValueError, KeyError):
        return None
    hf_dir = (common.get(CONVERSION_KEY) or {}).get("hf_dir")
    return hf_dir if hf_dir and (Path(hf_dir) / "config.json").is_file() else None


def initial_model_check(cfg: Config, hf_dir: Optional[str], max_tokens: int,
                        log: Callable[[str], None] = lambda text: None) -> CheckResult:
    """Collective (every rank of the launch, no model-parallel state held): check_init on the real run."""
    started = time.perf_counter()
    if not cfg.training.init_from:
        return CheckResult(NAME, NOT_RUN, "no training.init_from: the run starts from random weights")
    hf_dir = hf_dir or recorded_hf_dir(cfg)
    if hf_dir is None:
        return CheckResult(NAME, FAIL, f"training.init_from={cfg.training.init_from} records no Hugging Face source "
                                       f"to compare with: pass --hf-dir (the directory it was converted from)")
    try:
        from megatron_harpe.convert.hf_reference import HFReference
    except ImportError as err:
        return CheckResult(NAME, NOT_RUN, f"needs transformers (pip install 'megatron-harpe[hf]'): {err}")
    from megatron_harpe.training.init_check import check_init

    result = check_init(cfg, HFReference(hf_dir, show_progress=False), max_tokens=max_tokens, log=log)
    details = {"megatron_loss": result.megatron_loss, "reference_loss": result.reference_loss,
               "rel_diff": result.rel_diff, "tokens": result.tokens, "reference": result.reference,
               "run": result.run, "notes": result.notes}
    if result.passed:
        summary = (f"step-0 loss {result.megatron_loss:.6f} vs Hugging Face {result.reference_loss:.6f} "
                   f"({result.rel_diff:.2g} relative) on {result.tokens:,} tokens; {hf_dir}")
    else:
        summary = result.failure or "the step-0 loss differs"
    tolerance = f"{result.rtol:.0e} relative ({result.rtol_why})" if result.rtol_why else f"{result.rtol:.0e} relative"
    return CheckResult(NAME, PASS if result.passed else FAIL, summary, tolerance, details,
                       time.perf_counter() - started)


def _transformers_inverse_frequencies(hf: dict) -> np.ndarray:
    """transformers' own inverse frequencies for a stock Llama config.json (its RoPE initialisation)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "auto_map")})
    return LlamaRotaryEmbedding(config).inv_freq.double().numpy()


def export_check(model_cfg: ModelConfig) -> CheckResult:
    """What megatron-to-hf would write for `model_cfg`'s position encoding rotates as the run does."""
    started = time.perf_counter()
    try:
        import transformers  # noqa: F401
    except ImportError:
        return CheckResult(EXPORT_NAME, NOT_RUN, "needs transformers (pip install 'megatron-harpe[hf]')")
    from megatron_harpe.convert.hf_config import check_exportable, hf_config_dict

    position = model_cfg.position
    try:
        check_exportable(model_cfg)
        hf = hf_config_dict(model_cfg, vocab_size=model_cfg.vocab_size, dtype_name="float32")
    except ValueError as err:
        return CheckResult(EXPORT_NAME, FAIL, f"the run cannot be exported to Hugging Face: {err}")
    want = expected_inverse_frequencies(model_cfg)
    if position.kind == "harpe":
        saved = [float(b) for b in hf.get("harpe_bases") or []]
        ok = hf.get("model_type") == "harpe_llama" and saved == [float(b) for b in position.bases]
        summary = (f"config.json records the {len(saved)} HARPE bases for HarpeLlamaForCausalLM" if ok else
                   f"config.json records model_type {hf.get('model_type')!r}, bases {saved[:4]}...: not the run's "
                   f"{len(position.bases)} bases")
        return CheckResult(EXPORT_NAME, PASS if ok else FAIL, summary, "the exact bases",
                           {"hf_harpe_bases": saved}, time.perf_counter() - started)
    if want is None:
        return CheckResult(EXPORT_NAME, NOT_RUN, f"{position.kind}: YaRN's frequencies are not re-derived here")
    got = _transformers_inverse_frequencies(hf)
    rel = float(np.max(np.abs(got - want[0]) / np.abs(want[0])))
    scaling = hf.get("rope_scaling")
    details = {"rope_theta": hf.get("rope_theta"), "rope_scaling": scaling, "max_rel_error": rel}
    tolerance = f"{EXPORT_RTOL:.0e} relative (the same closed form; transformers computes it in fp32)"
    if rel <= EXPORT_RTOL:
        return CheckResult(EXPORT_NAME, PASS, f"transformers reads rope_theta {hf.get('rope_theta'):g}, rope_scaling "
                                              f"{(scaling or {}).get('rope_type', 'none')}: inverse frequencies "
                                              f"within {rel:.1g} of the run's", tolerance, details,
                           time.perf_counter() - started)
    return CheckResult(EXPORT_NAME, FAIL, f"the exported config.json (rope_theta {hf.get('rope_theta'):g}, "
                                          f"rope_scaling {scaling}) makes transformers rotate by other frequencies "
                                          f"than the run's {position.describe()} ({rel:.3g} relative): the export "
                                          f"would drop or change the position scaling", tolerance, details,
                       time.perf_counter() - started)


def describe_sources(cfg: Config, hf_dir: Optional[str]) -> List[str]:
    return [f"init_from {cfg.training.init_from}", f"Hugging Face {hf_dir or recorded_hf_dir(cfg) or '-'}"]
