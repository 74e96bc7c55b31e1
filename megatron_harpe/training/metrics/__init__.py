"""Training observability: model FLOPs, peak memory, and the per-iteration metrics logger.

The outputs, all written by the *logging rank* only (other ranks never create a file):

* stdout: one line per logged interval (``console``), plus a tqdm bar when stderr is a terminal;
* ``<run_dir>/metrics.jsonl``: one JSON object per line, flushed as written (``jsonl``);
* ``<run_dir>/tensorboard``: the same metrics as TensorBoard scalars, when installed (``tensorboard``).
* Weights & Biases: the same metrics as a W&B run, when ``logging.wandb.project`` is set (``wandb``).

The numbers come from pure modules with no I/O (``flops``, ``window``), so the arithmetic can be
tested without a run directory; ``logger.MetricsLogger`` wires them to the writers.
"""
from megatron_harpe.training.metrics.console import summary_line
from megatron_harpe.training.metrics.flops import flops_per_token_breakdown, mfu, model_flops_per_token
from megatron_harpe.training.metrics.logger import MetricsLogger
from megatron_harpe.training.metrics.memory import device_peak_memory_bytes

__all__ = [
    "flops_per_token_breakdown",
    "model_flops_per_token",
    "mfu",
    "device_peak_memory_bytes",
    "summary_line",
    "MetricsLogger",
]
