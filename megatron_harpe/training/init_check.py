"""The step-0 check: the run's first forward against a reference model's loss on the same tokens.

`harpe-train --config C --check-init HF_DIR` (megatron_harpe/train.py) before spending cluster hours: the loss of
the run's first forward equals Hugging Face's loss on the same tokens, with the same labels and the same loss mask.
Equal losses prove together what a continual-pretraining start depends on:

- init_from: the weights the run loads are the reference's weights (a random or another model's checkpoint is a
  loss near ln(vocab), or far from the reference's);
- the model: section: architecture, norm epsilon and position encoding as the reference computes them;
- the data: the batch is the configured data's first global batch, as training reads it (same seed, samples,
  DP split), tokenized for this model (another tokenizer's ids make a pretrained model's loss large);
- labels and the loss mask: the reference derives them itself from each sample's tokens - labels by the usual
  causal shift, no loss where the input is the EOD with data.eod_mask_loss, one forward per document (positions
  from 0, attention inside it) with data.document_mask - instead of taking the run's; so a shifted label, a
  wrong mask, document packing, CP's padding rows and chunk order, and the reductions over TP (vocabulary-
  parallel cross entropy), PP (the last stage's losses) and CP (per-chunk sums) all have to be right;
- the separator: with data.document_mask or data.eod_mask_loss, the documents of every data.blend prefix must
  end with the run's EOD (data.eod_token, else the tokenizer's EOS); a chat model's EOS (SmolLM2-Instruct's
  '<|im_end|>') beside data made with '<|endoftext|>' is caught here, before any model is built.

How the run is built: exactly as training builds it (Trainer: the parallel layout, precision, init_from's
weights, GPTDataset with the run's seed and sample count, the token-id check), with checkpoint.resume off (the
check is about init_from, not about a checkpoint in run_dir). One forward-only pass through megatron-core's
schedule (eval mode: no dropout; Llama trains without dropout, so this is the training forward), reduced by the
trainer's own loss function and `reduce_sums`. Nothing is trained or saved: the only files written are the
dataset's index cache (where training writes it first and reuses it); a run_dir the check created is removed.

The token cap (`max_tokens`, --check-init-tokens): the check compares the first micro-batches of the first
global batch, in the order training reads them (micro-batch j of DP rank d is unit j*DP+d), as many as hold
`max_tokens` tokens and at least one. When the cap covers the batch, the megatron loss is iteration 1's loss.

The reference runs on rank 0 after the megatron model is freed: on its GPU in the run's precision (bf16 for a
bf16 run), on CPU in fp32. Every rank waits for its verdict (a broadcast: within the process group's timeout,
10 min by default). `reference` is any object with `name`, `mismatches(model_cfg)`, `notes(model_cfg)`,
`describe(model_cfg)` and `load(model_cfg, dtype, device)` (a causal LM: `model.model(input_ids=...)` and
`model.get_output_embeddings()`, or `model(input_ids=...).logits`); convert/hf_reference.HFReference is the
Hugging Face one. This layer imports neither transformers nor the converter.

Tolerance (relative to the reference's loss): fp32 on both sides 2e-5. What differs is the order of fp32 sums (TP's
all-reduces, CP's chunks, per-micro-batch partial sums, another attention kernel); measured on SmolLM2-135M at 128
tokens: 2e-8 at TP=1, 6e-8 at TP=3, 2e-8 at PP=2 x CP=2 (docs/training.md has the table), a hundred-fold margin
at least, which also covers GPUs' fp32 kernels; a wrong weight anywhere is orders of magnitude more (random weights: 2.5 relative). The reference's cross
entropy is computed in float64 (reference_loss says why). bf16 (the run, or the reference on a GPU) 2e-2: bf16 keeps
8 bits of mantissa (relative rounding 4e-3 per operation) and two implementations round differently through every
layer; measured 7.6e-5 for a bf16 run against the fp32 reference on CPU, not measured bf16 against bf16 on a GPU here.
Faults that change the loss by less than 2% need the fp32 check: add `training.precision=fp32` to the command.
"""
from __future__ import annotations

import copy
import gc
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_harpe.cli import EXIT_CHECK_FAILED, InputError
from megatron_harpe.config.schema import Config, parse_blend
from megatron_harpe.config.stages import build_schedule
from megatron_harpe.training.evaluation import eval_mode, forward_only, reduce_sums

__all__ = ["DEFAULT_MAX_TOKENS", "FP32_RTOL", "BF16_RTOL", "FirstBatch", "FirstForward", "InitCheckResult",
           "check_init", "first_forward", "reference_loss", "separator_finding", "tolerance"]

#: tokens compared by default: a few samples of a 4k run, one micro-batch (whatever its length) of a 128k run
DEFAULT_MAX_TOKENS = 16384
FP32_RTOL = 2e-5
BF16_RTOL = 2e-2
#: share of documents that must end with one token for it to count as the data's separator
_SEPARATOR_SHARE = 0.99
#: logits the reference holds at once in float64, in elements (1 GiB: 1,024 tokens of a 128k vocabulary)
_LOGIT_ELEMENTS = 1 << 27


def tolerance(run_dtype: torch.dtype, reference_dtype: torch.dtype) -> Tuple[float, str]:
    """(relative tolerance, why) for a megatron forward in `run_dtype` against a reference in `reference_dtype`."""
    if run_dtype == torch.float32 and reference_dtype == torch.float32:
        return FP32_RTOL, "fp32 on both sides: the same sums in another order across ranks"
    return BF16_RTOL, ("bf16: 8-bit mantissas rounded differently by two implementations; for a tighter check "
                       "add training.precision=fp32")


# ----------------------------------------------------------------------------- what the reference computes on
@dataclass
class FirstBatch:
    """The compared samples as the reference sees them (host tensors, rank 0).

    `windows[i]` is sample i's tokens followed by the token after them (its last label): the reference makes the
    inputs, labels and loss mask from it by the rules below, not from the run's labels and mask."""

    windows: torch.Tensor  # int64 [samples, seq_length + 1]
    eod_id: Optional[int]
    document_mask: bool
    eod_mask_loss: bool

    @property
    def seq_length(self) -> int:
        return self.windows.shape[1] - 1

    def loss_mask(self) -> torch.Tensor:
        """[samples, seq_length] float: 1, and 0 where the input is the EOD with data.eod_mask_loss."""
        inputs = self.windows[:, :-1]
        mask = torch.ones(inputs.shape, dtype=torch.float64)
        if self.eod_mask_loss and self.eod_id is not None:
            mask[inputs == self.eod_id] = 0.0
        return mask

    def segments(self) -> List[Tuple[int, int, int]]:
        """(sample, start, end) of each sequence the reference runs: whole samples, or with data.document_mask
        each document (it ends after its EOD, and at the sample's end)."""
        out = []
        for row in range(self.windows.shape[0]):
            start = 0
            if self.document_mask and self.eod_id is not None:
                for end in (torch.nonzero(self.windows[row, :-1] == self.eod_id).flatten() + 1).tolist():
                    out.append((row, start, end))
                    start = end
            if start < self.seq_length:
                out.append((row, start, self.seq_length))
        return out


def _logit_chunks(model, ids: torch.Tensor, elements: int):
    """(offset, logits [n, vocab]) over the positions of `ids` [1, s], `elements` logits at a time: the full
    [s, vocab] logits are never held when the model exposes its decoder and output layer (transformers' causal LMs
    do)."""
    body = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None:
        yield 0, model(input_ids=ids).logits[0]
        return
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0]
    chunk = max(1, elements // head.weight.shape[0])
    for i in range(0, hidden.shape[0], chunk):
        yield i, head(hidden[i:i + chunk])


def reference_loss(model, batch: FirstBatch, device: torch.device,
                   elements: int = _LOGIT_ELEMENTS) -> Tuple[float, int]:
    """(loss sum, tokens in the loss) of `model` on `batch`: next-token cross entropy of its logits, computed in
    float64 and summed over the positions the loss mask keeps. Float64, not the fp32 of transformers' own loss:
    torch's fp32 cross entropy on CPU is biased by ~1e-5 per token at a 49k vocabulary (measured against float64;
    megatron-core's vocabulary-parallel one is within 1e-8), which would be most of the difference measured."""
    mask = batch.loss_mask()
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for row, start, end in batch.segments():
            weights = mask[row, start:end].to(device)
            if not bool(weights.any()):
                continue
            ids = batch.windows[row, start:end][None].to(device)
            targets = batch.windows[row, start + 1:end + 1].to(device)
            for offset, logits in _logit_chunks(model, ids, elements):
                n = logits.shape[0]
                losses = torch.nn.functional.cross_entropy(logits.double(), targets[offset:offset + n],
                                                           reduction="none")
                total += (losses * weights[offset:offset + n]).sum()
    return total.item(), int(mask.sum().item())


# ----------------------------------------------------------------------------- the run's side
@dataclass
class FirstForward:
    """The run's first forward, reduced: the same numbers on every rank (`batch` on rank 0 only)."""

    loss_sum: float
    tokens: int
    samples: int
    seq_length: int
    layout: str
    dtype: torch.dtype
    source: str  # training.init_from, resolved
    batch: Optional[FirstBatch]
    seconds: float

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens if self.tokens else float("nan")


def _layout(cfg: Config, dp: int) -> str:
    p = cfg.parallel
    text = f"TP {p.tensor}" + (" (SP)" if p.sequence_parallel else "") + f" x PP {p.pipeline}"
    if p.virtual_pipeline:
        text += f" (VPP {p.virtual_pipeline})"
    text += f" x CP {p.context} x DP {dp}"
    if cfg.data.document_mask:
        text += ", document masking"
    return text


def first_forward(cfg: Config, max_tokens: int = DEFAULT_MAX_TOKENS,
                  log: Callable[[str], None] = lambda text: None) -> FirstForward:
    """Collective: build the run as training does, load training.init_from, and run the first forward on the first
    micro-batches of the first global batch (`max_tokens`, at least one micro-batch). The model and optimizer are
    freed before it returns; a run_dir it created is removed."""
    from megatron_harpe.training import checkpointing as ckpt
    from megatron_harpe.training.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    _require_init_from(cfg)
    cfg.checkpoint.resume = False  # the run's start from init_from, never from a checkpoint in run_dir
    created = _first_missing(Path(cfg.run_dir))  # what the check makes and removes again (None: nothing)
    started = time.perf_counter()
    trainer = Trainer(cfg)
    done = False
    try:
        log(f"building the run ({_layout(cfg, trainer.dp_size)}) and loading {cfg.training.init_from}")
        _, data = trainer._prepare()  # layout, weights, data, token-id check: training's own path
        stage = trainer.stages[0]
        d = cfg.data
        per_unit = d.micro_batch_size * stage.seq_length
        units = min(d.global_batch_size // d.micro_batch_size, max(1, -(-int(max_tokens) // per_unit)))
        batches = [b for j, b in enumerate(data.iteration(0)) if j * trainer.dp_size + trainer.dp_rank < units]
        if cfg.parallel.virtual_pipeline and batches:  # the interleaved schedule's minimum: loss-free copies
            filler = {**batches[0], "loss_mask": torch.zeros_like(batches[0]["loss_mask"])}
            batches += [filler] * (-len(batches) % cfg.parallel.pipeline)
        log(f"first forward: {units * d.micro_batch_size} sample(s) of {stage.seq_length} tokens")
        with eval_mode(trainer.chunks):
            outputs = forward_only(trainer.chunks, trainer._forward_step, batches, seq_length=stage.seq_length,
                                   micro_batch_size=d.micro_batch_size)
        totals = reduce_sums([out["lm loss"] for out in outputs], 2, trainer.device)
        batch = None
        if trainer.rank == 0:
            samples = [data.dataset[k] for k in range(units * d.micro_batch_size)]
            windows = torch.stack([torch.cat([torch.as_tensor(np.asarray(s["tokens"])),
                                              torch.as_tensor(np.asarray(s["labels"]))[-1:]]) for s in samples])
            batch = FirstBatch(windows.long(), trainer.eod_id, d.document_mask, d.eod_mask_loss)
        first = FirstForward(loss_sum=totals[0].item(), tokens=int(totals[1].item()),
                             samples=units * d.micro_batch_size, seq_length=stage.seq_length,
                             layout=_layout(cfg, trainer.dp_size), dtype=trainer.params_dtype,
                             source=str(ckpt.resolve_checkpoint_path(cfg.training.init_from)), batch=batch,
                             seconds=time.perf_counter() - started)
        done = True
        return first
    finally:
        trainer.chunks = trainer.optimizer = trainer.scheduler = None
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ps.destroy_model_parallel()
        if created is not None:  # nothing left behind: the index cache went into a run_dir made for the check
            if done and dist.is_initialized():  # (after an error other ranks may never get here)
                dist.barrier()
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.rmtree(created, ignore_errors=True)


def _require_init_from(cfg: Config) -> None:
    if not cfg.training.init_from:
        raise InputError("--check-init compares the weights of training.init_from with the reference: set "
                         "training.init_from to the converted checkpoint (harpe-convert hf-to-megatron)")


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost directory of `path` that does not exist yet (None when `path` exists)."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


# ----------------------------------------------------------------------------- the data's separator
def separator_finding(cfg: Config) -> Tuple[Optional[str], bool]:
    """(what the data's documents end with against the run's EOD, whether that is a fault): a fault when
    data.document_mask or data.eod_mask_loss reads an EOD the documents do not end with. Reads the last token
    of the first 1,024 documents of each data.blend prefix (no model, no process group)."""
    d = cfg.data
    if d.kind != "indexed" or d.tokenizer_model is None:
        return None, False
    from megatron_harpe.data.indexed import last_tokens
    from megatron_harpe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(d.tokenizer_type, d.tokenizer_model, eod_token=d.eod_token)

    def name(token_id: int) -> str:
        return f"{tok.id_to_token(int(token_id))!r} ({int(token_id)})"

    findings = []
    for prefix in parse_blend(d.blend)[0]:
        ends = last_tokens(prefix)
        if ends.size == 0:
            continue
        values, counts = np.unique(ends, return_counts=True)
        top, share = int(values[counts.argmax()]), counts.max() / ends.size
        if share < _SEPARATOR_SHARE:
            findings.append(f"the documents of {prefix} end with no common token (made without --append-eod?)")
        elif top != tok.eod:
            findings.append(f"the documents of {prefix} end with {name(top)}, the run's EOD is {name(tok.eod)}")
    if not findings:
        return f"documents end with {name(tok.eod)}, the run's EOD", False
    readers = [key for key, on in (("data.document_mask", d.document_mask), ("data.eod_mask_loss", d.eod_mask_loss))
               if on]
    if not readers:
        return "; ".join(findings) + " (nothing in this run reads the EOD: only data.document_mask and " \
                                     "data.eod_mask_loss do)", False
    eod_source = "data.eod_token" if d.eod_token is not None else "the tokenizer's EOS (data.eod_token unset)"
    return ("; ".join(findings) + f": {' and '.join(readers)} would act on {eod_source}, which the documents do not "
            f"end with. Set data.eod_token to the token the data was made with (harpe-preprocess --eod-token), or "
            f"make the data again with the run's EOD"), True


# ----------------------------------------------------------------------------- the verdict
@dataclass
class InitCheckResult:
    passed: bool
    reference: str  # what the run was compared with
    run: str = ""
    megatron_loss: Optional[float] = None
    reference_loss: Optional[float] = None
    tokens: Optional[int] = None  # in the megatron loss
    reference_tokens: Optional[int] = None
    samples: int = 0
    seq_length: int = 0
    documents: Optional[int] = None
    rtol: float = FP32_RTOL
    rtol_why: str = ""
    vocab_size: int = 0
    data: Optional[str] = None  # the separator finding
    notes: List[str] = field(default_factory=list)
    failure: Optional[str] = None  # one line: what differs
    seconds: float = 0.0

    @property
    def abs_diff(self) -> Optional[float]:
        if self.megatron_loss is None or self.reference_loss is None:
            return None
        return abs(self.megatron_loss - self.reference_loss)

    @property
    def rel_diff(self) -> Optional[float]:
        diff = self.abs_diff
        return None if diff is None else diff / max(abs(self.reference_loss), 1e-12)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else EXIT_CHECK_FAILED

    def report(self, prog: str = "harpe-train --check-init") -> str:
        rows = [("run", self.run), ("reference", self.reference)]
        if self.tokens is not None:
            documents = "" if self.documents is None else f"; {self.documents} documents"
            rows.append(("tokens", f"{self.samples} sample(s) x {self.seq_length}; in the loss: {self.tokens:,} "
                                   f"(reference {self.reference_tokens:,}){documents}"))
            rows.append(("megatron loss", f"{self.megatron_loss:.9f}"))
            rows.append(("reference loss", f"{self.reference_loss:.9f}"))
            rows.append(("|diff|", f"{self.abs_diff:.3g} (relative {self.rel_diff:.3g})"))
            rows.append(("tolerance", f"{self.rtol:.0e} relative ({self.rtol_why})"))
        if self.data and not (self.failure or "").startswith("data: "):
            rows.append(("data", self.data))
        rows += [("note", note) for note in self.notes]
        verdict = "PASS" if self.passed else "FAIL"
        what = ("init_from, data, labels and loss mask agree with the reference" if self.passed else self.failure)
        rows.append(("result", f"{verdict} in {self.seconds:.1f} s: {what}"))
        width = max(len(key) for key, _ in rows)
        return "\n".join([f"{prog}: the run's step-0 loss against the reference"]
                         + [f"  {key:<{width}}  {value}" for key, value in rows])


def _failure(result: InitCheckResult) -> Optional[str]:
    """One line saying what differs, None when the check passes."""
    if result.tokens != result.reference_tokens:
        return (f"the loss masks differ: the run counts {result.tokens:,} tokens in the loss, the reference "
                f"{result.reference_tokens:,} (labels, data.eod_mask_loss or document masking)")
    if not (result.rel_diff <= result.rtol):  # NaN fails too
        uniform = math.log(max(result.vocab_size, 2))
        if abs(result.megatron_loss - uniform) < 0.15 * uniform:
            why = (f"the run's loss is near ln(vocab) = {uniform:.2f}, what untrained weights give: training.init_from "
                   f"does not hold the reference's weights")
        elif abs(result.reference_loss - uniform) < 0.15 * uniform:
            why = f"the reference's loss is near ln(vocab) = {uniform:.2f}: is the reference a trained model?"
        else:
            why = ("the run does not start from the reference's model: check that training.init_from is the "
                   "conversion of the reference, the model: section (norm_epsilon, position encoding) and the data's "
                   "tokenizer")
        return (f"the losses differ by {result.rel_diff:.3g} relative (tolerance {result.rtol:.0e}): {why}")
    return None


def _share(payload, src: int = 0):
    """`payload` of rank `src` on every rank (a world of one: as is)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return payload
    box = [payload]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_init(cfg: Config, reference, *, max_tokens: int = DEFAULT_MAX_TOKENS,
               log: Callable[[str], None] = lambda text: None) -> InitCheckResult:
    """Collective (every rank of the run's launch): the step-0 check; the same InitCheckResult on every rank.

    `log` receives progress lines on rank 0. Bad input (no init_from, an unreadable checkpoint or data) raises
    InputError on every rank; a fault the check finds is a result with passed False (exit_code 5)."""
    started = time.perf_counter()
    _require_init_from(cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    say = log if rank == 0 else (lambda text: None)
    model_cfg = build_schedule(cfg)[0].model_cfg
    p = cfg.parallel
    world = dist.get_world_size() if dist.is_initialized() else 1
    init_from = cfg.training.init_from
    result = InitCheckResult(passed=False, reference=f"{reference.name}: {reference.describe(model_cfg)}",
                             run=f"{cfg.run_dir}: {_layout(cfg, world // (p.tensor * p.pipeline * p.context))}, "
                                 f"{cfg.training.precision} precision, init_from {init_from}",
                             vocab_size=model_cfg.vocab_size)
    result.data, fatal = separator_finding(cfg)
    mismatches = reference.mismatches(model_cfg)
    if mismatches or fatal:
        result.failure = (f"the run's model is not the reference's: {'; '.join(mismatches)}" if mismatches
                          else f"data: {result.data}")
        result.seconds = time.perf_counter() - started
        return result
    result.notes += reference.notes(model_cfg)

    first = first_forward(cfg, max_tokens, log=say)
    result.run = f"{cfg.run_dir}: {first.layout}, {_dtype_name(first.dtype)}, init_from {first.source}"
    result.megatron_loss, result.tokens = first.loss, first.tokens
    result.samples, result.seq_length = first.samples, first.seq_length
    verdict: Optional[tuple] = None
    if rank == 0:
        try:
            verdict = _reference_side(reference, model_cfg, first, say)
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, or they wait in the broadcast
            bad_input = isinstance(err, InputError)  # the same message on every rank: reported once per node
            verdict = ("error", bad_input, str(err) if bad_input else f"the reference failed: {type(err).__name__}: "
                                                                      f"{err}")
            _share(verdict)
            raise
    verdict = _share(verdict)
    if verdict[0] == "error":  # (rank 0 raised its own error above)
        raise (InputError if verdict[1] else RuntimeError)(verdict[2])
    _, result.reference_loss, result.reference_tokens, result.documents, description, rtol, why = verdict
    result.reference = f"{reference.name}: {description}"
    result.rtol, result.rtol_why = rtol, why
    result.failure = _failure(result)
    result.passed = result.failure is None
    uniform = math.log(max(result.vocab_size, 2))
    if result.passed and result.reference_loss > 0.5 * uniform:  # equal, but not a trained model's on its text
        result.notes.append(f"the loss is above ln(vocab)/2 = {uniform / 2:.2f}, high for a trained model on text of "
                            f"its own tokenizer (1.5-3.5 is usual): was the data made with this model's tokenizer "
                            f"(harpe-preprocess --tokenizer-model)?")
    result.seconds = time.perf_counter() - started
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _reference_side(reference, model_cfg, first: FirstForward, say) -> tuple:
    """Rank 0: the reference model on the compared samples; ("ok", loss, tokens, documents, description, rtol, why)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        dtype = first.dtype
    else:
        device, dtype = torch.device("cpu"), torch.float32
    say(f"reference: loading {reference.name} ({_dtype_name(dtype)} on {device.type})")
    model = reference.load(model_cfg, dtype, device)
    say(f"reference: {len(first.batch.segments())} sequence(s)")
    loss_sum, tokens = reference_loss(model, first.batch, device)
    del model
    documents = len(first.batch.segments()) if first.batch.document_mask else None
    rtol, why = tolerance(first.dtype, dtype)
    description = f"{reference.describe(model_cfg)}, {_dtype_name(dtype)} on {device.type}"
    return ("ok", loss_sum / tokens if tokens else float("nan"), tokens, documents, description, rtol, why)
