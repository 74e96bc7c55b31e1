"""Writing megatron-core indexed datasets (``.bin`` + ``.idx``), atomically.

The format is megatron-core's ``MMIDIDX`` version 1 (``megatron.core.datasets.indexed_dataset``):

    .idx  b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count S |
          <Q document count D+1 | int32[S] sequence lengths | int64[S] byte pointers |
          int64[D+1] document indices (sequence index where each document starts, then S)
    .bin  the token ids of all sequences back to back, in the dtype of the code
          (uint16 = 8 for vocabularies below 65500, else int32 = 4)

Here every document is one sequence (as Megatron-LM's preprocessor writes it without
sentence splitting). We write the index ourselves (vectorised; megatron-core's writer builds
the pointers in a Python loop) and read everything back with megatron-core in the tests.

Atomicity: the data goes to ``<prefix>.bin.incomplete-<pid>`` and the index to
``<prefix>.idx.incomplete-<pid>``; :meth:`IndexedDatasetWriter.commit` removes an older
``<prefix>.idx``, renames the ``.bin`` and renames the ``.idx`` last. A run that stops at
any point leaves either the previous complete pair, or a ``.bin`` without ``.idx`` (which no
reader accepts), plus ``*.incomplete-*`` files that name themselves as such.
"""
from __future__ import annotations

import glob
import os
import struct

import numpy as np

from megatron_harpe.data.inputs import DataError

__all__ = ["IndexedDatasetWriter", "DTYPE_CODES", "read_index", "check_indexed_dataset", "last_tokens",
           "remove_incomplete"]

_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
               np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
               np.dtype(np.uint16): 8}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class IndexedDatasetWriter:
    """Append documents (one sequence each) and commit ``<prefix>.bin/.idx`` at the end."""

    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self.bin_path = prefix + ".bin"
        self.idx_path = prefix + ".idx"
        suffix = f".incomplete-{os.getpid()}"
        self._tmp_bin = self.bin_path + suffix
        self._tmp_idx = self.idx_path + suffix
        self._lengths: list[np.ndarray] = []
        self._f = open(self._tmp_bin, "wb")
        self.documents = 0
        self.tokens = 0
        self._done = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """``tokens``: the documents' ids back to back; ``lengths``: one length per document."""
        tokens = np.asarray(tokens)
        if tokens.dtype != self.dtype:
            tokens = tokens.astype(self.dtype)
        lengths = np.asarray(lengths, dtype=np.int32)
        if int(lengths.sum(dtype=np.int64)) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._f.write(tokens.tobytes())
        if lengths.size:
            self._lengths.append(lengths)
        self.documents += int(lengths.size)
        self.tokens += int(tokens.size)

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self.add_documents(arr, np.array([arr.size], dtype=np.int32))

    def commit(self) -> tuple[str, str]:
        """Write the index and put both files in place; returns ``(bin_path, idx_path)``."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        count = int(lengths.size)
        pointers = np.zeros(count, dtype=np.int64)
        if count > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(count + 1, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", count))
            f.write(struct.pack("<Q", doc_index.size))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_index.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        # an old index must never pair with the new data
        if os.path.lexists(self.idx_path):
            os.remove(self.idx_path)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._done = True
        return self.bin_path, self.idx_path

    def abort(self) -> None:
        """Remove the incomplete files (the final names are never touched)."""
        if self._done:
            return
        try:
            self._f.close()
        except OSError:
            pass
        for p in (self._tmp_bin, self._tmp_idx):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
        self._done = True


def read_index(prefix: str) -> dict:
    """The index of ``<prefix>.idx`` as numpy arrays (no megatron-core import needed)."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _HEADER:
        raise DataError(f"{path} is not a megatron indexed-dataset index (bad header); make it with harpe-preprocess")
    version, = struct.unpack("<Q", head[9:17])
    code = head[17]
    count, docs = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in _CODE_DTYPES:
        raise DataError(f"{path}: unsupported version {version} or dtype code {code}")
    expected = 34 + 12 * count + 8 * docs
    actual = os.path.getsize(path)
    if actual != expected:
        raise DataError(f"{path} is {'cut short' if actual < expected else 'longer than its header says'} ({actual} "
                        f"bytes, its header describes {expected}): the file is incomplete or corrupt; make it again "
                        f"with harpe-preprocess")
    buf = np.memmap(path, mode="r", dtype=np.uint8)
    off = 34
    lengths = np.frombuffer(buf, dtype="<i4", count=count, offset=off)
    off += 4 * count
    pointers = np.frombuffer(buf, dtype="<i8", count=count, offset=off)
    off += 8 * count
    doc_index = np.frombuffer(buf, dtype="<i8", count=docs, offset=off)
    return {"dtype": _CODE_DTYPES[code], "sequence_lengths": lengths, "sequence_pointers": pointers,
            "document_indices": doc_index}


def check_indexed_dataset(prefix: str) -> dict:
    """Check that ``.bin`` and ``.idx`` agree (size, pointers); returns counts. Raises DataError (a ValueError)."""
    idx = read_index(prefix)
    lengths, pointers = idx["sequence_lengths"], idx["sequence_pointers"]
    itemsize = idx["dtype"].itemsize
    total = int(lengths.sum(dtype=np.int64))
    size = os.path.getsize(prefix + ".bin")
    if size != total * itemsize:
        raise DataError(f"{prefix}.bin has {size} bytes but its index describes {total * itemsize}: the pair is "
                        f"incomplete or mismatched; make it again with harpe-preprocess")
    if lengths.size:
        expected = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * itemsize)])
        if not np.array_equal(expected, pointers):
            raise DataError(f"{prefix}.idx: sequence pointers do not follow the lengths (corrupt index)")
    d = idx["document_indices"]
    if d.size == 0 or d[0] != 0 or d[-1] != lengths.size or np.any(np.diff(d) < 0):
        raise DataError(f"{prefix}.idx: document indices are not a partition of the sequences (corrupt index)")
    return {"sequences": int(lengths.size), "documents": int(d.size - 1), "tokens": total,
            "dtype": str(idx["dtype"])}


def last_tokens(prefix: str, limit: int = 1024) -> np.ndarray:
    """The last token of each of the first `limit` documents of ``<prefix>`` (int64): the end-of-document
    token they were written with when harpe-preprocess had --append-eod, else their text's last token."""
    idx = read_index(prefix)
    starts = idx["document_indices"][1:limit + 1]  # a document ends where the next one starts
    ends = starts[idx["sequence_lengths"][starts - 1] > 0] - 1  # the last sequence of each (empty ones skipped)
    if ends.size == 0:
        return np.zeros(0, dtype=np.int64)
    dtype = idx["dtype"]
    data = np.memmap(prefix + ".bin", mode="r", dtype=dtype)
    offsets = idx["sequence_pointers"][ends] // dtype.itemsize + idx["sequence_lengths"][ends] - 1
    return data[offsets].astype(np.int64)


def remove_incomplete(prefix: str) -> list[str]:
    """Remove ``<prefix>*.incomplete-*`` leftovers of killed runs; returns what was removed."""
    removed = []
    for p in glob.glob(glob.escape(prefix) + "*.incomplete-*"):
        try:
            os.remove(p)
            removed.append(p)
        except OSError:
            pass
    return removed
