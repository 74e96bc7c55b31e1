"""harpe-merge-data: concatenate megatron-core indexed datasets (.bin/.idx) into one, in the order given.

    harpe-merge-data --input shards/shard_00000_text_document shards/shard_00001_text_document \\
        --output-prefix data/slimpj_text_document
    harpe-merge-data --input 'shards/shard_*_text_document.idx' --output-prefix data/slimpj_text_document

This is the second half of a sharded preprocessing job (slurm/preprocess.sbatch: an array job runs
harpe-preprocess on groups of input files, then one job merges). Preprocessing shards whose inputs are the
files of a single run, in the same order, and merging them gives byte-identical ``.bin`` and ``.idx`` files
to that single run (the tests check it). Documents and sequences are kept as they are (document boundaries
included), via megatron-core's ``IndexedDatasetBuilder.add_index``.

Inputs are prefixes (``path/name`` of ``path/name.bin`` + ``path/name.idx``), or ``.bin``/``.idx`` paths, or
globs of those (expanded in sorted order, so ``shard_00010`` follows ``shard_00009``). Every input is checked
(``.bin`` size against its index) and all must have the same token dtype (same tokenizer family). The output
is written like harpe-preprocess's: ``<prefix>.bin/.idx.incomplete-<pid>`` first, then the old ``.idx`` is
removed, the ``.bin`` renamed and the ``.idx`` renamed last; an interrupted merge leaves no new pair.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from megatron_harpe.cli import InputError
from megatron_harpe.data.indexed import check_indexed_dataset, read_index, remove_incomplete
from megatron_harpe.data.cli_errors import (UsageError, UsageErrorParser, add_contract_args, parse_command_line,
                                            run_reporting_errors, sigterm_as_interrupt)
from megatron_harpe.data.inputs import DataError, check_output_prefix, output_directory

PROG = "harpe-merge-data"


class MergeError(InputError):
    pass


def _strip(path: str) -> str:
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def resolve_inputs(inputs: list[str]) -> list[str]:
    """Prefixes from prefixes, .bin/.idx paths and globs (each glob sorted; duplicates are an error)."""
    prefixes: list[str] = []
    for item in inputs:
        if glob.has_magic(item):
            matches = sorted({_strip(p) for p in glob.glob(item) if p.endswith((".bin", ".idx"))})
            if not matches:
                raise MergeError(f"--input {item!r} matches no .bin/.idx file")
            prefixes.extend(matches)
        else:
            prefixes.append(_strip(item))
    seen = set()
    for p in prefixes:
        if p in seen:
            raise MergeError(f"input {p} is given twice (its documents would be duplicated)")
        seen.add(p)
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise MergeError(f"input {p}: {p + ext} does not exist (give dataset prefixes, e.g. "
                                 f"out/shard_00000_text_document for out/shard_00000_text_document.bin/.idx)")
    if not prefixes:
        raise MergeError("no inputs")
    return prefixes


def merge_datasets(inputs: list[str], output_prefix: str, progress: bool = False) -> dict:
    """Concatenate the datasets `inputs` (prefixes, globs) into `output_prefix`; returns a summary dict."""
    started = time.monotonic()
    prefixes = resolve_inputs(inputs)
    out_abs = os.path.abspath(output_prefix)
    if out_abs in {os.path.abspath(p) for p in prefixes}:
        raise MergeError(f"--output-prefix {output_prefix} is also an input")
    check_output_prefix(output_prefix)  # creates nothing: the directory is made only to write the output
    dtype, counts = None, []
    for p in prefixes:
        try:
            counts.append(check_indexed_dataset(p))
            d = read_index(p)["dtype"]
        except ValueError as e:
            raise MergeError(f"input {p} is not a valid indexed dataset: {e}") from None
        if dtype is None:
            dtype = d
        elif d != dtype:
            raise MergeError(f"input {p} holds {d} tokens but {prefixes[0]} holds {dtype}: inputs must come from "
                             "the same tokenizer (uint16 below 65,500 ids, else int32)")

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    with output_directory(os.path.dirname(out_abs)):
        _write_merged(IndexedDatasetBuilder, prefixes, output_prefix, dtype, progress)
    result = check_indexed_dataset(output_prefix)
    expected = {k: sum(c[k] for c in counts) for k in ("sequences", "documents", "tokens")}
    if any(result[k] != expected[k] for k in expected):
        raise MergeError(f"merged {output_prefix} has {result} but the inputs add up to {expected}")
    return {**result, "inputs": len(prefixes), "output": output_prefix, "seconds": time.monotonic() - started}


def _write_merged(IndexedDatasetBuilder, prefixes: list[str], output_prefix: str, dtype, progress: bool) -> None:
    """megatron-core's builder into incomplete files, renamed into place at the end (removed on failure)."""
    remove_incomplete(output_prefix)
    suffix = f".incomplete-{os.getpid()}"
    tmp_bin, tmp_idx = output_prefix + ".bin" + suffix, output_prefix + ".idx" + suffix
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype.type)
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(prefixes), unit="dataset", desc=PROG)
        for p in prefixes:
            builder.add_index(p)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        builder.finalize(tmp_idx)
        for path in (tmp_bin, tmp_idx):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        if os.path.lexists(output_prefix + ".idx"):  # an old index must never pair with the new data
            os.remove(output_prefix + ".idx")
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
    except BaseException:
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        raise


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(prog=PROG, description=__doc__.split("\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", nargs="+", required=True,
                   help="dataset prefixes, .bin/.idx paths or globs, merged in this order (globs sorted)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_contract_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv, "--input PREFIX [PREFIX ...] --output-prefix PREFIX [options]")
    if args is None:
        return 2
    with sigterm_as_interrupt():
        code, s = run_reporting_errors(PROG, lambda: merge_datasets(args.input, args.output_prefix,
                                                                    progress=not args.no_progress),
                                       usage_errors=(UsageError,), data_errors=(MergeError, DataError),
                                       interrupted="no output written", debug=args.debug, verbose=args.verbose)
    if code:
        return code
    print(f"{PROG}: done: {s['inputs']} datasets -> {s['output']}.bin/.idx: {s['documents']:,} documents, "
          f"{s['tokens']:,} tokens ({s['dtype']}), {s['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
