"""Training observability: model FLOPs, peak memory, and the per-iteration metrics logger.

Three outputs, all written by the *logging rank* only (other ranks never create a file):

* stdout: one line per logged interval, e.g.
  ``iter 120/1000 | loss 2.3145 | lr 1.20e-05 | grad norm 0.842 | 12,345 tok/s | 98.3 TFLOP/s/dev |
  MFU 9.9% | mem 61.2 GiB | 1.84 s/it``
* ``<run_dir>/metrics.jsonl``: one JSON object per line, flushed after every write so a script can
  ``tail -f`` it while the job runs (see :class:`MetricsLogger` for the keys and the resume rule).
* ``<run_dir>/tensorboard``: the same metrics as TensorBoard scalars, when ``tensorboard`` is installed.

A tqdm progress bar is drawn on stderr, and only when stderr is a terminal: batch jobs and CI logs
(where stderr is a file or a pipe) get the plain stdout lines and no carriage-return noise.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from typing import Any

__all__ = [
    "flops_per_token_breakdown",
    "model_flops_per_token",
    "device_peak_memory_bytes",
    "format_summary",
    "MetricsLogger",
]

GiB = float(1 << 30)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------
def flops_per_token_breakdown(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    vocab_size: int,
    seq_length: int,
    gated_linear_unit: bool = True,
    causal: bool = True,
    kv_channels: int | None = None,
) -> dict[str, float]:
    """Training FLOPs per token of a Llama-style decoder, split by component.

    Returns a dict with the keys ``qkv_projection``, ``output_projection``, ``mlp``, ``attention``
    (the score/value matmuls, quadratic in the sequence length), ``lm_head`` and ``total``, each
    already multiplied by 3 for training (see :func:`model_flops_per_token` for the formula).
    """
    for name, value in (
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("ffn_hidden_size", ffn_hidden_size),
        ("num_attention_heads", num_attention_heads),
        ("num_query_groups", num_query_groups),
        ("vocab_size", vocab_size),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"model_flops_per_token: {name}={value!r} must be a positive integer")
    if int(seq_length) != seq_length or seq_length < 0:
        raise ValueError(f"model_flops_per_token: seq_length={seq_length!r} must be an integer >= 0")
    if num_attention_heads % num_query_groups:
        raise ValueError(
            f"model_flops_per_token: num_attention_heads={num_attention_heads} is not a multiple of "
            f"num_query_groups={num_query_groups}; set num_query_groups to a divisor of the head count"
        )
    if kv_channels is None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"model_flops_per_token: hidden_size={hidden_size} is not a multiple of "
                f"num_attention_heads={num_attention_heads}; pass kv_channels (the head dimension) explicitly"
            )
        kv_channels = hidden_size // num_attention_heads

    h, f, s, d = float(hidden_size), float(ffn_hidden_size), float(seq_length), float(kv_channels)
    a, g, L, V = float(num_attention_heads), float(num_query_groups), float(num_layers), float(vocab_size)
    fwd_to_train = 3.0  # forward + backward (grad wrt activations and wrt weights: 2x forward)

    qkv = 2.0 * h * (a * d + 2.0 * g * d)
    out = 2.0 * (a * d) * h
    mlp = 2.0 * h * f * (3.0 if gated_linear_unit else 2.0)
    attn = 2.0 * 2.0 * a * d * s * (0.5 if causal else 1.0)
    head = 2.0 * h * V

    parts = {
        "qkv_projection": fwd_to_train * L * qkv,
        "output_projection": fwd_to_train * L * out,
        "mlp": fwd_to_train * L * mlp,
        "attention": fwd_to_train * L * attn,
        "lm_head": fwd_to_train * head,
    }
    parts["total"] = sum(parts.values())
    return parts


def model_flops_per_token(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    vocab_size: int,
    seq_length: int,
    gated_linear_unit: bool = True,
    causal: bool = True,
    kv_channels: int | None = None,
) -> float:
    """Training FLOPs per token (forward + backward = 3x the forward matmul FLOPs) of a Llama-style decoder.

    Notation: ``L`` layers, ``h`` hidden size, ``f`` FFN hidden size, ``a`` attention heads, ``g`` query
    (K/V) groups, ``d`` head dimension (``kv_channels``, default ``h / a``), ``V`` vocabulary size,
    ``s`` sequence length. A matmul of an ``[m, k]`` by a ``[k, n]`` matrix costs ``2*m*k*n`` FLOPs (one
    multiply and one add per multiply-accumulate). Forward FLOPs per token::

        per layer:
          QKV projection (GQA)   2 * h * (a*d + 2*g*d)
          output projection      2 * a*d * h
          MLP                    2 * h * f * 3          (gated / SwiGLU: gate, up, down)
                                 2 * h * f * 2          (gated_linear_unit=False: up, down)
          attention matmuls      2 * 2 * a*d * s * c    (Q K^T scores and P V; c = 1/2 if causal else 1)
        LM head (once)           2 * h * V

        training = 3 * (L * per_layer + LM head)

    Causal attention (``c = 1/2``) counts only the half of the score matrix that is actually computed,
    the convention FlashAttention (and most MFU reports based on it) uses; Megatron-LM's own
    ``num_floating_point_operations`` counts the full ``s x s`` square even for causal models, so its
    numbers are higher by ``3 * L * 2*a*d*s`` per token. Pass ``causal=False`` to get that convention.

    Not counted (all O(h) per token, well under 1% at Llama sizes): norms, activations, softmax, rotary
    embedding, residual adds, the embedding lookup (a gather, no matmul) and the loss. Without the
    attention term this is ``6 * N_matmul`` with ``N_matmul`` the number of weights used in matmuls
    (all parameters except the input embedding and the norm weights), i.e. the familiar ``6 * N``.

    ``seq_length`` is the length the attention actually spans (the packed sequence length; with context
    parallelism still the full, not the per-rank, length). ``kv_channels`` is an optional extension for
    models whose head dimension is not ``h / a``.
    """
    return flops_per_token_breakdown(
        num_layers,
        hidden_size,
        ffn_hidden_size,
        num_attention_heads,
        num_query_groups,
        vocab_size,
        seq_length,
        gated_linear_unit=gated_linear_unit,
        causal=causal,
        kv_channels=kv_channels,
    )["total"]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def device_peak_memory_bytes() -> int:
    """Peak memory of this process in bytes.

    On a GPU process (CUDA available and already initialised by this process): the caching allocator's
    ``torch.cuda.max_memory_allocated()`` for the current device. Otherwise (CPU runs) the process's peak
    resident set size from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which Linux reports in KiB
    (macOS in bytes). The CUDA check never initialises CUDA itself, so calling this on a CPU rank of a
    machine with GPUs does not create a context.
    """
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    except Exception:  # pragma: no cover - a broken CUDA install must not break logging
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# --------------------------------------------------------------------------------------------
# Logger
# --------------------------------------------------------------------------------------------
METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"

# The keys every iteration record has; `extra` may not reuse them.
_RECORD_KEYS = (
    "iteration",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tflops_per_device",
    "mfu",
    "peak_memory_bytes",
    "seconds_per_iteration",
)
_RESERVED_KEYS = frozenset(_RECORD_KEYS) | {"time", "event", "nonfinite", "nonfinite_keys"}

# TensorBoard tag for each record key (the iteration is the step).
_TB_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "throughput/tokens_per_s",
    "tflops_per_device": "throughput/tflops_per_device",
    "mfu": "throughput/mfu",
    "peak_memory_bytes": "memory/peak_memory_bytes",
    "seconds_per_iteration": "time/seconds_per_iteration",
}

_tensorboard_warned = False


def _warn_no_tensorboard(reason: str) -> None:
    global _tensorboard_warned
    if not _tensorboard_warned:
        _tensorboard_warned = True
        warnings.warn(
            f"TensorBoard logging is off: {reason}. Metrics still go to stdout and metrics.jsonl; "
            "`pip install tensorboard` (or pass tensorboard=False) to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )


def _to_plain(value: Any) -> Any:
    """Python scalars for JSON: unwrap numpy/torch 0-d values, recurse into containers."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except Exception:
            pass
    return str(value)


def _json_safe(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Replace non-finite floats by None (JSON has no NaN/inf); return the record and the keys hit."""
    bad: list[str] = []

    def fix(key: str, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, dict):
            return {k: fix(f"{key}.{k}", v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(f"{key}[{i}]", v) for i, v in enumerate(value)]
        return value

    out = {k: fix(k, v) for k, v in record.items()}
    return out, bad


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MetricsLogger:
    """Per-iteration training metrics on stdout, TensorBoard and ``run_dir/metrics.jsonl``.

    Call :meth:`log_iteration` every iteration on every rank; on ranks with ``is_logging_rank=False``
    every method returns at once and nothing is created on disk (``summary()`` returns the keys with
    ``None`` values). ``tokens``, ``flops`` and ``elapsed_s`` describe one iteration of the whole job
    (all ranks together); ``world_size`` divides the FLOP rate into a per-device number.

    **Intervals.** A line is written when ``iteration % interval == 0``, at ``iteration ==
    total_iterations``, and by :meth:`close` for a partial interval left over (a run stopped early).
    A line covers every iteration since the previous line:

    * ``loss`` and ``grad_norm``: means over the interval (``grad_norm`` over the iterations that gave
      one; ``None`` if none did). A non-finite loss anywhere in the interval makes the mean non-finite,
      so a NaN is never averaged away.
    * ``lr``: the value at the logged iteration (averaging a schedule would describe no step).
    * ``tokens_per_s`` = sum(tokens) / sum(elapsed_s); ``tflops_per_device`` = sum(flops / world_size) /
      sum(elapsed_s) / 1e12; ``seconds_per_iteration`` = sum(elapsed_s) / iterations in the interval;
      ``mfu`` = tflops_per_device / peak_tflops_per_device (``None`` without a peak).
    * ``peak_memory_bytes``: :func:`device_peak_memory_bytes` at the time of the line (process peak).
    * ``extra``: the dicts passed during the interval merged in order (later values win), so a value
      given on a non-logged iteration (say an eval loss) still reaches the next line. Its keys may not
      reuse the standard ones. Numeric extras also become TensorBoard scalars under ``extra/<key>``.

    **metrics.jsonl.** Each iteration line is a JSON object with ``iteration``, ``loss``, ``lr``,
    ``grad_norm``, ``tokens_per_s``, ``tflops_per_device``, ``mfu``, ``peak_memory_bytes``,
    ``seconds_per_iteration``, ``time`` (Unix seconds) and the ``extra`` keys. Non-finite values
    (NaN/inf) are written as ``null`` and the record gets ``"nonfinite": true`` and ``"nonfinite_keys":
    [...]``. :meth:`log_event` writes ``{"event": message, "iteration": <last iteration seen>, "time": ...}``.

    **Resume.** The file is opened in append mode, so a resumed run continues it. On open, every record
    whose ``iteration`` is greater than ``start_iteration`` (the iteration of the checkpoint being resumed)
    is dropped, as is a torn last line: those came from an attempt that crashed after its last checkpoint,
    and this run is about to redo those iterations. Events carry an iteration for exactly this reason:
    an event logged after iteration 150 by a crashed attempt goes too, one logged at or before the
    checkpoint stays. The file is rewritten (via a temporary file and an atomic rename) only when
    something is dropped. A fresh run (``start_iteration=0``) in an old run directory therefore starts an
    empty history. TensorBoard gets the same rule through ``SummaryWriter(purge_step=start_iteration + 1)``,
    which makes TensorBoard hide the older event files' steps after ``start_iteration``.

    **Progress bar.** With ``progress_bar=True`` a tqdm bar is drawn on stderr only when stderr is a TTY
    (interactive runs); batch jobs and CI, whose stderr is a file or a pipe, get no bar. stdout lines are
    printed through ``tqdm.write`` while a bar is up, so the two do not garble each other.
    """

    def __init__(
        self,
        run_dir: str,
        *,
        is_logging_rank: bool,
        total_iterations: int | None,
        tensorboard: bool = True,
        progress_bar: bool = True,
        interval: int = 1,
        peak_tflops_per_device: float | None = None,
        start_iteration: int = 0,
    ):
        if int(interval) != interval or interval < 1:
            raise ValueError(f"MetricsLogger: interval={interval!r} must be an integer >= 1")
        if peak_tflops_per_device is not None and not peak_tflops_per_device > 0:
            raise ValueError(
                f"MetricsLogger: peak_tflops_per_device={peak_tflops_per_device!r} must be > 0 "
                "(the device's dense peak in TFLOP/s, e.g. 989 for an H100 SXM in bf16), or None"
            )
        if total_iterations is not None and total_iterations < 0:
            raise ValueError(f"MetricsLogger: total_iterations={total_iterations!r} must be >= 0 or None")
        if start_iteration < 0:
            raise ValueError(f"MetricsLogger: start_iteration={start_iteration!r} must be >= 0")

        self.run_dir = str(run_dir)
        self.is_logging_rank = bool(is_logging_rank)
        self.total_iterations = total_iterations
        self.interval = int(interval)
        self.peak_tflops_per_device = peak_tflops_per_device
        self.start_iteration = int(start_iteration)
        self.metrics_path = os.path.join(self.run_dir, METRICS_FILENAME)
        self.tensorboard_dir = os.path.join(self.run_dir, TENSORBOARD_DIRNAME)

        self._closed = False
        self._last_iteration = self.start_iteration
        self._created = time.time()
        self._reset_window()
        # whole-run totals, for summary()
        self._n = 0
        self._first_loss: float | None = None
        self._last_loss: float | None = None
        self._min_loss: float | None = None
        self._nonfinite_iterations = 0
        self._total_tokens = 0
        self._total_elapsed = 0.0
        self._first_iteration: int | None = None

        self._file = None
        self._writer = None
        self._bar = None
        self.dropped_on_resume = 0  # records of a crashed earlier attempt removed from metrics.jsonl
        if not self.is_logging_rank:
            return

        os.makedirs(self.run_dir, exist_ok=True)
        self.dropped_on_resume = self._truncate_for_resume()
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if self.dropped_on_resume:
            print(
                f"{self.metrics_path}: dropped {self.dropped_on_resume} record(s) after iteration "
                f"{self.start_iteration} left by an earlier attempt",
                flush=True,
            )
        if tensorboard:
            self._writer = self._open_tensorboard()
        if progress_bar and _isatty(sys.stderr):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_iterations,
                initial=self.start_iteration,
                desc="train",
                unit="it",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    # -- setup helpers ---------------------------------------------------------------------------
    def _truncate_for_resume(self) -> int:
        """Drop records of iterations after start_iteration (and torn lines); return how many."""
        if not os.path.exists(self.metrics_path):
            return 0
        kept: list[str] = []
        dropped = 0
        with open(self.metrics_path, encoding="utf-8") as fh:
            for line in fh:
                stripped = line.strip()
                if not stripped:
                    continue
                try:
                    record = json.loads(stripped)
                except json.JSONDecodeError:
                    dropped += 1  # torn write of a crashed attempt
                    continue
                it = record.get("iteration") if isinstance(record, dict) else None
                if _is_number(it) and it > self.start_iteration:
                    dropped += 1
                    continue
                kept.append(stripped + "\n")
        if dropped:
            tmp = self.metrics_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(kept)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.metrics_path)
        return dropped

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            _warn_no_tensorboard(f"the tensorboard package is not installed ({exc})")
            return None
        return SummaryWriter(log_dir=self.tensorboard_dir, purge_step=self.start_iteration + 1)

    def _reset_window(self) -> None:
        self._w_n = 0
        self._w_loss = 0.0
        self._w_grad = 0.0
        self._w_grad_n = 0
        self._w_tokens = 0
        self._w_elapsed = 0.0
        self._w_flops_per_dev = 0.0
        self._w_lr = float("nan")
        self._w_extra: dict[str, Any] = {}

    # -- per iteration ---------------------------------------------------------------------------
    def log_iteration(
        self,
        iteration: int,
        *,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens: int,
        elapsed_s: float,
        flops: float,
        world_size: int,
        extra: dict | None = None,
    ) -> None:
        """Record one finished iteration; writes a line every ``interval`` iterations (see class doc)."""
        if not self.is_logging_rank:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log_iteration called after close()")
        if extra:
            clash = _RESERVED_KEYS.intersection(extra)
            if clash:
                raise ValueError(
                    f"MetricsLogger.log_iteration: extra keys {sorted(clash)} reuse standard metric names; "
                    "rename them (e.g. with a prefix)"
                )
            self._w_extra.update(extra)

        loss = float(loss)
        self._w_n += 1
        self._w_loss += loss
        if grad_norm is not None:
            self._w_grad += float(grad_norm)
            self._w_grad_n += 1
        self._w_tokens += int(tokens)
        self._w_elapsed += float(elapsed_s)
        self._w_flops_per_dev += float(flops) / max(int(world_size), 1)
        self._w_lr = float(lr)
        self._last_iteration = int(iteration)

        # whole-run totals
        if self._first_iteration is None:
            self._first_iteration = int(iteration)
            self._first_loss = loss
        self._n += 1
        self._last_loss = loss
        if math.isfinite(loss):
            self._min_loss = loss if self._min_loss is None else min(self._min_loss, loss)
        else:
            self._nonfinite_iterations += 1
        self._total_tokens += int(tokens)
        self._total_elapsed += float(elapsed_s)

        if self._bar is not None:
            self._bar.update(max(int(iteration) - self._bar.n, 0))

        last = self.total_iterations is not None and iteration >= self.total_iterations
        if iteration % self.interval == 0 or last:
            self._write_window(int(iteration))

    def _window_record(self, iteration: int) -> dict[str, Any]:
        n = self._w_n
        elapsed = self._w_elapsed
        tflops = self._w_flops_per_dev / elapsed / 1e12 if elapsed > 0 else None
        record: dict[str, Any] = {
            "iteration": iteration,
            "loss": self._w_loss / n,
            "lr": self._w_lr,
            "grad_norm": self._w_grad / self._w_grad_n if self._w_grad_n else None,
            "tokens_per_s": self._w_tokens / elapsed if elapsed > 0 else None,
            "tflops_per_device": tflops,
            "mfu": (tflops / self.peak_tflops_per_device)
            if (tflops is not None and self.peak_tflops_per_device)
            else None,
            "peak_memory_bytes": device_peak_memory_bytes(),
            "seconds_per_iteration": elapsed / n,
            "time": time.time(),
        }
        record.update(_to_plain(self._w_extra))
        return record

    def _write_window(self, iteration: int) -> None:
        if self._w_n == 0:
            return
        record = self._window_record(iteration)
        self._emit_line(self.format_line(record))
        self._write_tensorboard(record)
        safe, bad = _json_safe(record)
        if bad:
            safe["nonfinite"] = True
            safe["nonfinite_keys"] = bad
        self._write_json(safe)
        if self._bar is not None and record["loss"] is not None:
            self._bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)
        self._reset_window()

    def format_line(self, record: dict[str, Any]) -> str:
        """The stdout line for one record (an interval's averaged metrics)."""
        total = f"/{self.total_iterations}" if self.total_iterations is not None else ""
        parts = [f"iter {record['iteration']}{total}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
        if record.get("grad_norm") is not None:
            parts.append(f"grad norm {record['grad_norm']:.3f}")
        if record.get("tokens_per_s") is not None:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if record.get("tflops_per_device") is not None:
            tflops = record["tflops_per_device"]
            # CPU and tiny models run at GFLOP/s: keep the number readable instead of "0.0 TFLOP/s"
            parts.append(f"{tflops:.1f} TFLOP/s/dev" if tflops >= 1.0 else f"{tflops * 1e3:.2f} GFLOP/s/dev")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100.0 * record['mfu']:.1f}%")
        parts.append(f"mem {record['peak_memory_bytes'] / GiB:.1f} GiB")
        parts.append(f"{record['seconds_per_iteration']:.2f} s/it")
        return " | ".join(parts)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = record["iteration"]
        for key, tag in _TB_TAGS.items():
            value = record.get(key)
            if value is not None:
                self._writer.add_scalar(tag, float(value), step)
        for key, value in self._w_extra.items():
            value = _to_plain(value)
            if _is_number(value):
                self._writer.add_scalar(f"extra/{key}", float(value), step)
        self._writer.flush()

    # -- output helpers --------------------------------------------------------------------------
    def _emit_line(self, line: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def _write_json(self, record: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    # -- public extras ---------------------------------------------------------------------------
    def log_event(self, message: str) -> None:
        """A free-form line on stdout and ``{"event": message, "iteration": ..., "time": ...}`` in the jsonl."""
        if not self.is_logging_rank:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log_event called after close()")
        self._emit_line(str(message))
        self._write_json({"event": str(message), "iteration": self._last_iteration, "time": time.time()})

    def summary(self) -> dict[str, Any]:
        """Whole-run numbers over every iteration this logger saw (not only the logged ones).

        Keys: ``iterations`` (count), ``first_iteration``, ``last_iteration``, ``first_loss``, ``last_loss``,
        ``min_loss`` (over finite losses), ``nonfinite_iterations``, ``total_tokens``,
        ``mean_tokens_per_s`` (total tokens / total step time, i.e. time-weighted), ``total_time_s`` (sum of
        the iterations' ``elapsed_s``), ``wall_time_s`` (since the logger was created) and
        ``peak_memory_bytes``. On a non-logging rank every value is ``None``.
        """
        keys = (
            "iterations",
            "first_iteration",
            "last_iteration",
            "first_loss",
            "last_loss",
            "min_loss",
            "nonfinite_iterations",
            "total_tokens",
            "mean_tokens_per_s",
            "total_time_s",
            "wall_time_s",
            "peak_memory_bytes",
        )
        if not self.is_logging_rank:
            return dict.fromkeys(keys)
        return {
            "iterations": self._n,
            "first_iteration": self._first_iteration,
            "last_iteration": self._last_iteration if self._n else None,
            "first_loss": self._first_loss,
            "last_loss": self._last_loss,
            "min_loss": self._min_loss,
            "nonfinite_iterations": self._nonfinite_iterations,
            "total_tokens": self._total_tokens,
            "mean_tokens_per_s": self._total_tokens / self._total_elapsed if self._total_elapsed > 0 else None,
            "total_time_s": self._total_elapsed,
            "wall_time_s": time.time() - self._created,
            "peak_memory_bytes": device_peak_memory_bytes(),
        }

    def close(self) -> None:
        """Write a partial interval if one is pending, then close the bar, TensorBoard and the jsonl file.

        Safe to call more than once, and on non-logging ranks.
        """
        if self._closed or not self.is_logging_rank:
            self._closed = True
            return
        try:
            self._write_window(self._last_iteration)
        finally:
            self._closed = True
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_summary(summary: dict[str, Any]) -> str:
    """One line for the end of a run, from :meth:`MetricsLogger.summary`."""
    if not summary.get("iterations"):
        return "no iterations run"

    def loss(v):
        return "n/a" if v is None else f"{v:.4f}"

    tps = summary.get("mean_tokens_per_s")
    parts = [
        f"{summary['iterations']} iterations ({summary['first_iteration']}..{summary['last_iteration']})",
        f"loss {loss(summary['first_loss'])} -> {loss(summary['last_loss'])} (min {loss(summary['min_loss'])})",
        f"{tps:,.0f} tok/s" if tps is not None else "tok/s n/a",
        f"{summary['total_time_s']:.1f} s",
        f"peak mem {summary['peak_memory_bytes'] / GiB:.1f} GiB",
    ]
    if summary.get("nonfinite_iterations"):
        parts.append(f"{summary['nonfinite_iterations']} non-finite losses")
    return " | ".join(parts)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:
        return False
