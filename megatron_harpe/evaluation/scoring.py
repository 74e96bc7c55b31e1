"""Scoring generated answers the way RULER does: is each expected string somewhere in the output?

- :func:`string_match_all` (RULER's metric for the NiaH tasks): the fraction of the expected
  strings that occur in the prediction, case-insensitively. One sample with references
  ``["123", "456"]`` and the output ``"123 and 789"`` scores 0.5.
- :func:`string_match_part` (RULER's metric for QA tasks): 1 if any expected string occurs.

Task scores are the mean over samples, times 100. Predictions are compared as generated
(special tokens removed), so an answer that is a substring of a longer number counts, as in
RULER.
"""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["string_match_all", "string_match_part", "mean_score", "METRICS"]


def _norm(text: str) -> str:
    return text.strip().lower()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` (case-insensitive), in [0, 1]."""
    if not references:
        raise ValueError("no reference strings to score against")
    pred = _norm(prediction)
    return sum(_norm(r) in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 when any of ``references`` occurs in ``prediction`` (case-insensitive), else 0.0."""
    if not references:
        raise ValueError("no reference strings to score against")
    pred = _norm(prediction)
    return float(any(_norm(r) in pred for r in references))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def mean_score(scores: Iterable[float]) -> float:
    """Mean of per-sample scores in [0, 1], as a percentage (0..100)."""
    scores = list(scores)
    if not scores:
        return float("nan")
    return 100.0 * sum(scores) / len(scores)
