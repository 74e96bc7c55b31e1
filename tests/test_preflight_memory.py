"""Preflight check 5, memory: harpe-plan's verdict on the full run, and harpe-plan against a built twin.

(a) full_run_memory is harpe-plan's own answer (compared with what harpe-plan prints for the same config);
(b) twin_memory measures a tiny TP2 x CP2 twin on 4 gloo ranks (one torchrun launch, every scenario of
tests/workers/preflight_memory.py), and a one-rank twin in this process; planted faults must fail.
"""
from __future__ import annotations

import json

import pytest

from megatron_harpe.config.loader import load_config
from megatron_harpe.planning import cli as plan_cli
from megatron_harpe.preflight.memory_check import (EXACT_TOLERANCE, PREDICTED_KEYS, full_run_memory, resolve_gpu,
                                                   twin_memory)
from tests.launch import REPO_ROOT, run_workers

PAPER = str(REPO_ROOT / "examples" / "llama2_7b_harpe_128k.yaml")
TINY = str(REPO_ROOT / "examples" / "tiny" / "harpe.yaml")
TWIN_4 = ["parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true",
          "parallel.distributed_optimizer=true", "data.global_batch_size=2"]
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def harpe_plan(capsys, *argv) -> str:
    capsys.readouterr()
    assert plan_cli.main(list(argv)) == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- (a) the full run
def test_the_paper_config_fits_on_32_h100_as_harpe_plan_says(capsys):
    printed = json.loads(harpe_plan(capsys, PAPER, "--gpus", "32", "--gpu", "h100", "--json"))
    result = full_run_memory(load_config(PAPER), "h100", None, gpus=32, config_path=PAPER)
    assert result.status == "pass", result.summary
    predicted = result.details["predicted"]
    assert set(predicted) == set(PREDICTED_KEYS)
    assert predicted["peak_gib"] == pytest.approx(printed["peak_gib"], abs=1e-9)
    assert predicted["headroom_gib"] == pytest.approx(printed["headroom_gib"], abs=1e-9)
    assert predicted["peak_gib"] == pytest.approx(29.32, abs=0.01)  # docs/planning.md's table
    assert predicted["capacity_gib"] == 79.6 and predicted["fits"] is True and predicted["gpus"] == 32
    t = printed["time"]
    assert predicted["step_seconds"] == pytest.approx(t["step_s"])
    assert predicted["tokens_per_second_per_gpu"] == pytest.approx(t["tokens_per_s_per_gpu"])
    assert predicted["tokens_per_second"] == pytest.approx(32 * t["tokens_per_s_per_gpu"])
    assert predicted["tflops_per_device"] == pytest.approx(t["model_tflops_per_gpu"])
    assert predicted["mfu"] == pytest.approx(t["mfu"])
    assert "peak 29.3 of 79.6 GiB, fits, 50.3 GiB to spare" in result.summary
    # the text harpe-plan prints, verbatim, for the report
    assert result.details["report"] == harpe_plan(capsys, PAPER, "--gpus", "32", "--gpu", "h100").rstrip("\n")
    # a GPU named as torch names it, and the defaults (h100; no --gpus: one replica, here 32 GPUs)
    assert full_run_memory(load_config(PAPER), "NVIDIA H100 80GB HBM3", None).details["predicted"] == predicted


def test_128k_on_one_gpu_fails_with_the_planners_reason(capsys):
    overrides = ["parallel.tensor=1", "parallel.context=1"]
    text = harpe_plan(capsys, PAPER, *overrides, "--gpu", "h100")
    verdict = next(line for line in text.splitlines() if line.startswith("verdict"))
    reason = verdict.split(None, 1)[1]
    assert reason.startswith("out of memory by")
    result = full_run_memory(load_config(PAPER, overrides), None, None, config_path=PAPER)
    assert result.status == "fail"
    assert reason in result.summary
    assert f"harpe-plan {PAPER} --gpus 1 --gpu h100 --search for a layout that fits" in result.summary
    assert result.details["predicted"]["fits"] is False and result.details["predicted"]["peak_gib"] > 79.6


def test_a_config_harpe_plan_cannot_plan_fails_with_its_reason(capsys):
    result = full_run_memory(load_config(PAPER, ["parallel.tensor=3"]), "h100", None)
    assert result.status == "fail"
    assert "num_attention_heads (32) must be divisible by tensor_model_parallel_size (3)" in result.summary
    assert result.details["predicted"]["peak_gib"] is None
    result = full_run_memory(load_config(PAPER), "h100", None, gpus=48)
    assert result.status == "fail" and "48 GPUs is not a multiple" in result.summary
    # another memory size, as --gpu-memory; a GPU the planner has no figures for is not run
    small = full_run_memory(load_config(PAPER), "h100", 24.0, gpus=32)
    assert small.status == "fail" and "out of memory by 5.3 GiB (needs 29.3 of 24 GiB)" in small.summary
    assert resolve_gpu("NVIDIA H200").name == "H200 141GB"
    assert full_run_memory(load_config(PAPER), "NVIDIA L40S", None).status == "not run"


# ----------------------------------------------------------------------------- (b) the twin
@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """Every scenario on a TP2 x CP2 (SP, distributed optimizer) twin: {scenario: [the result of each rank]}."""
    with pytest.MonkeyPatch.context() as mp:
        for name in LAUNCH_ENV:  # a test run inside a torchrun launch must not hand its rendezvous on
            mp.delenv(name, raising=False)
        ranks = run_workers(REPO_ROOT / "tests" / "workers" / "preflight_memory.py", 4,
                            tmp_path_factory.mktemp("preflight_memory"), "--config", TINY,
                            "--overrides", json.dumps(TWIN_4), extra_env={"HARPE_BACKEND": "cpu"})
    return {name: [r[name] for r in ranks] for name in ranks[0]}


def test_twin_matches_the_planner_on_every_rank(four_ranks):
    results = four_ranks["exact"]
    assert all(r == results[0] for r in results)  # every rank returns the same CheckResult
    result = results[0]
    assert result["status"] == "pass", result["summary"]
    assert "worst error +0.00%" in result["summary"] and f"{EXACT_TOLERANCE:.1%}" in result["tolerance"]
    rows = result["details"]["ranks"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    assert sorted({(r["tp_rank"], r["cp_rank"]) for r in rows}) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for row in rows:
        for component, c in row["components"].items():
            assert c["measured"] == c["planned"] > 0, (component, row)
    # CP ranks hold different causal masks, DP x CP shards of the optimizer differ: per-rank numbers, not one
    assert len({r["components"]["activations"]["measured"] for r in rows}) == 2
    assert result["details"]["plan"]["layout"]["dist_opt"] is True
    assert not any(r["left_initialised"] for r in results)


def test_twin_gives_the_callers_parallel_state_and_rngs_back(four_ranks):
    for r in four_ranks["preinitialised"]:
        assert r["status"] == "pass", r["summary"]
        assert r["same_groups"] and r["tp_sum"] == 2.0 and r["gloo_sum"] == 2.0
        assert r["rng_restored"] and r["tracker_restored"]


@pytest.mark.parametrize("fault", ["planner_fault", "unplanned_activation"])
def test_planted_memory_faults_fail(four_ranks, fault):
    results = four_ranks[fault]
    assert all(r == results[0] for r in results)
    result = results[0]
    assert result["status"] == "fail"
    assert "the planner is off" in result["summary"] and "activations on rank" in result["summary"]
    failed = result["details"]["failed"]
    assert {f["component"] for f in failed} == {"activations"} and len(failed) == 4
    # the planner forgot a term (it predicts too little) / the model keeps more than planned (measured too much)
    assert all(f["planned"] < f["measured"] and abs(f["error"]) > 0.2 for f in failed)


def test_twin_of_another_world_size_is_not_run(four_ranks):
    result = four_ranks["wrong_world"][0]
    assert result["status"] == "not run" and "a world of 4" in result["summary"]


def test_one_rank_twin_without_a_process_group():
    import torch.distributed as dist

    before = dist.is_initialized()  # (an earlier test in this process may have left a world of one)
    result = twin_memory(load_config(TINY, ["data.global_batch_size=1"]), 1)
    assert result.status == "pass", result.summary
    assert result.details["device"] == "cpu" and result.details["backend"] == "local"
    assert dist.is_initialized() == before  # a world it made for itself is gone again
    assert twin_memory(load_config(TINY), 2).status == "not run"
