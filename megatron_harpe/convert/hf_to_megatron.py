"""Hugging Face Llama -> megatron-core torch_dist checkpoint (what `training.init_from` loads).

    convert_hf_to_megatron("Llama-2-7b-hf", "ckpt/llama2-7b-harpe", tp=8, pp=1,
                           position=PositionEmbeddingConfig(kind="harpe", base_strategy="paper-llama2-7b"))

The model is built at TP=1/PP=1 in one process with the project's provider, on the meta device
(its layout, no weights), and saved with megatron-core dist_checkpointing through
streaming_writer.StreamingSaveStrategy: each tensor is made from the HF files (fused QKV,
[gate; up]) just before it is written, so memory holds about one parameter, whatever the model's
size. A run with any TP/PP loads it (torch_dist reshards). `tp`/`pp` only check, before any
work, that the model can be split that way. `verify=True` loads the written checkpoint into a
whole model to compare logits with transformers: an opt-in check that needs the memory.

The checkpoint directory holds, beside the weights:
- common state: the position-encoding record (checked on resume), the ModelConfig
  (`megatron_harpe_model`, so megatron-to-hf needs no config) and where it came from
  (`megatron_harpe_conversion`: HF config, vocabulary size before padding, dtype);
- `model.yaml`: the `model:` section to put in the harpe-train config;
- `hf_source/`: the HF config.json, generation_config.json and tokenizer files, which
  megatron-to-hf reuses (also for runs started from this checkpoint with init_from).

Choosing a position encoding here (e.g. HARPE) is the continual-pretraining start: the weights
are those of the single-base model, the record says what the run will train with.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from megatron_harpe.convert.errors import ConversionError
from megatron_harpe.convert.hf_checkpoint import HFCheckpoint
from megatron_harpe.convert.hf_config import model_config_from_hf, read_hf_config
from megatron_harpe.convert.mapping import IGNORED_HF_SUFFIXES, hf_sources, megatron_tensor
from megatron_harpe.convert.megatron_io import (CONVERSION_KEY, HF_SOURCE_DIR, MODEL_KEY, MODEL_YAML,
                                                build_full_model, build_meta_model, dtype_name, parse_dtype,
                                                single_process_world)
from megatron_harpe.convert.streaming_writer import StreamingSaveStrategy
from megatron_harpe.convert.summary import ConversionSummary, progress, staging_dir
from megatron_harpe.convert.tokenizer_files import copy_tokenizer_files
from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig, check_layout
from megatron_harpe.files import publish, staging_path


def plan_model_config(hf_dir: str | Path, *, tp: int = 1, pp: int = 1,
                      position: Optional[PositionEmbeddingConfig] = None,
                      max_position_embeddings: Optional[int] = None,
                      make_vocab_size_divisible_by: int = 1) -> tuple[ModelConfig, dict, int]:
    """(ModelConfig, HF config, HF vocabulary size), checked against the TP/PP layout."""
    hf = read_hf_config(hf_dir)
    model_cfg = model_config_from_hf(hf, position=position, max_position_embeddings=max_position_embeddings)
    hf_vocab = model_cfg.vocab_size
    if make_vocab_size_divisible_by > 1:
        multiple = make_vocab_size_divisible_by
        model_cfg = dataclasses.replace(model_cfg, vocab_size=-(-hf_vocab // multiple) * multiple)
    try:
        check_layout(model_cfg, tensor=tp, pipeline=pp)
    except ValueError as err:
        hint = " (--make-vocab-size-divisible-by N pads it)" if "vocab_size" in str(err) else ""
        raise ConversionError(f"cannot convert {hf_dir} (for --tp {tp} --pp {pp}): {err}{hint}") from None
    return model_cfg, hf, hf_vocab


def convert_hf_to_megatron(hf_dir: str | Path, save: str | Path, *, tp: int = 1, pp: int = 1,
                           position: Optional[PositionEmbeddingConfig] = None,
                           max_position_embeddings: Optional[int] = None, dtype: Optional[str] = "auto",
                           make_vocab_size_divisible_by: int = 1, overwrite: bool = False,
                           show_progress: bool = True, verify: bool = False) -> ConversionSummary:
    """Convert a HF Llama-family checkpoint; see the module docstring. Returns the summary."""
    started = time.perf_counter()
    hf_dir, save = Path(hf_dir), Path(save)
    model_cfg, hf, hf_vocab = plan_model_config(hf_dir, tp=tp, pp=pp, position=position,
                                                max_position_embeddings=max_position_embeddings,
                                                make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    reader = HFCheckpoint(hf_dir)
    params_dtype = parse_dtype(dtype) or reader.dtype()
    staging = staging_dir(save, overwrite)
    tied_in_hf = model_cfg.tie_embeddings
    _check_output_layer(reader, tied_in_hf, hf_dir)
    extra = {}
    try:
        with single_process_world():
            from megatron_harpe.models.checkpoint import CheckpointWriteError, save_model

            model = build_meta_model(model_cfg, params_dtype)  # the layout: names, shapes, sharded keys
            parameters, tensors = _check_weights(reader, model, model_cfg, tied_in_hf, hf_dir)
            conversion = {"source": "huggingface", "hf_dir": str(hf_dir.resolve()), "hf_config": hf,
                          "hf_vocab_size": hf_vocab, "dtype": dtype_name(params_dtype),
                          "hf_source_dir": HF_SOURCE_DIR, "intended_layout": {"tp": tp, "pp": pp}}
            source = HFTensorSource(reader, model_cfg, tied_in_hf, params_dtype, show_progress, tensors)
            try:
                save_model([model], model_cfg, staging, sharded_strategy=StreamingSaveStrategy(source),
                           extra_common={MODEL_KEY: dataclasses.asdict(model_cfg), CONVERSION_KEY: conversion})
            except CheckpointWriteError:
                if source.error is not None:  # a bad input found while writing: say it plainly
                    raise source.error from None
                raise
            finally:
                source.close()
            if verify:  # the one step that holds the whole model: an explicit opt-in check
                diff = _verify_against_hf(staging, hf_dir, model_cfg, params_dtype, hf_vocab, show_progress)
                extra["max |logit diff| vs HF"] = f"{diff:.3g}"
        reader.close()
        _write_side_files(staging, hf_dir, model_cfg)
        publish(staging, save)
    except BaseException:
        reader.close()
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging_path(staging), ignore_errors=True)  # save_model's own staging
        raise
    return ConversionSummary("hf-to-megatron", str(hf_dir), str(save), parameters=parameters, tensors=tensors,
                             shards=len(reader.files), seconds=time.perf_counter() - started,
                             dtype=dtype_name(params_dtype), position=model_cfg.position.describe(),
                             extra={"loads at": f"TP={tp} PP={pp} (any layout)", **extra})


def _check_weights(reader: HFCheckpoint, model, model_cfg: ModelConfig, tied_in_hf: bool,
                   hf_dir: Path) -> tuple[int, int]:
    """Before anything is written: every megatron parameter can be made from the HF tensors with its shape
    (from the files' headers, no weights read), and no HF tensor is left over. Returns (parameters, tensors)."""
    used = set()
    parameters = tensors = 0
    for name, param in model.named_parameters():
        sources = hf_sources(name, tied_in_hf)
        used.update(sources)
        try:
            shape = megatron_tensor(name, lambda n: torch.empty(reader.shape(n), dtype=reader.tensor_dtype(n),
                                                                device="meta"), model_cfg, tied_in_hf).shape
        except RuntimeError:  # e.g. q/k/v rows that do not split into the configured heads
            shape = None
        if shape != param.shape:
            given = [reader.shape(n) for n in sources]
            raise ConversionError(
                f"shape mismatch: {name} is {tuple(param.shape)} in the model that config.json describes, but "
                f"{sources} are {given}; config.json and the weights do not belong together")
        parameters += param.numel()
        tensors += 1
    if tied_in_hf:
        used.add("lm_head.weight")  # checked equal to the embedding
    unused = sorted(n for n in set(reader.names()) - used if not n.endswith(IGNORED_HF_SUFFIXES))
    if unused:
        raise ConversionError(f"{hf_dir} has {len(unused)} tensor(s) a Llama model does not use, e.g. "
                              f"{unused[:4]}; refusing to drop weights silently (unsupported architecture?)")
    return parameters, tensors


class HFTensorSource:
    """StreamingSaveStrategy's source: each megatron tensor chunk made from the HF files when it is written.

    The full (TP=1) parameter is built (fused QKV, [gate; up], padded vocabulary) and kept until a
    chunk of another parameter is asked for: the SwiGLU fc1 is saved as two chunks ([gate] and
    [up]) of one parameter. A ConversionError raised while writing is kept in `error` (the writer
    wraps it)."""

    def __init__(self, reader: HFCheckpoint, model_cfg: ModelConfig, tied_in_hf: bool, dtype: torch.dtype,
                 show_progress: bool, total: int):
        self.reader, self.model_cfg, self.tied_in_hf, self.dtype = reader, model_cfg, tied_in_hf, dtype
        self.error: Optional[ConversionError] = None
        self._cached: tuple = (None, None)
        self._bar = progress(None, total, "hf -> megatron", show_progress) if show_progress else None

    def __call__(self, path, sh_ten) -> torch.Tensor:
        name = path[1]  # ("model", parameter name, [index of a factory's piece])
        try:
            if self._cached[0] != name:
                self._cached = (None, None)  # free the previous parameter first
                full = megatron_tensor(name, self.reader.get, self.model_cfg, self.tied_in_hf).to(self.dtype)
                self._cached = (name, full)
                if self._bar is not None:
                    self._bar.update(1)
            full = self._cached[1]
            first = sh_ten.prepend_axis_num  # the leading (layer) axis megatron-core adds
            if tuple(sh_ten.global_shape[first:]) != tuple(full.shape):
                raise ConversionError(f"internal: checkpoint key {sh_ten.key} is {tuple(sh_ten.global_shape)}, which "
                                      f"does not hold {name} {tuple(full.shape)} whole at TP=1")
            return full[tuple(slice(o, o + n) for o, n in zip(sh_ten.global_offset[first:], sh_ten.local_shape))]
        except ConversionError as err:
            self.error = self.error or err
            raise

    def close(self) -> None:
        self._cached = (None, None)
        if self._bar is not None:
            self._bar.close()


def _check_output_layer(reader: HFCheckpoint, tied: bool, hf_dir: Path) -> None:
    if not tied and "lm_head.weight" not in reader:
        raise ConversionError(f"{hf_dir}: tie_word_embeddings is false but there is no lm_head.weight")
    if tied and "lm_head.weight" in reader and not torch.equal(reader.get("lm_head.weight"),
                                                               reader.get("model.embed_tokens.weight")):
        raise ConversionError(f"{hf_dir}: tie_word_embeddings is true but lm_head.weight differs from "
                              f"model.embed_tokens.weight; fix config.json")


def _write_side_files(staging: Path, hf_dir: Path, model_cfg: ModelConfig) -> None:
    source = staging / HF_SOURCE_DIR
    source.mkdir()
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, source / name)
    copy_tokenizer_files(hf_dir, source)
    model_yaml = yaml.safe_dump({"model": dataclasses.asdict(model_cfg)}, sort_keys=False)
    (staging / MODEL_YAML).write_text("# the model: section for harpe-train configs that start from this checkpoint "
                                      "(training.init_from)\n" + model_yaml)


def _verify_against_hf(checkpoint: Path, hf_dir: Path, model_cfg: ModelConfig, dtype: torch.dtype, hf_vocab: int,
                       show_progress: bool) -> float:
    """Max |logit difference| between the written checkpoint (loaded into a whole megatron model) and
    transformers' model on random ids.

    Meaningful when the position encoding was kept; with a new one (e.g. HARPE) the two models
    differ by design and the number shows by how much.
    """
    from megatron_harpe.convert.hf_runtime import load_hf_causal_lm
    from megatron_harpe.convert.megatron_io import megatron_logits
    from megatron_harpe.models.checkpoint import load_model

    model = build_full_model(model_cfg, dtype)
    load_model([model], model_cfg, checkpoint)
    hf_model = load_hf_causal_lm(hf_dir, dtype=dtype, show_progress=show_progress)
    ids = torch.randint(0, hf_vocab, (1, min(64, model_cfg.max_position_embeddings)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(ids).logits.float()
    got = megatron_logits(model, ids)[..., :hf_vocab].float()
    return (got - expected).abs().max().item()
