"""logging.profile: a torch.profiler trace of chosen iterations (training/profiling.py, docs/training.md).

One real harpe-train run (in this process, single launch, like tests/test_errors.py: a launch costs ~5 s of
imports) profiles iteration 3 of 3; its trace must hold our named ranges for that iteration and no other.
The profiler object is also driven directly (no process group) for what a 1-process run cannot show: a
rank that is not listed writes nothing, a step that raises keeps its partial trace, a resumed run past the
window says so. Config errors are checked by their exact messages.
"""
from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT

TINY = str(REPO_ROOT / "examples" / "tiny" / "harpe.yaml")  # 2 layers, 4 micro-batches per iteration


def trace_names(path: Path) -> Counter:
    with gzip.open(path, "rt") as fh:
        events = json.load(fh)["traceEvents"]  # valid JSON, Chrome trace format
    return Counter(e["name"] for e in events if str(e.get("name", "")).startswith("harpe/"))


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory) -> Path:
    from megatron_harpe import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    run = tmp_path_factory.mktemp("profile") / "run"
    code = train.main(["--config", TINY, f"run_dir={run}", "training.iterations=3", "logging.profile.start=2",
                       "logging.profile.end=3"])
    assert code == 0
    return run


def test_trace_names_our_code_for_the_profiled_iteration_only(profiled_run):
    files = sorted(p.name for p in (profiled_run / "profile").iterdir())
    assert files == ["rank0_iters2-3.pt.trace.json.gz"]  # whole (renamed into place), one rank
    names = trace_names(profiled_run / "profile" / files[0])
    layers, micro_batches = 2, 4
    assert names == {
        "harpe/iteration_3": 1,  # iteration 2 was the profiler's warm-up: set up, not recorded
        "harpe/forward_backward": 1, "harpe/optimizer_step": 1,
        "harpe/rotary": micro_batches,  # the angle table, once per forward
        "harpe/query_key_angles": layers * micro_batches,  # table mode (fused mode: harpe/apply_rotary)
        "harpe/core_attention": layers * micro_batches,
    }


def test_the_trace_is_logged_with_its_path_and_size(profiled_run):
    trace = profiled_run / "profile" / "rank0_iters2-3.pt.trace.json.gz"
    events = [json.loads(line).get("event") for line in (profiled_run / "metrics.jsonl").read_text().splitlines()]
    notes = [e for e in events if e and e.startswith("profile of iterations 3-3")]
    assert len(notes) == 1 and f"rank 0: {trace} ({trace.stat().st_size:,} bytes)" in notes[0], notes


def _step():
    import torch

    (torch.ones(8, 8, requires_grad=True) @ torch.ones(8, 8)).sum().backward()


def _profiler(tmp_path, rank, first_iteration=0, **profile):
    from megatron_harpe.config.schema import ProfileConfig
    from megatron_harpe.training.profiling import IterationProfiler

    notes = []
    profiler = IterationProfiler(ProfileConfig(**profile), run_dir=tmp_path, rank=rank,
                                 first_iteration=first_iteration, log_event=notes.append)
    return profiler, notes


def test_a_rank_not_listed_writes_nothing(tmp_path):
    profiler, notes = _profiler(tmp_path, rank=1, start=0, end=2, ranks=[0])
    for i in range(3):
        with profiler.iteration(i):
            _step()
    assert not (tmp_path / "profile").exists()
    assert notes == ["profile of iterations 1-2: no rank wrote a trace (logging.profile.ranks [0])"]


def test_a_step_that_raises_keeps_its_partial_trace_and_stops_the_profiler(tmp_path):
    import torch

    profiler, notes = _profiler(tmp_path, rank=0, start=0, end=2)
    with pytest.raises(RuntimeError, match="step failed"):
        with profiler.iteration(0):
            _step()
            raise RuntimeError("step failed")
    assert not torch.autograd._profiler_enabled()
    assert trace_names(tmp_path / "profile" / "rank0_iters0-2.pt.trace.json.gz") == {"harpe/iteration_1": 1}
    profiler.close()  # the trainer does not get here after a raise; harmless if it does
    assert notes == []


def test_a_run_resumed_past_the_window_says_nothing_was_profiled(tmp_path):
    profiler, notes = _profiler(tmp_path, rank=0, first_iteration=5, start=2, end=4)
    with profiler.iteration(5):
        _step()
    assert not (tmp_path / "profile").exists()
    assert notes == ["logging.profile: iterations 3-4 were done before this run started at iteration 5; "
                     "nothing profiled"]


@pytest.mark.parametrize("overrides, world, message", [
    (["logging.profile.start=3", "logging.profile.end=3"], 1,
     "logging.profile.end (3) must be greater than logging.profile.start (3): iterations start+1..end are profiled"),
    (["logging.profile.start=-1"], 1,
     "logging.profile.start must be >= 0 (iterations done before the first profiled one; null = profiling off), "
     "got -1"),
    (["logging.profile.start=8"], 1,  # end defaults to start + 1 = 9; the run has 8 iterations
     "logging.profile.end (9) is past the run's last iteration (8); profile iterations inside the run"),
    (["logging.profile.start=2", "logging.profile.ranks=[]"], 1,
     "logging.profile.ranks is empty: list the global ranks to profile, e.g. [0], or set "
     "logging.profile.start=null to turn profiling off"),
    (["logging.profile.start=2", "logging.profile.ranks=[0,2,5]"], 2,
     "logging.profile.ranks: [2, 5] not in this run of 2 process(es) (global ranks 0..1)"),
])
def test_config_errors_name_the_key(overrides, world, message):
    from megatron_harpe.config.loader import ConfigError, load_config
    from megatron_harpe.config.validate import validate_config

    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, world)
    assert str(err.value) == message


def test_valid_windows_pass_and_off_means_off():
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.config.validate import validate_config

    validate_config(load_config(TINY, ["logging.profile.start=7"]), 1)  # the last iteration
    validate_config(load_config(TINY, ["logging.profile.start=0", "logging.profile.end=8",
                                       "logging.profile.ranks=[0,1]"]), 2)
    off = load_config(TINY, ["logging.profile.end=100", "logging.profile.ranks=[]"])  # start null: off, unchecked
    validate_config(off, 1)
    assert not off.logging.profile.enabled


def test_a_memory_snapshot_is_refused_without_a_gpu():
    from megatron_harpe.config.loader import ConfigError, load_config
    from megatron_harpe.training.runtime import Machine, check_runtime

    cpu = Machine(cuda=False, te=False, triton=False, capability=None)
    check_runtime(load_config(TINY, ["logging.profile.memory_snapshot=true"]), cpu)  # profiling off: nothing asked
    with pytest.raises(ConfigError) as err:
        check_runtime(load_config(TINY, ["logging.profile.start=1", "logging.profile.memory_snapshot=true"]), cpu)
    assert str(err.value) == ("logging.profile.memory_snapshot records the CUDA caching allocator's history and "
                              "needs a GPU; this machine has none: set logging.profile.memory_snapshot=false")
