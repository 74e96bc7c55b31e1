"""Quick evaluations of tiny exported models, for the demo main job (`make demo`, megatron_harpe/demo.py).

- :func:`demo_eval`: passkey / needle (and, given a corpus, perplexity) tables of one model:

    from megatron_harpe.evaluation import demo_eval
    print(demo_eval("runs/demo/hf/harpe", "sentencepiece", corpus="runs/demo/heldout.jsonl"))

- :func:`compare_models` + :func:`comparison_table` + :func:`comparison_reading`: the demo's step 7,
  several models trained alike but for their position encoding, in one table (perplexity and passkey at
  1x, 2x, 4x the training length) and what it shows, written from the numbers.
- :class:`ConversionCost` + :func:`conversion_cost_table` + :func:`conversion_cost_reading`: its step 8, a real
  pretrained model as it is and converted to other bases, perplexity per length and the increase each costs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["demo_eval", "ComparedModel", "compare_models", "comparison_table", "comparison_reading",
           "ConversionCost", "conversion_cost_table", "conversion_cost_reading"]


def demo_eval(hf_dir: str | Path, tokenizer_kind: Optional[str] = None, *, tokenizer: Optional[str | Path] = None,
              corpus: Optional[str | Path] = None, out_dir: Optional[str | Path] = None,
              lengths: Sequence[int] = (192, 256, 512), depths: Sequence[float] = (0.0, 0.5, 1.0),
              samples: int = 2, ppl_docs: int = 4, seed: int = 0, device: str = "cpu",
              progress: bool = False) -> str:
    """Evaluate the model in ``hf_dir`` (a Hugging Face directory, e.g. the demo's export) and return the tables.

    - passkey retrieval over ``lengths`` x ``depths`` (``samples`` per cell) -> ``out_dir/passkey``;
    - the classic needle (essay haystack), one sample per cell -> ``out_dir/needle`` (heatmap.png);
    - with ``corpus`` (a jsonl, e.g. the demo's corpus.jsonl): perplexity of its first ``ppl_docs``
      documents long enough, truncated to each length -> ``out_dir/ppl``.

    ``tokenizer`` (with ``tokenizer_kind`` = sentencepiece | huggingface) replaces the directory's own
    tokenizer files; without it ``tokenizer_kind`` is only informative. ``out_dir`` defaults to
    ``<hf_dir>/../eval``. The tiny demo model is trained at 256 tokens, so 512 measures extrapolation.
    Results are resumable like the CLI's (a rerun reuses them).
    """
    from megatron_harpe.evaluation.commands import run_grid, run_ppl
    from megatron_harpe.evaluation.errors import EvalError
    from megatron_harpe.evaluation.model import load_model

    hf_dir = Path(hf_dir)
    out = Path(out_dir) if out_dir is not None else hf_dir.resolve().parent / "eval"
    lm = load_model(hf_dir, tokenizer=tokenizer, tokenizer_type=tokenizer_kind if tokenizer else None, device=device,
                    lazy=True, show_progress=progress)
    parts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lengths beyond max_position_embeddings are on purpose here
        _, md, _ = run_grid("passkey", lm, out / "passkey", lengths=lengths, depths=depths, samples=samples, seed=seed,
                            progress=progress, name=hf_dir.name)
        parts.append(md)
        summary, md, _ = run_grid("needle", lm, out / "needle", lengths=lengths, depths=depths, samples=1, seed=seed,
                                  progress=progress, name=hf_dir.name)
        parts.append(md + f"\nheatmap: {summary['heatmap']}\n")
        if corpus is not None:
            try:
                _, md, _ = run_ppl(lm, out / "ppl", data=[str(corpus)], lengths=lengths, num_docs=ppl_docs,
                                   progress=progress, name=hf_dir.name)
                parts.append(md)
            except EvalError as err:
                parts.append(f"### Perplexity\n\nskipped: {err}\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the demo's comparison

@dataclass
class ComparedModel:
    """One row of the demo's comparison: a trained model and what it scored."""

    name: str                   # short label: HARPE, RoPE, ABF
    encoding: str               # e.g. "HARPE 2 bases [10000, 500000]"
    hf_dir: str
    loss: Optional[float] = None                                 # training loss (see compare_models)
    ppl: Dict[int, float] = field(default_factory=dict)          # length -> perplexity
    passkey: Dict[int, float] = field(default_factory=dict)      # length -> % retrieved
    passkey_samples: int = 0                                     # prompts per length


def compare_models(models: Sequence[ComparedModel], *, train_length: int, ppl_data: str | Path,
                   out_dir: str | Path, multiples: Sequence[int] = (1, 2, 4), ppl_docs: int = 8,
                   depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), samples: int = 2, seed: int = 0,
                   device: str = "cpu") -> List[ComparedModel]:
    """Perplexity (truncate mode: the first L tokens of each of ``ppl_docs`` documents of ``ppl_data``) and
    passkey retrieval (``len(depths) * samples`` prompts per length) at ``multiples`` of ``train_length``, for
    each model; fills in ``ppl`` and ``passkey`` and returns the models. Results are written (and reused by a
    rerun) under ``out_dir/<name>/ppl`` and ``out_dir/<name>/passkey``, as harpe-eval writes them."""
    import contextlib
    import io
    import sys

    from megatron_harpe.evaluation.commands import run_grid, run_ppl
    from megatron_harpe.evaluation.model import load_model

    lengths = [int(train_length) * int(m) for m in multiples]
    out = Path(out_dir)
    for row in models:
        lm = load_model(row.hf_dir, device=device, lazy=True, show_progress=False)
        notes = io.StringIO()
        # the tools' "note: lengths exceed max_position_embeddings: measuring extrapolation" is what the table's
        # 2x/4x columns are for; anything else written to stderr is passed on
        with contextlib.redirect_stderr(notes):
            ppl, _, _ = run_ppl(lm, out / row.name.lower() / "ppl", data=[str(ppl_data)], lengths=lengths,
                                num_docs=ppl_docs, progress=False, name=row.name)
            key, _, _ = run_grid("passkey", lm, out / row.name.lower() / "passkey", lengths=lengths, depths=depths,
                                 samples=samples, seed=seed, progress=False, name=row.name, heatmap=False)
        for line in notes.getvalue().splitlines():
            if "measuring extrapolation" not in line:
                print(line, file=sys.stderr)
        row.ppl = {L: ppl["ppl"][str(L)] for L in lengths}
        row.passkey = {L: key["per_length"][str(L)] for L in lengths}
        row.passkey_samples = len(depths) * samples
    return list(models)


def comparison_table(models: Sequence[ComparedModel], train_length: int, loss_label: str = "train loss") -> str:
    """The comparison as one markdown table: a row per model, perplexity and passkey per length."""
    lengths = sorted(models[0].ppl)

    def mult(L: int) -> str:
        return f"{L} ({L // train_length}x)" if L % train_length == 0 else str(L)

    head = (["model", "position encoding", loss_label] + [f"ppl {mult(L)}" for L in lengths]
            + [f"passkey {mult(L)}" for L in lengths])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for m in models:
        loss = f"{m.loss:.3f}" if m.loss is not None else "-"
        cells = [m.name, m.encoding, loss] + [_num(m.ppl.get(L)) for L in lengths] \
            + [_pct(m.passkey.get(L)) for L in lengths]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def comparison_reading(models: Sequence[ComparedModel], train_length: int, *, base_length: Optional[int] = None,
                       noise: float = 0.03) -> str:
    """What the table shows, written from its numbers: the training length, then the longest length.

    ``base_length``: the context of the model the rows were continued from (the demo: 64 tokens), if any.
    ``noise``: the relative perplexity difference under which two models are called indistinguishable: a margin
    above the ~1% standard deviation over seeds that docs/study/README.md measured for this setting."""
    lengths = sorted(models[0].ppl)
    L1, Lmax = lengths[0], lengths[-1]
    at1 = {m.name: m.ppl[L1] for m in models}
    best1, worst1 = min(at1.values()), max(at1.values())
    if worst1 / best1 - 1 <= noise:
        first = (f"At the training length ({L1} tokens) the encodings are indistinguishable in perplexity "
                 f"({_num(best1)}-{_num(worst1)}, within the {noise:.0%} we treat as noise for one seed)")
    else:
        order = sorted(models, key=lambda m: m.ppl[L1])
        first = (f"At the training length ({L1} tokens) {order[0].name} has the lowest perplexity "
                 f"({_num(order[0].ppl[L1])} against {', '.join(f'{m.name} {_num(m.ppl[L1])}' for m in order[1:])}), "
                 f"more than the {noise:.0%} we treat as noise for one seed")
    key1 = {m.name: m.passkey.get(L1) for m in models}
    if all(v is not None and v == 0 for v in key1.values()):
        first += ("; none retrieves the passkey even there: a ~1M-parameter model does not learn to copy a key over "
                  "this distance in a few hundred steps (docs/demo.md: what it takes), so the passkey columns are "
                  "at chance.")
    else:
        first += "; passkey at that length: " + ", ".join(f"{n} {_pct(v)}" for n, v in key1.items()) + "."
    order = sorted(models, key=lambda m: m.ppl[Lmax])
    best, runner_up = order[0], order[1] if len(order) > 1 else order[0]
    values = ", ".join(f"{m.name} {_num(m.ppl[Lmax])}" for m in order)
    where = f"{Lmax // L1}x the training length ({Lmax} tokens" + \
        (f", {Lmax // base_length}x the base model's context)" if base_length else ")")
    margin = runner_up.ppl[Lmax] / best.ppl[Lmax] - 1
    if margin <= noise:
        close = [m.name for m in order if m.ppl[Lmax] / best.ppl[Lmax] - 1 <= noise]
        second = (f"At {where} perplexity is {values}: {_and(close)} are within {noise:.0%} of each other, so this "
                  f"run does not separate them there.")
    else:
        second = (f"At {where} perplexity is lowest for {best.name}: {values} ({best.name} {margin:.0%} below "
                  f"{runner_up.name}).")
    by_name = {m.name: m for m in models}
    if "HARPE" in by_name and "ABF" in by_name:
        harpe, abf = by_name["HARPE"].ppl[Lmax], by_name["ABF"].ppl[Lmax]
        gap = abf / harpe - 1
        second += (f" HARPE against ABF, the paper's comparison: at {Lmax // L1}x HARPE is "
                   + (f"{gap:.1%} below ABF" if gap > 0 else f"{-gap:.1%} above ABF")
                   + "; docs/study/README.md ran it over 3 seeds at 150 continuation steps (with PI and YaRN beside) "
                     "and found HARPE 4-6% below single-stage ABF at 4x in every seed, so "
                   + ("this run agrees with it" if gap > noise else
                      "this run agrees in direction, by less than we can tell from noise in one seed" if gap > 0 else
                      "this run, one seed, does not reproduce it: see there for the spread over seeds") + ".")
    if "RoPE" in by_name and len(models) > 1:
        rope = by_name["RoPE"].ppl[Lmax]
        if rope / best.ppl[Lmax] - 1 <= noise:
            second += (" RoPE, its pretraining base kept, extrapolates as well as the best here: at 4x (16x the "
                       "base's context) a 10k base is evidently not yet too small, unlike the paper's 32x to 128k, where "
                       "raising it is what ABF is for." if base_length and Lmax // base_length == 16 else
                       " RoPE, its pretraining base kept, extrapolates as well as the best here.")
        elif rope == max(m.ppl[Lmax] for m in models):
            second += " RoPE, its pretraining base kept, extrapolates worst, as a base too small for the length does."
    return first + "\n" + second


def _and(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# ----------------------------------------------------------------------------- the demo's real-model step

@dataclass
class ConversionCost:
    """One row of the real-model table: a pretrained model as it is or converted, and its perplexity."""

    name: str                   # original, HARPE, ABF
    encoding: str
    ppl: Dict[int, float]       # length -> perplexity


def conversion_cost_table(rows: Sequence[ConversionCost]) -> str:
    """Perplexity per length and its increase over the first row (the original model), as one markdown table."""
    lengths = sorted(rows[0].ppl)
    original = rows[0]
    head = ["model", "position encoding"]
    for L in lengths:
        head += [f"ppl {L}", f"vs original ({L})"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in rows:
        cells = [row.name, row.encoding]
        for L in lengths:
            cells += [_num(row.ppl[L]), "-" if row is original else f"{row.ppl[L] / original.ppl[L] - 1:+.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conversion_cost_reading(rows: Sequence[ConversionCost]) -> str:
    """What the real-model table shows: each conversion's perplexity increase, HARPE's against ABF's."""
    lengths = sorted(rows[0].ppl)
    original = rows[0]
    rise = {r.name: {L: r.ppl[L] / original.ppl[L] - 1 for L in lengths} for r in rows[1:]}
    parts = [f"{name} {', '.join(f'{v[L]:+.0%} at {L}' for L in lengths)}" for name, v in rise.items()]
    text = ("Changing a trained model's RoPE bases costs perplexity before any training: " + "; ".join(parts) + ".")
    if "HARPE" in rise and "ABF" in rise:
        ratios = [rise["HARPE"][L] / rise["ABF"][L] for L in lengths if rise["ABF"][L] > 0]
        if ratios and all(r < 1 for r in ratios):
            text += (" HARPE keeps one K/V group at the base the model learned and raises the others; ABF moves "
                     f"every head to the new base. HARPE's jump is {_span(ratios)} of ABF's: a closer start for the "
                     "continual pretraining that adapts the model to its new bases.")
        else:
            text += " Here HARPE's jump is not smaller than ABF's."
    return text


def _span(values: Sequence[float]) -> str:
    low, high = f"{min(values):.0%}", f"{max(values):.0%}"
    return low if low == high else f"{low}-{high}"


def _num(v: Optional[float]) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.2f}"


def _pct(v: Optional[float]) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.0f}%"
