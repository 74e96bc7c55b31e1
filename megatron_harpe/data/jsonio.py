"""JSON in and out for the data tools and the evaluation inputs.

Reading: the tokenizer trainer and the evaluation haystacks accept the same ``.jsonl``/``.jsonl.gz``/
``.jsonl.zst`` files, so they must agree on what counts as a jsonl file and which of its lines are records; only
the wording of a bad line differs (each names its own flag), so the caller builds that error.

Writing: a report is written under a temporary name and renamed, so that a crash or Ctrl-C never
leaves a half-written JSON file where a finished one is expected.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Sequence

from megatron_harpe.data.inputs import get_field, open_binary
from megatron_harpe.files import atomic_write_text

__all__ = ["is_jsonl", "iter_jsonl_fields", "write_json_atomic"]


def is_jsonl(path: str) -> bool:
    """A file whose name has ``.json`` in it (``.jsonl``, ``.json``, ``.jsonl.gz``) is read as JSON lines."""
    return ".json" in os.path.basename(path)


def iter_jsonl_fields(path: str, keys: Sequence[str],
                      bad_line: Callable[[int, str | None], Exception]) -> Iterator[tuple[int, list]]:
    """(line number, the value of every key) for each non-blank line of a jsonl file (gzip and zstd allowed).

    A line that is not JSON raises ``bad_line(lineno, None)``; one that lacks a key raises
    ``bad_line(lineno, key)`` before anything of that line is yielded. Values are returned as
    they are (the caller decides what to do with a non-string).
    """
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                raise bad_line(lineno, None) from None
            values = []
            for key in keys:
                try:
                    values.append(get_field(record, key))
                except KeyError:
                    raise bad_line(lineno, key) from None
            yield lineno, values


def write_json_atomic(obj, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path`` (temporary name, then a rename)."""
    atomic_write_text(path, json.dumps(obj, indent=2))
