"""The generation loop shared by niah, needle and passkey: build prompts, generate in batches, score,
append to the result file (so an interrupted sweep resumes), with a progress bar."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from megatron_harpe.evaluation.model import LoadedModel
from megatron_harpe.evaluation.results import ResultStore
from megatron_harpe.evaluation.scoring import METRICS
from megatron_harpe.evaluation.tasks import Sample

__all__ = ["RunStats", "PendingUnits", "run_generation", "auto_batch_size"]

# sample metadata kept in result records (the prompt text itself is not stored: it is regenerated from the seed)
_KEEP = ("prompt_tokens", "haystack_tokens", "depths", "measured_depths", "needle_spans", "context_span",
         "queried", "filler_sentences", "haystack", "key")


@dataclass
class RunStats:
    total: int
    resumed: int
    new: int
    seconds: float
    stopped: bool   # max_units reached before the end


def auto_batch_size(lm: LoadedModel, length: int, batch_size: Optional[int], batch_tokens: Optional[int]) -> int:
    if batch_size:
        return int(batch_size)
    budget = batch_tokens or (32768 if str(lm.device).startswith("cuda") else 8192)
    return max(1, int(budget) // int(length))


class PendingUnits:
    """The units of a run that are not in its result store yet, and the bookkeeping every evaluation
    loop shares: a resumed run skips what is stored, ``max_units`` caps the new units, each batch of
    records is appended as soon as it is scored (an interrupted sweep loses at most one batch), and
    a progress bar follows. Use it as a context manager so that the bar is closed on any exit."""

    def __init__(self, units: Sequence[Dict], store: ResultStore, *, max_units: Optional[int], progress: bool,
                 desc: str, unit: str):
        self.started = time.perf_counter()
        self.total = len(units)
        self.store = store
        self.todo = [u for u in units if not store.has(u)]
        self.limit = len(self.todo) if max_units is None else min(len(self.todo), max(0, int(max_units)))
        self.done = 0
        self._bar = None
        if progress and self.limit:
            from tqdm import tqdm

            self._bar = tqdm(total=self.limit, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                             initial=0, leave=False)

    def __enter__(self) -> "PendingUnits":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def record(self, records: List[Dict]) -> None:
        self.store.append(records)
        self.done += len(records)
        if self._bar is not None:
            self._bar.update(len(records))

    def stats(self) -> RunStats:
        return RunStats(total=self.total, resumed=self.total - len(self.todo), new=self.done,
                        seconds=time.perf_counter() - self.started, stopped=self.done < len(self.todo))


def run_generation(lm: LoadedModel, units: Sequence[Dict], make_sample: Callable[[Dict], Sample],
                   store: ResultStore, *, batch_size: Optional[int] = None, batch_tokens: Optional[int] = None,
                   metric: str = "string_match_all", progress: bool = True, max_units: Optional[int] = None,
                   desc: str = "eval") -> RunStats:
    """Evaluate the units not yet in ``store``. Units with the same ``length`` (and generation budget) share
    batches; they are visited in the given order. ``max_units`` stops after that many new units."""
    score_fn = METRICS[metric]
    with PendingUnits(units, store, max_units=max_units, progress=progress, desc=desc, unit="sample") as run:
        todo = run.todo
        i = 0
        while i < len(todo) and run.done < run.limit:
            length = int(todo[i]["length"])
            size = min(auto_batch_size(lm, length, batch_size, batch_tokens), run.limit - run.done)
            batch_units: List[Dict] = []
            samples: List[Sample] = []
            while i < len(todo) and len(batch_units) < size and int(todo[i]["length"]) == length:
                sample = make_sample(todo[i])
                if samples and sample.max_new_tokens != samples[0].max_new_tokens:
                    break
                batch_units.append(todo[i])
                samples.append(sample)
                i += 1
            outputs = lm.generate([s.ids for s in samples], samples[0].max_new_tokens)
            run.record([_result_record(unit, sample, out, score_fn)
                        for unit, sample, out in zip(batch_units, samples, outputs)])
    return run.stats()


def _result_record(unit: Dict, sample: Sample, output: str, score_fn) -> Dict:
    rec = dict(unit)
    rec.update({k: sample.meta[k] for k in _KEEP if k in sample.meta})
    rec.update({"answers": sample.answers, "prediction": output, "score": score_fn(output, sample.answers)})
    return rec
