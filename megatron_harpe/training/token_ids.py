"""The vocabulary contract without a tokenizer: every token id of a batch fits the model's embedding.

Data tokenized with another model's tokenizer (the usual "Llama-3 data, Llama-2 model" mistake) holds
ids past `model.vocab_size`. The embedding then fails with an IndexError on CPU and a device-side
assert on a GPU, which names neither the data nor the number; the vocabulary-parallel cross entropy
is worse: a label outside every rank's vocabulary shard is masked and the loss is silently wrong.
A tokenizer, when configured, is checked before anything starts (data/tokenizer.py); this is the
check for the ids themselves, made on the host before a batch moves to the device.

Cost: a min and a max over the micro-batches' token and label ids (host memory, int64) and one
one-element all-reduce per iteration, so that every rank stops together with exit 2 rather than one
rank failing while the others wait in a collective (tools/bench_token_check.py measures it).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_harpe.data.inputs import DataError


def _id_range(batches: Sequence[Dict[str, torch.Tensor]]) -> tuple[int, int]:
    low, high = 0, 0
    for batch in batches:
        for key in ("tokens", "labels"):
            ids = batch[key]
            low, high = min(low, int(ids.min())), max(high, int(ids.max()))
    return low, high


def _first_bad_sample(batches: Sequence[Dict[str, torch.Tensor]], vocab_size: int) -> tuple[int, int, int]:
    """(micro-batch, row, largest id) of the first sample holding an id outside [0, vocab_size)."""
    for j, batch in enumerate(batches):
        ids = torch.cat([batch["tokens"], batch["labels"]], dim=1)
        bad = ((ids >= vocab_size) | (ids < 0)).any(dim=1)
        if bad.any():
            row = int(bad.nonzero()[0])
            high, low = int(ids[row].max()), int(ids[row].min())
            return j, row, high if high >= vocab_size else low
    raise AssertionError("no sample out of range")  # only called after _id_range found one


def sample_source(dataset, index: int) -> str:
    """Where sample `index` of a training dataset comes from: the indexed dataset's prefix (through a
    blend, if any), or "mock data"."""
    blended = getattr(dataset, "datasets", None)
    if blended is not None and hasattr(dataset, "dataset_index"):
        which = int(dataset.dataset_index[index])
        return sample_source(blended[which], int(dataset.dataset_sample_index[index]))
    indexed = getattr(dataset, "dataset", None)
    prefix = getattr(indexed, "path_prefix", None)
    if prefix is not None:
        return f"dataset {prefix} (sample {index})"
    return f"{type(dataset).__name__} (sample {index})"


def check_token_ids(batches: List[Dict[str, torch.Tensor]], vocab_size: int, *,
                    locate: Callable[[int, int], str], device: torch.device, what: str) -> None:
    """Collective: raise DataError on every rank when any rank's batches hold an id outside
    [0, vocab_size). `locate(micro_batch, row)` names the source of a sample (sample_source); `what` names
    the batches in the message ("the batch of iteration 7")."""
    low, high = _id_range(batches)
    local_bad = low < 0 or high >= vocab_size
    flag = torch.tensor([1.0 if local_bad else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    finding: Optional[str] = None
    if local_bad:
        j, row, value = _first_bad_sample(batches, vocab_size)
        finding = f"{locate(j, row)} holds token id {value}"
    findings = [finding]
    if dist.is_initialized() and dist.get_world_size() > 1:
        findings = [None] * dist.get_world_size()
        dist.all_gather_object(findings, finding)
    seen = sorted({f for f in findings if f})
    raise DataError(f"{what} has token ids outside the model's vocabulary "
                    f"(model.vocab_size {vocab_size}): {'; '.join(seen)}. The data was tokenized with another "
                    f"tokenizer than the model's: re-tokenize it (harpe-preprocess with the model's tokenizer), "
                    f"or set model.vocab_size to the tokenizer's (padded) size for a model trained from scratch")


__all__ = ["check_token_ids", "sample_source"]
