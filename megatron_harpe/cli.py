"""The contract every `harpe-*` command keeps: exit codes, how a failure is reported, quiet output.

| exit | meaning | printed |
|------|---------|---------|
| 0    | done | the tool's one-line summary |
| 1    | internal error (a bug, or the machine failed) | the traceback; harpe-train when a rank was lost: one line naming it (rank, host, pid), from one survivor |
| 2    | bad input: config, flags, files, checkpoints (missing, truncated, corrupt, another model) | one paragraph naming the input and the fix; a traceback only with --debug or HARPE_DEBUG=1 |
| 3    | harpe-train: non-finite loss; the last good checkpoint is kept | the reason |
| 4    | no space or quota left for an output (ENOSPC, EDQUOT); the partial output is removed, the previous one kept; retrying does not help until space is freed | one paragraph: the path, the bytes needed, the bytes free |
| 5    | a check found a fault (harpe-train --check-init: the run's step-0 loss is not the reference's); nothing written | the check's table and one line saying what differs |
| 75   | harpe-train: stopped on a signal after checkpointing; requeue it (EX_TEMPFAIL) | the reason |
| 130  | interrupted (Ctrl-C, SIGTERM in the data tools); no output left behind | one line |

Why one module: a cluster operator scripts around exit codes (train.sbatch requeues on 75 only,
never on 2, 3 or 4), and an error that arrives as a traceback per rank at 3 a.m. is not read. Every
command's `main` runs through `run_command`, which maps exceptions to codes: the error types in
`INPUT_ERRORS` (each package's own "bad input" type derives from `InputError` or is listed) are
reported as one paragraph, printed once per job on a node even when every rank hits it.

Known upstream warnings (`KNOWN_WARNINGS`, each with why it is harmless here) are silenced at the
commands' entry points unless --verbose or HARPE_VERBOSE=1.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import traceback
import warnings
from typing import Callable, Iterable, Tuple, Type

EXIT_DONE = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_NONFINITE_LOSS = 3
EXIT_NO_SPACE = 4
EXIT_CHECK_FAILED = 5
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad input (config, flags, files, checkpoints): exit 2; the message names the input and the fix."""


class NoSpaceError(OSError):
    """An output that did not fit its filesystem or quota: exit 4, one paragraph with the path, the bytes
    needed and free. Its own code because a scheduler must not requeue it: a full disk does not heal by
    retrying (slurm/train.sbatch)."""


#: Upstream warnings the commands silence (regex on the message, category, why it is harmless here).
KNOWN_WARNINGS: Tuple[Tuple[str, Type[Warning], str], ...] = (
    (r"Transformer Engine and Apex are not installed", UserWarning,
     "on CPU and GPU nodes without TE megatron-core falls back to torch kernels, which is the configured path"),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning,
     "this project brings its own RMSNorm (models/norm.py); megatron-core's torch norm is not used"),
    (r"full scope is deprecated\. Use empty cuda_graph_(scope|modules)", UserWarning,
     "megatron-core's own TransformerConfig default triggers it (0.16.1: cuda_graph_scope, 0.19: "
     "cuda_graph_modules); CUDA graphs are not used"),
    (r"MimoModelConfig is experimental", UserWarning,
     "printed when megatron-core 0.19 is imported; the multimodal model is not used"),
    (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single "
     r"process", UserWarning,
     "megatron-core 0.19 reads a checkpoint's common state with torch.distributed.checkpoint.load(no_dist=True) "
     "on purpose (models/checkpoint.py read_common_state)"),
    (r"The argument order of load has been changed", UserWarning,
     "raised by torch.distributed.checkpoint inside megatron-core 0.19's common-state reader"),
    (r"CUDA_DEVICE_MAX_CONNECTIONS", UserWarning,
     "only matters for TP communication overlap on GPUs, which this project does not enable"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     "megatron-core 0.16.1's torch_dist checkpoints are built on ShardedTensor; nothing to do on our side"),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning,
     "raised inside megatron-core 0.16.1's checkpoint loader"),
    (r"TypedStorage is deprecated", UserWarning, "raised inside torch.distributed.checkpoint"),
    (r"If you are using transformer_engine as the transformer implementation, the core_attn is from "
     r"transformer_engine", UserWarning,
     "megatron-core's TransformerConfig says it for any selective core_attn recompute; with the local spec the "
     "SDPA core attention is ours and recomputing it is what the config asks for"),
)


#: Upstream log records (not Python warnings) the commands silence: (logger, regex on the message, why).
KNOWN_LOG_MESSAGES: Tuple[Tuple[str, str, str], ...] = (
    ("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED",
     "megatron-core 0.19 logs it for every GPTModel; this project stays on GPTModel for now "
     "(docs/architecture.md, 'GPTModel or HybridModel' says why and what would change that)"),
    ("megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated",
     "megatron-core 0.19 logs it from its SYNCHRONOUS save too (the sync path calls async_save with "
     "async_strategy='mcore'); this project saves synchronously (docs/architecture.md, 'Checkpoint saving')"),
    ("megatron.core.dist_checkpointing.strategies.common", r"(load|save)_common is deprecated",
     "megatron-core 0.19 logs it whenever it reads or writes a torch_dist checkpoint's common.pt (checkpoints "
     "written by 0.16 have one), once per load: megatron-to-hf loads a layer at a time, so it said it 33 times "
     "for SmolLM2; the file is read and written as before"),
    ("megatron.core.distributed.distributed_data_parallel", r"full_param_layout not provided",
     "megatron-core 0.19's DDP computes the distributed optimizer's parameter layout itself when not handed one; "
     "the same layout, nothing to do"),
)


class _DropKnownRecords:
    def __init__(self, pattern: str):
        import re

        self.pattern = re.compile(pattern)

    def filter(self, record) -> bool:
        return not self.pattern.search(record.getMessage())


def verbose_requested(argv: Iterable[str] = ()) -> bool:
    return "--verbose" in argv or os.environ.get("HARPE_VERBOSE", "") == "1"


def debug_requested(argv: Iterable[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("HARPE_DEBUG", "") == "1"


def silence_known_warnings() -> None:
    """Filter KNOWN_WARNINGS in this process and, through PYTHONWARNINGS, in the processes it starts."""
    import logging

    for pattern, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
    for logger_name, pattern, _ in KNOWN_LOG_MESSAGES:
        logging.getLogger(logger_name).addFilter(_DropKnownRecords(pattern))
    os.environ["HARPE_QUIET_WARNINGS"] = "1"  # read by child processes that call setup_output()


def setup_output(argv: Iterable[str] = ()) -> None:
    """What every entry point calls first: known warnings silenced unless --verbose/HARPE_VERBOSE=1."""
    argv = list(argv)
    if not verbose_requested(argv):
        silence_known_warnings()


def _job_key() -> str | None:
    """What the processes of one launch on one node share, and no other launch does."""
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ['SLURM_STEP_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun's workers on a node share their agent (the parent)
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}-{os.getppid()}"
    return None


def first_on_this_node(message: str) -> bool:
    """True for the first process of this launch on this node that reports `message`: every rank of a
    torchrun/srun step hits the same config or checkpoint error, and the operator needs to read it once."""
    key = _job_key()
    if key is None:
        return True
    digest = hashlib.sha1(f"{key}|{message}".encode()).hexdigest()[:20]
    marker = os.path.join(tempfile.gettempdir(), f"harpe-reported-{digest}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:  # no writable temp dir: rather twice than never
        return True


def report_input_error(prog: str, err: BaseException, argv: Iterable[str] = ()) -> int:
    message = f"{prog}: error: {err}"
    if first_on_this_node(message):
        print(message, file=sys.stderr, flush=True)
        if debug_requested(argv):
            traceback.print_exception(err, file=sys.stderr)
    return EXIT_BAD_INPUT


def run_command(prog: str, main: Callable[[], int], *, input_errors: Tuple[Type[BaseException], ...] = (),
                argv: Iterable[str] = (), interrupted: str = "stopped") -> int:
    """Run a command's body under the contract above; returns its exit code."""
    argv = list(argv)
    setup_output(argv)
    try:
        return int(main() or 0)
    except (InputError, *input_errors) as err:
        return report_input_error(prog, err, argv)
    except NoSpaceError as err:
        report_input_error(prog, err, argv)
        return EXIT_NO_SPACE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
