"""Worker (gloo ranks): preflight check 5's twin_memory on the real model of a tiny twin, every scenario in one launch.

exact                 twin_memory as the preflight calls it, parallel_state not initialised: must pass, and leave it
                      uninitialised
preinitialised        the caller has initialised parallel_state (the twin's layout) and seeded the RNGs first: must pass
                      and give back the same groups (usable) and RNG states
planner_fault         the planner forgets the MLP's activations (planning.memory.layer_activations wrapped): must fail
unplanned_activation  every RMSNorm of the model keeps an extra fp32 tensor the planner does not count: must fail
wrong_world           twin_memory(cfg, 2) in a world of 4: not run, nothing collective

rank{r}.json: {scenario: CheckResult.to_dict() + what the scenario checked}.
Usage (under torchrun): preflight_memory.py --out DIR --config YAML --overrides JSON
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

from megatron_harpe.backends import setup_backend

setup_backend()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed  # noqa: E402

from megatron_harpe.cli import silence_known_warnings  # noqa: E402
from megatron_harpe.config.loader import load_config  # noqa: E402
from megatron_harpe.models.norm import RMSNorm  # noqa: E402
from megatron_harpe.planning import memory  # noqa: E402
from megatron_harpe.preflight.memory_check import twin_memory  # noqa: E402


@contextlib.contextmanager
def replaced(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def planner_forgets_mlp():
    original = memory.layer_activations

    def layer_activations(*args, **kwargs):
        parts = original(*args, **kwargs)
        parts.pop("mlp", None)
        return parts

    return replaced(memory, "layer_activations", layer_activations)


def norms_keep_more():
    original = RMSNorm.forward

    def forward(self, x):
        y = original(self, x)
        extra = torch.exp(x.float().repeat(1, 1, 4))  # ExpBackward keeps its output: 16 bytes per element of x
        return y + 0.0 * extra[..., : y.shape[-1]].to(y.dtype)

    return replaced(RMSNorm, "forward", forward)


def preinitialised(cfg, world):
    p = cfg.parallel
    ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
                                 context_parallel_size=p.context)
    torch.manual_seed(77)
    model_parallel_cuda_manual_seed(99)
    groups = (ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group(),
              ps.get_data_parallel_group_gloo(with_context_parallel=True))
    rng = torch.get_rng_state()
    tracker = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    result = twin_memory(cfg, world).to_dict()
    after = (ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group(),
             ps.get_data_parallel_group_gloo(with_context_parallel=True))
    result["same_groups"] = all(a is b for a, b in zip(groups, after))
    ones = torch.ones(1)
    dist.all_reduce(ones, group=after[0])  # the caller's TP group still works
    gloo = torch.ones(1)
    dist.all_reduce(gloo, group=after[2])  # ... and its gloo group was not destroyed
    result["tp_sum"], result["gloo_sum"] = float(ones), float(gloo)
    result["rng_restored"] = bool(torch.equal(torch.get_rng_state(), rng))
    states = get_cuda_rng_tracker().get_states()
    result["tracker_restored"] = states.keys() == tracker.keys() and all(torch.equal(states[k], v)
                                                                          for k, v in tracker.items())
    ps.destroy_model_parallel()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", required=True, help='["key=value", ...]')
    args = parser.parse_args()
    silence_known_warnings()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    cfg = load_config(args.config, json.loads(args.overrides))
    results = {}
    for name in ("exact", "preinitialised", "planner_fault", "unplanned_activation", "wrong_world"):
        if name == "preinitialised":
            result = preinitialised(cfg, world)
        else:
            fault = {"planner_fault": planner_forgets_mlp, "unplanned_activation": norms_keep_more}.get(name)
            with fault() if fault else contextlib.nullcontext():
                result = twin_memory(cfg, 2 if name == "wrong_world" else world).to_dict()
            result["left_initialised"] = ps.model_parallel_is_initialized()
        results[name] = result
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
