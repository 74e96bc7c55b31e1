"""harpe-train-tokenizer: train a small tokenizer on text for demos and tests.

    harpe-train-tokenizer --input corpus.jsonl --vocab-size 2000 --output-dir tok/
    harpe-train-tokenizer --input corpus.jsonl --type huggingface --vocab-size 2000 --output-dir tok-hf/

``sentencepiece`` (default) writes ``tokenizer.model`` shaped like Llama-2's: BPE with byte
fallback, split digits, identity normalisation, unk/bos/eos = 0/1/2. ``huggingface`` writes
``tokenizer.json`` + ``tokenizer_config.json`` shaped like Llama-3's: byte-level BPE with
Llama-3's pre-tokenizer regex and ``<|begin_of_text|>`` / ``<|end_of_text|>``. Inputs are
``.jsonl``/``.jsonl.gz``/``.jsonl.zst`` or Parquet (text taken from ``--json-keys``) or plain text
files (one line a sentence). Real runs use the model's own tokenizer; these are for demos and tests.

--output-dir: a directory that exists gets the files (each written under a temporary name and
renamed); a new one is built as a hidden sibling and renamed into place when the tokenizer is
whole, so a failed or interrupted run leaves no directory behind that was not there before.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from typing import Iterator

from megatron_harpe.data.cli_errors import (UsageError, UsageErrorParser, add_contract_args, parse_command_line,
                                            run_reporting_errors, sigterm_as_interrupt)
from megatron_harpe.data.inputs import CorruptInputError, DataError, expand_inputs, open_binary, output_directory
from megatron_harpe.data.jsonio import is_jsonl, iter_jsonl_fields
from megatron_harpe.data.parquet_input import is_parquet, iter_parquet_rows
from megatron_harpe.data.tokenizer import TokenizerError
from megatron_harpe.files import atomic_write_text, publish, staging_path

PROG = "harpe-train-tokenizer"

# Llama-3's pre-tokenizer split (the published tokenizer.json's pattern)
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                        r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The smallest vocabularies that can be trained. sentencepiece: its fixed pieces (256 byte pieces for
# byte fallback + <unk>, <s>, </s>) plus one piece per character the text needs (at least two: the
# word-boundary mark U+2581 and one letter); a real text needs more, and how many is known only once
# it is read (sentencepiece's "required_chars", reported by _sentencepiece_error).
SPM_FIXED_PIECES = 256 + 3
SPM_MIN_VOCAB = SPM_FIXED_PIECES + 2
# huggingface: the 256 byte-level tokens + <|begin_of_text|>, <|end_of_text|> (no merges yet)
HF_MIN_VOCAB = 256 + 2
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    """The text lines of one input; a non-string value of a key is passed over (not every record has text).
    A compressed file that turns out truncated or corrupt is a DataError naming it, as in harpe-preprocess."""
    try:
        yield from _file_lines_unchecked(path, json_keys)
    except CorruptInputError:
        raise
    except (EOFError, zlib.error, OSError) as e:  # gzip: BadGzipFile is an OSError, a cut file an EOFError
        raise DataError(f"cannot read input {path}: {e} (truncated or corrupt file?)") from None


def _file_lines_unchecked(path: str, json_keys: list[str]) -> Iterator[str]:
    if is_parquet(path):
        # rows in order, and per row its keys in order: the same lines as the same records in jsonl
        for _row, values in iter_parquet_rows(path, json_keys):
            for text in values:
                if isinstance(text, str):
                    yield from text.split("\n")
        return
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
                # a lone surrogate ("\ud800" escaped in JSON) cannot be encoded: U+FFFD, as for bad bytes above
                yield from _SURROGATE.sub("\ufffd", text).split("\n")


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


def _sentencepiece_error(err: Exception, vocab_size: int) -> DataError:
    """sentencepiece's failure in the words of this tool's flags."""
    text = str(err)
    m = re.search(r"required_chars\. (\d+) vs (\d+)", text)
    if m:
        need = int(m.group(2))
        return DataError(f"--vocab-size {vocab_size} is too small for this text: sentencepiece needs {need} pieces "
                         f"({SPM_FIXED_PIECES} fixed ones: 256 bytes for byte fallback, <unk>, <s>, </s>; and one "
                         f"for each of the {need - SPM_FIXED_PIECES} distinct characters of the text); use "
                         f"--vocab-size {need} or more")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
    if m:
        return DataError(f"--vocab-size {vocab_size} is more than this text can fill (at most {m.group(2)} pieces); "
                         f"lower --vocab-size, give more text, or pass --soft-vocab-limit to accept a smaller "
                         f"vocabulary")
    if "sentences_.empty()" in text:
        return DataError("no text to train on: every line is empty or blank")
    return DataError(f"sentencepiece training failed: {text}")


def train_sentencepiece(lines: Iterator[str], output_dir: str, vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 0.99995, threads: int = 1, verbose: bool = False,
                        hard_vocab_limit: bool = True) -> str:
    """Train a Llama-2-like sentencepiece model; returns the path of ``tokenizer.model``."""
    import sentencepiece as spm

    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, "tokenizer.model")
    reading_failed: list[BaseException] = []

    def guarded(it):
        # sentencepiece turns an exception raised by the iterator into a RuntimeError holding its traceback
        # as text; keep the original (a bad input's DataError, Ctrl-C) to raise it as it was
        try:
            yield from it
        except BaseException as e:
            reading_failed.append(e)
            raise

    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".spm-train-") as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=guarded(lines), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                character_coverage=character_coverage, byte_fallback=True, split_digits=True,
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                num_threads=threads, minloglevel=0 if verbose else 2, hard_vocab_limit=hard_vocab_limit,
                train_extremely_large_corpus=False)
        except RuntimeError as e:
            if reading_failed:
                raise reading_failed[0] from None
            raise _sentencepiece_error(e, vocab_size) from None
        os.replace(prefix + ".model", final)
    return final


def train_huggingface(lines: Iterator[str], output_dir: str, vocab_size: int) -> str:
    """Train a Llama-3-like byte-level BPE ``tokenizer.json``; returns its path."""
    try:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise DataError("--type huggingface needs the 'tokenizers' package: pip install 'megatron-harpe[hf]'") \
            from None
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = [0]

    def counted(it):
        for line in it:
            seen[0] += 1
            yield line

    tok.train_from_iterator(counted(lines), trainer)
    if not seen[0]:  # the trainer would save a tokenizer of bytes alone
        raise DataError("no text to train on: every line is empty or blank")
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "tokenizer.json")
    atomic_write_text(path, tok.to_str(pretty=True))
    atomic_write_text(os.path.join(output_dir, "tokenizer_config.json"), json.dumps(
        {"bos_token": bos, "eos_token": eos, "add_bos_token": True, "model_max_length": 131072,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return path


@contextlib.contextmanager
def staged_output_dir(output_dir: str):
    """The directory to write the tokenizer into: ``output_dir`` itself when it exists, else a hidden
    sibling renamed to ``output_dir`` when the body succeeds; on failure the sibling (and any parent
    made for it) is removed, so no directory is left that was not there before."""
    if os.path.isdir(output_dir):
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise DataError(f"--output-dir {output_dir} is not writable (choose another or fix its permissions)")
        yield output_dir
        return
    if os.path.lexists(output_dir):
        raise DataError(f"--output-dir {output_dir} is a file, not a directory; give a directory")
    staging = staging_path(os.path.abspath(output_dir))
    with output_directory(str(staging.parent)):
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed run (the name is ours)
        try:
            os.mkdir(staging)
            yield str(staging)
            publish(staging, output_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _with_first_line(lines: Iterator[str], files: list[str], json_keys: list[str]) -> Iterator[str]:
    """``lines`` unchanged, once one is known to exist; else a DataError naming the inputs."""
    lines = iter(lines)
    first = next(lines, None)
    if first is None:
        names = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        where = (f" under the key(s) {', '.join(map(repr, json_keys))} (choose others with --json-keys)"
                 if any(is_jsonl(f) or is_parquet(f) for f in files) else "")
        raise DataError(f"no text in {names}: every line is empty or blank{where}; give files with text. "
                        f"Nothing written")
    return itertools.chain([first], lines)


def check_vocab_size(kind: str, vocab_size: int) -> None:
    """The smallest vocabulary each trainer can make (before any input is read)."""
    if kind == "sentencepiece" and vocab_size < SPM_MIN_VOCAB:
        raise UsageError(f"--vocab-size {vocab_size} is too small: a sentencepiece model holds {SPM_FIXED_PIECES} "
                         f"fixed pieces (256 bytes for byte fallback, <unk>, <s>, </s>) plus one per character of "
                         f"the text (at least 2), so at least {SPM_MIN_VOCAB}; real text needs more (this tool "
                         f"names the number when it has read the text)")
    if kind == "huggingface" and vocab_size < HF_MIN_VOCAB:
        raise UsageError(f"--vocab-size {vocab_size} is too small: a byte-level BPE tokenizer holds 256 byte "
                         f"tokens and 2 special tokens, so at least {HF_MIN_VOCAB}")


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(prog=PROG, description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="jsonl, jsonl.gz, jsonl.zst, Parquet or text files (globs allowed)")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="keys (Parquet: columns) holding the text (default: text)")
    p.add_argument("--type", default="sentencepiece", choices=["sentencepiece", "huggingface"])
    p.add_argument("--vocab-size", type=int, default=2000,
                   help=f"default 2000; at least {SPM_MIN_VOCAB} (sentencepiece: {SPM_FIXED_PIECES} + the text's "
                        f"characters) or {HF_MIN_VOCAB} (huggingface)")
    p.add_argument("--output-dir", required=True, help="writes tokenizer.model (sentencepiece) or tokenizer.json")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="sentencepiece algorithm")
    p.add_argument("--max-lines", type=int, default=2_000_000, help="read at most this many lines")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--soft-vocab-limit", action="store_true",
                   help="sentencepiece: a smaller vocabulary is fine when the text cannot fill --vocab-size")
    add_contract_args(p, verbose_help="show upstream warnings and the trainer's own log (HARPE_VERBOSE=1)")
    return p


def train(args) -> dict:
    """The whole tool: check the flags and the inputs, train into a staged directory, load the result."""
    from megatron_harpe.data.tokenizer import load_tokenizer

    check_vocab_size(args.type, args.vocab_size)
    if args.max_lines < 1:
        raise UsageError(f"--max-lines {args.max_lines}: give a number of lines >= 1")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give a number of threads >= 1")
    files = expand_inputs(args.input)
    lines = _with_first_line(iter_training_lines(files, args.json_keys, max_lines=args.max_lines), files,
                             args.json_keys)
    with staged_output_dir(args.output_dir) as work_dir:
        if args.type == "sentencepiece":
            path = train_sentencepiece(lines, work_dir, args.vocab_size, args.model_type, threads=args.threads,
                                       verbose=args.verbose, hard_vocab_limit=not args.soft_vocab_limit)
        else:
            path = train_huggingface(lines, work_dir, args.vocab_size)
        tok = load_tokenizer(args.type, path)  # what it wrote loads, before it is put in place
    return {**tok.describe(), "path": os.path.join(args.output_dir, os.path.basename(path)), "files": files}


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv, "--input FILE [FILE ...] --output-dir DIR [options]")
    if args is None:
        return 2
    start = time.time()
    with sigterm_as_interrupt():
        code, r = run_reporting_errors(PROG, lambda: train(args), usage_errors=(UsageError,),
                                       data_errors=(DataError, TokenizerError), debug=args.debug,
                                       verbose=args.verbose, interrupted="nothing written")
    if code:
        return code
    print(f"{PROG}: wrote {r['path']} ({args.type}, vocab {r['vocab_size']}, eod {r['eod']}, bos {r['bos']}) "
          f"from {len(r['files'])} file(s) in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
