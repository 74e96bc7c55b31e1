"""Long-context probes while training: passkey retrieval scored teacher-forced on the training model.

A 128k continual-pretraining run takes days; validation loss says little about whether the model is
learning to *use* its context. A probe answers that at intervals, in-process, with no export: each
prompt is the passkey document harpe-eval and the demo corpus use (``data.corpus.passkey_document``:
"The pass key is 71432. Remember it." at a depth inside filler text, ending "What is the pass key?
The pass key is") followed by the key, exactly ``length`` tokens long (EOD padding after the key,
which a causal model cannot see from the scored positions). The model is scored on the key's tokens
only, teacher-forced:

- ``exact``: the fraction of prompts whose every key token is the model's greedy (argmax) choice;
  this is what greedy generation would get right, without generating;
- ``token_accuracy``: the fraction of key tokens that are the argmax;
- ``nll``: the mean negative log-likelihood of the key's tokens (nats), a smooth signal that falls
  before ``exact`` rises.

The prompts' depths are spread evenly over (0, 1) and the keys come from ``probe.seed``, so every
probe of a run, and of every run with the same seed, asks the same questions. Scoring reads the
logits of the key positions only (a few rows), so it adds nothing of the size of the vocabulary x
length to memory beyond the forward itself: with tensor parallelism each rank holds a vocabulary
slice, and the argmax, the target logit and the log-sum-exp are combined over the TP group.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_harpe import compat

from megatron_harpe.training.evaluation import eval_mode, forward_only, reduce_sums

__all__ = ["ProbePrompt", "build_probe_prompts", "score_probes", "probe_depths"]

_REPORT = 3  # correct key tokens, key tokens, nll sum


@dataclass
class ProbePrompt:
    length: int
    index: int
    depth: float
    passkey: str
    tokens: torch.Tensor       # [length] input ids
    labels: torch.Tensor       # [length] next-token targets
    loss_mask: torch.Tensor    # [length] 1.0 on the positions whose target is a key token

    def batch(self) -> Dict[str, torch.Tensor]:
        return {"tokens": self.tokens[None], "labels": self.labels[None], "loss_mask": self.loss_mask[None],
                "position_ids": torch.arange(self.length)[None]}


def probe_depths(prompts: int) -> List[float]:
    """Evenly spread depths, away from both ends: (i + 0.5) / n."""
    return [(i + 0.5) / prompts for i in range(prompts)]


def build_probe_prompts(tokenizer, lengths: Sequence[int], prompts: int, seed: int) -> List[ProbePrompt]:
    """`prompts` passkey prompts per length, each exactly that many tokens (see the module doc).

    `tokenizer` is the training data's (data.tokenizer.load_tokenizer): the prompt is tokenized as the
    preprocessor tokenizes documents, so the model reads what it was trained on."""
    from megatron_harpe.data.corpus import passkey_document

    out = []
    for length in lengths:
        for index, depth in enumerate(probe_depths(prompts)):
            key = random.Random(f"harpe-probe:{seed}:{length}:{index}").randint(10000, 99999)

            def encode(n: int, *, answer: bool = True) -> List[int]:
                text, _ = passkey_document(random.Random(seed), n, depth=depth, passkey=key, with_answer=False)
                return tokenizer.encode(text + (f" {key}" if answer else ""))

            n = _fit_filler(lambda n: len(encode(n)), length)
            ids, question = encode(n), encode(n, answer=False)
            common = next((i for i, (a, b) in enumerate(zip(ids, question)) if a != b), len(question))
            if common >= len(ids):
                raise ValueError(f"training.probe: the tokenizer gives the passkey no tokens of its own ({key})")
            pad = length + 1 - len(ids)
            full = torch.tensor(ids + [tokenizer.eod] * pad, dtype=torch.long)
            loss_mask = torch.zeros(length)
            loss_mask[common - 1:len(ids) - 1] = 1.0  # label j is token j+1: the key's tokens
            out.append(ProbePrompt(length, index, depth, str(key), full[:-1].clone(), full[1:].clone(), loss_mask))
    return out


def _fit_filler(count: Callable[[int], int], length: int) -> int:
    """The most filler sentences whose prompt (with the key) has at most `length` tokens."""
    if count(0) > length:
        raise ValueError(f"training.probe.lengths: {length} tokens cannot hold the passkey prompt without filler "
                         f"({count(0)} tokens); use lengths of at least {count(0) + 16}")
    low, high = 0, max(1, length // 8)
    while count(high) <= length:
        low, high = high, high * 2
    while high - low > 1:  # count(low) <= length < count(high)
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) <= length else (low, mid)
    return low


def _probe_forward_step(cp: int, device: torch.device, data_iterator, model):
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    if cp > 1:
        batch = compat.batch_on_this_cp_rank(batch)
    output = model(batch["tokens"], batch["position_ids"], None)  # logits [b, s, vocab / tp] on the last stage
    return output, partial(_score_key_tokens, batch["labels"], batch["loss_mask"])


def _score_key_tokens(labels: torch.Tensor, loss_mask: torch.Tensor, logits: torch.Tensor):
    """[correct, count, nll sum] of the masked positions, the vocabulary combined over the TP group."""
    mask = loss_mask.reshape(-1) > 0
    rows = logits.reshape(-1, logits.shape[-1])[mask].float()
    targets = labels.reshape(-1)[mask]
    report = torch.zeros(_REPORT, dtype=torch.float64, device=logits.device)
    if rows.shape[0]:  # the same on every rank of the TP group (same CP slice), so the collectives match
        vocab_start = ps.get_tensor_model_parallel_rank() * rows.shape[1]
        local = targets - vocab_start
        here = (local >= 0) & (local < rows.shape[1])
        target_logit = torch.where(here, rows.gather(1, local.clamp(0, rows.shape[1] - 1)[:, None])[:, 0],
                                   torch.full_like(targets, float("-inf"), dtype=rows.dtype))
        best = rows.max(dim=1).values
        tensor_parallel = ps.get_tensor_model_parallel_world_size() > 1
        if tensor_parallel:
            group = ps.get_tensor_model_parallel_group()
            dist.all_reduce(target_logit, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.exp(rows - best[:, None]).sum(dim=1)
        if tensor_parallel:
            dist.all_reduce(sum_exp, group=group)
        log_z = best + torch.log(sum_exp)
        report[0] = (target_logit >= best).sum()  # the key token is the argmax over the whole vocabulary
        report[1] = rows.shape[0]
        report[2] = (log_z - target_logit).double().sum()
    zero = logits.sum() * 0.0  # a loss the schedule can hold; nothing is backpropagated
    return zero, torch.ones((), dtype=torch.int, device=logits.device), {"probe": report}


def score_probes(chunks, prompts: List[ProbePrompt], *, dp_rank: int, dp_size: int, context_parallel: int,
                 virtual_pipeline: bool, device: torch.device) -> Dict[str, float]:
    """{"probe_passkey_<L>_exact", "..._token_accuracy", "..._nll", "probe_seconds"} for every length.

    Data-parallel ranks take every dp_size-th prompt of each length; one forward-only pass per length
    (a pass has one sequence length). megatron-core's interleaved schedule needs at least `pipeline`
    micro-batches, so a rank with fewer pads with copies whose key mask is zero."""
    started = time.perf_counter()
    table = torch.zeros(len(prompts), _REPORT, dtype=torch.float64, device=device)
    pipeline = ps.get_pipeline_model_parallel_world_size()
    lengths = sorted({p.length for p in prompts})
    with eval_mode(chunks):
        for length in lengths:
            mine = [i for i, p in enumerate(prompts) if p.length == length][dp_rank::dp_size]
            batches = [prompts[i].batch() for i in mine]
            if virtual_pipeline and batches:
                filler = {**batches[0], "loss_mask": torch.zeros_like(batches[0]["loss_mask"])}
                batches += [filler] * max(pipeline - len(batches), 0)
            outputs = forward_only(chunks, partial(_probe_forward_step, context_parallel, device), batches,
                                   seq_length=length, micro_batch_size=1)
            for i, out in zip(mine, outputs):
                table[i] += out["probe"].to(table)
    table = reduce_sums([table.reshape(-1)], table.numel(), device).reshape(len(prompts), _REPORT)
    result = {}
    for length in lengths:
        rows = table[[i for i, p in enumerate(prompts) if p.length == length]]
        correct, count, nll = rows[:, 0], rows[:, 1], rows[:, 2]
        result[f"probe_passkey_{length}_exact"] = (correct == count).double().mean().item()
        result[f"probe_passkey_{length}_token_accuracy"] = (correct.sum() / count.sum()).item()
        result[f"probe_passkey_{length}_nll"] = (nll.sum() / count.sum()).item()
    result["probe_seconds"] = time.perf_counter() - started
    return result
