"""Weights & Biases: the metrics lines as a W&B run, the iteration as the W&B step.

Optional: on only when ``logging.wandb.project`` is set (and ``mode`` is not ``disabled``), and ``wandb`` is
imported only then, inside :meth:`WandbWriter.open`. Config validation has already refused a config that
turns W&B on without the package installed (config/validate.py), so a missing package cannot surface
here, on one rank, after the model is built.

**What goes to W&B.** Each metrics line, under the TensorBoard tag names (``train/loss``, ``train/lr``,
``train/grad_norm``, ``throughput/tokens_per_s``, ``throughput/mfu``, ``memory/peak_memory_bytes``, ...;
numeric ``extra`` keys as ``extra/<key>``), so the two UIs show the same names; ``step`` is the iteration.
The run config is the whole resolved config (what ``<run_dir>/config.yaml`` holds). Events (start, stage
boundaries, the final line) are not history, which W&B keeps for numbers per step: the latest one is in
the run summary as ``last_event``, the full list stays in metrics.jsonl. At the end the run summary gets
the logger's :meth:`~.logger.MetricsLogger.summary` as ``launch/<key>`` and the one-line summary as
``launch/summary_line``: like the stdout summary they describe this launch, so after a resume they cover
the iterations since the checkpoint.

**Resume continues the same W&B run.** The run id is kept in ``<run_dir>/wandb_run_id`` (written atomically
on the first start) and passed with ``resume="allow"`` when the run resumes from a checkpoint. Like
metrics.jsonl, a run that starts at iteration 0 starts a new history, so a fresh start in an old run
directory gets a new id. W&B only accepts increasing steps: when an attempt crashed after its last
checkpoint, its later steps are already in the online run and W&B would drop the repeated ones with a
warning per call, so they are left out here with one line saying so (resume is exact, so the losses are
the ones already shown). An offline run writes one ``offline-run-*`` directory per launch under
``<dir>/wandb``; ``wandb sync`` on all of them uploads them into the one run, in order.

**Quiet.** W&B's own terminal output (banner, sync hints, URLs) is off (``silent``), and so is its copy of
the console (``console="off"``: the job's log already has stdout, and wrapping stdout would interleave
with the progress bar). One line of ours says where the run is. System metrics (GPU use, power) stay on.

**W&B never stops training.** If an online start fails (not logged in, no network on compute nodes), the
run is logged offline under the same id instead, to upload later; if that fails too, or a later call
raises, a warning says so once and W&B is off for the rest of the launch. metrics.jsonl has every number.
"""
from __future__ import annotations

import os
import secrets
import string
import warnings
from pathlib import Path
from typing import Any, Mapping

from megatron_harpe.files import atomic_write_text
from megatron_harpe.training.metrics.tensorboard import TAGS
from megatron_harpe.training.metrics.values import is_number, to_plain

__all__ = ["WANDB_ID_FILENAME", "WandbWriter", "run_id_for"]

WANDB_ID_FILENAME = "wandb_run_id"
_ID_ALPHABET = string.ascii_lowercase + string.digits  # what W&B's own generated ids use


def run_id_for(run_dir: str | os.PathLike, start_iteration: int) -> str:
    """The W&B run id of this launch: the stored one when resuming, a new stored one when starting.

    A resumed run (``start_iteration > 0``) reuses ``<run_dir>/wandb_run_id`` when present (a run that
    turned W&B on after its start gets one now). A start from iteration 0 always writes a new id: it
    begins a new history, as metrics.jsonl does.
    """
    path = Path(run_dir) / WANDB_ID_FILENAME
    if start_iteration > 0 and path.is_file():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbWriter:
    """An open W&B run that knows the tags; make one with :meth:`open`."""

    def __init__(self, run, first_step: int, note: str):
        self._run = run
        self._first_step = int(first_step)  # W&B's next step: lower ones would be dropped (module doc)
        self.note = note  # the one line saying where the run is

    @classmethod
    def open(cls, settings, *, run_dir: str, start_iteration: int,
             run_config: Mapping[str, Any] | None) -> "WandbWriter | None":
        """Start (or resume) the run described by ``settings`` (a ``logging.wandb`` WandbConfig).

        Returns ``None`` after a warning when neither an online nor an offline start works (module doc).
        """
        import wandb

        run_id = run_id_for(run_dir, start_iteration)
        kwargs = dict(
            project=settings.project, entity=settings.entity, name=settings.name or Path(run_dir).resolve().name,
            group=settings.group, tags=list(settings.tags) or None, dir=str(settings.dir or run_dir),
            id=run_id, resume="allow", job_type="train", config=to_plain(dict(run_config or {})),
        )
        os.makedirs(kwargs["dir"], exist_ok=True)
        quiet = dict(silent=True, console="off")
        fallback, mode = "", settings.mode
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(**quiet), **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to start: see the module doc
            if settings.mode != "online":
                _warn(f"could not start the offline run ({type(exc).__name__}: {exc})")
                return None
            fallback = f"; the online start failed ({type(exc).__name__}: {exc}), so this launch logs offline"
            mode = "offline"
            try:
                run = wandb.init(mode=mode, settings=wandb.Settings(**quiet), **kwargs)
            except Exception as exc2:  # noqa: BLE001
                _warn(f"could not start it online ({exc}) nor offline ({type(exc2).__name__}: {exc2})")
                return None
        if mode == "offline":
            where = (f"offline in {Path(run.dir).parent}; upload with: wandb sync "
                     f"{Path(kwargs['dir']) / 'wandb'}/offline-run-*-{run.id}")
        else:
            where = run.url or "online"
        try:
            first_step = int(run.step)
        except Exception:  # noqa: BLE001 - only a hint for skipping repeated steps
            first_step = 0
        note = f"W&B run {run.id} ({settings.project}): {where}{fallback}"
        if first_step > start_iteration + 1:
            note += (f"; it already has steps up to {first_step - 1} from an attempt that crashed after the "
                     f"checkpoint of iteration {start_iteration}: those are not sent again")
        return cls(run, first_step, note)

    def write(self, record: dict[str, Any], extra: dict[str, Any]) -> None:
        """The record's :data:`~.tensorboard.TAGS` that have a value and each numeric ``extra`` as
        ``extra/<key>``, at ``step=record["iteration"]``."""
        if self._run is None:
            return
        data = {tag: record[key] for key, tag in TAGS.items() if record.get(key) is not None}
        data.update({f"extra/{key}": value for key, value in extra.items()})
        self.write_scalars(int(record["iteration"]), data)

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        """Numeric values under their own names at ``step`` (evaluation results: ``eval/eval_loss``, ...)."""
        if self._run is None or step < self._first_step:
            return
        data = {}
        for name, value in scalars.items():
            value = to_plain(value)
            if is_number(value):
                data[name] = value
        self._call(self._run.log, data, step=int(step))

    def log_event(self, message: str) -> None:
        """The latest event as ``last_event`` in the run summary (events are not per-step numbers)."""
        if self._run is not None:
            self._call(self._run.summary.__setitem__, "last_event", str(message))

    def close(self, summary: Mapping[str, Any] | None = None, line: str = "") -> None:
        """Put this launch's summary into the run summary and finish the run (uploads what is pending)."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            if summary is not None:
                update = {f"launch/{k}": to_plain(v) for k, v in summary.items() if v is not None}
                update["launch/summary_line"] = line
                run.summary.update(update)
            run.finish()
        except Exception as exc:  # noqa: BLE001
            _warn(f"finishing the run failed ({type(exc).__name__}: {exc})")

    def _call(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see the module doc: W&B never stops training
            run, self._run = self._run, None
            _warn(f"{type(exc).__name__}: {exc}; W&B is off for the rest of this launch")
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass


def _warn(reason: str) -> None:
    warnings.warn(f"Weights & Biases logging: {reason}. Metrics still go to stdout and metrics.jsonl.",
                  RuntimeWarning, stacklevel=3)
