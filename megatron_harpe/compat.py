"""Every place where this project works around a behaviour of the installed megatron-core.

Why one module: a workaround is tied to the megatron-core release it was found in. Kept together,
each with the versions it was verified on, an upgrade shows at once what to re-check: the trainer
warns at start for every workaround not verified on the installed release, and a test fails until
someone re-checks them and adds the version (tests/test_architecture.py).

Not here, because they are not version workarounds but the CPU adaptation of CUDA calls
(backends/cpu.py, used only without a GPU) or features megatron-core leaves to its users
(SDPA core attention with context parallelism, a sequence-parallel RMSNorm, building the C++
dataset helpers when a wheel lacks them: data/helpers.py).
"""
from __future__ import annotations

import logging
import signal as signal_module
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workaround:
    name: str
    why: str
    verified_on: Tuple[str, ...]


WORKAROUNDS = (
    Workaround("interleaved-pipeline-batched-p2p",
               "the interleaved (virtual pipeline) schedule with batch_p2p_comm=True silently corrupts PP=2 "
               "training (Megatron-LM issue #750): batched p2p is switched off with virtual pipeline stages",
               ("0.16.1",)),
    Workaround("torch-adamw-fresh-step",
               "loading a checkpoint into a fresh torch AdamW fails with KeyError 'step' (no per-parameter "
               "state yet): every parameter gets an explicit zero step first",
               ("0.16.1",)),
    Workaround("torch-adamw-shared-step",
               "after loading, every parameter's state holds the SAME step tensor, which AdamW increments once "
               "per parameter per step (wrong bias correction after resume): each gets its own copy",
               ("0.16.1",)),
    Workaround("reshardable-optimizer-step",
               "the distributed optimizer's 'fully_reshardable' loader copies a 'step' it never saved for torch "
               "AdamW (KeyError 'step'): that parameter state is loaded with 'step' set aside; and the default "
               "sharding 'fully_sharded_model_space' fails with torch AdamW, so 'fully_reshardable' is used",
               ("0.16.1",)),
    Workaround("checkpoint-writer-signals",
               "the torch_dist writer's helper process (a spawned multiprocessing manager) dies of the very "
               "signal a scheduler sends every process to ask for a checkpoint: it is started with the exit "
               "signals ignored (megatron_core private _get_write_results_queue)",
               ("0.16.1",)),
)


def installed_version() -> str:
    from megatron.core.package_info import __version__

    return __version__


def unverified_workarounds(version: Optional[str] = None) -> List[Workaround]:
    """The workarounds not verified on `version` (default: the installed megatron-core)."""
    version = version or installed_version()
    return [w for w in WORKAROUNDS if version not in w.verified_on]


def warn_if_unverified() -> List[Workaround]:
    """Log one warning per workaround not verified on the installed megatron-core (and return them)."""
    unverified = unverified_workarounds()
    for w in unverified:
        log.warning("megatron-core %s: workaround %r was verified on %s only; re-check it (%s) - see "
                    "megatron_harpe/compat.py", installed_version(), w.name, ", ".join(w.verified_on), w.why)
    return unverified


# ---------------------------------------------------------------------- interleaved-pipeline-batched-p2p
def batch_p2p_comm(virtual_pipeline: Optional[int]) -> bool:
    """TransformerConfig.batch_p2p_comm for a layout: off with virtual pipeline stages."""
    return virtual_pipeline is None


# ---------------------------------------------------------------------- torch AdamW in torch_dist checkpoints
#: The distributed optimizer's checkpoint format (also lets a run resume with another DP size).
OPTIMIZER_CHECKPOINT_METADATA: Dict[str, str] = {"distrib_optim_sharding_type": "fully_reshardable"}


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
        if isinstance(state, dict) and state.get("param_state_sharding_type") == "fully_reshardable":
            _load_reshardable(opt, state)
        else:
            opt.load_state_dict(state)
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


# ---------------------------------------------------------------------- checkpoint-writer-signals
def start_checkpoint_writer_shielded(signals: Iterable[signal_module.Signals]) -> None:
    """Start megatron-core's checkpoint-writer helper process with the exit signals ignored.

    An ignored disposition survives exec, so the helper is immune to the signals that ask the
    trainer to checkpoint; the trainer's own handlers are installed afterwards.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = {sig: signal_module.signal(sig, signal_module.SIG_IGN) for sig in signals}
    try:
        filesystem_async._get_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal_module.signal(sig, handler)
