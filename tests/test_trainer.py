"""harpe-train on CPU with real gloo process groups: exact resume after a signal (with dropout, so the RNG
streams matter), resharded resume, staged schedules, the example methods, launchers, bad configs, init_from,
the demo pipeline, and parallel layouts that train the same model.

Each launch costs ~5 s of start-up, so runs that several tests need are made once per module (`runs`) and
shared: the TP=2 reference run serves the resharding and the launcher tests, one 4-layer seed checkpoint
serves init_from and the layout test. Which configs run elsewhere is said where a test relies on it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_harpe.config.loader import load_config
from megatron_harpe.config.validate import validate_config
from tests.data_fixtures import *  # noqa: F401,F403  (spm_model: the probes' tokenizer)
from tests.launch import REPO_ROOT, free_port, run_workers

WORKER = "tests/workers/train_worker.py"
TINY = "examples/tiny"
DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
VOCAB = ["model.vocab_size=1024"]  # runs that probe read text: the test tokenizer's 1000 tokens must fit


def evaluated(spm_model, interval, lengths="[128]", prompts=2):
    """Validation loss and passkey probes every `interval` iterations and at the end."""
    return [f"data.tokenizer_model={spm_model}", f"training.eval_interval={interval}", "training.eval_iterations=2",
            f"training.probe.lengths={lengths}", f"training.probe.prompts={prompts}"]


def evaluations(run_dir):
    """{(kind, iteration): record} of the eval/probe records in metrics.jsonl."""
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["iteration"]): r for r in records if "kind" in r}


def assert_same_evaluations(a, b, tolerance, where):
    assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
    for key in a:
        for name, value in a[key].items():
            if name.endswith(("_seconds", "time")) or name in ("kind", "iteration"):
                continue
            assert abs(value - b[key][name]) <= tolerance * max(1.0, abs(value)), (where, key, name, value, b[key][name])


def train(tmp_path, name, nproc, *overrides, config="harpe.yaml", signal_at=None, signal_children=False):
    """Run harpe-train under torchrun; returns rank 0's {exit_code, losses, iteration, reason}."""
    out = tmp_path / f"out_{name}"
    args = ["--", "--config", f"{TINY}/{config}", f"run_dir={tmp_path / name}", *overrides]
    if signal_at is not None:
        args = ["--send-signal-at", str(signal_at)] + (["--signal-children"] if signal_children else []) + args
    results = run_workers(WORKER, nproc, out, *args)
    for r in results[1:]:  # every rank reports the same losses (they are reduced and shared)
        assert r["losses"] == results[0]["losses"]
    return results[0]


def losses(result):
    return {int(k): v for k, v in result["losses"].items()}


class Runs:
    """Runs several tests compare against, each made once (by the first test that asks)."""

    def __init__(self, root: Path, spm_model: str):
        self.root, self.spm, self.done = root, spm_model, {}

    def get(self, name, nproc, *overrides, **kw):
        if name not in self.done:
            self.done[name] = train(self.root, name, nproc, *overrides, **kw)
        return self.done[name]

    def tp2_reference(self):
        """8 iterations at TP=2 on 2 torchrun ranks, no dropout, checkpoints at 4 and 8, evaluated at 4 and 8
        (validation loss and probes: the mpirun twin of this run does not evaluate and must match it)."""
        return self.get("tp2_reference", 2, "parallel.tensor=2", "checkpoint.save_interval=4", *VOCAB,
                        *evaluated(self.spm, 4))

    def seed(self):
        """A 4-layer HARPE model trained 4 iterations: the weights init_from tests start from."""
        self.get("seed", 1, "model.num_layers=4", "training.iterations=4", *VOCAB)
        return self.root / "seed" / "checkpoints"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spm_model):
    return Runs(tmp_path_factory.mktemp("shared_runs"), spm_model)


@pytest.mark.parametrize("layout, signal_children", [
    (["parallel.tensor=2"], True),
    (["parallel.pipeline=2", "data.global_batch_size=4"], False),
    (["parallel.distributed_optimizer=true"], False),  # DP=2 with the distributed optimizer
])
def test_resume_after_signal_is_bit_identical(tmp_path, layout, signal_children):
    """Dropout is on, so the trace is identical only if the RNG streams (torch's and megatron-core's
    model-parallel tracker) are restored along with weights, optimizer, scheduler and data position.

    In the TP=2 case the signal reaches every process of rank 0, megatron-core's checkpoint-writer helper
    (started by the periodic save at iteration 2) included, as Slurm signals every process of a step:
    the save on the signal must still succeed."""
    layout = [*layout, *DROPOUT] + (["checkpoint.save_interval=2"] if signal_children else [])
    straight = train(tmp_path, "straight", 2, *layout)
    assert straight["exit_code"] == 0 and len(straight["losses"]) == 8
    first = train(tmp_path, "resumed", 2, *layout, signal_at=4, signal_children=signal_children)
    assert first["exit_code"] == 75, first["reason"]  # checkpointed, asks to be requeued
    assert sorted(losses(first)) == [1, 2, 3, 4]
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    second = train(tmp_path, "resumed", 2, *layout)
    assert second["exit_code"] == 0
    assert sorted(losses(second)) == [5, 6, 7, 8]
    assert {**losses(first), **losses(second)} == losses(straight)  # bit-identical trace


def test_dp_reshardable_is_refused_with_torch_adamw_and_auto_records_its_format(tmp_path):
    """checkpoint.optimizer_format (issue 22 finding 7). dp_reshardable - no gather of the DP group's optimizer
    state at each save; what FusedAdam gets on GPUs - does not resume torch's AdamW exactly (measured: DP=2 bf16,
    iterations 6-8 after a resume at 4 differ), so with torch's AdamW it is refused before the first step, exit 2;
    `auto` records the format it chose (fully_reshardable here) in the checkpoint, which is loaded in that format."""
    from megatron_harpe.models.checkpoint import read_common_state

    layout = ["parallel.distributed_optimizer=true", "training.iterations=2"]
    refused = train(tmp_path, "dp_reshardable", 2, *layout, "checkpoint.optimizer_format=dp_reshardable")
    assert refused["exit_code"] == 2 and not refused["losses"]
    auto = train(tmp_path, "auto", 2, *layout)
    assert auto["exit_code"] == 0
    assert read_common_state(tmp_path / "auto" / "checkpoints" / "iter_0000002")["optimizer_format"] == \
        "fully_reshardable"


def test_resume_with_another_tensor_parallel_size(tmp_path, runs):
    """The reference run's TP=2 checkpoint at iteration 4, resumed at TP=1 (RNG streams re-seeded, weights
    and optimizer resharded), continues the same trace; its evaluation at iteration 8 (validation loss,
    probes scored over the whole vocabulary at TP=1) equals the TP=2 run's (vocabulary split in two)."""
    straight = runs.tp2_reference()
    shutil.copytree(runs.root / "tp2_reference" / "checkpoints" / "iter_0000004",
                    tmp_path / "resharded" / "checkpoints" / "iter_0000004")
    (tmp_path / "resharded" / "checkpoints" / "latest").write_text("iter_0000004\n")
    resumed = train(tmp_path, "resharded", 1, *VOCAB, *evaluated(runs.spm, 4))  # TP=2 checkpoint, TP=1 run
    assert resumed["exit_code"] == 0
    for it in (5, 6, 7, 8):
        assert abs(losses(resumed)[it] - losses(straight)[it]) < 1e-4, (it, losses(resumed), losses(straight))
    at_8 = {k: v for k, v in evaluations(runs.root / "tp2_reference").items() if k[1] == 8}
    assert sorted(at_8) == [("eval", 8), ("probe", 8)]
    assert_same_evaluations(evaluations(tmp_path / "resharded"), at_8, 1e-4, "TP=1 vs TP=2")


def test_stage_schedule_switches_length_and_base(tmp_path):
    result = train(tmp_path, "abf_multi", 1, config="abf_multi.yaml")
    assert result["exit_code"] == 0 and sorted(losses(result)) == list(range(1, 9))
    events = [json.loads(line) for line in (tmp_path / "abf_multi" / "metrics.jsonl").read_text().splitlines()]
    stage_of = {e["iteration"]: e["stage"] for e in events if "stage" in e}
    assert [stage_of[i] for i in range(1, 9)] == [0, 0, 0, 1, 1, 1, 2, 2]
    begins = [e["event"] for e in events if "event" in e and "begins" in e["event"]]
    assert "stage 1 (s64) begins at iteration 3: seq_length 64, RoPE base 50000" in begins
    assert "stage 2 (s128) begins at iteration 6: seq_length 128, RoPE base 200000" in begins
    # the stage ends were checkpointed with their own base, the final one with the last
    ckpts = tmp_path / "abf_multi" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("iter_*")) == ["iter_0000006", "iter_0000008"]  # keep_last 2


@pytest.mark.parametrize("method", ["pi", "yarn"])
def test_tiny_example_methods_run(tmp_path, method):
    """The two example methods no other test trains (harpe runs everywhere, abf_multi in the stage test,
    abf_single in the init_from test)."""
    result = train(tmp_path, method, 1, "training.iterations=3", config=f"{method}.yaml")
    assert result["exit_code"] == 0 and len(result["losses"]) == 3


@pytest.mark.parametrize("overrides, message", [
    (["model.num_heads=4"], "unknown key(s): model.num_heads"),
    (["model.position.bases=[10000,20000,30000]"], "3 bases but the model has 2 K/V groups"),
    (["parallel.tensor=8"], "world size 2 is not divisible"),
    (["parallel.tensor=2", "model.num_query_groups=1", "model.position.bases=[1e4]"],
     "num_query_groups (1) must be divisible"),
    (["parallel.context=2", "data.seq_length=30"], "divisible by 2 * context_parallel_size"),
    (["data.kind=indexed", "data.blend=[/nonexistent/corpus]"], "/nonexistent/corpus.bin does not exist"),
])
def test_bad_configs_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ValueError) as err:
        validate_config(load_config(f"{REPO_ROOT}/{TINY}/harpe.yaml", overrides), world_size=2)
    assert message in str(err.value)


def test_a_bad_config_fails_fast_on_every_rank(tmp_path):
    """Each rank refuses a bad config before any process group exists: started alone as rank 0 or as
    rank 1 of an env:// world of 2 (its partner never comes), it exits 2 at once with the message
    instead of waiting in the rendezvous, and creates nothing."""
    import time

    for rank in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "megatron_harpe.train", "--config", f"{TINY}/harpe.yaml",
                               f"run_dir={tmp_path}/bad", "model.position.bases=[10000,20000,30000]"],
                              env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.count("3 bases but the model has 2 K/V groups") == 1, proc.stderr[-3000:]
        assert elapsed < 20, elapsed  # ~0.3 s measured: the config is checked before torch is imported
    assert not (tmp_path / "bad").exists()


def mpiexec_path():
    candidate = Path(sys.executable).parent / "mpiexec"
    return str(candidate) if candidate.exists() else shutil.which("mpiexec")


def test_torchrun_and_mpirun_give_the_same_losses(tmp_path, runs):
    mpiexec = mpiexec_path()
    if mpiexec is None:
        if os.environ.get("CI"):
            pytest.fail("mpiexec not found: `make setup` installs the MPICH wheel (the mpi extra)")
        pytest.skip("mpiexec not installed (pip install -e .[mpi])")
    by_torchrun = runs.tp2_reference()
    out = tmp_path / "out_mpi"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.pop("MASTER_ADDR", None)
    cmd = [mpiexec, "-n", "2", sys.executable, WORKER, "--out", str(out), "--", "--config", f"{TINY}/harpe.yaml",
           f"run_dir={tmp_path / 'mpi'}", "parallel.tensor=2", *VOCAB]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert "mpi launch, world size 2" in proc.stdout
    # bit-identical although the torchrun run also evaluated at 4 and 8: evaluating leaves training alone
    assert ranks[0]["losses"] == ranks[1]["losses"] == by_torchrun["losses"]
    assert evaluations(runs.root / "tp2_reference") and not evaluations(tmp_path / "mpi")


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    result = train(tmp_path, "diverge", 1, "optimizer.lr=1e30", "scheduler.warmup_iterations=0",
                   "optimizer.clip_grad=0", "checkpoint.save_interval=1")
    assert result["exit_code"] == 3, result
    # lr 1e30: the gradients of the second step overflow first; checked before the step, never applied
    assert any(why in result["reason"] for why in ("loss is nan", "loss is inf", "gradients are not finite")), \
        result["reason"]
    last = max(losses(result))
    latest = (tmp_path / "diverge" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{last - 1:07d}"  # nothing saved after the bad step


def test_init_from_loads_weights_only(tmp_path, runs):
    # a new run, another position scheme (ABF single-stage base), fresh optimizer, from trained weights
    four = "model.num_layers=4"
    start = train(tmp_path, "continued", 1, four, *VOCAB, f"training.init_from={runs.seed()}", "training.iterations=2",
                  config="abf_single.yaml")
    fresh = train(tmp_path, "fresh", 1, four, *VOCAB, "training.iterations=2", config="abf_single.yaml")
    assert start["exit_code"] == 0 and fresh["exit_code"] == 0
    # starting from trained weights: the first loss is well below a fresh model's
    assert losses(start)[1] < losses(fresh)[1] - 0.05, (losses(start), losses(fresh))


def test_parallel_layouts_train_the_same_model(tmp_path, runs):
    """From the same weights (init_from: random init differs per pipeline layout, as in
    megatron-core), a 4-layer run at world 1, with CP=2, with DP=2, and with PP=2 x VPP=2
    (interleaved 1F1B) gives the same loss trace: the per-token loss normalisation and every
    schedule agree. So do the validation loss and the passkey probes at the end (one prompt per length:
    with DP=2 one rank has none, with VPP the pass is padded to the pipeline's two micro-batches)."""
    common = ["model.num_layers=4", *VOCAB, f"training.init_from={runs.seed()}", "training.iterations=3",
              *evaluated(runs.spm, 3, lengths="[128,192]", prompts=1)]
    single = losses(train(tmp_path, "single", 1, *common))
    reference = evaluations(tmp_path / "single")
    assert sorted(reference) == [("eval", 3), ("probe", 3)]
    assert reference[("probe", 3)]["probe_passkey_192_nll"] > 0 and reference[("eval", 3)]["eval_tokens"] == 1024
    for name, layout in {"cp2": ["parallel.context=2"], "dp2": [],
                         "vpp": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]}.items():
        run = train(tmp_path, name, 2, *common, *layout)
        other = losses(run)
        assert other.keys() == single.keys()
        for it in single:
            assert abs(other[it] - single[it]) < 2e-5, (name, it, other, single)
        assert_same_evaluations(evaluations(tmp_path / name), reference, 2e-5, name)
