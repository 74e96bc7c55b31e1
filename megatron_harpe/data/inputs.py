"""Input files: glob expansion, plain/gzip opening, and the errors that name the file and the fix."""
from __future__ import annotations

import glob
import gzip
import os
from typing import Iterable

from megatron_harpe.cli import InputError

__all__ = ["DataError", "expand_inputs", "open_binary", "get_field", "check_output_prefix"]


class DataError(InputError):
    """Bad input or output: the message names the file (and line) and what to do about it."""


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand globs (``data/*.jsonl.gz``) and check that every file exists and is readable.

    Order: the patterns' order, each glob sorted; a file named twice is read once.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise DataError(f"--input {pattern!r} matches no file")
        else:
            if not os.path.exists(pattern):
                raise DataError(f"input file not found: {pattern}")
            if os.path.isdir(pattern):
                raise DataError(f"input {pattern} is a directory; give files or a glob such as {pattern}/*.jsonl")
            matches = [pattern]
        for m in matches:
            if not os.access(m, os.R_OK):
                raise DataError(f"input file is not readable: {m} (check its permissions)")
            key = os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                files.append(m)
    if not files:
        raise DataError("no input files given (--input FILE [FILE ...])")
    return files


def open_binary(path: str):
    """Open a jsonl / jsonl.gz / text file for reading bytes (gzip by magic number, not by name)."""
    f = open(path, "rb")
    magic = f.peek(2)[:2] if hasattr(f, "peek") else b""
    if magic == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb")
    return f


def get_field(record, dotted: str):
    """``record['meta']['redpajama_set_name']`` for ``dotted='meta.redpajama_set_name'``.

    A top-level key that itself contains dots wins over the nested reading. Raises KeyError.
    """
    if isinstance(record, dict) and dotted in record:
        return record[dotted]
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def check_output_prefix(prefix: str) -> None:
    """Fail early, before any work, when the output cannot be written."""
    if not prefix:
        raise DataError("no --output-prefix given")
    directory = os.path.dirname(os.path.abspath(prefix))
    if os.path.isdir(prefix):
        raise DataError(f"--output-prefix {prefix} is a directory; give a prefix such as {prefix}/data")
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the output directory {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DataError(f"output directory is not writable: {directory} (choose another --output-prefix "
                        f"or fix its permissions)")
