"""The slurm/ scripts on a real single-node Slurm 22.05 cluster (tests/slurm_cluster.py), CPU mode.

One module-scoped fixture installs Slurm if needed (CI), starts a cluster in a fresh directory and submits
every job at once; each test then waits for its own jobs. The cluster's node declares more CPUs than the
machine has (config_overrides), so the jobs run side by side and their waiting (Slurm's ~12 s requeue
delay, start-up) overlaps. The daemons are stopped by their pid files at the end, also on failure.

- slurm/train.sbatch, plain srun, 2 ranks (TP=2, gloo): completes, loss falls, world size 2.
- the same run with a 2-minute limit and --signal=B:USR1@110 (the signal arrives 10-40 s after the start,
  slurmctld checks limits every 30 s): checkpoints, requeues itself, resumes; loss trace bit-identical.
  Once it has requeued, the test raises the job's limit to 10 minutes: a 2-minute limit would interrupt
  every later attempt after a few iterations too (start-up takes 10-30 s here), which proves nothing more
  and makes the module slow on a loaded machine.
- a dead rank (issue 23): the same run with task 0 (rank 0, which holds the rendezvous store) SIGKILLed by the
  test once the first checkpoint exists: the step ends within srun's bound (--wait + KillWait), the
  survivor names the lost rank in one line, nothing of that step is left, the job requeues on its progress
  and the resumed loss trace equals the uninterrupted one.
- LAUNCHER=mpi (srun --mpi=pmi2, the mpich wheel): MPI's COMM_WORLD and the trainer both see 2 ranks.
- the requeue decisions of train.sbatch (bounded restarts, no loop on crashes without progress, exit 2/3
  never requeued), with a stand-in trainer that only exits with the codes harpe-train uses.
- slurm/submit_preprocess.sh: array job + afterok merge == one harpe-preprocess run, byte for byte.
- harpe-sweep: a 2-point grid submitted chained (afterok) and run.

Deselect with `-m "not slurm"`. Outside CI the module skips (with the reason) when Slurm is not installed,
unless HARPE_SLURM_INSTALL=1 lets it apt-get install it; in CI (CI=true) it installs and must run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.data_fixtures import corpus_jsonl, data_dir, spm_model  # noqa: F401  (fixtures)
from tests.launch import REPO_ROOT
from tests.slurm_cluster import FINAL_STATES, SlurmCluster, SlurmUnavailable, ensure_slurm, in_ci

pytestmark = pytest.mark.slurm

TRAIN = str(REPO_ROOT / "slurm" / "train.sbatch")
TINY = str(REPO_ROOT / "examples" / "tiny" / "harpe.yaml")
# CPU mode on the test cluster: 1 node, 2 ranks, no GPUs, and (unlike the H100 default) not exclusive.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--oversubscribe"]
# Long enough to outlive the first time-limit signal (<= 40 s after the start) on an idle 2-core machine:
# ~0.14 s per iteration alone, ~0.28 s with the reference run beside it -> 150 iterations ~ 42 s + ~10 s
# start-up (a loaded machine is slower, which only adds margin).
ITERATIONS = 150
LONG = ["parallel.tensor=2", "model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=352",
        "data.seq_length=256", "model.max_position_embeddings=256", f"training.iterations={ITERATIONS}",
        # periodic checkpoints, as in real runs: the time-limit signal then meets megatron-core's checkpoint
        # writer processes (spawned at the first save), which train.sbatch must not signal
        "checkpoint.save_interval=25", "logging.tensorboard=false"]
JOB_TIMEOUT = 600
#: srun --wait for the dead-rank job: how long the survivor may go on after the killed task's end (train.sbatch's
#: default is 120 s; gloo's survivor sees the broken connection at once and leaves by itself: measured 2.4 s after
#: the kill on an idle machine, 7-9.5 s beside this module's other jobs). The step's bound is that plus Slurm's
#: KillWait (SIGTERM, then SIGKILL; 10 s in tests/slurm_cluster.py)
DEAD_RANK_WAIT_S = 10
DEAD_RANK_BOUND_S = DEAD_RANK_WAIT_S + 10

# A stand-in for `python` that plays harpe-train's exit codes (everything else goes to the real Python):
# attempt i (SLURM_RESTART_COUNT) exits FAKE_EXITS[i] and, if FAKE_PROGRESS[i] is 1, first writes a new
# checkpoint name into FAKE_CKPT/latest (the last entry repeats). It tests train.sbatch's decisions in seconds.
FAKE_PYTHON = """#!/bin/bash
if [[ $1 == -m && $2 == megatron_harpe.train ]]; then
    restart=${SLURM_RESTART_COUNT:-0}
    IFS=, read -r -a codes <<< "$FAKE_EXITS"; IFS=, read -r -a progress <<< "$FAKE_PROGRESS"
    code=${codes[$restart]:-${codes[-1]}}; p=${progress[$restart]:-${progress[-1]}}
    if [[ $p == 1 && ${SLURM_PROCID:-0} == 0 ]]; then
        mkdir -p "$FAKE_CKPT"; printf 'iter_%07d\\n' $((restart + 1)) > "$FAKE_CKPT/latest"
    fi
    echo "fake harpe-train: attempt $restart exits $code (progress $p)"
    exit "$code"
fi
exec {python} "$@"
"""
# name: (exit codes per attempt, progress per attempt, extra env) -> expected (state, exit code, restarts, log)
DECISIONS = {
    "budget": ("75", "1", {"MAX_RESTARTS": "2"}, ("FAILED", "75:0", 2, "reached MAX_RESTARTS=2")),
    "crash-no-progress": ("1", "0", {}, ("FAILED", "1:0", 0, "without a new checkpoint")),
    "crash-then-finish": ("1,0", "1", {}, ("COMPLETED", "0:0", 1, "failed (exit 1) after progress")),
    "nonfinite": ("3", "1", {}, ("FAILED", "3:0", 0, "non-finite loss: not requeued")),
    "bad-config": ("2", "0", {}, ("FAILED", "2:0", 0, "bad config or arguments: not requeued")),
    "signal-no-progress": ("75", "0", {}, ("FAILED", "75:0", 0, "before completing an iteration")),
}


def loss_trace(run_dir: Path) -> dict[int, float]:
    trace = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            trace[record["iteration"]] = record["loss"]
    return trace


def mpi_problem() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed: pip install -e '.[mpi]'"
    if not (Path(sys.executable).parent / "mpiexec").exists():
        return f"the mpich wheel is not installed (no mpiexec beside {sys.executable}): pip install -e '.[mpi]'"
    return None


def step_processes(job_id: str) -> list[tuple[int, dict, str]]:
    """(pid, environment, command line) of every live process of a step of job `job_id` (srun's tasks and what
    they started; not the batch script, which has no SLURM_STEP_ID)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().decode(errors="replace").split("\0")
            env = dict(item.split("=", 1) for item in environ if "=" in item)
            if env.get("SLURM_JOB_ID") != job_id or "SLURM_STEP_ID" not in env:
                continue
            if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        found.append((int(entry), env, cmd.strip()))
    return found


class Jobs:
    """Everything submitted at the start; `wait(name)` waits for one job and returns its scontrol record."""

    def __init__(self, cluster: SlurmCluster, work: Path):
        self.cluster, self.work = cluster, work
        self.ids: dict[str, str] = {}
        self.extra: dict = {}
        self.started = time.monotonic()

    def env(self, **extra) -> dict:
        env = self.cluster.env(HARPE_PYTHON=sys.executable, HARPE_DEVICE="cpu", OMP_NUM_THREADS="1",
                               PYTHONPATH=str(REPO_ROOT))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "CONFIG", "OVERRIDES", "LAUNCHER", "MAX_RESTARTS"):
            env.pop(key, None)
        env.update(extra)
        return env

    def train(self, name: str, *sbatch_args: str, overrides=(), env=None) -> None:
        args = [*CPU_JOB, f"--job-name={name}", f"--output={self.work}/%x-%j.out", *sbatch_args, TRAIN, TINY,
                f"run_dir={self.work / name}", *overrides]
        self.ids[name] = str(self.cluster.sbatch(args, env=self.env(**(env or {})), cwd=self.work))

    def lift_limit_after_first_requeue(self, name: str, minutes: int = 10) -> None:
        """Raise the job's time limit once it has requeued (a thread; see the module docstring)."""
        def watch():
            deadline = time.monotonic() + JOB_TIMEOUT
            while time.monotonic() < deadline:
                record = self.cluster.job(self.ids[name])
                if not record or record.get("JobState") in FINAL_STATES:
                    return
                if int(record.get("Restarts", "0")) >= 1:
                    self.cluster.run("scontrol", "update", f"JobId={self.ids[name]}", f"TimeLimit={minutes}",
                                     check=False)
                    self.extra[f"{name}_lifted_after"] = record.get("Restarts")
                    return
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()

    def kill_task_after_first_checkpoint(self, name: str, task: int = 0) -> None:
        """SIGKILL task `task`'s harpe-train once the job's first checkpoint exists, then note which processes of
        that attempt's step are still there once the step has ended (a thread; the dead-rank test)."""
        def watch():
            deadline = time.monotonic() + JOB_TIMEOUT
            latest, attempts = self.work / name / "checkpoints" / "latest", self.work / name / "slurm_attempts.log"
            while not latest.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            victims = [pid for pid, env, cmd in step_processes(self.ids[name])
                       if env.get("SLURM_PROCID") == str(task) and "-m megatron_harpe.train" in cmd]
            if len(victims) != 1:
                self.extra[f"{name}_killed"] = f"found {victims} for task {task}"
                return
            os.kill(victims[0], signal.SIGKILL)
            self.extra[f"{name}_killed"] = (victims[0], time.time())
            while " exit " not in attempts.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            ended = time.monotonic()
            while True:  # what outlives that step (slurmstepd ends what it tracks as the step ends)
                left = [(pid, cmd) for pid, env, cmd in step_processes(self.ids[name])
                        if env.get("SLURM_RESTART_COUNT", "0") == "0"]
                if not left or time.monotonic() > ended + 5:
                    break
                time.sleep(0.2)
            self.extra[f"{name}_left"] = left

        threading.Thread(target=watch, daemon=True).start()

    def wait(self, name: str, timeout: float = JOB_TIMEOUT) -> dict:
        return self.cluster.wait(self.ids[name], timeout=timeout)

    def log(self, record: dict) -> str:
        path = record.get("StdOut", "")
        return Path(path).read_text(errors="replace") if path and Path(path).exists() else f"(no log {path!r})"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, corpus_jsonl, spm_model):  # noqa: F811
    install = in_ci() or os.environ.get("HARPE_SLURM_INSTALL", "").strip() == "1"
    try:
        installed_s = ensure_slurm(install)
    except SlurmUnavailable as err:
        if in_ci():
            pytest.fail(f"{err} - required in CI")
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("slurm")
    cluster = SlurmCluster(root / "cluster", cpus=32)
    started = time.monotonic()
    cluster.start()
    print(f"\nslurm: install {installed_s:.0f} s, cluster start {time.monotonic() - started:.1f} s")
    work = root / "work"
    work.mkdir()
    j = Jobs(cluster, work)
    try:
        # the long training runs first: they are the longest poles
        j.train("reference", "--time=10", overrides=LONG)
        j.train("requeue", "--time=2", "--signal=B:USR1@110", overrides=LONG)
        j.lift_limit_after_first_requeue("requeue")
        j.train("deadrank", "--time=10", overrides=LONG, env={"STEP_EXIT_WAIT_S": str(DEAD_RANK_WAIT_S)})
        j.kill_task_after_first_checkpoint("deadrank", task=0)
        if mpi_problem() is None:
            j.train("mpi", "--time=10", overrides=["training.iterations=2", "logging.tensorboard=false"],
                    env={"LAUNCHER": "mpi", "SRUN_MPI": "pmi2"})
        # PREFLIGHT=1: harpe-preflight as the job's first step on its own 2 srun ranks; training only after a pass
        short = ["parallel.tensor=2", "training.iterations=2", "logging.tensorboard=false"]
        j.train("preflight", "--time=10", overrides=short, env={"PREFLIGHT": "1"})
        j.train("preflight-fails", "--time=10", overrides=short,
                env={"PREFLIGHT": "1", "PREFLIGHT_ARGS": "--gpu-memory-gib 1"})
        submit_preprocess(j, corpus_jsonl, spm_model)
        submit_sweep(j)
        fake = work / "fake-python"
        fake.write_text(FAKE_PYTHON.replace("{python}", sys.executable))
        fake.chmod(0o755)
        for name, (codes, progress, extra, _) in DECISIONS.items():
            j.train(name, "--ntasks-per-node=1", "--time=10",
                    env={"HARPE_PYTHON": str(fake), "FAKE_EXITS": codes, "FAKE_PROGRESS": progress,
                         "FAKE_CKPT": str(work / name / "checkpoints"), **extra})
        yield j
    finally:
        stopping = time.monotonic()
        cluster.stop()
        print(f"\nslurm: jobs {stopping - j.started:.0f} s, stop {time.monotonic() - stopping:.1f} s")


def submit_preprocess(j: Jobs, corpus: str, spm: str) -> None:
    """Three input shards -> array job of 3 tasks + merge (afterok); the single-process run is made later."""
    lines = Path(corpus).read_text().splitlines(keepends=True)
    raw = j.work / "raw"
    raw.mkdir()
    third = len(lines) // 3 + 1
    for i in range(3):
        (raw / f"part-{i}.jsonl").write_text("".join(lines[i * third:(i + 1) * third]))
    env = j.env(OUTPUT_PREFIX=str(j.work / "pp" / "corpus"), INPUTS=str(raw / "part-*.jsonl"),
                PREPROCESS_ARGS=f"--tokenizer-type sentencepiece --tokenizer-model {spm} --append-eod")
    proc = subprocess.run([str(REPO_ROOT / "slurm" / "submit_preprocess.sh"), "--cpus-per-task=1", "--time=10"],
                          env=env, cwd=j.work, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    ids = dict(line.split()[:2] for line in proc.stdout.splitlines() if line.startswith(("array ", "merge ")))
    j.ids["preprocess-array"], j.ids["preprocess-merge"] = ids["array"], ids["merge"]
    j.extra["preprocess_inputs"] = sorted(raw.glob("part-*.jsonl"))
    j.extra["preprocess_submit_output"] = proc.stdout


def submit_sweep(j: Jobs) -> None:
    cmd = [sys.executable, "-m", "megatron_harpe.sweeps.sweep", "--name", "tiny",
           "--method", f"harpe={TINY}", "--method", f"pi={REPO_ROOT / 'examples/tiny/pi.yaml'}",
           "--seq-length", "64", "--layout", "tp2:nodes=1,tp=2", "--tasks-per-node", "2",
           "--set", "training.iterations=2", "--set", "logging.tensorboard=false",
           *[f"--sbatch-arg={a}" for a in CPU_JOB if not a.startswith(("--nodes", "--ntasks"))],
           "--sbatch-arg=--time=10", "--chain", "afterok",
           "--out-dir", str(j.work / "sweeps"), "--runs-root", str(j.work / "runs")]
    proc = subprocess.run(cmd, env=j.env(), cwd=j.work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
    rows = (j.work / "sweeps" / "tiny" / "jobs.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    j.extra["sweep"] = [dict(zip(header, row.split("\t"))) for row in rows[1:]]
    j.extra["sweep_stdout"] = proc.stdout


# -------------------------------------------------------------------------------------------------- tests
def test_train_job_completes_with_falling_loss_on_two_srun_ranks(jobs):
    info = jobs.wait("reference")
    log = jobs.log(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-4000:]
    assert "harpe-train: slurm launch, world size 2" in log, log[-4000:]  # plain srun, launcher reads SLURM_*
    assert "world 2 = TP 2 x PP 1 x CP 1 x DP 1" in log
    trace = loss_trace(jobs.work / "reference")
    assert sorted(trace) == list(range(1, ITERATIONS + 1))
    first = sum(trace[i] for i in range(1, 6)) / 5
    last = sum(trace[i] for i in range(ITERATIONS - 4, ITERATIONS + 1)) / 5
    assert last < 0.8 * first, (first, last)


def test_time_limit_signal_checkpoints_requeues_and_resumes_bit_identically(jobs):
    info = jobs.wait("requeue")
    log = jobs.log(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    restarts = int(info["Restarts"])
    assert restarts >= 1, ("the run finished before the time-limit signal: this machine is faster than "
                           "expected; raise ITERATIONS\n" + log[-4000:])
    # (the last attempt may get the signal too, after its last iteration: it then just finishes)
    assert log.count("USR1 (time limit near): asking the ranks to checkpoint and exit (signalled 2 rank(s) on "
                     "this node)") >= restarts  # the rank processes themselves, found with scontrol listpids
    assert log.count("checkpointed on the signal: requeueing") == restarts
    assert "signal SIGUSR1: checkpoint saved at iteration" in log  # the trainer saw the forwarded signal
    assert re.search(r"resumed from .*iter_\d+ at iteration \d+", log)
    attempts = (jobs.work / "requeue" / "slurm_attempts.log").read_text().split("\n")
    assert sum(" exit 75 " in a for a in attempts) == restarts and " exit 0 " in attempts[-2]
    assert jobs.extra.get("requeue_lifted_after") is not None  # the limit was raised after the first requeue
    reference = jobs.wait("reference")
    assert reference["JobState"] == "COMPLETED", jobs.log(reference)[-3000:]
    assert loss_trace(jobs.work / "requeue") == loss_trace(jobs.work / "reference")  # bit-identical


def test_a_killed_task_ends_the_step_in_bound_requeues_and_resumes_exactly(jobs):
    """One task SIGKILLed after the first checkpoint (issue 23): rank 0, which holds the rendezvous store."""
    info = jobs.wait("deadrank")
    log = jobs.log(info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-6000:]
    killed = jobs.extra.get("deadrank_killed")
    assert isinstance(killed, tuple), killed
    pid, killed_at = killed
    records = [line.split() for line in (jobs.work / "deadrank" / "slurm_attempts.log").read_text().splitlines()]
    # <time> <job> <restart> start|exit <latest>|<rc> <latest>
    first_exit = next(r for r in records if r[3] == "exit")
    assert first_exit[2] == "0" and first_exit[4] not in ("0", "2", "3", "4", "75"), records
    ended = int(first_exit[0]) + 1 - killed_at  # the log has whole seconds
    print(f"\ndead rank: the step ended {ended:.1f} s after the kill (bound {DEAD_RANK_BOUND_S} s)")
    assert ended <= DEAD_RANK_BOUND_S + 1, (ended, log[-6000:])
    assert "srun: error: localhost: task 0: Killed" in log
    named = [line for line in log.splitlines() if line.startswith("harpe-train: lost ")]
    assert len(named) == 1, log[-6000:]  # one line, from the survivor
    assert named[0].startswith("harpe-train: lost rank 0 (") and f"pid {pid}: gone), 1 of 2 ranks, which held the " \
        "rendezvous store" in named[0], named
    assert "Traceback" not in log, log[-6000:]  # the line instead of the survivor's traceback
    assert f"failed (exit {first_exit[4]}) after progress" in log and "requeueing (restart 1" in log
    assert jobs.extra.get("deadrank_left") == [], jobs.extra.get("deadrank_left")  # nothing of that step is left
    assert re.search(r"resumed from .*iter_\d+ at iteration \d+", log)
    reference = jobs.wait("reference")
    assert reference["JobState"] == "COMPLETED", jobs.log(reference)[-3000:]
    assert loss_trace(jobs.work / "deadrank") == loss_trace(jobs.work / "reference")  # bit-identical


@pytest.mark.parametrize("launcher", ["srun", "srun --mpi=pmi2"])
def test_launchers_give_the_trainer_the_right_world_size(jobs, launcher):
    if launcher == "srun":
        info = jobs.wait("reference")
    else:
        problem = mpi_problem()
        if problem:
            if in_ci():
                pytest.fail(problem + " - required in CI")
            pytest.skip(problem)
        info = jobs.wait("mpi")
    log = jobs.log(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "harpe-train: slurm launch, world size 2" in log, log[-4000:]
    if launcher != "srun":
        assert "launcher mpi" in log
        assert re.search(r"mpicheck: MPI COMM_WORLD size 2 on every rank \(2 answered\), SLURM_NTASKS 2, "
                         r"PMI size 2: MPICH", log), log[-4000:]


def test_preflight_runs_as_the_first_step_and_gates_training(jobs):
    """PREFLIGHT=1: harpe-preflight on the job's own srun ranks (Slurm's launcher, gloo) before harpe-train; a
    failed check (a memory plan that cannot fit: --gpu-memory-gib 1 through PREFLIGHT_ARGS) ends the job with
    exit 5 and nothing trained."""
    info = jobs.wait("preflight")
    log = jobs.log(info)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert "harpe-preflight: slurm launch, world size 2" in log and "preflight passed: training" in log, log[-4000:]
    report = json.loads((jobs.work / "preflight" / "preflight.json").read_text())
    assert report["passed"] and {c["name"]: c["status"] for c in report["checks"]}["layout parity"] == "pass"
    assert loss_trace(jobs.work / "preflight")  # and then it trained

    info = jobs.wait("preflight-fails")
    log = jobs.log(info)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "5:0"), log[-4000:]
    assert "a check failed" in log and "nothing trained" in log, log[-4000:]
    report = json.loads((jobs.work / "preflight-fails" / "preflight.json").read_text())
    assert report["verdict"].startswith("FAIL: memory (full run)")
    assert not (jobs.work / "preflight-fails" / "checkpoints").exists()


@pytest.mark.parametrize("name", list(DECISIONS))
def test_requeue_decisions(jobs, name):
    state, exit_code, restarts, message = DECISIONS[name][3]
    info = jobs.wait(name)
    log = jobs.log(info)
    assert (info["JobState"], info["ExitCode"], int(info["Restarts"])) == (state, exit_code, restarts), log[-3000:]
    assert message in log, log[-3000:]
    assert log.count("fake harpe-train: attempt") == restarts + 1


def test_preprocess_array_and_merge_equal_one_preprocess_run(jobs, spm_model, tmp_path):  # noqa: F811
    merge = jobs.wait("preprocess-merge")
    array = jobs.cluster.jobs(jobs.ids["preprocess-array"])
    assert len(array) == 3 and all(r["JobState"] == "COMPLETED" for r in array), array
    assert merge["JobState"] == "COMPLETED", jobs.log(merge)[-3000:]
    assert merge["StartTime"] >= max(r["EndTime"] for r in array)  # afterok: after every array task
    from megatron_harpe.data.preprocess import main as preprocess

    single = tmp_path / "single"
    assert preprocess(["--input", *map(str, jobs.extra["preprocess_inputs"]), "--tokenizer-type", "sentencepiece",
                       "--tokenizer-model", spm_model, "--append-eod", "--output-prefix", str(single),
                       "--workers", "1", "--no-progress"]) == 0
    merged = jobs.work / "pp" / "corpus_text_document"
    for ext in (".bin", ".idx"):
        assert Path(str(merged) + ext).read_bytes() == Path(f"{single}_text_document{ext}").read_bytes(), ext
    assert not (jobs.work / "pp" / "corpus.shards").exists()  # removed after the merge


def test_sweep_submits_a_chained_grid_that_runs(jobs):
    points = jobs.extra["sweep"]
    assert [p["point"] for p in points] == ["harpe-s64-tp2", "pi-s64-tp2"], jobs.extra["sweep_stdout"]
    assert all(p["job_id"] in jobs.extra["sweep_stdout"] for p in points)
    first, second = (jobs.cluster.wait(p["job_id"], timeout=JOB_TIMEOUT) for p in points)
    for record, point in ((first, points[0]), (second, points[1])):
        assert record["JobState"] == "COMPLETED", jobs.log(record)[-3000:]
        assert "harpe-train: slurm launch, world size 2" in jobs.log(record)
        assert sorted(loss_trace(Path(point["run_dir"]))) == [1, 2]
    assert second["StartTime"] >= first["EndTime"]  # afterok: the second waited for the first
    config = Path(points[1]["config"]).read_text()
    assert "seq_length: 64" in config and "interpolation_factor: 2.0" in config  # tiny pi: 4 x 64 / 128
