"""The demo main job's last step: a quick passkey / needle (and, given the corpus, perplexity) check of the
tiny exported model, as one markdown block.

    from megatron_harpe.evaluation import demo_eval
    print(demo_eval("runs/demo/hf", "sentencepiece", corpus="runs/demo/corpus.jsonl"))
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["demo_eval"]


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
