"""Input files: glob expansion, plain/gzip/zstd opening, and the errors that name the file and the fix."""
from __future__ import annotations

import contextlib
import glob
import gzip
import io
import os
from typing import Iterable

from megatron_harpe.cli import InputError

__all__ = ["DataError", "CorruptInputError", "expand_inputs", "open_binary", "get_field", "check_output_prefix",
           "output_directory", "is_zstd"]


class DataError(InputError):
    """Bad input or output: the message names the file (and line) and what to do about it."""


class CorruptInputError(DataError):
    """A compressed input that cannot be decompressed (truncated or corrupt). ``reason`` is the message
    without the file, for callers that add where in the file it happened."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read input {path}: {reason}")
        self.path = path
        self.reason = reason


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


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SUFFIXES = (".zst", ".zstd")


def _zstd_head(head: bytes) -> bool:
    """A zstd frame or a zstd skippable frame (magic 0x184D2A5?, little-endian) starts ``head``."""
    return head[:4] == ZSTD_MAGIC or (len(head) >= 4 and head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50)


def is_zstd(path: str, head: bytes | None = None) -> bool:
    """zstd by magic number, or by a ``.zst``/``.zstd`` name (then a file that is not zstd is reported as
    corrupt rather than read as text)."""
    if path.endswith(ZSTD_SUFFIXES):
        return True
    if head is None:
        with open(path, "rb") as f:
            head = f.read(4)
    return _zstd_head(head)


def open_binary(path: str):
    """Open a jsonl / jsonl.gz / jsonl.zst / text file for reading bytes (gzip and zstd by magic number;
    zstd also by a .zst name). Line iteration and ``read(n)`` work on all of them."""
    f = open(path, "rb")
    head = f.peek(4)[:4] if hasattr(f, "peek") else b""
    if head[:2] == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb")
    if is_zstd(path, head):
        return _ZstdFile(path, f)
    return f


class _ZstdFrames(io.RawIOBase):
    """Decompresses a zstd file frame after frame, with the ``zstandard`` library.

    Why not ``ZstdDecompressor().stream_reader(read_across_frames=True)``: it ends without an error
    when the file ends inside a frame (zstandard 0.25: a .zst cut in half reads as its first half),
    and a truncated download must not become a shorter dataset. One ``decompressobj`` per frame
    knows when its frame is complete (``eof``) and hands over what follows (``unused_data``, the
    next frame: files written by parallel compressors such as pzstd hold many); input that ends
    while a frame is open is an error. Frames with a checksum (the zstd command's default) are
    verified by the library. Windows up to 2 GB are accepted (``zstd --long=31`` files).
    """

    READ_SIZE = 1 << 17   # compressed bytes per step (zstandard's recommended input size)

    def __init__(self, path: str, fileobj):
        import zstandard
        self._zstd = zstandard
        self.path = path
        self.fileobj = fileobj                 # the compressed stream (its tell() is the progress)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        self._frame = None                     # the decompressobj of the frame being read, if one is open
        self._out = b""
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._out):
            if self._eof:
                return 0
            self._fill()
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def _fill(self) -> None:
        data = self.fileobj.read(self.READ_SIZE)
        if not data:
            self._eof = True
            if self._frame is not None:
                raise CorruptInputError(self.path, "the zstd data ends inside a frame: the file is truncated "
                                                   "or corrupt (download it again; `zstd -t FILE` checks a "
                                                   "file)")
            self._out, self._pos = b"", 0
            return
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            try:
                out.append(self._frame.decompress(data))
            except self._zstd.ZstdError as e:
                detail = str(e).split("error: ", 1)[-1]  # "zstd decompressor error: Data corruption detected"
                raise CorruptInputError(self.path, f"corrupt zstd data ({detail}); download it again "
                                                   f"(`zstd -t FILE` checks a file)") from None
            if self._frame.eof:
                data = self._frame.unused_data    # the next frame(s), if any
                self._frame = None
            else:
                data = b""
        self._out, self._pos = out[0] if len(out) == 1 else b"".join(out), 0

    def close(self) -> None:
        if not self.closed:
            self.fileobj.close()
        super().close()


class _ZstdFile(io.BufferedReader):
    """A buffered zstd file: ``read(n)`` and line iteration; ``fileobj`` is the compressed stream, as
    gzip's (the pipeline reports progress in compressed bytes)."""

    def __init__(self, path: str, fileobj):
        super().__init__(_ZstdFrames(path, fileobj), buffer_size=1 << 20)

    @property
    def fileobj(self):
        return self.raw.fileobj


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
