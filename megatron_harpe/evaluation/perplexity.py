"""Sliding-window perplexity on long documents (Press et al., 2022; the convention of YaRN's and the
paper's Proof-pile numbers).

The general rule (``press_windows``), for a token sequence of ``T`` tokens, a context ``C`` and a
stride ``S`` (``S <= C``): window k reads tokens ``[k*S, min(k*S + C, T))``; its loss counts
only the tokens no earlier window scored (the last ``S`` of it, all of them in the first
window); it stops at the window that reaches ``T``. Every token ``t >= 1`` is scored exactly
once, predicted from the ``t - k*S`` tokens before it in its window (between ``C - S`` and
``C - 1`` of them after the first window). Token 0 has nothing to be predicted from.

What ``--lengths L`` means (``--window S``, default 256):

- ``--mode truncate`` (default; the paper's Proof-pile curve, YaRN's ``eval/perplexity.py
  --truncate``): each document is cut to its first ``L`` tokens (BOS included when the
  tokenizer adds one, so ``L - 1`` text tokens) and scored with context ``C = L``. The span
  equals the context, so there is exactly one window: all ``L - 1`` predictions are counted,
  token ``t`` seeing all ``t`` tokens before it. ``S`` never starts a second window here
  (YaRN's script sets its stride to the whole length under ``--truncate``); this is the
  plain full-context perplexity of the first ``L`` tokens.
- ``--mode sliding``: ``L`` is the context ``C``; every document is scored over the same
  span, its first ``--span`` tokens (default: the longest length), with stride ``S``. Each
  length scores the same tokens, with at most ``L`` tokens of context. It costs about
  ``span / S`` forward passes of ``L`` tokens per document and length.

Perplexity at a length = ``exp(sum of the NLLs / number of scored tokens)`` over the
documents (every document scores the same number of tokens, so this is also the exp of the
mean of the per-document mean NLLs). The run's "average" is the mean of the per-length
perplexities (the paper averages its Proof-pile lengths 2k..128k this way).

Documents: the first ``--num-docs`` documents (file order) with at least the needed number
of tokens (the longest length, or the span) — shorter ones are skipped, and a run where no
document is long enough is an error. Inputs: ``.jsonl``/``.jsonl.gz`` (``--text-key``), plain
text files (one document each), or a megatron indexed dataset (``PREFIX``, ``PREFIX.bin`` or
``PREFIX.idx``; its token ids are used as they are, with BOS put in front when the tokenizer
has one and the document does not start with it).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_harpe.evaluation.errors import EvalError
from megatron_harpe.evaluation.model import EvalTokenizer, LoadedModel
from megatron_harpe.evaluation.results import ResultStore
from megatron_harpe.evaluation.runner import PendingUnits, auto_batch_size

__all__ = ["press_windows", "Document", "load_documents", "evaluate_perplexity", "ppl_summary", "MODES",
           "indexed_prefix"]

MODES = ("truncate", "sliding")


def press_windows(total: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """``[(begin, end, score_from)]``: window reads ``tokens[begin:end]`` and counts the losses of the tokens at
    positions ``score_from .. end-1`` (see the module docstring)."""
    if total < 2:
        raise ValueError("need at least 2 tokens")
    if context < 2 or stride < 1:
        raise ValueError("context must be >= 2 and stride >= 1")
    if stride > context:
        raise EvalError(f"--window {stride} is larger than the context {context}: tokens would be skipped")
    out = []
    begin, prev_end = 0, 0
    while True:
        end = min(begin + context, total)
        out.append((begin, end, max(prev_end, begin + 1)))
        if end == total:
            return out
        prev_end = end
        begin += stride


@dataclass
class Document:
    doc_id: str
    tokens: List[int]


def indexed_prefix(path: str) -> Optional[str]:
    """The prefix of a megatron indexed dataset named by ``path`` (prefix, .bin or .idx), else None."""
    for suffix in (".idx", ".bin"):
        if path.endswith(suffix) and os.path.isfile(path[:-4] + ".idx") and os.path.isfile(path[:-4] + ".bin"):
            return path[:-4]
    if os.path.isfile(path + ".idx") and os.path.isfile(path + ".bin"):
        return path
    return None


def _indexed_documents(prefix: str) -> Iterator[Tuple[str, List[int]]]:
    import numpy as np

    from megatron_harpe.data.indexed import read_index

    try:
        idx = read_index(prefix)
    except ValueError as err:
        raise EvalError(f"{prefix}: {err}") from None
    dtype = idx["dtype"]
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    lengths, pointers, docs = idx["sequence_lengths"], idx["sequence_pointers"], idx["document_indices"]
    for d in range(len(docs) - 1):
        parts = []
        for s in range(int(docs[d]), int(docs[d + 1])):
            start = int(pointers[s]) // dtype.itemsize
            parts.append(np.asarray(data[start:start + int(lengths[s])], dtype=np.int64))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        yield f"{os.path.basename(prefix)}#{d}", tokens.tolist()


def _text_documents(path: str, text_key: str) -> Iterator[Tuple[str, str]]:
    from megatron_harpe.data.inputs import get_field, open_binary

    name = os.path.basename(path)
    if ".json" in name:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    raise EvalError(f"{path}:{lineno}: not valid JSON") from None
                try:
                    text = get_field(rec, text_key)
                except KeyError:
                    raise EvalError(f"{path}:{lineno}: no field {text_key!r} (use --text-key)") from None
                if isinstance(text, str):
                    yield f"{name}:{lineno}", text
    else:
        with open_binary(path) as f:
            yield name, f.read().decode("utf-8", errors="replace")


def load_documents(paths: Sequence[str], tok: EvalTokenizer, needed: int, num_docs: int, *,
                   text_key: str = "text", add_bos: bool = True, vocab_size: Optional[int] = None) -> List[Document]:
    """The first ``num_docs`` documents with at least ``needed`` tokens (each cut to ``needed``)."""
    if not paths:
        raise EvalError("no --data given (jsonl, text files or a megatron indexed dataset prefix)")
    docs: List[Document] = []
    seen, longest, longest_bound = 0, 0, 0
    prefix = list(tok.prefix) if add_bos else []
    for path in paths:
        ipref = indexed_prefix(path)
        if ipref is None and not os.path.isfile(path):
            raise EvalError(f"--data {path} not found (a jsonl/text file, or a megatron indexed dataset prefix "
                            f"with .bin and .idx)")
        if ipref is not None:
            for doc_id, ids in _indexed_documents(ipref):
                seen += 1
                if prefix and ids[:len(prefix)] != prefix:
                    ids = prefix + ids
                longest = max(longest, len(ids))
                if len(ids) >= needed:
                    if vocab_size is not None and max(ids[:needed]) >= vocab_size:
                        raise EvalError(f"{ipref}: token id {max(ids[:needed])} is outside the model's vocabulary "
                                        f"({vocab_size}): the data was tokenized with another tokenizer")
                    docs.append(Document(doc_id, ids[:needed]))
                    if len(docs) >= num_docs:
                        return docs
        else:
            for doc_id, text in _text_documents(path, text_key):
                seen += 1
                # a token covers at least one byte (byte-level BPE, sentencepiece with byte fallback): skip documents
                # that cannot reach the length without tokenizing them
                bound = len(text.encode("utf-8")) + len(prefix) + 2
                if bound < needed:
                    longest_bound = max(longest_bound, bound)
                    continue
                ids = (prefix + tok.encode_plain(text)) if add_bos else tok.encode_plain(text)
                longest = max(longest, len(ids))
                if len(ids) >= needed:
                    docs.append(Document(doc_id, ids[:needed]))
                    if len(docs) >= num_docs:
                        return docs
    if not docs:
        most = f"{longest} tokens" if longest >= longest_bound else f"at most {longest_bound} tokens"
        raise EvalError(f"none of the {seen} documents in {', '.join(paths)} has the {needed} tokens needed (the "
                        f"longest has {most}): lower --lengths (or --span) or give longer documents")
    return docs


def ppl_summary(records: Sequence[dict], lengths: Sequence[int], settings: dict) -> dict:
    per: Dict[int, List[dict]] = {int(L): [] for L in lengths}
    for r in records:
        if int(r["length"]) in per:
            per[int(r["length"])].append(r)
    ppl, nll, docs, tokens, doc_ppl = {}, {}, {}, {}, {}
    for L, rs in per.items():
        if not rs:
            ppl[str(L)] = None
            continue
        total = sum(r["nll"] for r in rs)
        count = sum(r["tokens"] for r in rs)
        nll[str(L)] = total / count
        ppl[str(L)] = math.exp(total / count)
        docs[str(L)] = len(rs)
        tokens[str(L)] = count
        doc_ppl[str(L)] = [math.exp(r["nll"] / r["tokens"]) for r in rs]
    vals = [v for v in ppl.values() if v is not None]
    return {"kind": "ppl", "lengths": [int(L) for L in lengths], "ppl": ppl, "mean_nll": nll, "documents": docs,
            "scored_tokens": tokens, "doc_ppl": doc_ppl, "average": sum(vals) / len(vals) if vals else float("nan"),
            **settings}


def evaluate_perplexity(lm: LoadedModel, docs: Sequence[Document], lengths: Sequence[int], store: ResultStore, *,
                        window: int = 256, mode: str = "truncate", span: Optional[int] = None,
                        batch_size: Optional[int] = None, batch_tokens: Optional[int] = None,
                        progress: bool = True, max_units: Optional[int] = None) -> dict:
    """Score ``docs`` at every length (units: one document at one length), appending to ``store``."""
    if mode not in MODES:
        raise EvalError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    by_id = {d.doc_id: d for d in docs}
    units = [{"length": int(L), "doc_id": d.doc_id} for L in lengths for d in docs]
    with PendingUnits(units, store, max_units=max_units, progress=progress, desc="ppl", unit="doc") as run:
        todo = run.todo
        i = 0
        while i < len(todo) and run.done < run.limit:
            L = todo[i]["length"]
            if mode == "truncate":
                size = min(auto_batch_size(lm, L, batch_size, batch_tokens), run.limit - run.done)
                group = []
                while i < len(todo) and len(group) < size and todo[i]["length"] == L:
                    group.append(todo[i])
                    i += 1
                records = _score_truncated(lm, [by_id[u["doc_id"]].tokens[:L] for u in group], group, L)
            else:
                u = todo[i]
                i += 1
                total, count, windows = _score_sliding(lm, by_id[u["doc_id"]].tokens[:span], L, window,
                                                       auto_batch_size(lm, L, batch_size, batch_tokens))
                records = [{"length": L, "doc_id": u["doc_id"], "nll": total, "tokens": count, "windows": windows}]
            run.record(records)
    return asdict(run.stats())


def _score_truncated(lm: LoadedModel, token_rows: List[List[int]], group: List[dict], length: int) -> List[dict]:
    """One window per document (its first ``length`` tokens, all predictions counted), the group in one batch."""
    import torch

    ids = torch.tensor(token_rows, dtype=torch.long)
    nll = lm.token_nll(ids).double()
    return [{"length": length, "doc_id": u["doc_id"], "nll": float(nll[k].sum()),
             "tokens": int(nll.shape[1]), "windows": 1} for k, u in enumerate(group)]


def _score_sliding(lm: LoadedModel, tokens: List[int], context: int, stride: int,
                   size: int) -> Tuple[float, int, int]:
    """(sum of NLLs, scored tokens, windows) of one document over ``press_windows``. Up to ``size``
    windows share a batch; a batch holds one width only, so a shorter last window goes alone."""
    import torch

    wins = press_windows(len(tokens), context, stride)
    total, count = 0.0, 0
    for w0 in range(0, len(wins), size):
        chunk = wins[w0:w0 + size]
        width = chunk[0][1] - chunk[0][0]
        same = [w for w in chunk if w[1] - w[0] == width]
        rest = [w for w in chunk if w[1] - w[0] != width]
        for part in (same, *([[w] for w in rest])):
            if not part:
                continue
            ids = torch.tensor([tokens[b:e] for b, e, _ in part], dtype=torch.long)
            nll = lm.token_nll(ids).double()
            for k, (b, e, s) in enumerate(part):
                total += float(nll[k, s - b - 1:].sum())
                count += e - s
    return total, count, len(wins)
