"""Every workaround in megatron_harpe/compat.py is shown to be needed, on the real code path.

Each scenario runs twice in the same worker: with the workaround active, and switched off by
HARPE_COMPAT_DISABLE=<name> (what compat.active reads at call time). With it active the behaviour
is correct (exact resume, the PP=1 loss, the right context-parallel chunks, a checkpoint writer
that survives the scheduler's signal). Switched off, on a release where compat.needed(name) is
true, the failure it exists for must show, precisely; on a release outside `needed_on`,
switching it off must change nothing. So when upstream fixes something, the "needed" assertion
fails and says to narrow `needed_on` (and when a workaround stops being needed on a release that
still lists it, the same).

One torchrun launch (2 gloo ranks) runs the multi-rank scenarios; the checkpoint-writer scenario
needs a fresh process per variant (megatron-core keeps the writer's results queue in a module
global), two single-process runs side by side. See tests/workers/compat_worker.py.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_harpe import compat
from tests.launch import REPO_ROOT, run_workers

WORKER = "tests/workers/compat_worker.py"
SEQ = 32  # the worker's sequence length: token i sits at position i
SCENARIOS = ["cp_batch", "adamw_plain", "adamw_distributed", "interleaved_pp"]
#: the workaround each test below switches off; a new workaround without a test fails test_every_workaround_is_tested
COVERED = {"interleaved-pipeline-batched-p2p", "torch-adamw-fresh-step", "torch-adamw-shared-step",
           "reshardable-optimizer-step", "checkpoint-writer-signals", "cp-batch-group",
           "checkpoint-writer-orphans"}  # the last one: tests/test_dead_rank.py (a rank SIGKILLed under torchrun)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_workers(WORKER, 2, tmp_path_factory.mktemp("compat"), "--scenarios", ",".join(SCENARIOS),
                       extra_env={compat.DISABLE_VARIABLE: ""})


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    """The checkpoint-writer scenario with the workaround active and switched off: two fresh processes."""
    runs = {}
    for variant, disabled in (("active", ""), ("disabled", "checkpoint-writer-signals")):
        out = tmp_path_factory.mktemp(f"writer_{variant}")
        env = dict(os.environ, OMP_NUM_THREADS="1", **{compat.DISABLE_VARIABLE: disabled},
                   PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(out / "log.txt", "w")  # a file, not a pipe: a leaked helper would hold a pipe open
        proc = subprocess.Popen([sys.executable, WORKER, "--out", str(out), "--writer-signals"], cwd=REPO_ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        runs[variant] = (proc, out, log)
    results = {}
    for variant, (proc, out, log) in runs.items():
        code = proc.wait(timeout=300)
        log.close()
        assert code == 0, f"writer scenario ({variant}) failed:\n{(out / 'log.txt').read_text()[-8000:]}"
        results[variant] = json.loads((out / "writer.json").read_text())
    return results


def test_every_workaround_is_tested():
    """A workaround added to compat.WORKAROUNDS needs its own scenario here (the issue's rule)."""
    assert {w.name for w in compat.WORKAROUNDS} == COVERED


# --------------------------------------------------------------------------- interleaved-pipeline-batched-p2p
def max_loss_diff(a, b):
    return max(abs(x - y) for step_a, step_b in zip(a, b) for x, y in zip(step_a, step_b))


def test_interleaved_pipeline_batched_p2p(ranks):
    """PP=2 with 2 virtual stages (4 layers, 4 micro-batches, 3 AdamW steps) must train exactly like PP=1 on
    the same weights and data. With batched p2p, at PP=2 the previous and the next stage are the same rank
    and megatron-core's batch_isend_irecv pairs a gradient with an activation of the same shape
    (Megatron-LM #750): the steady-state micro-batches get swapped tensors and the losses drift, silently.
    """
    result = ranks[1]["interleaved_pp"]  # rank 1 holds the last (virtual) stage
    reference, active, disabled = result["reference"], result["active"], result["disabled"]
    assert active["last_stage"] and reference["last_stage"]
    assert [len(step) for step in active["losses"]] == [4, 4, 4]
    assert max_loss_diff(active["losses"], reference["losses"]) < 1e-5, (active, reference)
    if compat.needed("interleaved-pipeline-batched-p2p"):
        assert active["batch_p2p_comm"] is False and disabled["batch_p2p_comm"] is True
        # the warm-up micro-batches pass before any forward/backward exchange is batched: equal; later ones not
        assert max_loss_diff(disabled["losses"][:1], reference["losses"][:1]) > 1e-3, disabled
        assert max_loss_diff(disabled["losses"], reference["losses"]) > 1e-2, disabled
    else:
        assert disabled == active


# --------------------------------------------------------------------------- torch AdamW in checkpoints
def adamw(ranks, optimizer):
    return [r[f"adamw_{optimizer}"] for r in ranks]


@pytest.mark.parametrize("optimizer", ["plain", "distributed"])
def test_resume_with_the_workarounds_is_bit_identical(ranks, optimizer):
    """The reference for the AdamW tests: 2 steps, save_checkpoint, 2 steps, against a fresh model and
    optimizer that load_checkpoint and take the same 2 steps: identical losses and weights, every
    parameter's state with its own step tensor."""
    for result in adamw(ranks, optimizer):
        active = result["active"]
        assert "error" not in active, active
        assert active["losses"] == result["uninterrupted"]
        assert active["params_bit_identical"], active["param_max_diff"]
        assert active["distinct_step_tensors_after_load"] == active["num_param_states"] > 1


def test_torch_adamw_fresh_step(ranks):
    """Loading into a fresh torch AdamW: the distributed optimizer's state_dict(), called by
    sharded_state_dict(is_loading=True), collects the per-parameter 'step' values and asserts there is
    exactly one - a fresh optimizer has none, so the load stops with a bare AssertionError.
    megatron-core's plain optimizer creates the state itself when loading (init_state_fn): unaffected."""
    name = "torch-adamw-fresh-step"
    for plain, distributed in zip(adamw(ranks, "plain"), adamw(ranks, "distributed")):
        assert plain[name] == plain["active"]
        if compat.needed(name):
            error = distributed[name].get("error")
            assert error is not None and error["type"] == "AssertionError", distributed[name]
            assert error["where"][-2:] == ["distrib_optimizer.py:sharded_state_dict", "distrib_optimizer.py:state_dict"]
        else:
            assert distributed[name] == distributed["active"]


def test_torch_adamw_shared_step(ranks):
    """After the distributed optimizer's load, every parameter's state holds the SAME 'step' tensor; torch
    AdamW increments it once per parameter, so the bias correction of the first step after resume is
    wrong: the first loss still matches (computed before that update), the next and the weights do not.
    The plain optimizer loads a step per parameter: unaffected."""
    name = "torch-adamw-shared-step"
    for plain, distributed in zip(adamw(ranks, "plain"), adamw(ranks, "distributed")):
        assert plain[name] == plain["active"]
        if compat.needed(name):
            broken = distributed[name]
            assert "error" not in broken, broken
            assert broken["distinct_step_tensors_after_load"] == 1 < broken["num_param_states"]
            assert broken["losses"][0] == distributed["uninterrupted"][0]
            assert broken["losses"][1] != distributed["uninterrupted"][1]
            assert not broken["params_bit_identical"] and broken["param_max_diff"] > 1e-4, broken
        else:
            assert distributed[name] == distributed["active"]


def test_reshardable_optimizer_step(ranks):
    """The distributed optimizer's 'fully_reshardable' loader copies a per-parameter 'step' into the torch
    AdamW state, which that format never saved: KeyError 'step'. And megatron-core's default sharding
    ('fully_sharded_model_space', which compat's checkpoint metadata replaces) cannot even save: its
    flattened-range tensors are refused."""
    name = "reshardable-optimizer-step"
    for result in adamw(ranks, "distributed"):
        if compat.needed(name):
            error = result[name].get("error")
            assert error is not None and (error["type"], error["message"]) == ("KeyError", "'step'"), result[name]
            assert "distrib_optimizer.py:load_parameter_state_from_fully_reshardable" in error["where"], error
            default = result["default-sharding"]
            assert default["when"] == "save" and default["error"]["type"] == "CheckpointingException"
            assert "flattened_range is not supported" in default["error"]["message"]
        else:
            assert result[name] == result["active"]
            assert "error" not in result["default-sharding"]


# --------------------------------------------------------------------------- checkpoint-writer-signals
def test_checkpoint_writer_signals(writer):
    """megatron-core's torch_dist writer keeps a spawned multiprocessing-manager helper for its results;
    a scheduler's SIGTERM (sent to every process of the job) kills it, and the next checkpoint - the one
    the signal asked for - fails with a broken pipe. Started with the exit signals ignored, it survives."""
    name = "checkpoint-writer-signals"
    active, disabled = writer["active"], writer["disabled"]
    assert active["helpers"] == disabled["helpers"] == 1
    if compat.needed(name):
        assert active["active"] and not disabled["active"]
        assert active["helper_exit"] is None and active["second_save"] == "ok"
        assert disabled["helper_exit"] == -signal.SIGTERM
        second = disabled["second_save"]  # megatron-core's BrokenPipeError, as models/checkpoint.py reports it
        assert "BrokenPipeError" in f"{second['type']}: {second['message']}", disabled
    else:
        for key in ("helper_exit", "second_save"):
            assert active[key] == disabled[key]


# --------------------------------------------------------------------------- cp-batch-group
def chunks(*indices, cp):
    size = SEQ // (2 * cp)
    return [pos for i in indices for pos in range(i * size, (i + 1) * size)]


def test_cp_batch_group(ranks):
    """compat.batch_on_this_cp_rank must give a rank chunks r and 2cp-1-r of its OWN context-parallel
    group: at CP=2 the halves of a 4-chunk split, and with TP=2/CP=1 (a CP group of one rank) the whole
    sequence. From 0.19 megatron-core's get_batch_on_this_cp_rank slices over the whole world when no
    group is passed: at TP=2 each tensor-parallel rank would train on half the sequence, silently."""
    name = "cp-batch-group"
    for rank, result in enumerate(r["cp_batch"] for r in ranks):
        tp2, cp2 = result["tp2_cp1"], result["cp2"]
        assert (tp2["cp_size"], cp2["cp_size"], cp2["cp_rank"]) == (1, 2, rank)
        assert tp2["active"] == list(range(SEQ))
        assert cp2["active"] == chunks(rank, 3 - rank, cp=2)
        assert cp2["disabled"] == cp2["active"]  # on 2 ranks the world IS the CP group
        if compat.needed(name):
            assert tp2["disabled"] == chunks(rank, 3 - rank, cp=2)
        else:
            assert tp2["disabled"] == tp2["active"]
