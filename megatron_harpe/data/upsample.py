"""harpe-upsample: per-source length upsampling and packing (Fu et al. 2024).

    harpe-upsample --input 'slimpajama/*.jsonl.gz' --source-key meta.redpajama_set_name \\
        --tokenizer-type sentencepiece --tokenizer-model llama2/tokenizer.model \\
        --seq-length 131072 --output-prefix out/slimpj_128k --workers 16

"Data Engineering for Scaling Language Models to 128K Context" (Fu et al., 2024) trains on
SlimPajama with *per-source length upsampling*: keep the mixture of sources (each source's
share of tokens) as it is, and within every source raise the share of long documents. Here:

1. Tokenize every document; its source is ``--source-key`` (a dotted jsonl field, or Parquet
   column / struct field) or, without it, its input file (``--source NAME=GLOB`` names them; else
   the file name without its extensions).
2. Per source s: tokens T_s (a document counts len + 1, its EOD separator); share w_s = T_s / T.
3. Filter: documents with len < ``--short-threshold`` (4096) are kept with probability
   ``--keep-prob`` p (0.1), long ones always (a Bernoulli draw per document, seeded by
   (seed, source)). Kept tokens K_s.
4. Budget B = ``--target-tokens`` or, by default, the largest budget that needs no repetition:
   B = min_s K_s / w_s. Target per source t_s = w_s * B. A source with K_s >= t_s takes a
   seeded random subset of its kept documents whose tokens come closest to t_s; one with
   K_s < t_s (only with an explicit larger budget) repeats its kept documents (whole epochs,
   then a random part) and the report says how often.
5. Shuffle all chosen documents (seeded), join them with EOD after each, and cut the stream
   into sequences of exactly ``--seq-length`` tokens (+1 with ``--add-extra-token``); the
   last partial sequence is dropped (reported).

Output: ``<prefix>.bin/.idx`` (one packed sequence per document; harpe-train reads it with
``data.kind=indexed 'data.blend=[<prefix>]'``) and ``<prefix>.report.json`` with tokens, documents and shares per
source before and after, the short-document keep rate, and the parameters. Same inputs, same
seed: byte-identical outputs, whatever ``--workers``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import zlib

import numpy as np

from megatron_harpe.data.indexed import IndexedDatasetWriter
from megatron_harpe.data.inputs import DataError, check_output_prefix, expand_inputs, output_directory
from megatron_harpe.data.pipeline import ChunkResult, Progress, run_pipeline
from megatron_harpe.data.preprocess import (Tally, add_input_args, add_runtime_args, add_tokenizer_args,
                                            check_runtime_args, encode_options, train_hint)
from megatron_harpe.data.tokenizer import DATA_TOOL_SETTINGS, TokenizerError, load_tokenizer, token_dtype
from megatron_harpe.data.cli_errors import (UsageError, UsageErrorParser, sigterm_as_interrupt,
                                            parse_command_line, run_reporting_errors)
from megatron_harpe.data.jsonio import write_json_atomic

PROG = "harpe-upsample"

__all__ = ["select_documents", "pack_stream", "upsample", "main"]


def parse_count(text: str) -> int:
    """'5B', '200M', '131072', '1.5e9' -> int."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMbBtT]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a count such as 131072, 200M or 5B, got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}[m.group(2).lower()]
    return int(round(float(m.group(1)) * scale))


def _rng(seed: int, *names: str) -> np.random.Generator:
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(n.encode("utf-8")) for n in names]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words)))


def select_documents(lengths: np.ndarray, sources: np.ndarray, source_names: list[str], *, threshold: int = 4096,
                     keep_prob: float = 0.1, seed: int = 0, target_tokens: int | None = None,
                     separator_tokens: int = 1) -> tuple[np.ndarray, dict]:
    """The upsampling algorithm on document lengths (tokens, without separators) and source ids.

    Returns (order, report): ``order`` lists document indices in output order (a document may
    repeat when the budget needs it); ``report`` has per-source counts before and after.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    sources = np.asarray(sources, dtype=np.int64)
    if not 0.0 <= keep_prob <= 1.0:
        raise DataError(f"--keep-prob {keep_prob}: a probability in [0, 1], e.g. 0.1")
    cost = lengths + separator_tokens
    names = list(source_names)
    total_before = int(cost.sum())
    if total_before == 0:
        raise DataError("no tokens to upsample")
    per, kept_idx = _filter_short_documents(lengths, sources, cost, names, threshold, keep_prob, seed)
    for name in names:
        per[name]["share_before"] = per[name]["tokens_before"] / total_before
    binding, budget = _budget(per, names, target_tokens, threshold, keep_prob)
    order_parts = []
    for name in names:
        info = per[name]
        target = info["share_before"] * budget
        info["target_tokens"] = int(round(target))
        pool = kept_idx[name]
        pool_tokens = int(cost[pool].sum())
        if pool.size == 0 or pool_tokens == 0:
            info.update(documents_after=0, tokens_after_selection=0, epochs=0.0)
            continue
        sel = _select_from_pool(pool, cost, target, _rng(seed, "select", name))
        info["documents_after"] = int(sel.size)
        info["tokens_after_selection"] = int(cost[sel].sum())
        info["epochs"] = round(info["tokens_after_selection"] / pool_tokens, 4)
        info["short_documents_after"] = int((lengths[sel] < threshold).sum())
        order_parts.append(sel)
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, dtype=np.int64)
    order = order[_rng(seed, "shuffle").permutation(order.size)]
    report = {"per_source": per, "budget_tokens": int(round(budget)), "binding_source": binding,
              "tokens_before": total_before}
    return order, report


def _filter_short_documents(lengths: np.ndarray, sources: np.ndarray, cost: np.ndarray, names: list[str],
                            threshold: int, keep_prob: float, seed: int) -> tuple[dict, dict]:
    """Step 3: (per-source counts, kept document indices per source). Each source draws from its own
    seeded generator, so adding a source does not change what the others keep."""
    per: dict[str, dict] = {}
    kept_idx: dict[str, np.ndarray] = {}
    for s, name in enumerate(names):
        idx = np.flatnonzero(sources == s)
        short = lengths[idx] < threshold
        draw = _rng(seed, "keep", name).random(idx.size)
        keep = ~short | (draw < keep_prob)
        kept_idx[name] = idx[keep]
        n_short = int(short.sum())
        per[name] = {
            "documents_before": int(idx.size), "tokens_before": int(cost[idx].sum()),
            "short_documents_before": n_short, "short_documents_kept": int((short & keep).sum()),
            "short_keep_rate": (int((short & keep).sum()) / n_short) if n_short else None,
            "long_documents": int((~short).sum()),
            "long_token_fraction_before": float(cost[idx][~short].sum() / max(cost[idx].sum(), 1)),
            "tokens_kept": int(cost[idx[keep]].sum()),
        }
    return per, kept_idx


def _budget(per: dict, names: list[str], target_tokens: int | None, threshold: int,
            keep_prob: float) -> tuple[str | None, float]:
    """Step 4: (binding source or None, budget). Without a target, the largest budget that keeps every
    source's share without repeating a document: the source with the least kept per share binds."""
    if target_tokens is not None:
        return None, float(target_tokens)
    active = [n for n in names if per[n]["tokens_before"] > 0]
    binding = min(active, key=lambda n: per[n]["tokens_kept"] / per[n]["share_before"])
    if per[binding]["tokens_kept"] == 0:
        raise DataError(f"source {binding!r} keeps no document (all {per[binding]['documents_before']} are "
                         f"shorter than {threshold} tokens and none drew the keep probability {keep_prob}); "
                         f"its share cannot be kept: raise --keep-prob, lower --short-threshold or leave the "
                         f"source out")
    return binding, per[binding]["tokens_kept"] / per[binding]["share_before"]


def _select_from_pool(pool: np.ndarray, cost: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Documents of ``pool`` whose tokens come closest to ``target``: whole shuffled epochs while the
    target exceeds the pool (only with an explicit larger budget), then a random part."""
    pool_tokens = int(cost[pool].sum())
    chosen: list[np.ndarray] = []
    have = 0
    while target - have >= pool_tokens:
        chosen.append(rng.permutation(pool))
        have += pool_tokens
    perm = rng.permutation(pool)
    chosen.append(perm[:_closest_prefix(np.cumsum(cost[perm]), target - have)])
    return np.concatenate(chosen)


def _closest_prefix(csum: np.ndarray, need: float) -> int:
    """How many leading documents (cumulative tokens ``csum``) come closest to ``need``; ties take fewer."""
    k = int(np.searchsorted(csum, need, side="left"))
    if k >= csum.size:
        return csum.size
    above = csum[k] - need
    below = need - (csum[k - 1] if k > 0 else 0)
    return k + 1 if above < below else k


def pack_stream(store: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, order: np.ndarray, eod: int,
                seq_len: int, writer: IndexedDatasetWriter, doc_sources: np.ndarray, num_sources: int,
                bos: int | None = None) -> dict:
    """Write the documents of `order` (each + EOD) as sequences of exactly `seq_len` tokens."""
    buf = np.empty(seq_len, dtype=writer.dtype)
    fill = 0
    sequences = 0
    per_source = np.zeros(num_sources, dtype=np.int64)
    # tokens of the documents in the sequence being filled, by source (dropped if it never fills)
    pending = np.zeros(num_sources, dtype=np.int64)
    one = np.array([seq_len], dtype=np.int32)
    prefix = [] if bos is None else [bos]
    for d in order:
        start, n = int(offsets[d]), int(lengths[d])
        src = int(doc_sources[d])
        doc = store[start:start + n]
        pieces = ([np.asarray(prefix, dtype=buf.dtype)] if prefix else []) + [doc, np.array([eod], dtype=buf.dtype)]
        for piece in pieces:
            pos = 0
            m = piece.size
            while pos < m:
                room = seq_len - fill
                k = min(room, m - pos)
                buf[fill:fill + k] = piece[pos:pos + k]
                fill += k
                pos += k
                pending[src] += k
                if fill == seq_len:
                    writer.add_documents(buf, one)
                    sequences += 1
                    per_source += pending
                    pending[:] = 0
                    fill = 0
    return {"sequences": sequences, "tokens_per_source": per_source, "dropped_tail_tokens": int(fill)}


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(prog=PROG, description=__doc__.split("\n\n")[0],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_input_args(p, multi_keys=False, input_required=False)
    g = p.add_argument_group("sources and upsampling")
    g.add_argument("--source-key", default=None,
                   help="jsonl field (Parquet: column, a dotted key reaching into struct columns) naming the "
                        "source, e.g. source or meta.redpajama_set_name (default: every input file is a source)")
    g.add_argument("--source", action="append", default=[], metavar="NAME=GLOB",
                   help="one input per source: files of source NAME (repeatable; instead of --input/--source-key)")
    g.add_argument("--short-threshold", type=int, default=4096,
                   help="documents with fewer tokens are short (default 4096)")
    g.add_argument("--keep-prob", type=float, default=0.1, help="probability of keeping a short document (default 0.1)")
    g.add_argument("--target-tokens", type=parse_count, default=None,
                   help="output budget, e.g. 5B (default: the largest budget that needs no repetition)")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("packing and output")
    g.add_argument("--seq-length", type=parse_count, required=True, help="packed sequence length, e.g. 131072")
    g.add_argument("--add-extra-token", action="store_true",
                   help="pack seq-length + 1 tokens per sequence (megatron-core's GPTDataset reads seq-length + 1 "
                        "tokens per sample, so each sample is then exactly one packed sequence)")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx and <prefix>.report.json")
    add_tokenizer_args(p)
    add_runtime_args(p)
    return p


def _sources_from_args(args) -> tuple[list[str], list[str] | None]:
    """(files, per-file source names or None when the source key is used)."""
    if args.source:
        if args.source_key or args.input:
            raise UsageError("--source NAME=GLOB names the inputs and their sources: use it without --input "
                             "and --source-key")
        files, names = [], []
        for item in args.source:
            name, sep, pattern = item.partition("=")
            if not sep or not name or not pattern:
                raise UsageError(f"--source expects NAME=GLOB, got {item!r}")
            for f in expand_inputs([pattern]):
                files.append(f)
                names.append(name)
        return files, names
    if not args.input:
        raise UsageError("give the inputs: --input FILE [FILE ...] (with --source-key, or one file per source), "
                         "or --source NAME=GLOB ...")
    files = expand_inputs(args.input)
    if args.source_key:
        return files, None
    names = []
    for f in files:
        base = os.path.basename(f)
        for ext in (".gz", ".zst", ".zstd", ".parquet", ".pq", ".jsonl", ".json"):  # data.jsonl.zst -> data
            if base.endswith(ext):
                base = base[: -len(ext)]
        names.append(base)
    return files, names


def upsample(args) -> dict:
    """The whole tool: tokenize into a temporary token file, select (select_documents), pack, report."""
    files, file_sources = _check_args(args)
    tok = load_tokenizer(args.tokenizer_type, args.tokenizer_model, eod_token=args.eod_token,
                         settings=DATA_TOOL_SETTINGS)
    if args.prepend_bos and tok.bos is None:
        raise DataError(f"--prepend-bos: the tokenizer {args.tokenizer_model} has no BOS token")
    dtype = token_dtype(tok.vocab_size)
    key = args.json_keys[0]
    prefix = args.output_prefix
    seq_len = args.seq_length + (1 if args.add_extra_token else 0)
    store_path = f"{prefix}.tokens.incomplete-{os.getpid()}"
    tally = Tally(files, args.skip_bad_lines, [key])
    progress = Progress(sum(os.path.getsize(f) for f in files), args.log_interval,
                        enabled=not args.no_progress, prog=PROG)
    start = time.time()
    with output_directory(os.path.dirname(os.path.abspath(prefix))):
        return _tokenize_select_pack(args, files, file_sources, tok, dtype, key, seq_len, store_path, tally,
                                     progress, start)


def _tokenize_select_pack(args, files: list[str], file_sources: list[str] | None, tok, dtype, key: str,
                          seq_len: int, store_path: str, tally: Tally, progress: Progress, start: float) -> dict:
    """Steps 1-5 and the report; on any failure no output is left (incomplete files removed)."""
    prefix = args.output_prefix
    writer = None
    try:
        lengths, doc_sources, names = _tokenize_into(store_path, files, file_sources, args, key, tally, progress)
        sep = 1 + (1 if args.prepend_bos else 0)
        order, report = select_documents(lengths, doc_sources, names, threshold=args.short_threshold,
                                         keep_prob=args.keep_prob, seed=args.seed,
                                         target_tokens=args.target_tokens, separator_tokens=sep)
        writer = IndexedDatasetWriter(prefix, dtype)
        packed = _pack_from_store(store_path, dtype, lengths, order, doc_sources, len(names), tok, seq_len,
                                  writer, bos=tok.bos if args.prepend_bos else None)
        if packed["sequences"] == 0:
            raise DataError(f"the selected documents hold {report['budget_tokens']:,} tokens, fewer than one "
                            f"sequence of {seq_len:,}; lower --seq-length or give more data")
        total_after = _add_shares_after(report, packed["tokens_per_source"], names)
        writer.commit()
        report.update(_run_details(args, files, key, tok, packed, total_after, lengths, order, tally, seq_len,
                                   time.time() - start))
        write_json_atomic(report, prefix + ".report.json")
        return report
    except BaseException:
        progress.close()
        if writer is not None:
            writer.abort()
        raise
    finally:
        try:
            os.remove(store_path)
        except FileNotFoundError:
            pass


def _check_args(args) -> tuple[list[str], list[str] | None]:
    """The checks that need no tokenizer, before anything is loaded; returns _sources_from_args's answer."""
    if args.seq_length < 2:
        raise UsageError("--seq-length must be at least 2")
    if not 0.0 <= args.keep_prob <= 1.0:
        raise UsageError(f"--keep-prob {args.keep_prob}: give a probability in [0, 1], e.g. 0.1")
    if args.short_threshold < 0:
        raise UsageError(f"--short-threshold {args.short_threshold}: give a number of tokens >= 0, e.g. 4096")
    if args.target_tokens is not None and args.target_tokens < 1:
        raise UsageError(f"--target-tokens {args.target_tokens}: give a positive budget such as 5B, or leave it "
                         f"out (the largest budget that repeats no document)")
    check_runtime_args(args)
    files, file_sources = _sources_from_args(args)
    check_output_prefix(args.output_prefix)
    return files, file_sources


def _tokenize_into(store_path: str, files: list[str], file_sources: list[str] | None, args, key: str,
                   tally: Tally, progress: Progress) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(lengths, source index per document, source names) after writing every document's tokens back
    to back into ``store_path``: the selection needs all lengths before it can pick any document, and
    the tokens of a large corpus do not fit in memory."""
    lengths_parts: list[np.ndarray] = []
    source_parts: list[np.ndarray] = []
    source_ids: dict[str, int] = {}
    options = encode_options(args, [key], source_key=None if file_sources else args.source_key)
    options.append_eod = False
    options.prepend_bos = False  # BOS (if asked) is added at packing time
    with open(store_path, "wb") as store_f:
        def on_result(res: ChunkResult, position: int) -> None:
            tally.add(res)
            store_f.write(res.tokens[key].tobytes())
            lengths_parts.append(res.lengths[key])
            if file_sources is not None:
                sid = source_ids.setdefault(file_sources[res.file_index], len(source_ids))
                source_parts.append(np.full(res.lengths[key].size, sid, dtype=np.int32))
            else:
                source_parts.append(np.array([source_ids.setdefault(s, len(source_ids)) for s in res.sources],
                                             dtype=np.int32))
            progress.update(position, res.documents, int(res.tokens[key].size))

        run_pipeline(files, options, args.workers, on_result,
                     block_bytes=max(int(args.block_mb * (1 << 20)), 1 << 16))
    progress.close()
    if tally.documents == 0:
        names = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise DataError(f"no documents in {names} ({tally.bad} bad lines, {tally.empty} empty documents, "
                        f"{tally.blank} blank lines); nothing written")
    names, doc_sources = _number_sources_by_name(source_ids, np.concatenate(source_parts))
    return np.concatenate(lengths_parts).astype(np.int64), doc_sources, names


def _number_sources_by_name(source_ids: dict[str, int], doc_sources: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Source ids were handed out in arrival order; renumbered by name, the selection does not depend
    on the order documents arrive in."""
    names = sorted(source_ids)
    remap = np.empty(len(source_ids), dtype=np.int64)
    for new, name in enumerate(names):
        remap[source_ids[name]] = new
    return names, remap[doc_sources]


def _pack_from_store(store_path: str, dtype, lengths: np.ndarray, order: np.ndarray, doc_sources: np.ndarray,
                     num_sources: int, tok, seq_len: int, writer: IndexedDatasetWriter, bos: int | None) -> dict:
    """pack_stream over the token file, memory-mapped (and unmapped before the file is removed)."""
    offsets = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    store = np.memmap(store_path, dtype=dtype, mode="r") if lengths.sum() else np.zeros(0, dtype=dtype)
    packed = pack_stream(store, offsets, lengths, order, tok.eod, seq_len, writer, doc_sources, num_sources,
                         bos=bos)
    del store
    return packed


def _add_shares_after(report: dict, tokens_per_source: np.ndarray, names: list[str]) -> int:
    """Each source's tokens and share in the packed output; returns the total."""
    total_after = int(tokens_per_source.sum())
    for s, name in enumerate(names):
        info = report["per_source"][name]
        info["tokens_after"] = int(tokens_per_source[s])
        info["share_after"] = info["tokens_after"] / total_after
    return total_after


def _run_details(args, files: list[str], key: str, tok, packed: dict, total_after: int, lengths: np.ndarray,
                 order: np.ndarray, tally: Tally, seq_len: int, seconds: float) -> dict:
    """The report's record of the run: outputs, counts and every parameter that decides them."""
    return {
        "output_prefix": args.output_prefix, "inputs": files, "sequences": packed["sequences"],
        "sequence_length": seq_len, "tokens_after": total_after, "dropped_tail_tokens": packed["dropped_tail_tokens"],
        "documents_before": int(lengths.size), "documents_after": int(order.size),
        "bad_lines": tally.bad, "empty_documents": tally.empty,
        "parameters": {"short_threshold": args.short_threshold, "keep_prob": args.keep_prob, "seed": args.seed,
                       "target_tokens": args.target_tokens, "seq_length": args.seq_length,
                       "add_extra_token": args.add_extra_token, "prepend_bos": args.prepend_bos,
                       "source_key": args.source_key, "json_key": key,
                       "token_counting": "document tokens + 1 EOD separator (+1 BOS with --prepend-bos)"},
        "tokenizer": tok.describe(), "seconds": round(seconds, 3),
    }


def format_report(r: dict) -> str:
    lines = [f"{'source':<24}{'tokens before':>15}{'share':>8}{'tokens after':>15}{'share':>8}{'short kept':>12}"
             f"{'epochs':>8}"]
    for name, s in r["per_source"].items():
        rate = "-" if s["short_keep_rate"] is None else f"{s['short_keep_rate']:.3f}"
        lines.append(f"{name:<24}{s['tokens_before']:>15,}{s['share_before']:>8.3f}{s.get('tokens_after', 0):>15,}"
                     f"{s.get('share_after', 0):>8.3f}{rate:>12}{s.get('epochs', 0):>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(build_parser(), argv, "--input FILE [FILE ...] --tokenizer-type TYPE "
                              "--tokenizer-model PATH --seq-length N --output-prefix PREFIX [options]")
    if args is None:
        return 2
    with sigterm_as_interrupt():
        code, r = run_reporting_errors(PROG, lambda: upsample(args), usage_errors=(UsageError,),
                                       data_errors=(DataError, TokenizerError), debug=args.debug,
                                       verbose=args.verbose)
    if code:
        return code
    print(format_report(r), file=sys.stderr)
    print(f"{PROG}: wrote {r['output_prefix']}.bin/.idx and .report.json", file=sys.stderr)
    print(f"{PROG}: {train_hint(r['output_prefix'], args.tokenizer_model)}", file=sys.stderr)
    print(f"{PROG}: done: {r['documents_before']:,} documents -> {r['documents_after']:,} packed into "
          f"{r['sequences']:,} sequences of {r['sequence_length']:,} tokens ({r['tokens_after']:,} tokens; "
          f"{r['tokens_before']:,} before), {r['bad_lines']:,} bad lines, {r['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
