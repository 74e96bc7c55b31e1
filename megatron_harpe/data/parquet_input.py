"""Parquet inputs (the format of Hugging Face datasets), read with pyarrow, a batch at a time.

Why a module of its own: a Parquet file is not lines of JSON, yet the data tools must treat its
rows exactly as they treat jsonl records (same keys, same bad-row rules, same token ids), and find
out about a file they cannot use (truncated, a column missing or of the wrong type) before any
work, from the footer alone.

Keys (``--json-keys``, ``--source-key``) name columns. A dotted key means what it means in jsonl:
a top-level column with exactly that name wins; otherwise each part after the first names a field
of a struct column (``meta.redpajama_set_name`` is the field ``redpajama_set_name`` of the struct
column ``meta``, as Hugging Face stores a jsonl ``"meta": {...}`` object). Map columns and JSON held
in string columns are not looked into. Text columns must hold strings (string, large_string,
string_view, or dictionary-encoded strings); a source column strings or integers. A null value is
a bad row (``--skip-bad-lines`` counts and skips it), a column that is missing or of another type
an error for the whole file. Rows are numbered from 0, as ``datasets`` and pandas index them.

Reading never holds the whole file: only the needed columns (nested fields by their path), with
``iter_batches`` and a batch size chosen from the footer's uncompressed column sizes so that a
batch holds about ``block_bytes`` of text; how row groups become the workers' blocks is said at
``iter_parquet_tasks``. pyarrow is imported only when a Parquet file is given (the tools start
without it).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterator

from megatron_harpe.data.inputs import DataError

__all__ = ["is_parquet", "ColumnPlan", "ArrowBlock", "ParquetSlice", "plan_columns", "iter_parquet_tasks",
           "read_slice", "forget_open_files", "iter_parquet_rows", "column_values", "PARQUET_SUFFIXES"]

PARQUET_MAGIC = b"PAR1"
PARQUET_SUFFIXES = (".parquet", ".pq")


def is_parquet(path: str) -> bool:
    """Parquet by name (``.parquet``, ``.pq``) or by its leading magic ``PAR1`` (no jsonl starts so).
    Only a regular file is looked into: reading from a pipe (a FIFO input) would take its bytes, and
    Parquet cannot be streamed through one anyway (its footer, read first, is at the end)."""
    if path.lower().endswith(PARQUET_SUFFIXES):
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) == PARQUET_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class ColumnPlan:
    """Where a key's values are: the column path read from the file, the top-level column of the batch,
    and the struct fields below it."""
    key: str
    read: str
    top: str
    fields: tuple


@dataclass
class ArrowBlock:
    """One batch of rows sent to a worker: the values of every text key (pyarrow arrays, cheap to
    pickle) and of the source key (or None)."""
    texts: list
    source: object
    rows: int


def _pa():
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("Parquet inputs need pyarrow: pip install pyarrow") from None
    return pyarrow


def _is_string_type(pa, t) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view",
                                                                          lambda _t: False)(t)


def _is_integer_type(pa, t) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t)


def open_parquet(path: str):
    """``pyarrow.parquet.ParquetFile`` of ``path``; a file pyarrow cannot read (truncated: its footer is
    at the end) is a DataError naming it.

    Pages are read through a 4 MB buffer instead of pyarrow's default (the whole column chunk of a
    row group, pre-buffered): a file written with pyarrow's defaults is often one row group, and its
    text column would otherwise sit in memory whole, compressed (measured on a 270 MB single row
    group file: 187 MB peak instead of 419 MB, same time). Page checksums are verified where the
    writer stored them."""
    pa = _pa()
    try:
        return pa.parquet.ParquetFile(path, pre_buffer=False, buffer_size=4 << 20, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read input {path}: not a readable Parquet file ({e}); a truncated download? "
                        f"Fetch it again") from None


def _plan(pa, schema, path: str, key: str, what: str, flag: str) -> ColumnPlan:
    """Resolve ``key`` against the file's schema (see the module docstring) and check the leaf type."""
    names = schema.names
    if key in names:
        plan, leaf = ColumnPlan(key, key, key, ()), schema.field(key).type
    else:
        parts = key.split(".")
        if parts[0] not in names:
            raise DataError(f"{path}: no column {key!r} (columns: {names[:12]}); choose the {what} column with "
                            f"{flag}")
        leaf = schema.field(parts[0]).type
        for depth, part in enumerate(parts[1:], 1):
            where = ".".join(parts[:depth])
            if not pa.types.is_struct(leaf):
                raise DataError(f"{path}: column {where!r} holds {leaf}, not a struct: a dotted key ({key!r}) "
                                f"reaches into struct columns only; choose the {what} column with {flag}")
            index = leaf.get_field_index(part)
            if index < 0:
                fields = [leaf.field(i).name for i in range(leaf.num_fields)]
                raise DataError(f"{path}: struct column {where!r} has no field {part!r} (fields: {fields[:12]}); "
                                f"choose the {what} column with {flag}")
            leaf = leaf.field(index).type
        plan = ColumnPlan(key, key, parts[0], tuple(parts[1:]))
    ok = _is_string_type(pa, leaf) or (what == "source" and _is_integer_type(pa, leaf))
    if not ok:
        wanted = "strings or integers" if what == "source" else "strings"
        raise DataError(f"{path}: column {key!r} holds {leaf} values, not {wanted}; choose the {what} column "
                        f"with {flag}")
    return plan


def plan_columns(path: str, keys: list[str], source_key: str | None = None,
                 key_flag: str = "--json-keys") -> tuple[object, list[ColumnPlan], ColumnPlan | None]:
    """(ParquetFile, a plan per text key, the source key's plan or None): everything a file can be told
    to be unusable for from its footer, before any row is read."""
    pa = _pa()
    pf = open_parquet(path)
    schema = pf.schema_arrow
    plans = [_plan(pa, schema, path, k, "text", key_flag) for k in keys]
    source = _plan(pa, schema, path, source_key, "source", "--source-key") if source_key else None
    return pf, plans, source


def _column_sizes(pf, plans: list[ColumnPlan]) -> list[int]:
    """Per row group: the uncompressed bytes of the needed columns, as the footer counts them."""
    meta = pf.metadata
    wanted = {p.read for p in plans}
    sizes = []
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        size = 0
        for j in range(rg.num_columns):
            col = rg.column(j)
            path = col.path_in_schema
            if path in wanted or any(path.startswith(w + ".") for w in wanted):
                size += col.total_uncompressed_size
        sizes.append(size)
    return sizes


def _batch_rows(rows: int, size: int, block_bytes: int) -> int:
    """Rows per batch so that a batch holds about ``block_bytes`` of the needed columns."""
    per_row = max(size / max(rows, 1), 1.0)
    return int(min(max(block_bytes / per_row, 1), 1 << 20))


def _arrays(pa, batch, plans: list[ColumnPlan]) -> list:
    out = []
    for p in plans:
        arr = batch.column(p.top)
        if p.fields:
            # struct_field (unlike StructArray.field) keeps the nulls of the struct itself
            arr = pa.compute.struct_field(arr, list(p.fields))
        out.append(arr)
    return out


def _iter_batches(path: str, pf, plans: list[ColumnPlan], batch_rows: int, row_groups: list[int] | None,
                  first_row: int) -> Iterator[object]:
    pa = _pa()
    columns = list(dict.fromkeys(p.read for p in plans))
    row = first_row
    try:
        it = pf.iter_batches(batch_size=batch_rows, row_groups=row_groups, columns=columns, use_threads=False)
        for batch in it:
            yield batch
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read input {path} after row {row}: {e} (a truncated or corrupt Parquet file? "
                        f"Fetch it again)") from None


@dataclass
class ParquetSlice:
    """Consecutive row groups of one file, read by the worker that tokenizes them (only the path and
    the row group numbers cross processes)."""
    path: str
    row_groups: tuple
    rows: int
    size: int          # uncompressed bytes of the needed columns


def iter_parquet_tasks(path: str, keys: list[str], source_key: str | None, block_bytes: int,
                       position: list) -> Iterator[tuple[int, "ParquetSlice | ArrowBlock"]]:
    """(first row, work item) covering the file in order; ``position[0]`` advances by the file's share of
    its size handed out so far (progress in on-disk bytes, as for the compressed formats).

    Row groups are the natural blocks: row groups of up to ``2 * block_bytes`` (of the needed columns,
    uncompressed) are grouped into ParquetSlices of about ``block_bytes`` that a worker reads itself,
    so decoding is spread over the workers (Hugging Face datasets writes row groups of 1,000 rows). A
    larger row group (pyarrow's default is a million rows, often a whole file) cannot be split without
    decoding it from its start, so it is read here, a batch of about ``block_bytes`` at a time, and
    the batches (ArrowBlocks) are sent, as a jsonl file's blocks are.
    """
    pa = _pa()
    pf, plans, source = plan_columns(path, keys, source_key)
    all_plans = plans + ([source] if source else [])
    meta = pf.metadata
    sizes = _column_sizes(pf, all_plans)
    file_size = os.path.getsize(path)
    total_rows = max(meta.num_rows, 1)
    row = 0
    counted = 0

    def advance(rows: int) -> None:
        nonlocal row, counted
        row += rows
        done = file_size * row // total_rows
        position[0] += done - counted
        counted = done

    group: list[int] = []
    group_rows = group_size = 0
    for g in range(meta.num_row_groups):
        rows, size = meta.row_group(g).num_rows, sizes[g]
        if group and (group_size + size > block_bytes or size > 2 * block_bytes):
            first = row
            advance(group_rows)
            yield first, ParquetSlice(path, tuple(group), group_rows, group_size)
            group, group_rows, group_size = [], 0, 0
        if size <= 2 * block_bytes:
            group.append(g)
            group_rows += rows
            group_size += size
            continue
        for batch in _iter_batches(path, pf, all_plans, _batch_rows(rows, size, block_bytes), [g], row):
            arrays = _arrays(pa, batch, all_plans)
            first = row
            advance(batch.num_rows)
            yield first, ArrowBlock(arrays[:len(plans)], arrays[len(plans)] if source else None, batch.num_rows)
    if group:
        first = row
        advance(group_rows)
        yield first, ParquetSlice(path, tuple(group), group_rows, group_size)


_OPEN: dict = {}   # worker side: the last file's (ParquetFile, plans), reused by its next slices


def forget_open_files() -> None:
    """Close the file ``read_slice`` keeps open (after a run in the main process, ``--workers 0``)."""
    _OPEN.clear()


def read_slice(piece: ParquetSlice, first_row: int, keys: list[str], source_key: str | None,
               block_bytes: int = 4 << 20) -> Iterator[tuple[int, ArrowBlock]]:
    """(first row, ArrowBlock) of a ParquetSlice, a batch at a time (runs in a worker)."""
    pa = _pa()
    cache_key = (piece.path, tuple(keys), source_key)
    if cache_key not in _OPEN:
        _OPEN.clear()
        _OPEN[cache_key] = plan_columns(piece.path, keys, source_key)
    pf, plans, source = _OPEN[cache_key]
    all_plans = plans + ([source] if source else [])
    row = first_row
    for batch in _iter_batches(piece.path, pf, all_plans, _batch_rows(piece.rows, piece.size, block_bytes),
                               list(piece.row_groups), first_row):
        arrays = _arrays(pa, batch, all_plans)
        yield row, ArrowBlock(arrays[:len(plans)], arrays[len(plans)] if source else None, batch.num_rows)
        row += batch.num_rows


def iter_parquet_rows(path: str, keys: list[str], key_flag: str = "--json-keys",
                      block_bytes: int = 1 << 20) -> Iterator[tuple[int, list]]:
    """(row, the value of every key) of every row, in order; a null is None, as jsonl's null."""
    pa = _pa()
    pf, plans, _ = plan_columns(path, keys, None, key_flag)
    row = 0
    size = sum(_column_sizes(pf, plans))
    for batch in _iter_batches(path, pf, plans, _batch_rows(pf.metadata.num_rows, size, block_bytes), None, 0):
        columns = [column_values(a, replace_invalid_utf8=True)[0] for a in _arrays(pa, batch, plans)]
        for values in zip(*columns):
            yield row, list(values)
            row += 1


def column_values(array, replace_invalid_utf8: bool = False) -> tuple[list, dict]:
    """(the Python values of ``array``, {index: reason} of the values that are not valid UTF-8).

    pyarrow does not check that a Parquet string column holds UTF-8; a writer that did not either
    makes ``to_pylist`` fail on the whole batch. Then the values are decoded one by one: a bad one is
    None with its reason (the caller's bad row), or decoded with U+FFFD when replacing was asked for.
    """
    try:
        return array.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    import pyarrow as pa
    if pa.types.is_dictionary(array.type):
        array = array.cast(array.type.value_type)
    raw = array.cast(pa.large_binary()).to_pylist()
    values, bad = [], {}
    for i, b in enumerate(raw):
        if b is None:
            values.append(None)
            continue
        try:
            values.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            if replace_invalid_utf8:
                values.append(b.decode("utf-8", errors="replace"))
                bad[i] = None
            else:
                values.append(None)
                bad[i] = f"invalid UTF-8 (byte 0x{b[e.start]:02x} at byte {e.start + 1} of the value)"
    return values, bad
