"""Input files: glob expansion, plain/gzip opening, and the errors that name the file and the fix."""
from __future__ import annotations

import contextlib
import glob
import gzip
import os
from typing import Iterable

from megatron_harpe.cli import InputError

__all__ = ["DataError", "expand_inputs", "open_binary", "get_field", "check_output_prefix", "output_directory"]


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


def _missing_directories(directory: str) -> list[str]:
    """The directories that creating ``directory`` would make, outermost first; a DataError when an
    ancestor is a file or the nearest existing one is not writable (checked before any work)."""
    missing = []
    d = os.path.abspath(directory)
    while not os.path.isdir(d):
        if os.path.lexists(d):
            raise DataError(f"cannot create the output directory {directory}: {d} is a file, not a directory")
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not os.access(d, os.W_OK | os.X_OK):
        where = f"output directory is not writable: {d}" if not missing else \
            f"cannot create the output directory {directory}: {d} is not writable"
        raise DataError(f"{where} (choose another output path or fix its permissions)")
    return missing[::-1]


def check_output_prefix(prefix: str) -> None:
    """Fail early, before any work, when the output cannot be written. Creates nothing: the directory
    is made by ``output_directory`` when the output is written, and removed again if that fails."""
    if not prefix:
        raise DataError("no --output-prefix given")
    if os.path.isdir(prefix):
        raise DataError(f"--output-prefix {prefix} is a directory; give a prefix such as {prefix}/data")
    _missing_directories(os.path.dirname(prefix) or ".")


@contextlib.contextmanager
def output_directory(directory: str):
    """Make ``directory`` (and missing parents) for the body; if the body fails, remove the
    directories made here again (when empty: whatever else came to be in them is kept), so a failed
    or interrupted run leaves no directory that did not exist before."""
    made = []
    try:
        for d in _missing_directories(directory):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            except OSError as e:
                raise DataError(f"cannot create the output directory {directory}: {e.strerror}") from None
            made.append(d)
        yield directory
    except BaseException:
        for d in reversed(made):
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
