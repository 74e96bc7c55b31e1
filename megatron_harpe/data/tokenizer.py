"""Tokenizers behind one interface: sentencepiece models and Hugging Face ``tokenizer.json``.

    tok = load_tokenizer("sentencepiece", "llama2/tokenizer.model")
    tok = load_tokenizer("huggingface", "llama3/")          # a directory or a tokenizer.json
    ids = tok.encode("Hello world")                          # no BOS/EOS: the text's own tokens
    tok.decode(ids), tok.eod, tok.bos, tok.vocab_size

``encode`` returns exactly what the underlying library returns for the text without special
tokens (``SentencePieceProcessor.encode(text)``; ``tokenizers.Tokenizer.encode(text,
add_special_tokens=False).ids``); the preprocessor adds BOS / EOD only where asked. The
object also satisfies what megatron-core's datasets read from a tokenizer (``vocab_size``,
``eod``, ``pad``, ``tokenize``, ``detokenize``), so it can be given to ``GPTDatasetConfig``.

Hugging Face tokenizers are read with the ``tokenizers`` library alone (the ``hf`` extra);
``transformers`` is not needed. BOS/EOS come from ``tokenizer_config.json`` /
``special_tokens_map.json`` beside ``tokenizer.json`` when present, else from the usual
names (``<s>``/``</s>``, Llama-3's ``<|begin_of_text|>``/``<|end_of_text|>``, ...).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

from megatron_harpe.cli import InputError

__all__ = ["TokenizerError", "Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer",
           "load_tokenizer", "TOKENIZER_TYPES", "token_dtype", "DATA_TOOL_SETTINGS"]

TOKENIZER_TYPES = ("sentencepiece", "huggingface")

# names accepted for --tokenizer-type besides ours (Megatron-LM's spellings)
_TYPE_ALIASES = {
    "sentencepiece": "sentencepiece", "sentencepiecetokenizer": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece", "llama2tokenizer": "sentencepiece", "spm": "sentencepiece",
    "huggingface": "huggingface", "huggingfacetokenizer": "huggingface", "hf": "huggingface",
}

_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eos|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
#: chat models' end-of-turn tokens: an EOS of these ends a turn, not a document of pretraining text
_CHAT_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
#: what such a model's pretraining text separates documents with (SmolLM2, Qwen: the first; Llama-3: the second)
_DOCUMENT_ENDS = ("<|endoftext|>", "<|end_of_text|>")


class TokenizerError(InputError):
    """A tokenizer that cannot be loaded or used; the message names the file and the fix."""


#: How a message names the settings it refers to. The data tools pass their flags; harpe-train (the
#: data.tokenizer_* keys) and harpe-eval load tokenizers too, so without ``settings`` the message names
#: none of them (a hint must not send a user to another tool's flag).
DATA_TOOL_SETTINGS = {"type": "--tokenizer-type", "model": "--tokenizer-model", "eod": "--eod-token"}
_NEUTRAL_SETTINGS = {"type": "the tokenizer type", "model": "the tokenizer path", "eod": "an explicit EOD token"}


def _settings(settings: dict | None) -> dict:
    return {**_NEUTRAL_SETTINGS, **(settings or {})}


def token_dtype(vocab_size: int) -> type:
    """The token dtype megatron-core uses for a vocabulary (uint16 below 65500, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class Tokenizer:
    """The common interface. Subclasses set ``kind``, ``path``, ``vocab_size``, ``eod``, ``bos``."""

    kind: str = ""
    path: str = ""
    vocab_size: int = 0
    eod: int = -1
    bos: int | None = None
    pad_id: int | None = None
    document_end: tuple[str, int] | None = None  # set when the EOS is a chat end-of-turn token (HF tokenizers)

    # --- the interface
    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_fast(self, text: str) -> list[int]:
        """The ids of :meth:`encode`, by the fastest exact route this tokenizer has."""
        return self.encode(text)

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` by the fastest exact route (the preprocessor's path)."""
        return [self.encode_fast(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    @property
    def dtype(self) -> type:
        return token_dtype(self.vocab_size)

    def describe(self) -> dict:
        return {"type": self.kind, "path": self.path, "vocab_size": self.vocab_size, "eod": self.eod,
                "bos": self.bos}

    # aliases (the names other parts of the project use)
    @property
    def eod_id(self) -> int:
        return self.eod

    @property
    def bos_id(self) -> int | None:
        return self.bos

    # --- what megatron-core's datasets read (GPTDatasetConfig.tokenizer)
    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        # megatron-core falls back to its own pad id (-1) when this raises
        if self.pad_id is None or self.pad_id in (self.eod, self.bos):
            raise AttributeError("this tokenizer has no distinct pad token")
        return self.pad_id

    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.decode(ids)

    @property
    def unique_identifiers(self) -> dict:
        # megatron-core hashes the config (tokenizer included) into its index cache names
        return {"class": type(self).__name__, "path": os.path.abspath(self.path),
                "vocab_size": self.vocab_size, "eod": self.eod}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, bos={self.bos})"

    # Tokenizers travel to worker processes by path, not by pickled library state.
    def __getstate__(self):
        return {"path": self.path, "eod_override": getattr(self, "_eod_override", None)}

    def __setstate__(self, state):
        self.__init__(state["path"], eod_token=state["eod_override"])


def _check_file(path: str, what: str, fix: str) -> None:
    if not path:
        raise TokenizerError(f"no {what} given: {fix}")
    if not os.path.exists(path):
        raise TokenizerError(f"{what} not found: {path} ({fix})")
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise TokenizerError(f"{what} is not readable: {path} (check its permissions)")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file (Llama-2's ``tokenizer.model``)."""

    kind = "sentencepiece"

    def __init__(self, path: str, eod_token: str | None = None, word_cache: bool = True,
                 settings: dict | None = None):
        import sentencepiece as spm

        names = _settings(settings)
        path = os.fspath(path)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.model")):
            path = os.path.join(path, "tokenizer.model")
        _check_file(path, "sentencepiece model", f"set {names['model']} to a tokenizer.model or its directory")
        if os.path.isdir(path):
            raise TokenizerError(f"sentencepiece model: {path} is a directory without tokenizer.model")
        self.path = path
        self._eod_override = eod_token
        self._sp = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                proto = f.read()
            self._sp.LoadFromSerializedProto(proto)
        except OSError as e:
            raise TokenizerError(f"cannot read sentencepiece model {path}: {e}") from None
        except Exception as e:  # sentencepiece raises RuntimeError/OSError for non-models
            raise TokenizerError(f"{path} is not a sentencepiece model ({type(e).__name__}: {e}); "
                                 f"for a Hugging Face tokenizer.json set {names['type']} to huggingface") from None
        self.vocab_size = int(self._sp.get_piece_size())
        if eod_token is not None:
            eod = self._sp.piece_to_id(eod_token)
            if eod == self._sp.unk_id() and eod_token != self._sp.id_to_piece(self._sp.unk_id()):
                raise TokenizerError(f"EOD token {eod_token!r} is not in {path}")
            self.eod = int(eod)
        else:
            self.eod = int(self._sp.eos_id())
            if self.eod < 0:
                raise TokenizerError(f"sentencepiece model {path} has no EOS piece; name the end-of-document "
                                     f"token with {names['eod']}")
        bos = int(self._sp.bos_id())
        self.bos = bos if bos >= 0 else None
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else None
        self._word_cache: _WordCache | None = None
        self.word_cache_reason = ""
        if word_cache:
            ok, reason = _word_cache_safe(proto, self._sp)
            if ok:
                self._word_cache = _WordCache(self._sp)
            self.word_cache_reason = reason

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=1)

    @property
    def uses_word_cache(self) -> bool:
        return self._word_cache is not None

    def disable_word_cache(self, reason: str) -> None:
        self._word_cache = None
        self.word_cache_reason = reason

    def encode_fast(self, text: str) -> list[int]:
        """Same ids as :meth:`encode`, through the word cache when the model allows it."""
        if self._word_cache is None:
            return self._sp.encode(text)
        return self._word_cache.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


# ----------------------------------------------------------------------------- sentencepiece word cache
#
# Llama-style sentencepiece models (BPE, identity normalisation, dummy prefix, whitespace
# escaped to U+2581) segment text word by word: no piece contains a non-space character
# followed by U+2581, so no BPE merge can cross the boundary in front of a space that follows
# a non-space character. The segmentation of a text is then the concatenation of the
# segmentations of its words (each with its leading space(s)), and a dictionary word -> ids
# gives the very same ids as sentencepiece at a fraction of the cost (natural text repeats its
# words). The conditions are read from the model itself (_word_cache_safe); any model that
# does not meet them is encoded by sentencepiece directly. The preprocessor additionally
# checks the cache against sentencepiece on the first documents of every worker.

_WS = "\u2581"


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, list]:
    """The top-level fields of a protobuf message (varints as ints, length-delimited as bytes)."""
    fields: dict[int, list] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _word_cache_safe(proto: bytes, sp) -> tuple[bool, str]:
    """Whether word-by-word encoding is exact for this model, and why (not)."""
    try:
        model = _proto_fields(proto)
        trainer = _proto_fields(model.get(2, [b""])[-1])
        normalizer = _proto_fields(model.get(3, [b""])[-1])
    except (ValueError, IndexError):
        return False, "model proto not understood"
    if trainer.get(3, [1])[-1] != 2:
        return False, "not a BPE model"
    if trainer.get(24, [0])[-1]:
        return False, "treat_whitespace_as_suffix"
    name = normalizer.get(1, [b""])[-1]
    if normalizer.get(2, [b""])[-1] or name not in (b"identity", b""):
        return False, f"normaliser {name.decode(errors='replace') or '?'} is not identity"
    if not normalizer.get(3, [1])[-1]:
        return False, "no dummy prefix"
    if normalizer.get(4, [1])[-1]:
        return False, "remove_extra_whitespaces"
    if not normalizer.get(5, [1])[-1]:
        return False, "whitespace not escaped"
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        j = piece.find(_WS, 1)
        while j > 0:
            if piece[j - 1] != _WS:
                return False, f"piece {piece!r} crosses a word boundary"
            j = piece.find(_WS, j + 1)
    return True, "word cache on"


class _WordCache:
    """word (with its leading spaces) -> ids, for models that pass _word_cache_safe."""

    MAX_ENTRIES = 1 << 19

    def __init__(self, sp):
        self._sp = sp
        self._cache: dict[str, list[int]] = {}
        # encode(anchor + " " + word) = encode(anchor) + ids("\u2581" + word): the anchor keeps
        # sentencepiece's dummy prefix away from the word
        self._anchor = "a"
        self._anchor_len = len(sp.encode(self._anchor))
        self.misses = 0

    def _miss(self, key: str) -> list[int]:
        if key[0] == _WS:  # trailing spaces at the end of a text: len(key) x U+2581
            ids = self._sp.encode(self._anchor + " " * len(key))[self._anchor_len:]
        else:
            ids = self._sp.encode(self._anchor + " " + key)[self._anchor_len:]
        if len(self._cache) >= self.MAX_ENTRIES:
            self._cache.clear()
        self._cache[key] = ids
        self.misses += 1
        return ids

    def encode(self, text: str) -> list[int]:
        if not text or _WS in text:
            return self._sp.encode(text)
        cache_get = self._cache.get
        ids: list[int] = []
        extend = ids.extend
        pending = 0
        for part in text.split(" "):
            if part:
                if pending:
                    part = " " * pending + part
                    pending = 0
                r = cache_get(part)
                if r is None:
                    r = self._miss(part)
                extend(r)
            else:
                pending += 1
        if pending:
            # n empty parts at the end = n trailing U+2581 (the first is the text's own space)
            extend(cache_get(_WS * pending) or self._miss(_WS * pending))
        return ids


def _special_from_config(directory: str) -> dict:
    """bos/eos/pad token strings from tokenizer_config.json / special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        p = os.path.join(directory, name)
        if not os.path.isfile(p):
            continue
        try:
            with open(p, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read {p}: {e}") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[key] = v
    return out


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer: ``tokenizer.json`` or a directory holding one."""

    kind = "huggingface"

    def __init__(self, path: str, eod_token: str | None = None, settings: dict | None = None):
        names = _settings(settings)
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError:
            raise TokenizerError("Hugging Face tokenizers need the 'tokenizers' package: "
                                 "pip install 'megatron-harpe[hf]'") from None
        path = os.fspath(path)
        _check_file(path, "Hugging Face tokenizer", f"set {names['model']} to a tokenizer.json or its directory")
        directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) \
            else (os.path.dirname(path) or ".", path)
        if not os.path.isfile(file):
            raise TokenizerError(f"no tokenizer.json in {path} (only fast tokenizers are supported; "
                                 f"for a sentencepiece tokenizer.model set {names['type']} to sentencepiece)")
        _check_file(file, "Hugging Face tokenizer", "check the path")
        self.path = path
        self._eod_override = eod_token
        try:
            self._tok = _HFTokenizer.from_file(file)
        except Exception as e:
            raise TokenizerError(f"{file} is not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        special = _special_from_config(directory)

        def lookup(name: str | None) -> int | None:
            return None if name is None else self._tok.token_to_id(name)

        def first(names) -> int | None:
            for n in names:
                i = lookup(n)
                if i is not None:
                    return i
            return None

        if eod_token is not None:
            eod = lookup(eod_token)
            if eod is None:
                raise TokenizerError(f"EOD token {eod_token!r} is not in {file}")
        else:
            eod = lookup(special.get("eos_token"))
            if eod is None:
                eod = first(_EOS_NAMES)
            if eod is None:
                raise TokenizerError(f"cannot tell the end-of-document token of {file}: no eos_token in "
                                     f"tokenizer_config.json and none of {list(_EOS_NAMES)}; "
                                     f"name the end-of-document token with {names['eod']}")
        self.eod = int(eod)
        #: (token, id) that separates this model's pretraining documents when its EOS is a chat end-of-turn token
        #: (harpe-preprocess says so; it does not change the EOD: data/preprocess.py separator_note)
        self.document_end = None
        if eod_token is None and self._tok.id_to_token(self.eod) in _CHAT_TURN_ENDS:
            self.document_end = next(((n, lookup(n)) for n in _DOCUMENT_ENDS if lookup(n) is not None), None)
        bos = lookup(special.get("bos_token"))
        self.bos = bos if bos is not None else first(_BOS_NAMES)
        pad = lookup(special.get("pad_token"))
        self.pad_id = pad if pad is not None else first(_PAD_NAMES)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: Sequence[str]):
        fast = getattr(self._tok, "encode_batch_fast", None)  # tokenizers >= 0.20: no offsets
        if fast is not None:
            return fast(list(texts), add_special_tokens=False)
        return self._tok.encode_batch(list(texts), add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(texts)]

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        # one call for the whole block; without offsets (encode_batch_fast) it is ~1.4x faster
        # than encode() per text. Parallel only if TOKENIZERS_PARALLELISM allows (the
        # preprocessor's workers turn it off: one worker = one core).
        return [e.ids for e in self._encode_batch(texts)] if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))


def normalize_type(name: str) -> str:
    key = (name or "").strip().lower().replace("-", "").replace("_", "")
    if key not in _TYPE_ALIASES:
        raise TokenizerError(f"unknown tokenizer type {name!r}; use one of {list(TOKENIZER_TYPES)}")
    return _TYPE_ALIASES[key]


def load_tokenizer(kind: str, path: str, eod_token: str | None = None, settings: dict | None = None) -> Tokenizer:
    """Load a tokenizer of ``kind`` (``sentencepiece`` | ``huggingface``) from ``path``.

    ``settings``: how the caller's user sets the type, the path and the EOD token (``{"type": ...,
    "model": ..., "eod": ...}``, e.g. DATA_TOOL_SETTINGS), for the fix an error message names.
    """
    kind = normalize_type(kind)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, eod_token=eod_token, settings=settings)
    return HuggingFaceTokenizer(path, eod_token=eod_token, settings=settings)


def check_tokenizer_fits_model(tokenizer_type: str, tokenizer_model: str, model_vocab_size: int) -> None:
    """A tokenizer with more ids than the model's embedding has rows: refused before anything starts.

    The common mistake it catches is data tokenized for another model (Llama-3's 128k vocabulary into a Llama-2
    model of 32k): without this the run preprocesses, starts, and dies in the embedding with "index out of range"
    (a device-side assert on a GPU, naming nothing)."""
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(f"data.tokenizer_model {tokenizer_model} has {tokenizer.vocab_size:,} tokens but the model's "
                             f"vocabulary (model.vocab_size) is {model_vocab_size:,}: its ids would index past the "
                             f"embedding. Set model.vocab_size >= {tokenizer.vocab_size:,} (a multiple of 128 x "
                             f"parallel.tensor is customary), or use the tokenizer the model and its data were made with")
