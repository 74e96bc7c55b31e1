"""Tokenizer files for exported Hugging Face directories.

Sources (`write_hf_tokenizer`):
- a Hugging Face tokenizer directory (tokenizer.json and/or tokenizer.model with
  tokenizer_config.json, ...): its files are copied as they are;
- a `tokenizer.json` file: copied, with a tokenizer_config.json naming its BOS/EOS;
- a sentencepiece `tokenizer.model` (Llama-2's, or one from harpe-train-tokenizer): copied, plus
  a `tokenizer.json` that reproduces sentencepiece's ids (Llama-2's "legacy" layout: the
  normalizer prepends "▁" and replaces spaces, BPE with byte fallback) and a
  tokenizer_config.json, so `AutoTokenizer.from_pretrained(DIR)` loads offline with any
  transformers version. The ids are checked against sentencepiece on probe strings; a mismatch
  is reported (and tokenizer.model is always there for sentencepiece itself).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from megatron_harpe.convert.errors import ConversionError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
PROBES = ("Hello world, the year 2024 was 12345.", " leading space", "  two spaces", "tabs\tand\nnewlines",
          "ünïcödé ☃ 中文", "end ")


@dataclass
class TokenizerInfo:
    source: str
    files: List[str] = field(default_factory=list)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    note: str = ""

    def token_ids(self) -> dict:
        ids = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        return {k: v for k, v in ids.items() if v is not None or k == "pad_token_id"}


def is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def copy_tokenizer_files(src: Path, dest: Path) -> List[str]:
    """Copy the tokenizer files of a HF directory; returns their names."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
            copied.append(name)
    return copied


def _ids_of(path: Path) -> tuple:
    from megatron_harpe.data.tokenizer import load_tokenizer

    kind = "huggingface" if (path / "tokenizer.json").is_file() or path.suffix == ".json" else "sentencepiece"
    tok = load_tokenizer(kind, str(path))
    return tok.bos, tok.eod, tok.pad_id


def write_hf_tokenizer(source: str | Path, out_dir: Path, model_max_length: int) -> TokenizerInfo:
    """Write tokenizer files for `source` (see the module docstring) into out_dir."""
    source = Path(source)
    if not source.exists():
        raise ConversionError(f"--tokenizer {source} does not exist")
    if source.is_dir() and ((source / "tokenizer.json").is_file() or (source / "tokenizer_config.json").is_file()):
        # a Hugging Face tokenizer directory: its own files are the most faithful description
        files = copy_tokenizer_files(source, out_dir)
        bos, eos, pad = _ids_of(source)
        return TokenizerInfo(str(source), files, bos, eos, pad)
    if source.is_dir() and (source / "tokenizer.model").is_file():
        source = source / "tokenizer.model"
    if source.is_file() and source.suffix == ".json":
        shutil.copy2(source, out_dir / "tokenizer.json")
        files = ["tokenizer.json"]
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (source.parent / name).is_file():
                shutil.copy2(source.parent / name, out_dir / name)
                files.append(name)
        bos, eos, pad = _ids_of(source)
        if "tokenizer_config.json" not in files:
            tokens = json.loads(source.read_text())
            id_to_token = {t["id"]: t["content"] for t in tokens.get("added_tokens", [])}
            _write_json(out_dir / "tokenizer_config.json", {
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": id_to_token.get(bos),
                "eos_token": id_to_token.get(eos), "model_max_length": model_max_length,
                "clean_up_tokenization_spaces": False})
            files.append("tokenizer_config.json")
        return TokenizerInfo(str(source), files, bos, eos, pad)
    if source.is_file():
        return sentencepiece_to_hf(source, out_dir, model_max_length)
    raise ConversionError(f"--tokenizer {source}: expected a tokenizer directory, a tokenizer.json or a sentencepiece "
                          f"tokenizer.model")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sentencepiece_to_hf(model_path: Path, out_dir: Path, model_max_length: int) -> TokenizerInfo:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_path))
    except Exception as err:  # sentencepiece raises RuntimeError/OSError for non-models
        raise ConversionError(f"--tokenizer {model_path} is not a sentencepiece model ({err})") from None
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    bos, eos, unk = piece(sp.bos_id()), piece(sp.eos_id()), piece(sp.unk_id())
    info = TokenizerInfo(str(model_path), ["tokenizer.model"], sp.bos_id() if bos else None,
                         sp.eos_id() if eos else None, sp.pad_id() if sp.pad_id() >= 0 else None)
    shutil.copy2(model_path, out_dir / "tokenizer.model")
    tokenizer_class = "LlamaTokenizer"  # converted by the loader from tokenizer.model, if we cannot do better
    try:
        backend = _legacy_llama_tokenizer_json(model_path, sp, bos, eos, unk)
    except ImportError:
        info.note = "transformers/tokenizers not installed: no tokenizer.json written (loaders convert tokenizer.model)"
    else:
        backend.save(str(out_dir / "tokenizer.json"))
        info.files.append("tokenizer.json")
        tokenizer_class = "PreTrainedTokenizerFast"
        mismatches = [text for text in PROBES if backend.encode(text, add_special_tokens=False).ids != sp.encode(text)]
        if mismatches:
            info.note = f"tokenizer.json differs from sentencepiece on {mismatches!r}"
            warnings.warn(f"{model_path}: the written tokenizer.json encodes {mismatches!r} differently from "
                          f"sentencepiece; use tokenizer.model with sentencepiece for exact ids")
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": tokenizer_class, "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "add_bos_token": bos is not None, "add_eos_token": False, "legacy": True,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False})
    _write_json(out_dir / "special_tokens_map.json",
                {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)) if v is not None})
    info.files += ["tokenizer_config.json", "special_tokens_map.json"]
    return info


def _legacy_llama_tokenizer_json(model_path: Path, sp, bos: Optional[str], eos: Optional[str], unk: Optional[str]):
    """A `tokenizers.Tokenizer` equal to sentencepiece: vocabulary and merges from transformers'
    conversion, Llama-2's legacy normalizer/decoder (transformers 5 would otherwise use a
    Metaspace pre-tokenizer that drops a leading space)."""
    from tokenizers import decoders, normalizers, processors
    from transformers import AutoTokenizer

    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("▁")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(model_path, Path(tmp) / "tokenizer.model")
        _write_json(Path(tmp) / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "legacy": True,
                                                          "bos_token": bos, "eos_token": eos, "unk_token": unk})
        backend = AutoTokenizer.from_pretrained(tmp, local_files_only=True).backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if dummy_prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    if bos is not None:
        bos_id = sp.piece_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, bos_id)])
    return backend
