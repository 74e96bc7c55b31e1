"""Every place where this project works around a behaviour of the installed megatron-core.

Why one module: a workaround is tied to the megatron-core releases that need it. Kept together,
each says which releases need it (`needed_on`, a PEP 440 range) and on which releases a test
showed that need (`verified_on`); the code asks `active(name)` instead of assuming. An upgrade then
shows at once what to re-check: the trainer warns at start for every workaround not verified on
the installed release, and tests/test_architecture.py fails until someone has re-checked them.

Each workaround has a test that runs the real code path with the workaround switched off
(``HARPE_COMPAT_DISABLE=name``, read here and nowhere else; it exists for those tests) and shows
the failure on every release in `needed_on`, and shows nothing changes on a release outside it
(tests/test_compat.py). When upstream fixes one, that test says so and `needed_on` is narrowed.

Supported: megatron-core 0.16.1 (the last release for Python 3.11) through 0.19.x; CI runs the
suite on 0.16.1 and on 0.19.2 (Makefile: test-stable, test-current).

Not here, because they are not version workarounds but the CPU adaptation of CUDA calls
(backends/cpu.py, used only without a GPU) or features megatron-core leaves to its users
(SDPA core attention with context parallelism, a sequence-parallel RMSNorm, building the C++
dataset helpers when a wheel lacks them: data/helpers.py).
"""
from __future__ import annotations

import inspect
import logging
import os
import signal as signal_module
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)

#: The megatron-core releases this project supports (setup.py's range) and the ones CI runs.
SUPPORTED_RELEASES = ">=0.16.1,<0.20"
TESTED_RELEASES = ("0.16.1", "0.19.2")

#: Comma-separated workaround names to switch off: only for the tests that show each one is needed.
DISABLE_VARIABLE = "HARPE_COMPAT_DISABLE"


@dataclass(frozen=True)
class Workaround:
    name: str
    why: str
    needed_on: str  # PEP 440 specifier: the megatron-core releases that need it
    verified_on: Tuple[str, ...]  # releases on which tests/test_compat.py showed the need (or its absence)


WORKAROUNDS = (
    Workaround("interleaved-pipeline-batched-p2p",
               "the interleaved (virtual pipeline) schedule with batch_p2p_comm=True silently corrupts PP=2 "
               "training (Megatron-LM issue #750): batched p2p is switched off with virtual pipeline stages",
               ">=0.16.1", ("0.16.1", "0.19.2")),
    Workaround("torch-adamw-fresh-step",
               "with the distributed optimizer, loading a checkpoint into a fresh torch AdamW (no per-parameter "
               "state yet) fails: AssertionError `len(steps) == 1` in DistributedOptimizer.state_dict, reached "
               "from sharded_state_dict(is_loading=True); every parameter gets an explicit zero step first",
               ">=0.16.1", ("0.16.1", "0.19.2")),
    Workaround("torch-adamw-shared-step",
               "with the distributed optimizer, after loading every parameter's state holds the SAME step tensor, "
               "which AdamW increments once per parameter per step (wrong bias correction after resume: the "
               "second step after resume differs): each gets its own copy",
               ">=0.16.1", ("0.16.1", "0.19.2")),
    Workaround("reshardable-optimizer-step",
               "the distributed optimizer's 'fully_reshardable' loader copies a 'step' it never saved for torch "
               "AdamW (KeyError 'step'): that parameter state is loaded with 'step' set aside. (Why that format: "
               "megatron-core's default 'fully_sharded_model_space' fails at save with 'ShardedTensor."
               "flattened_range is not supported' on 0.16.1 and 0.19.2; see optimizer_checkpoint_metadata)",
               ">=0.16.1", ("0.16.1", "0.19.2")),
    Workaround("checkpoint-writer-signals",
               "the torch_dist writer's helper process (a spawned multiprocessing manager) dies of the very "
               "signal a scheduler sends every process to ask for a checkpoint: it is started with the exit "
               "signals ignored (filesystem_async.get_write_results_queue, public from 0.19; "
               "_get_write_results_queue before); hence it is started at the run's start, not at the first "
               "save (which also lets checkpoint-writer-orphans guard it)",
               ">=0.16.1", ("0.16.1", "0.19.2")),
    Workaround("checkpoint-writer-orphans",
               "the same helper (and its multiprocessing resource tracker) is ended only by its rank's exit "
               "handlers: when the rank is killed (SIGKILL, the OOM killer) both run on forever, re-parented "
               "to init - the manager never checks for its parent, torchrun signals only the ranks still "
               "running, and a shielded helper ignores those signals anyway (measured under torchrun: 2 "
               "processes left per killed rank, shielded or not). A guardian process holding one end of a "
               "pipe from the rank SIGKILLs the helper once the rank is gone, however it went; the tracker "
               "then sees its own pipe close and exits",
               ">=0.16.1", ("0.16.1", "0.19.2")),
    Workaround("cp-batch-group",
               "from 0.19 get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group=None) slices over the WHOLE "
               "world when no group is given (0.16.1 used parallel_state's CP group): with TP or DP beside CP "
               "every rank would get the wrong chunks, silently. The CP group is always passed",
               ">=0.19", ("0.16.1", "0.19.2")),
)
_BY_NAME = {w.name: w for w in WORKAROUNDS}


def installed_version() -> str:
    """The installed megatron-core release, e.g. "0.19.2".

    From the package metadata, not ``megatron.core.package_info.__version__``: from 0.19 that
    appends the short git hash of whatever repository the package sits in (a venv inside a
    checkout reports "0.19.2+<our commit>").
    """
    from importlib.metadata import version

    return version("megatron-core")


@lru_cache(maxsize=None)
def _release(version: str):
    from packaging.version import Version

    return Version(Version(version).base_version)


def needed(name: str, version: Optional[str] = None) -> bool:
    """Whether megatron-core `version` (default: the installed one) needs workaround `name`."""
    from packaging.specifiers import SpecifierSet

    return _release(version or installed_version()) in SpecifierSet(_BY_NAME[name].needed_on)


def disabled() -> set:
    return {n.strip() for n in os.environ.get(DISABLE_VARIABLE, "").split(",") if n.strip()}


def active(name: str) -> bool:
    """Whether the code takes workaround `name` here: the installed release needs it and no test switched it off."""
    if name not in _BY_NAME:
        raise KeyError(f"no workaround named {name!r} in megatron_harpe/compat.py")
    return needed(name) and name not in disabled()


def supported(version: Optional[str] = None) -> bool:
    from packaging.specifiers import SpecifierSet

    return _release(version or installed_version()) in SpecifierSet(SUPPORTED_RELEASES)


def unverified_workarounds(version: Optional[str] = None) -> List[Workaround]:
    """The workarounds not verified on `version` (default: the installed megatron-core)."""
    release = str(_release(version or installed_version()))
    return [w for w in WORKAROUNDS if release not in w.verified_on]


def warn_if_unverified() -> List[Workaround]:
    """Log one warning per workaround not verified on the installed megatron-core (and return them)."""
    version = installed_version()
    if not supported(version):
        log.warning("megatron-core %s is outside the supported range %s (megatron_harpe/compat.py); "
                    "install one of %s", version, SUPPORTED_RELEASES, ", ".join(TESTED_RELEASES))
    unverified = unverified_workarounds(version)
    for w in unverified:
        log.warning("megatron-core %s: workaround %r was verified on %s only; re-check it (%s) - see "
                    "megatron_harpe/compat.py", version, w.name, ", ".join(w.verified_on), w.why)
    return unverified


# ---------------------------------------------------------------------- interleaved-pipeline-batched-p2p
def batch_p2p_comm(virtual_pipeline: Optional[int]) -> bool:
    """TransformerConfig.batch_p2p_comm for a layout: off with virtual pipeline stages."""
    if not active("interleaved-pipeline-batched-p2p"):
        return True  # megatron-core's default
    return virtual_pipeline is None


# ---------------------------------------------------------------------- torch AdamW in torch_dist checkpoints
#: The distributed optimizer's checkpoint format with torch's Adam/AdamW (it also resumes at any layout).
OPTIMIZER_CHECKPOINT_METADATA: Dict[str, str] = {"distrib_optim_sharding_type": "fully_reshardable"}
#: With TE's or apex's FusedAdam: each rank writes its own shard, nothing gathered (Megatron-LM's default).
FUSED_ADAM_CHECKPOINT_METADATA: Dict[str, str] = {"distrib_optim_sharding_type": "dp_reshardable"}


def optimizer_checkpoint_metadata(optimizer, requested: str = "auto") -> Dict[str, str]:
    """The distributed optimizer's checkpoint format for `optimizer` (checkpoint.optimizer_format).

    fully_reshardable only where torch's AdamW needs it: megatron-core's default format fails at save with it
    (reshardable-optimizer-step), and fully_reshardable gathers the whole DP group's optimizer state into every
    rank's host memory at each save (distrib_optimizer.py ~1030/~1443 in 0.16.1) - affordable at CPU sizes, ~10
    GB per rank at TP=8 for a 7B model. TE's or apex's FusedAdam keep 'step' per group and take dp_reshardable."""
    if requested != "auto":
        return {"distrib_optim_sharding_type": requested}
    return OPTIMIZER_CHECKPOINT_METADATA if uses_torch_adam(optimizer) else FUSED_ADAM_CHECKPOINT_METADATA


def uses_torch_adam(optimizer) -> bool:
    """Whether megatron-core's (chained) optimizer steps with torch's Adam/AdamW (per-parameter 'step')."""
    return bool(_torch_adam_optimizers(optimizer))


def _torch_adam_optimizers(optimizer) -> List[torch.optim.Optimizer]:
    """The torch Adam/AdamW optimizers inside megatron-core's (chained) optimizer.

    Only those: TE's or apex's FusedAdam keep `step` per param group and would be broken by a
    per-parameter `step` key.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(opt, "optimizer", None) for opt in chained]
    return [opt for opt in inner if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))]


def prepare_optimizer_for_loading(optimizer) -> None:
    """torch-adamw-fresh-step: give every parameter of a fresh torch AdamW an explicit zero step."""
    if not active("torch-adamw-fresh-step"):
        return
    for inner in _torch_adam_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(param.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param.data))


def load_optimizer_state(optimizer, state_dict: Any) -> None:
    """optimizer.load_state_dict, with reshardable-optimizer-step and torch-adamw-shared-step applied."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state_dict] if len(chained) == 1 else list(state_dict)
    for opt, state in zip(chained, states):
        if isinstance(state, dict) and state.get("param_state_sharding_type") == "fully_reshardable" and \
                active("reshardable-optimizer-step"):
            _load_reshardable(opt, state)
        else:
            opt.load_state_dict(state)
    if not active("torch-adamw-shared-step"):
        return
    for inner in _torch_adam_optimizers(optimizer):
        for param_state in inner.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].detach().clone()


def _load_reshardable(opt, state: dict) -> None:
    state = dict(state)
    param_state = state.pop("param_state")
    state.pop("param_state_sharding_type")
    opt.load_state_dict(state)
    inner = opt.optimizer
    steps = {id(p): st.pop("step") for p, st in inner.state.items() if "step" in st}
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for p, st in inner.state.items():
        if id(p) in steps:
            st["step"] = steps[id(p)]


# ---------------------------------------------------------------------- checkpoint-writer-signals, -orphans
def start_checkpoint_writer_shielded(signals: Iterable[signal_module.Signals]) -> None:
    """Start megatron-core's checkpoint-writer helper process with the exit signals ignored, and its guardian.

    checkpoint-writer-signals: an ignored disposition survives exec, so the helper is immune to the
    signals that ask the trainer to checkpoint; the trainer's own handlers are installed afterwards.
    checkpoint-writer-orphans: `_guard` starts the process that ends the helper when this rank is
    gone. With both switched off megatron-core starts the helper itself, at the first save.
    """
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    shield, guard = active("checkpoint-writer-signals"), active("checkpoint-writer-orphans")
    if not (shield or guard):
        return
    # public from megatron-core 0.19 (get_write_results_queue), private before
    start = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
    before = {child.pid for child in multiprocessing.active_children()}
    previous = {sig: signal_module.signal(sig, signal_module.SIG_IGN) for sig in signals} if shield else {}
    try:
        start()
        helpers = [child.pid for child in multiprocessing.active_children() if child.pid not in before]
        if helpers and guard:
            _guard(helpers)
    finally:
        for sig, handler in previous.items():
            signal_module.signal(sig, handler)


#: What the guardian ignores: the signals that end a job or ask for a checkpoint. Only the rank's end (or
#: SIGKILL) ends it. They are blocked from its start (the mask survives exec) until it ignores them.
GUARDIAN_IGNORES = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2")
#: The guardian's program (run by `python -I -S -c`): block reading the pipe whose write end only the
#: rank holds; EOF means the rank is gone (exited or killed: the kernel closes its descriptors either
#: way); then SIGKILL each helper - through a pidfd where the kernel has them (Linux >= 5.3: the signal
#: cannot reach a recycled pid), else by pid if /proc still shows the same start time - and exit.
GUARDIAN_PROGRAM = """# megatron-harpe checkpoint-writer guardian
import os, signal, sys
ignored = [getattr(signal, name) for name in %r]
for sig in ignored:
    signal.signal(sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, ignored)
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
fd, helpers = int(sys.argv[1]), [arg.split(":") for arg in sys.argv[2:]]
while os.read(fd, 64):
    pass
for kind, value, start in helpers:
    try:
        if kind == "pidfd":
            signal.pidfd_send_signal(int(value), signal.SIGKILL)
        elif started(value) == start:
            os.kill(int(value), signal.SIGKILL)
    except OSError:
        pass
""" % (GUARDIAN_IGNORES,)
#: Each guardian (its Popen) and the write end of its pipe, held open for the life of this process.
_GUARDIANS: List[Tuple[Any, int]] = []


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[19]


def _guard(helpers: List[int]) -> None:
    """Start the guardian of `helpers` (children of this process, not reaped yet: their pids are theirs).

    The pipe's write end is close-on-exec: processes this one spawns do not hold it, so the guardian
    sees EOF when this process is gone (a fork()ed child that outlives it would delay that)."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    pidfds, args = [], []
    try:
        for pid in helpers:
            try:
                pidfd = os.pidfd_open(pid)
                pidfds.append(pidfd)
                args.append(f"pidfd:{pidfd}:")
            except (AttributeError, OSError):  # no pidfd_open (kernel < 5.3): the pid and its start time
                args.append(f"pid:{pid}:{_start_time(pid)}")
        # blocked in this thread only (a signal for this process meanwhile goes to another thread): the child
        # starts with them blocked and unblocks them once it ignores them
        blocked = {getattr(signal_module, name) for name in GUARDIAN_IGNORES}
        mask = signal_module.pthread_sigmask(signal_module.SIG_BLOCK, blocked)
        try:
            guardian = subprocess.Popen([sys.executable, "-I", "-S", "-c", GUARDIAN_PROGRAM, str(read_end), *args],
                                        pass_fds=(read_end, *pidfds), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, start_new_session=True)
        finally:
            signal_module.pthread_sigmask(signal_module.SIG_SETMASK, mask)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        for fd in (read_end, *pidfds):
            os.close(fd)
    _GUARDIANS.append((guardian, write_end))


# ---------------------------------------------------------------------- cp-batch-group
def batch_on_this_cp_rank(batch: Dict[str, Any]) -> Dict[str, Any]:
    """megatron-core's get_batch_on_this_cp_rank (chunks r and 2cp-1-r of every sequence) for this
    rank's context-parallel group, on every supported release."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    if "is_hybrid_cp" in _parameters(get_batch_on_this_cp_rank):  # 0.19+
        group = ps.get_context_parallel_group() if active("cp-batch-group") else None
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(batch)


def _parameters(fn) -> Tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)
