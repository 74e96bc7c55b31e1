"""harpe-preprocess: jsonl (.jsonl, .jsonl.gz, .jsonl.zst) or Parquet -> megatron-core indexed dataset (.bin/.idx).

    harpe-preprocess --input 'data/*.jsonl.gz' --tokenizer-type sentencepiece \\
        --tokenizer-model llama2/tokenizer.model --output-prefix out/slimpj --workers 16 --append-eod

writes ``out/slimpj_text_document.bin/.idx`` (one pair per ``--json-keys`` key, named as
Megatron-LM's tools/preprocess_data.py names them); train on it with harpe-train's config keys
``data.kind=indexed 'data.blend=[out/slimpj_text_document]'``. The flags that Megatron-LM's tool
also has mean the same here.
Token ids are exactly the tokenizer's own ``encode(text)`` (no BOS unless
``--prepend-bos``; EOD after each document with ``--append-eod``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from megatron_harpe.data.indexed import IndexedDatasetWriter
from megatron_harpe.data.inputs import DataError, check_output_prefix, expand_inputs, output_directory
from megatron_harpe.data.jsonio import write_json_atomic
from megatron_harpe.data.pipeline import BadLine, ChunkResult, EncodeOptions, Progress, run_pipeline
from megatron_harpe.data.tokenizer import DATA_TOOL_SETTINGS, TokenizerError, load_tokenizer, token_dtype
from megatron_harpe.data.cli_errors import (UsageError, UsageErrorParser, add_contract_args, sigterm_as_interrupt,
                                            parse_command_line, run_reporting_errors)

PROG = "harpe-preprocess"


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True,
                   help="sentencepiece (a tokenizer.model, e.g. Llama-2) or huggingface (a tokenizer.json or its "
                        "directory, e.g. Llama-3); Megatron-LM's names (GPTSentencePieceTokenizer, "
                        "Llama2Tokenizer, HuggingFaceTokenizer) are accepted")
    g.add_argument("--tokenizer-model", required=True, help="path of the tokenizer model / tokenizer.json / directory")
    g.add_argument("--eod-token", default=None, help="the end-of-document token (default: the tokenizer's EOS)")
    g.add_argument("--no-word-cache", action="store_true",
                   help="encode every document with sentencepiece itself (the word cache gives the same ids, faster)")


def add_input_args(p: argparse.ArgumentParser, multi_keys: bool = True, input_required: bool = True) -> None:
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=input_required, default=[],
                   help="jsonl, jsonl.gz, jsonl.zst or Parquet files; globs allowed (quote them); several files "
                        "are read in order")
    if multi_keys:
        g.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract (one output per key; dotted keys reach into objects, and into "
                            "struct columns of Parquet files)")
    else:
        g.add_argument("--json-keys", nargs=1, default=["text"],
                       help="the key (Parquet: the column) holding the text")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="count and skip lines that are not valid JSON objects with the keys (default: stop "
                        "at the first one, naming file and line)")
    g.add_argument("--replace-invalid-utf8", action="store_true",
                   help="replace bytes that are not UTF-8 with U+FFFD (default: such a line is a bad line)")
    g.add_argument("--prepend-bos", action="store_true", help="put BOS before every document")
    g.add_argument("--keep-empty", action="store_true",
                   help="keep documents with no tokens as empty documents (default: count and skip them)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="tokenizer processes (0: tokenize in the main process)")
    g.add_argument("--log-interval", type=int, default=10000,
                   help="documents between progress lines when stderr is not a terminal")
    g.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    g.add_argument("--block-mb", type=float, default=4.0, help="MB of input per work item")
    add_contract_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(prog=PROG, description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_input_args(p)
    add_tokenizer_args(p)
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx for every json key")
    g.add_argument("--append-eod", action="store_true", help="put the EOD token after every document")
    g.add_argument("--stats-json", default=None, help="also write the summary as JSON to this file")
    add_runtime_args(p)
    # accepted for Megatron-LM compatibility, with its meaning where it has one here
    g = p.add_argument_group("Megatron-LM compatibility")
    g.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--partitions", type=int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--vocab-file", default=None, help=argparse.SUPPRESS)
    g.add_argument("--merge-file", default=None, help=argparse.SUPPRESS)
    return p


def encode_options(args, json_keys: list[str], source_key: str | None = None) -> EncodeOptions:
    return EncodeOptions(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                         json_keys=json_keys, eod_token=args.eod_token,
                         append_eod=getattr(args, "append_eod", False), prepend_bos=args.prepend_bos,
                         keep_empty=args.keep_empty, replace_invalid_utf8=args.replace_invalid_utf8,
                         source_key=source_key, word_cache=not args.no_word_cache)


class Tally:
    """Counts over all blocks, and the bad-line policy."""

    def __init__(self, files: list[str], skip_bad: bool, keys: list[str]):
        self.files = files
        self.skip_bad = skip_bad
        self.keys = keys
        self.documents = 0
        self.tokens = 0
        self.tokens_per_key = {k: 0 for k in keys}
        self.bad = 0
        self.bad_reasons: dict[str, int] = {}
        self.bad_examples: list[BadLine] = []
        self.empty = 0
        self.blank = 0
        self.replaced_utf8 = 0
        self.cache_notes: list[str] = []

    def add(self, res: ChunkResult) -> None:
        path = self.files[res.file_index]
        if res.bad_count:
            first = BadLine(path, *res.bad[0], unit=res.unit)
            if not self.skip_bad:
                raise DataError(f"{first}\n  fix the {res.unit}, or pass --skip-bad-lines to count and skip bad "
                                f"lines")
            for line, reason in res.bad:
                if len(self.bad_examples) < 10:
                    self.bad_examples.append(BadLine(path, line, reason, unit=res.unit))
            self.bad += res.bad_count
            for k, v in res.bad_reasons.items():
                self.bad_reasons[k] = self.bad_reasons.get(k, 0) + v
        self.documents += res.documents
        for k in self.keys:
            n = int(res.tokens[k].size)
            self.tokens_per_key[k] += n
            self.tokens += n
        self.empty += res.empty
        self.blank += res.blank
        self.replaced_utf8 += res.replaced_utf8
        if res.cache_disabled:
            self.cache_notes.append(f"{path}: {res.cache_disabled}")

    def summary(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "tokens_per_key": self.tokens_per_key,
                "bad_lines": self.bad, "bad_line_reasons": self.bad_reasons,
                "bad_line_examples": [str(b) for b in self.bad_examples], "empty_documents": self.empty,
                "blank_lines": self.blank, "invalid_utf8_replaced": self.replaced_utf8}


def output_paths(prefix: str, keys: list[str]) -> dict[str, str]:
    return {k: f"{prefix}_{k.replace('.', '_').replace('/', '_')}_document" for k in keys}


def check_runtime_args(args) -> None:
    """The runtime flags' values, before any input is read."""
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: give 0 (tokenize in the main process) or more")
    if not args.block_mb > 0:
        raise UsageError(f"--block-mb {args.block_mb}: give a positive size in MB, e.g. 4")
    if args.log_interval < 1:
        raise UsageError(f"--log-interval {args.log_interval}: give a number of documents >= 1")


def _tokenize_and_write(files: list[str], keys: list[str], prefixes: dict, dtype, args, tally: Tally,
                        progress: Progress, writers: dict) -> None:
    """Tokenize ``files`` into one incomplete pair per key and commit them; on any failure the
    incomplete files are removed."""
    try:
        writers.update({k: IndexedDatasetWriter(prefixes[k], dtype) for k in keys})

        def on_result(res: ChunkResult, position: int) -> None:
            tally.add(res)
            for k in keys:
                writers[k].add_documents(res.tokens[k], res.lengths[k])
            progress.update(position, res.documents, sum(int(res.tokens[k].size) for k in keys))

        run_pipeline(files, encode_options(args, keys), args.workers, on_result,
                     block_bytes=max(int(args.block_mb * (1 << 20)), 1 << 16))
        progress.close()
        if tally.documents == 0:
            names = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            raise DataError(f"no documents in {names} ({tally.bad} bad lines, {tally.empty} empty documents, "
                            f"{tally.blank} blank lines); nothing written")
        for k in keys:
            writers[k].commit()
    except BaseException:
        progress.close()
        for w in writers.values():
            w.abort()
        raise


def preprocess(args) -> dict:
    check_runtime_args(args)
    files = expand_inputs(args.input)
    keys = list(dict.fromkeys(args.json_keys))
    check_output_prefix(args.output_prefix)
    tok = load_tokenizer(args.tokenizer_type, args.tokenizer_model, eod_token=args.eod_token,
                         settings=DATA_TOOL_SETTINGS)
    if args.prepend_bos and tok.bos is None:
        raise DataError(f"--prepend-bos: the tokenizer {args.tokenizer_model} has no BOS token")
    note = separator_note(tok, args.append_eod, args.eod_token)
    if note:
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    dtype = token_dtype(tok.vocab_size)
    prefixes = output_paths(args.output_prefix, keys)
    tally = Tally(files, args.skip_bad_lines, keys)
    total_bytes = sum(os.path.getsize(f) for f in files)
    progress = Progress(total_bytes, args.log_interval, enabled=not args.no_progress, prog=PROG)
    writers = {}
    start = time.time()
    with output_directory(os.path.dirname(os.path.abspath(args.output_prefix))):
        _tokenize_and_write(files, keys, prefixes, dtype, args, tally, progress, writers)
    seconds = time.time() - start

    summary = {"inputs": files, "outputs": {k: prefixes[k] for k in keys},
               "tokenizer": tok.describe(), "seconds": round(seconds, 3), **tally.summary(),
               "docs_per_s": tally.documents / max(seconds, 1e-9), "tokens_per_s": tally.tokens / max(seconds, 1e-9),
               "workers": args.workers, "append_eod": args.append_eod, "prepend_bos": args.prepend_bos,
               "word_cache": getattr(tok, "word_cache_reason", "n/a") if not args.no_word_cache else "off",
               "word_cache_notes": tally.cache_notes}
    if args.stats_json:
        write_json_atomic(summary, args.stats_json)
    return summary


def train_hint(prefix: str, tokenizer_model: str, eod_token: str | None = None) -> str:
    """How harpe-train reads a dataset (config keys; harpe-train has no --data-path)."""
    eod = "" if eod_token is None else " " + shlex.quote(f"data.eod_token={eod_token}")
    return (f"train on it with: harpe-train --config CONFIG.yaml data.kind=indexed 'data.blend=[{prefix}]' "
            f"data.tokenizer_model={tokenizer_model}{eod}")


def separator_note(tok, append_eod: bool, eod_token: str | None) -> str | None:
    """A chat model's EOS ends a turn, not a document: said (not changed: the default stays the tokenizer's EOS,
    as in Megatron-LM's tool) when --append-eod would separate pretraining text with it."""
    document_end = getattr(tok, "document_end", None)
    if not append_eod or eod_token is not None or document_end is None:
        return None
    name, token_id = document_end
    eos = tok.id_to_token(tok.eod)
    return (f"note: the tokenizer's EOS {eos!r} ({tok.eod}) ends a chat turn; this model's pretraining text "
            f"separates documents with {name!r} ({token_id}). For continual pretraining pass --eod-token '{name}' "
            f"(and data.eod_token: '{name}' in the harpe-train config); this run writes {eos!r} (the default, as "
            f"Megatron-LM's tool does)")


def format_summary(s: dict) -> str:
    extra = ""
    if s["bad_lines"]:
        reasons = ", ".join(f"{v} {k}" for k, v in sorted(s["bad_line_reasons"].items()))
        extra += f" ({reasons})"
    line = (f"{PROG}: done: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bad_lines']:,} bad lines{extra}, "
            f"{s['empty_documents']:,} empty documents skipped, {s['seconds']:.2f} s "
            f"({s['docs_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tokens/s)")
    return line


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv, "--input FILE [FILE ...] --tokenizer-type TYPE "
                              "--tokenizer-model PATH --output-prefix PREFIX [options]")
    if args is None:
        return 2
    if args.split_sentences or args.partitions != 1 or args.vocab_file or args.merge_file:
        print(f"{PROG}: error: --split-sentences, --partitions, --vocab-file and --merge-file (Megatron-LM) are "
              f"not supported: documents are never split, workers replace partitions, and tokenizers are "
              f"given by --tokenizer-model", file=sys.stderr)
        return 2
    with sigterm_as_interrupt():
        code, summary = run_reporting_errors(PROG, lambda: preprocess(args), usage_errors=(UsageError,),
                                             data_errors=(DataError, TokenizerError), debug=args.debug,
                                             verbose=args.verbose)
    if code:
        return code
    for ex in summary["bad_line_examples"][:5]:
        print(f"{PROG}: skipped bad line {ex}", file=sys.stderr)
    for note in summary["word_cache_notes"]:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    for k, prefix in summary["outputs"].items():
        print(f"{PROG}: wrote {prefix}.bin/.idx (key {k!r})", file=sys.stderr)
    print(f"{PROG}: {train_hint(next(iter(summary['outputs'].values())), args.tokenizer_model, args.eod_token)}",
          file=sys.stderr)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
