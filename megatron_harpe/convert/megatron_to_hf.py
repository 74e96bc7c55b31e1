"""megatron-core checkpoint -> Hugging Face directory (safetensors, config, generation config, tokenizer).

    convert_megatron_to_hf("runs/harpe/checkpoints", "hf/llama2-7b-harpe-128k")

`load` may be a converted checkpoint, a trainer checkpoint directory (its `latest`), one
`iter_XXXXXXX/`, or a run directory (see megatron_io). The weights are read at TP=1/PP=1 one
transformer layer at a time (streaming_reader.py; any saved layout loads: torch_dist reshards),
mapped to HF names (mapping.py) and each HF tensor is written into its place in its safetensors
shard as it comes (hf_checkpoint.write_safetensors with the layout planned from a meta-device
model), so memory holds about one layer, whatever the model's size. `verify=True` builds and
loads the whole model to compare logits with transformers: an opt-in check that needs the memory.

- rope / ABF / PI / YaRN models: a stock `LlamaForCausalLM` config.json carrying both the legacy
  `rope_theta`/`rope_scaling` and transformers 5's `rope_parameters`.
- HARPE models: a `harpe_llama` config.json with `harpe_bases` and `auto_map`, plus
  `configuration_harpe_llama.py` / `modeling_harpe_llama.py` (hf_modeling/), so
  `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` applies the per-group bases.

Tokenizer files come from `--tokenizer`, else from the checkpoint's `hf_source/` (written by
hf-to-megatron; for trainer checkpoints, the one its run was initialised from), else from the
run config's `data.tokenizer_model`. A vocabulary padded for TP on import is cut back to the HF
size recorded then (or `vocab_size`).

A checkpoint written on another software stack (torch, megatron-core, TE, ...: environment.py) is
exported all the same, with a warning naming what changed (`ConversionSummary.warnings`).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.convert.hf_checkpoint import parse_size, write_safetensors
from megatron_harpe.convert.hf_config import check_exportable, hf_config_dict
from megatron_harpe.convert.mapping import hf_tensors
from megatron_harpe.convert.megatron_io import (CONVERSION_KEY, HF_SOURCE_DIR, MegatronCheckpoint, build_full_model,
                                                build_meta_model, dtype_name, locate_checkpoint, megatron_logits,
                                                open_checkpoint, parse_dtype, single_process_world, stored_dtype)
from megatron_harpe.convert.streaming_reader import CheckpointTensors
from megatron_harpe.convert.summary import ConversionSummary, progress, staging_dir
from megatron_harpe.environment import ENVIRONMENT_KEY, environment_changes, environment_record, environment_warning
from megatron_harpe.files import publish
from megatron_harpe.convert.tokenizer_files import TokenizerInfo, is_tokenizer_dir, write_hf_tokenizer


def _origins(ckpt: MegatronCheckpoint, max_hops: int = 8) -> List[Path]:
    """This checkpoint, then the checkpoints its run was initialised from (training.init_from), in order."""
    chain, run_config = [ckpt.path], ckpt.run_config
    for _ in range(max_hops):
        init_from = ((run_config or {}).get("training") or {}).get("init_from")
        if not init_from:
            break
        try:
            path = locate_checkpoint(init_from)
        except ConversionError:
            break  # moved or deleted since: tokenizer/vocabulary must then come from the options
        if path in chain:
            break
        chain.append(path)
        config = path / "config.yaml"
        run_config = _safe_yaml(config) if config.is_file() else None
    return chain


def _safe_yaml(path: Path) -> Optional[dict]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _conversion_record(chain: List[Path], ckpt: MegatronCheckpoint) -> Dict[str, Any]:
    from megatron_harpe.models.checkpoint import read_common_state

    if ckpt.conversion:
        return ckpt.conversion
    for path in chain[1:]:
        record = read_common_state(path).get(CONVERSION_KEY)
        if record:
            return record
    return {}


def _tokenizer_source(chain: List[Path], ckpt: MegatronCheckpoint, explicit) -> Optional[Path]:
    if explicit:
        return Path(explicit)
    for path in chain:
        if is_tokenizer_dir(path / HF_SOURCE_DIR):
            return path / HF_SOURCE_DIR
    model_file = ((ckpt.run_config or {}).get("data") or {}).get("tokenizer_model")
    if model_file and Path(model_file).exists():
        return Path(model_file)
    return None


def convert_megatron_to_hf(load: str | Path, out: str | Path, *, tokenizer: Optional[str | Path] = None,
                           config: Optional[str | Path] = None, dtype: Optional[str] = "auto",
                           max_shard_size: str | int = "5GB", vocab_size: Optional[int] = None,
                           max_position_embeddings: Optional[int] = None, overwrite: bool = False,
                           show_progress: bool = True, verify: bool = False) -> ConversionSummary:
    """Export a megatron checkpoint to a Hugging Face directory; see the module docstring."""
    started = time.perf_counter()
    out = Path(out)
    ckpt = open_checkpoint(load, config)
    model_cfg = ckpt.model_cfg
    stack_notes = stack_warnings(ckpt)
    if max_position_embeddings:
        model_cfg.max_position_embeddings = int(max_position_embeddings)
    check_exportable(model_cfg)
    chain = _origins(ckpt)
    origin = _conversion_record(chain, ckpt)
    true_vocab = int(vocab_size or origin.get("hf_vocab_size") or model_cfg.vocab_size)
    if not 0 < true_vocab <= model_cfg.vocab_size:
        raise ConversionError(f"--vocab-size {true_vocab} must be between 1 and the model's {model_cfg.vocab_size}")
    max_bytes = parse_size(max_shard_size)
    out_dtype = parse_dtype(dtype)
    staging = staging_dir(out, overwrite)
    staging.mkdir()
    extra: Dict[str, Any] = {}
    try:
        with single_process_world():
            saved_dtype = stored_dtype(ckpt.path)
            out_dtype = out_dtype or saved_dtype
            meta = build_meta_model(model_cfg, saved_dtype)
            # also checks the position record, the shard files and the shapes, before any weight is read
            weights = CheckpointTensors(ckpt.path, meta, saved_dtype, model_cfg)
            layout = [(name, tuple(t.shape), out_dtype)
                      for name, t in hf_tensors(dict(meta.named_parameters()), model_cfg, true_vocab)]
            stats = write_safetensors(progress(hf_tensors(weights, model_cfg, true_vocab), len(layout),
                                               "megatron -> hf", show_progress),
                                      staging, max_bytes, dtype=out_dtype, layout=layout)
            weights.release()
            info = _write_tokenizer(_tokenizer_source(chain, ckpt, tokenizer), staging, model_cfg)
            token_ids = _token_ids(info, origin)
            hf_config = hf_config_dict(model_cfg, vocab_size=true_vocab, dtype_name=dtype_name(out_dtype),
                                       token_ids=token_ids)
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            _write_generation_config(staging, chain, token_ids, hf_config.get("transformers_version"))
            if model_cfg.position.kind == "harpe":
                from megatron_harpe.convert.hf_modeling import HF_MODELING_DIR, HF_MODELING_FILES

                for name in HF_MODELING_FILES:
                    shutil.copy2(HF_MODELING_DIR / name, staging / name)
            if verify:  # the one step that holds the whole model: an explicit opt-in check
                from megatron_harpe.models.checkpoint import load_model

                model = build_full_model(model_cfg, saved_dtype)
                load_model([model], model_cfg, ckpt.path)
                diff = verify_export(model, staging, true_vocab, show_progress=show_progress)
                extra["max |logit diff| HF vs megatron"] = f"{diff:.3g}"
        if info is None:
            extra["tokenizer"] = "none written (pass --tokenizer)"
        elif info.note:
            extra["tokenizer"] = info.note
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConversionSummary("megatron-to-hf", str(ckpt.path), str(out), parameters=stats["parameters"],
                             tensors=stats["tensors"], shards=stats["shards"], seconds=time.perf_counter() - started,
                             dtype=dtype_name(out_dtype), position=model_cfg.position.describe(), extra=extra,
                             warnings=stack_notes)


def stack_warnings(ckpt: MegatronCheckpoint) -> List[str]:
    """A line when the checkpoint was written on another software stack than this process's, else none."""
    changes = environment_changes(ckpt.common.get(ENVIRONMENT_KEY), environment_record())
    if not changes:
        return []
    return [environment_warning(f"checkpoint {ckpt.path}", changes, "the weights are exported as saved; the model's "
                                "numerics on this stack (--verify, evaluation) may differ from the run's")]


def _write_tokenizer(source: Optional[Path], staging: Path, model_cfg) -> Optional[TokenizerInfo]:
    if source is None:
        return None
    return write_hf_tokenizer(source, staging, model_max_length=model_cfg.max_position_embeddings)


def _token_ids(info: Optional[TokenizerInfo], origin: Dict[str, Any]) -> Dict[str, Any]:
    hf = origin.get("hf_config") or {}
    ids = {key: hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in hf}
    if info is not None:
        ids.update(info.token_ids())
    return ids


def _write_generation_config(staging: Path, chain: List[Path], token_ids: Dict[str, Any],
                             transformers_version: Optional[str]) -> None:
    for path in chain:
        source = path / HF_SOURCE_DIR / "generation_config.json"
        if source.is_file():
            shutil.copy2(source, staging / "generation_config.json")
            return
    config = {"_from_model_config": True, **{k: v for k, v in token_ids.items() if v is not None}}
    if transformers_version:
        config["transformers_version"] = transformers_version
    (staging / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def verify_export(model, hf_dir: Path, vocab: int, seq: int = 32, show_progress: bool = True) -> float:
    """Max |logit difference| between the megatron model and the exported HF model on random ids."""
    from megatron_harpe.convert.hf_runtime import load_hf_causal_lm

    dtype = next(model.parameters()).dtype
    hf_model = load_hf_causal_lm(hf_dir, dtype=dtype, show_progress=show_progress)
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = megatron_logits(model, ids)[..., :vocab].float()
        got = hf_model(ids).logits.float()
    return (got - expected).abs().max().item()
