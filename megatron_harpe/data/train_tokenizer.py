"""harpe-train-tokenizer: train a small tokenizer on text for demos and tests.

    harpe-train-tokenizer --input corpus.jsonl --vocab-size 2000 --output-dir tok/
    harpe-train-tokenizer --input corpus.jsonl --type huggingface --vocab-size 2000 --output-dir tok-hf/

``sentencepiece`` (default) writes ``tokenizer.model`` shaped like Llama-2's: BPE with byte
fallback, split digits, identity normalisation, unk/bos/eos = 0/1/2. ``huggingface`` writes
``tokenizer.json`` + ``tokenizer_config.json`` shaped like Llama-3's: byte-level BPE with
Llama-3's pre-tokenizer regex and ``<|begin_of_text|>`` / ``<|end_of_text|>``. Inputs are
``.jsonl``/``.jsonl.gz`` (text taken from ``--json-keys``) or plain text files (one line a
sentence). Real runs use the model's own tokenizer; these are for demos and tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Iterator

from megatron_harpe.data.inputs import DataError, expand_inputs, open_binary
from megatron_harpe.data.jsonio import is_jsonl, iter_jsonl_fields

PROG = "harpe-train-tokenizer"

# Llama-3's pre-tokenizer split (the published tokenizer.json's pattern)
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def iter_training_lines(files: list[str], json_keys: list[str], max_line_chars: int = 2000,
                        max_lines: int | None = None) -> Iterator[str]:
    """Lines of text from jsonl (the keys' texts, split at newlines) or plain text files.

    Lines longer than ``max_line_chars`` are cut at sentence ends (sentencepiece skips long lines).
    """
    count = 0
    for path in files:
        for line in _file_lines(path, json_keys):
            for piece in _cut_at_sentence_ends(line, max_line_chars):
                if piece.strip():
                    yield piece
                    count += 1
                    if max_lines is not None and count >= max_lines:
                        return


def _file_lines(path: str, json_keys: list[str]) -> Iterator[str]:
    """The text lines of one input; a non-string value of a key is passed over (not every record has text)."""
    if not is_jsonl(path):
        with open_binary(path) as f:
            for raw in f:
                yield raw.decode("utf-8", errors="replace").rstrip("\r\n")
        return

    def bad_line(lineno: int, key: str | None) -> DataError:
        if key is None:
            return DataError(f"{path}:{lineno}: not valid JSON")
        return DataError(f"{path}:{lineno}: no key {key!r} (use --json-keys)")

    for _lineno, values in iter_jsonl_fields(path, json_keys, bad_line):
        for text in values:
            if isinstance(text, str):
                yield from text.split("\n")


def _cut_at_sentence_ends(line: str, max_line_chars: int) -> Iterator[str]:
    """Pieces of at most ``max_line_chars``: sentencepiece drops longer sentences instead of learning from them."""
    while line:
        if len(line) <= max_line_chars:
            piece, line = line, ""
        else:
            cut = line.rfind(". ", 0, max_line_chars)
            cut = max_line_chars if cut < max_line_chars // 4 else cut + 2
            piece, line = line[:cut], line[cut:]
        yield piece


def train_sentencepiece(lines: Iterator[str], output_dir: str, vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 0.99995, threads: int = 1, verbose: bool = False,
                        hard_vocab_limit: bool = True) -> str:
    """Train a Llama-2-like sentencepiece model; returns the path of ``tokenizer.model``."""
    import sentencepiece as spm

    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, "tokenizer.model")
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".spm-train-") as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                num_threads=threads, minloglevel=0 if verbose else 2, hard_vocab_limit=hard_vocab_limit,
                train_extremely_large_corpus=False)
        except RuntimeError as e:
            raise DataError(f"sentencepiece training failed: {e}") from None
        os.replace(prefix + ".model", final)
    return final


def train_huggingface(lines: Iterator[str], output_dir: str, vocab_size: int) -> str:
    """Train a Llama-3-like byte-level BPE ``tokenizer.json``; returns its path."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise DataError("--type huggingface needs the 'tokenizers' package: pip install 'megatron-harpe[hf]'") \
            from None
    os.makedirs(output_dir, exist_ok=True)
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])
    path = os.path.join(output_dir, "tokenizer.json")
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "add_bos_token": True,
                   "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="jsonl, jsonl.gz or text files (globs allowed)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text in jsonl (default: text)")
    p.add_argument("--type", default="sentencepiece", choices=["sentencepiece", "huggingface"])
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--output-dir", required=True, help="writes tokenizer.model (sentencepiece) or tokenizer.json")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="sentencepiece algorithm")
    p.add_argument("--max-lines", type=int, default=2_000_000, help="read at most this many lines")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--soft-vocab-limit", action="store_true",
                   help="sentencepiece: a smaller vocabulary is fine when the text cannot fill --vocab-size")
    p.add_argument("--verbose", action="store_true", help="show the trainer's own log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        if args.vocab_size < 300 and args.type == "sentencepiece":
            raise DataError(f"--vocab-size {args.vocab_size} is too small: byte fallback alone needs 259 pieces")
        files = expand_inputs(args.input)
        lines = iter_training_lines(files, args.json_keys, max_lines=args.max_lines)
        if args.type == "sentencepiece":
            path = train_sentencepiece(lines, args.output_dir, args.vocab_size, args.model_type,
                                       threads=args.threads, verbose=args.verbose,
                                       hard_vocab_limit=not args.soft_vocab_limit)
        else:
            path = train_huggingface(lines, args.output_dir, args.vocab_size)
    except DataError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from megatron_harpe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.type, path)
    print(f"{PROG}: wrote {path} ({args.type}, vocab {tok.vocab_size}, eod {tok.eod}, bos {tok.bos}) "
          f"from {len(files)} file(s) in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
