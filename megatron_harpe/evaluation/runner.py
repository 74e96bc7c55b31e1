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

__all__ = ["RunStats", "run_generation", "auto_batch_size"]

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


def run_generation(lm: LoadedModel, units: Sequence[Dict], make_sample: Callable[[Dict], Sample],
                   store: ResultStore, *, batch_size: Optional[int] = None, batch_tokens: Optional[int] = None,
                   metric: str = "string_match_all", progress: bool = True, max_units: Optional[int] = None,
                   desc: str = "eval") -> RunStats:
    """Evaluate the units not yet in ``store``. Units with the same ``length`` (and generation budget) share
    batches; they are visited in the given order. ``max_units`` stops after that many new units."""
    started = time.perf_counter()
    score_fn = METRICS[metric]
    todo = [u for u in units if not store.has(u)]
    resumed = len(units) - len(todo)
    limit = len(todo) if max_units is None else min(len(todo), max(0, int(max_units)))
    bar = None
    if progress and limit:
        from tqdm import tqdm

        bar = tqdm(total=limit, desc=desc, unit="sample", dynamic_ncols=True, file=sys.stderr,
                   initial=0, leave=False)
    done = 0
    i = 0
    try:
        while i < len(todo) and done < limit:
            length = int(todo[i]["length"])
            size = min(auto_batch_size(lm, length, batch_size, batch_tokens), limit - done)
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
            records = []
            for unit, sample, out in zip(batch_units, samples, outputs):
                rec = dict(unit)
                rec.update({k: sample.meta[k] for k in _KEEP if k in sample.meta})
                rec.update({"answers": sample.answers, "prediction": out, "score": score_fn(out, sample.answers)})
                records.append(rec)
            store.append(records)
            done += len(records)
            if bar is not None:
                bar.update(len(records))
    finally:
        if bar is not None:
            bar.close()
    return RunStats(total=len(units), resumed=resumed, new=done, seconds=time.perf_counter() - started,
                    stopped=done < len(todo))
