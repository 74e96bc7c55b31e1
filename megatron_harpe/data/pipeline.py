"""The tokenization engine shared by harpe-preprocess and harpe-upsample.

The main process reads the inputs in blocks of whole lines (a few MB, raw bytes, gzip or zstd
decompressed) and hands them to ``workers`` processes; each worker parses the JSON lines,
tokenizes the texts, and returns the tokens of the whole block as one numpy array plus one
length per document (cheap to pickle, no Python int lists crossing processes). Results come
back in input order, so the output does not depend on the number of workers. At most
``2 * workers + 2`` blocks are in flight (reading never runs ahead of tokenization).

zstd is decompressed by the main process like gzip: a zstd frame can only be decoded from its
start (a SlimPajama chunk is one frame), and the main process decompresses ~1 GB/s, far more than
the workers tokenize. Parquet row groups are the blocks: row groups of up to two blocks are grouped
into slices that the worker reads itself (the main process sends the path and the row group
numbers, so decoding is spread over the workers), and a larger row group is read by the main
process a batch at a time and sent as pyarrow arrays (parquet_input.py). Either way the worker
turns the rows into the same (row, texts, source) records a jsonl block gives, so everything after
parsing, and so every token id, is shared; blocks stay a few MB whatever the file's layout, and
the input order, hence the output, does not depend on the number of workers.

Bad lines (malformed JSON, invalid UTF-8, a missing key, a non-string value) are collected
with file and line; the caller either stops at the first one or counts and skips them.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from megatron_harpe.data.inputs import CorruptInputError, DataError, get_field, open_binary
from megatron_harpe.data.parquet_input import (ArrowBlock, ParquetSlice, column_values, forget_open_files, is_parquet,
                                               iter_parquet_tasks, plan_columns, read_slice)
from megatron_harpe.data.tokenizer import Tokenizer, load_tokenizer, token_dtype

__all__ = ["EncodeOptions", "ChunkResult", "BadLine", "run_pipeline", "check_inputs", "Progress", "BLOCK_BYTES"]

BLOCK_BYTES = 4 << 20
MAX_BAD_REPORTED = 20
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins escaped pairs; what is left is alone


@dataclass
class EncodeOptions:
    tokenizer_type: str
    tokenizer_model: str
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    eod_token: str | None = None
    append_eod: bool = False
    prepend_bos: bool = False
    keep_empty: bool = False
    replace_invalid_utf8: bool = False
    source_key: str | None = None      # per-document source label (harpe-upsample)
    word_cache: bool = True            # sentencepiece word cache (exact; see tokenizer.py)
    verify_docs: int = 64              # per worker: documents checked against the plain tokenizer


@dataclass
class BadLine:
    file: str
    line: int
    reason: str
    unit: str = "line"    # "row" for Parquet (numbered from 0, as datasets/pandas index rows)

    def __str__(self) -> str:
        if self.unit == "row":
            return f"{self.file}: row {self.line}: {self.reason}"
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ChunkResult:
    file_index: int
    start_line: int
    nbytes: int
    tokens: dict           # key -> np.ndarray (token dtype), the documents back to back
    lengths: dict          # key -> np.ndarray int32, one length per document
    sources: list | None   # per document of the first key, when a source key is set
    documents: int = 0     # lines that became documents
    bad: list = field(default_factory=list)          # [(line, reason)], the first few
    bad_count: int = 0
    bad_reasons: dict = field(default_factory=dict)  # reason kind -> count
    empty: int = 0
    blank: int = 0
    replaced_utf8: int = 0
    cache_disabled: str | None = None
    unit: str = "line"     # what ``start_line`` and the bad entries count: "line" (jsonl) or "row" (Parquet)

    def add_bad(self, line: int, kind: str, reason: str) -> None:
        """Count a bad line by kind; only the first few reasons travel back (the caller reports a handful)."""
        self.bad_count += 1
        self.bad_reasons[kind] = self.bad_reasons.get(kind, 0) + 1
        if len(self.bad) < MAX_BAD_REPORTED:
            self.bad.append((line, reason))


# ----------------------------------------------------------------------------- worker side

_STATE: dict = {}


def _worker_init(options: EncodeOptions) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate ends a worker; never the parent's handler
    _unblock(_FORK_SIGNALS)  # blocked across the fork (run_pipeline): a SIGTERM sent meanwhile ends us here
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core
    _worker_init_inline(options)


def _make_tokenizer(options: EncodeOptions) -> Tokenizer:
    if options.tokenizer_type.lower().startswith("sentencepiece") or options.tokenizer_type.lower() == "spm":
        from megatron_harpe.data.tokenizer import SentencePieceTokenizer
        return SentencePieceTokenizer(options.tokenizer_model, eod_token=options.eod_token,
                                      word_cache=options.word_cache)
    return load_tokenizer(options.tokenizer_type, options.tokenizer_model, eod_token=options.eod_token)


def _process_block(task: tuple[int, int, bytes | ArrowBlock | ParquetSlice]) -> ChunkResult:
    """One block of whole input lines, or of Parquet rows (a batch read by the main process, or row
    groups this worker reads itself) -> the tokens of its documents (runs in a worker)."""
    file_index, start_line, data = task
    tok: Tokenizer = _STATE["tok"]
    opt: EncodeOptions = _STATE["options"]
    if isinstance(data, ParquetSlice):
        res = ChunkResult(file_index, start_line, data.size, {}, {}, [] if opt.source_key else None, unit="row")
        parsed = []
        for first_row, block in read_slice(data, start_line, opt.json_keys, opt.source_key):
            parsed.extend(_parse_arrow(block, first_row, opt, res))
    elif isinstance(data, ArrowBlock):
        nbytes = sum(a.nbytes for a in data.texts)
        res = ChunkResult(file_index, start_line, nbytes, {}, {}, [] if opt.source_key else None, unit="row")
        parsed = _parse_arrow(data, start_line, opt, res)
    else:
        res = ChunkResult(file_index, start_line, len(data), {}, {}, [] if opt.source_key else None)
        parsed = _parse_block(data, start_line, opt, res)
    # tokenize the block key by key (one batch call where the tokenizer has one)
    encoded = {key: _encode_verified(tok, [p[1][k] for p in parsed], [p[0] for p in parsed], res)
               for k, key in enumerate(opt.json_keys)}
    _collect_documents(parsed, encoded, tok, opt, res)
    return res


def _parse_block(data: bytes, start_line: int, opt: EncodeOptions, res: ChunkResult) -> list:
    """(line number, text per key, source) of every good line; blank and bad lines are counted in ``res``."""
    parsed: list = []
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    for offset, raw in enumerate(lines):
        lineno = start_line + offset
        if not raw or raw.isspace():
            res.blank += 1
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        rec = _parse_object(raw, lineno, opt.replace_invalid_utf8, res)
        if rec is None:
            continue
        # a surrogate can only come from a JSON escape (as UTF-8 bytes it fails to decode): look for one only then
        escaped = b"\\ud" in raw or b"\\uD" in raw
        texts = _texts_of(rec, lineno, opt.json_keys, res, opt.replace_invalid_utf8, escaped)
        if texts is None:
            continue
        src = None
        if opt.source_key:
            src = _source_of(rec, lineno, opt.source_key, res)
            if src is None:
                continue
        parsed.append((lineno, texts, src))
    return parsed


def _parse_arrow(block: ArrowBlock, start_row: int, opt: EncodeOptions, res: ChunkResult) -> list:
    """(row number, text per key, source) of every good row of a Parquet batch; the column types were
    checked from the file's footer, so what is left to find here is a null (jsonl's null: "not a
    string" / "bad source") and bytes that are not UTF-8."""
    columns = []
    bad_utf8: dict = {}
    for key, array in zip(opt.json_keys, block.texts):
        values, bad = column_values(array, opt.replace_invalid_utf8)
        columns.append(values)
        for i, reason in bad.items():
            bad_utf8.setdefault(i, (key, reason))
    sources = None
    if opt.source_key:
        sources, bad = column_values(block.source, opt.replace_invalid_utf8)
        for i, reason in bad.items():
            bad_utf8.setdefault(i, (opt.source_key, reason))
    parsed: list = []
    for i in range(block.rows):
        row = start_row + i
        if i in bad_utf8:
            key, reason = bad_utf8[i]
            if reason is not None:
                res.add_bad(row, "invalid UTF-8", f"column {key!r}: {reason}; fix the encoding, or pass "
                                                  f"--replace-invalid-utf8 to replace such bytes with U+FFFD")
                continue
            res.replaced_utf8 += 1
        texts = [c[i] for c in columns]
        null = next((k for k, t in zip(opt.json_keys, texts) if t is None), None)
        if null is not None:
            res.add_bad(row, "not a string", f"column {null!r} is null, not a string")
            continue
        src = None
        if sources is not None:
            src = sources[i]
            if src is None:
                res.add_bad(row, "bad source", f"source column {opt.source_key!r} is null, not a name")
                continue
        parsed.append((row, texts, src))
    return parsed


def _parse_object(raw: bytes, lineno: int, replace_invalid_utf8: bool, res: ChunkResult) -> dict | None:
    """The JSON object of a line, or None for a bad line (counted). Invalid UTF-8 is a bad line unless
    replacing it was asked for: silently altered text would end up in the training data."""
    try:
        rec = json.loads(raw)
    except UnicodeDecodeError as e:
        if not replace_invalid_utf8:
            res.add_bad(lineno, "invalid UTF-8",
                        f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); fix the encoding, or "
                        f"pass --replace-invalid-utf8 to replace such bytes with U+FFFD")
            return None
        res.replaced_utf8 += 1
        try:
            rec = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError as e2:
            res.add_bad(lineno, "malformed JSON", f"malformed JSON: {e2}")
            return None
    except ValueError as e:
        res.add_bad(lineno, "malformed JSON", f"malformed JSON: {e}")
        return None
    if not isinstance(rec, dict):
        res.add_bad(lineno, "not an object", f"a JSON {type(rec).__name__}, not an object")
        return None
    return rec


def _texts_of(rec: dict, lineno: int, keys: list[str], res: ChunkResult, replace_invalid_utf8: bool = False,
              check_surrogates: bool = True) -> list[str] | None:
    """The string of every key, or None for a bad line (counted)."""
    texts = []
    for key in keys:
        try:
            value = get_field(rec, key)
        except KeyError:
            res.add_bad(lineno, "missing key", f"no key {key!r} (keys: {sorted(rec)[:8]}); choose it with --json-keys")
            return None
        if not isinstance(value, str):
            name = type(value).__name__
            res.add_bad(lineno, "not a string",
                        f"key {key!r} holds {'an' if name[0] in 'aeiou' else 'a'} {name}, not a string")
            return None
        m = _LONE_SURROGATE.search(value) if check_surrogates else None
        if m is not None:
            # JSON may escape half of a UTF-16 pair ("\ud800"): no tokenizer can encode that
            if not replace_invalid_utf8:
                res.add_bad(lineno, "invalid UTF-8",
                            f"key {key!r} holds a lone surrogate \\u{ord(m.group()):04x} (at character "
                            f"{m.start() + 1}), which is not Unicode text; fix the encoding, or pass "
                            f"--replace-invalid-utf8 to replace it with U+FFFD")
                return None
            value = _LONE_SURROGATE.sub("\ufffd", value)
            res.replaced_utf8 += 1
        texts.append(value)
    return texts


def _source_of(rec: dict, lineno: int, source_key: str, res: ChunkResult) -> str | int | None:
    """The document's source label, or None for a bad line (counted)."""
    try:
        src = get_field(rec, source_key)
    except KeyError:
        res.add_bad(lineno, "missing source", f"no source key {source_key!r}; choose it with --source-key")
        return None
    if not isinstance(src, (str, int)):
        res.add_bad(lineno, "bad source", f"source key {source_key!r} holds a {type(src).__name__}, not a name")
        return None
    if isinstance(src, str) and _LONE_SURROGATE.search(src):
        res.add_bad(lineno, "bad source", f"source key {source_key!r} holds a lone surrogate (not Unicode text)")
        return None
    return src


def _encode_verified(tok: Tokenizer, texts: list[str], line_numbers: list[int], res: ChunkResult) -> list:
    """``tok.encode_many(texts)``. The word cache is a speed-up that must not change a single id, so
    each worker's first documents are also encoded without it; on a disagreement the cache is turned
    off and the whole block is encoded again without it."""
    ids_list = tok.encode_many(texts)
    n_verify = min(_STATE["verify_left"], len(texts))
    if n_verify > 0 and getattr(tok, "uses_word_cache", False):
        _STATE["verify_left"] -= n_verify
        for j in range(n_verify):
            if ids_list[j] != tok.encode(texts[j]):
                tok.disable_word_cache(f"word cache disagreed with the tokenizer at line {line_numbers[j]}")
                res.cache_disabled = tok.word_cache_reason
                return [tok.encode(t) for t in texts]
    return ids_list


def _collect_documents(parsed: list, encoded: dict, tok: Tokenizer, opt: EncodeOptions, res: ChunkResult) -> None:
    """Every key's documents back to back (with BOS/EOD as asked) into ``res.tokens``/``res.lengths``,
    as one numpy array per key: cheap to send back to the main process."""
    keys = opt.json_keys
    prefix = [tok.bos] if opt.prepend_bos and tok.bos is not None else []
    suffix = [tok.eod] if opt.append_eod else []
    toks = {k: [] for k in keys}
    lens = {k: [] for k in keys}
    for j, (_lineno, _texts, src) in enumerate(parsed):
        kept = False
        for key in keys:
            ids = encoded[key][j]
            if not ids:
                res.empty += 1
                if not opt.keep_empty:
                    continue
                lens[key].append(0)
                kept = True
                continue
            t = toks[key]
            if prefix:
                t.extend(prefix)
            t.extend(ids)
            if suffix:
                t.extend(suffix)
            lens[key].append(len(ids) + len(prefix) + len(suffix))
            kept = True
        if kept:
            res.documents += 1
            if res.sources is not None:
                res.sources.append(str(src))
    dtype = token_dtype(tok.vocab_size)
    for key in keys:
        res.tokens[key] = np.array(toks[key], dtype=dtype)
        res.lengths[key] = np.array(lens[key], dtype=np.int32)


# ----------------------------------------------------------------------------- main side


def check_inputs(files: list[str], options: EncodeOptions) -> None:
    """What can be known to be wrong before any work: each Parquet file's footer is read (a truncated
    file, a key's column missing or of another type). jsonl lines are checked as they are read."""
    for path in files:
        if is_parquet(path):
            plan_columns(path, options.json_keys, options.source_key)


def _read_blocks(files: list[str], block_bytes: int, position: list,
                 options: EncodeOptions) -> Iterator[tuple[int, int, bytes | ArrowBlock | ParquetSlice]]:
    """(file index, first line number, bytes of whole lines) or, for Parquet, (file index, first row,
    ArrowBlock or ParquetSlice); `position` tracks bytes read (compressed bytes for compressed inputs)."""
    for fi, path in enumerate(files):
        if is_parquet(path):
            for row, block in iter_parquet_tasks(path, options.json_keys, options.source_key, block_bytes,
                                                 position):
                yield fi, row, block
            continue
        line = 1
        rest = b""
        try:
            f = open_binary(path)
        except OSError as e:
            raise DataError(f"cannot open input {path}: {e.strerror or e}") from None
        with f:
            raw = getattr(f, "fileobj", None)  # gzip: the compressed stream, for progress
            last_pos = 0
            while True:
                try:
                    buf = f.read(block_bytes)
                except CorruptInputError as e:  # zstd: truncated or corrupt
                    raise DataError(f"cannot read input {path} after line {line}: {e.reason}") from None
                except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                    raise DataError(f"cannot read input {path} after line {line}: {e} "
                                    f"(truncated or corrupt file?)") from None
                if raw is not None:
                    pos = raw.tell()
                    position[0] += pos - last_pos
                    last_pos = pos
                else:
                    position[0] += len(buf)
                if not buf:
                    if rest:
                        yield fi, line, rest + b"\n"
                    break
                buf = rest + buf
                cut = buf.rfind(b"\n")
                if cut < 0:
                    rest = buf
                    continue
                rest = buf[cut + 1:]
                block = buf[:cut + 1]
                yield fi, line, block
                line += block.count(b"\n")


class Progress:
    """A tqdm bar (docs/s, tokens/s) on a terminal; a log line every `log_interval` docs otherwise."""

    def __init__(self, total_bytes: int, log_interval: int = 10000, enabled: bool = True,
                 prog: str = "harpe", stream=None):
        self.stream = stream or sys.stderr
        self.start = time.time()
        self.docs = 0
        self.tokens = 0
        self.log_interval = max(int(log_interval), 1)
        self._next_log = self.log_interval
        self.prog = prog
        self.enabled = enabled
        self.bar = None
        self._pos = 0
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm
            tqdm.monitor_interval = 0
            # a terminal that reports 0 columns (some pseudo-terminals) would get an empty bar
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                columns = 0
            width = {"dynamic_ncols": True} if columns > 0 else {"ncols": 100, "nrows": 20}
            self.bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, file=self.stream,
                            desc=prog, smoothing=0.1, **width)

    def update(self, position: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if not self.enabled:
            return
        elapsed = max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(position - self._pos)
            self._pos = position
            self.bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s",
                                     refresh=False)
        elif self.docs >= self._next_log:
            while self._next_log <= self.docs:
                self._next_log += self.log_interval
            print(f"{self.prog}: {self.docs:,} documents, {self.tokens:,} tokens "
                  f"({self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s, "
                  f"{position / elapsed / 1e6:,.1f} MB/s)", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_pipeline(files: list[str], options: EncodeOptions, workers: int,
                 on_result: Callable[[ChunkResult, int], None], block_bytes: int = BLOCK_BYTES) -> None:
    """Tokenize `files` with `workers` processes (0: in this process) and pass every block's
    result, in input order, to ``on_result(result, bytes_read_so_far)``.
    """
    position = [0]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    check_inputs(files, options)
    blocks = _read_blocks(files, block_bytes, position, options)
    if workers <= 0:
        _worker_init_inline(options)
        try:
            for task in blocks:
                on_result(_process_block(task), position[0])
        finally:
            forget_open_files()
        return
    # The main thread reads and submits; at most `in_flight` blocks are queued or being
    # tokenized (reading never runs far ahead), and results are taken in submission order.
    # Reading here rather than in the pool's task thread keeps Ctrl-C/SIGTERM prompt even
    # when an input blocks (a FIFO, a slow network file).
    in_flight = 2 * workers + 2
    method = "fork" if sys.platform.startswith("linux") else None
    # SIGTERM/SIGINT are blocked while the workers are forked, and each worker unblocks them once its
    # own handling is set (_worker_init). Otherwise a worker that the scheduler has not run yet when
    # Pool.terminate() signals it (a tiny input whose first block is bad, on a loaded machine) can lose
    # the signal: CPython drops a Python-level signal that arrives before its after-fork reset, the
    # worker then waits for a task forever, and terminate() waits for the worker (seen: a hang).
    previous_mask = _block(_FORK_SIGNALS)
    try:
        pool = mp.get_context(method).Pool(workers, initializer=_worker_init, initargs=(options,))
    except BaseException:
        _restore(previous_mask)
        raise
    pending: deque = deque()
    try:
        _restore(previous_mask)  # a signal that came meanwhile is raised here, and the pool terminated below
        exhausted = False
        while True:
            while not exhausted and len(pending) < in_flight:
                task = next(blocks, None)
                if task is None:
                    exhausted = True
                    break
                pending.append((pool.apply_async(_process_block, (task,)), position[0]))
            if not pending:
                break
            result, pos = pending.popleft()
            on_result(result.get(), pos)
        pool.close()
    except Exception:
        # A failed write (a full disk) or a bad block: the workers finish the few blocks already handed out
        # (at most `in_flight`) and leave. Not Pool.terminate(): it can hang for ever when the pool's task thread
        # is blocked writing a block larger than the pipe into a queue whose readers it has just killed (seen
        # in CI under load: test_write_failure_leaves_no_valid_pair, 900 s).
        pool.close()
        raise
    except BaseException:  # Ctrl-C, SIGTERM: now
        pool.terminate()
        raise
    finally:
        pool.join()


_FORK_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _block(signals) -> set | None:
    """Block ``signals`` in this thread (inherited by the processes it forks); the previous mask."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, signals)


def _unblock(signals) -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def _restore(mask: set | None) -> None:
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _worker_init_inline(options: EncodeOptions) -> None:
    _STATE["tok"] = _make_tokenizer(options)
    _STATE["options"] = options
    _STATE["verify_left"] = options.verify_docs
