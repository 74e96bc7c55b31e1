"""Faults a long run meets (issue 23), each planted for real and each costing at most the work since the last
good checkpoint: a save killed at several points, data of another vocabulary, non-finite losses and gradients,
a full filesystem.

Runs go through tests/workers/fault_worker.py under torchrun (gloo); the faults are real (SIGKILL of the
processes, NaN in the forward pass or a gradient buffer, ids past the embedding, a tmpfs that fills up).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.launch import REPO_ROOT, free_port

TINY = REPO_ROOT / "examples" / "tiny" / "harpe.yaml"
WORKER = REPO_ROOT / "tests" / "workers" / "fault_worker.py"
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "HARPE_DEBUG")


def launch(tmp_path, name, nproc, *overrides, fault=(), timeout=300):
    """harpe-train under torchrun with `fault` flags for the worker; (process, {rank: result}) whatever the exit."""
    out = tmp_path / f"out_{name}_{len(list(tmp_path.glob(f'out_{name}_*')))}"
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), "--out", str(out), *fault,
           "--", "--config", str(TINY), f"run_dir={tmp_path / name}", *overrides]
    # output to files, not pipes: a process that outlived the run must not keep the test waiting for EOF
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        code = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=stdout, stderr=stderr, timeout=timeout).returncode
    proc = subprocess.CompletedProcess(cmd, code, (out / "stdout").read_text(), (out / "stderr").read_text())
    results = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
    return proc, results


def losses(result):
    return {int(k): v for k, v in result["losses"].items()}


def events(run_dir: Path):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines if '"event"' in line]


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


# ---------------------------------------------------------------------------------------------- torn saves
SAVES = ("training.iterations=6", "checkpoint.save_interval=2", "checkpoint.keep_last=3")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 iterations on 2 ranks (DP=2, dropout on), checkpoints at 2, 4 and 6: the trace every resume must give."""
    root = tmp_path_factory.mktemp("faults_reference")
    proc, results = launch(root, "ref", 2, *SAVES)
    assert proc.returncode == 0 and results[0]["exit_code"] == 0, proc.stderr[-4000:]
    return root / "ref", losses(results[0])


def _from_iteration_2(uninterrupted, tmp_path) -> Path:
    """A copy of the reference run as it stood after its save at iteration 2."""
    ref, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for later in ("iter_0000004", "iter_0000006"):
        shutil.rmtree(run / "checkpoints" / later)
    (run / "checkpoints" / "latest").write_text("iter_0000002\n")
    (run / "metrics.jsonl").unlink()
    return run


@pytest.mark.parametrize("point", ["before_shards", "between_shards", "before_latest"])
def test_a_save_killed_at_any_point_resumes_bit_exact_from_the_previous_checkpoint(uninterrupted, tmp_path, point):
    """SIGKILL during the save of iteration 4 (every process, or one rank while the others write): `latest` still
    names iter_2, which loads; the next start says what it cleared, and the resumed trace is the uninterrupted one."""
    _, reference = uninterrupted
    run = _from_iteration_2(uninterrupted, tmp_path)
    killed, _ = launch(tmp_path, "run", 2, *SAVES, fault=("--kill-at", f"{point}:4"))
    assert killed.returncode != 0, killed.stdout[-2000:]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    left = sorted(p.name for p in ckpts.iterdir())
    if point == "before_latest":
        assert "iter_0000004" in left, left  # complete, renamed into place, but not named by `latest`
    else:
        assert ".iter_0000004.incomplete" in left and "iter_0000004" not in left, left

    proc, results = launch(tmp_path, "run", 2, *SAVES)
    assert proc.returncode == 0 and results[0]["exit_code"] == 0, proc.stderr[-4000:]
    resumed = losses(results[0])
    assert sorted(resumed) == [3, 4, 5, 6]
    assert all(resumed[i] == reference[i] for i in resumed), (resumed, reference)
    said = [e for e in events(run) if e.startswith("checkpoints:")]
    if point == "before_latest":
        assert len(said) == 1 and "moved iter_0000004 to skipped/iter_0000004" in said[0], said
        assert (ckpts / "skipped" / "iter_0000004" / "metadata.json").is_file()
    else:
        assert len(said) == 1 and "removed the partial checkpoint .iter_0000004.incomplete" in said[0], said
    assert not list(ckpts.glob(".iter_*")), sorted(p.name for p in ckpts.iterdir())
    assert (ckpts / "latest").read_text().strip() == "iter_0000006"


# ---------------------------------------------------------------------------------------------- vocabulary
def _indexed(prefix: Path, documents) -> str:
    from megatron_harpe.data.indexed import IndexedDatasetWriter

    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    for doc in documents:
        writer.add_document(doc)
    writer.commit()
    return str(prefix)


def test_token_ids_past_the_vocabulary_are_refused_on_every_rank_with_the_dataset_named(tmp_path):
    """No tokenizer configured, data holding ids >= model.vocab_size (another model's tokenizer): before, an
    IndexError in the embedding (a device-side assert on a GPU). Now exit 2 on both ranks, one message naming
    the dataset, the id and the vocabulary; a run that never started leaves nothing behind."""
    rng = np.random.default_rng(0)
    good = _indexed(tmp_path / "good", [rng.integers(0, 256, 300) for _ in range(40)])
    bad = _indexed(tmp_path / "bad", [np.r_[rng.integers(0, 256, 299), 300] for _ in range(40)])
    blend = [f"data.blend=[{good},{bad}]", "data.kind=indexed", "training.iterations=2"]
    proc, results = launch(tmp_path, "run", 2, *blend)
    assert [results[r]["exit_code"] for r in (0, 1)] == [2, 2], proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "harpe-train: error:" in line]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert f"dataset {bad}" in errors[0] and "token id 300" in errors[0] and "model.vocab_size 256" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_steps_are_skipped_up_to_the_bound_and_counted_across_resume(tmp_path):
    base = ("training.on_nonfinite=skip", "training.max_skipped_iterations=2", "checkpoint.save_interval=1")
    proc, results = launch(tmp_path, "run", 1, *base, "training.iterations=5",
                           fault=("--nan-input-at", "2", "--nan-grad-at", "4"))
    assert results[0]["exit_code"] == 0, proc.stderr[-4000:]
    got = losses(results[0])
    assert [i for i, v in got.items() if v != v] == [2] and all(v == v for i, v in got.items() if i != 2)
    skipped = [r["iteration"] for r in records(tmp_path / "run") if r.get("skipped")]
    assert skipped == [2, 4], records(tmp_path / "run")
    said = [e for e in events(tmp_path / "run") if "update skipped" in e]
    assert len(said) == 2 and "samples [4, 8) of stage 0" in said[0] and "gradients are not finite" in said[1]
    # weights untouched by the skipped updates: every checkpoint loads and the run went on learning
    assert got[5] < got[1]

    # the count survives a resume: the third non-finite step of the run stops it (exit 3, no save after it)
    proc, results = launch(tmp_path, "run", 1, *base, "training.iterations=7", "scheduler.replan_on_resume=true",
                           fault=("--nan-grad-at", "6"))
    assert results[0]["exit_code"] == 3, proc.stderr[-4000:]
    assert "2 update(s) already skipped, training.max_skipped_iterations=2" in results[0]["reason"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000005"


def test_nonfinite_stop_is_the_default_and_nan_weights_are_never_saved(tmp_path):
    proc, results = launch(tmp_path, "stop", 1, "checkpoint.save_interval=1", "training.iterations=4",
                           fault=("--nan-input-at", "3"))
    reason = results[0]["reason"]
    assert results[0]["exit_code"] == 3 and reason.startswith("loss is nan") and "at iteration 3" in reason, reason
    assert (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip() == "iter_0000002"

    proc, results = launch(tmp_path, "weights", 1, "checkpoint.save_interval=1", "training.iterations=4",
                           fault=("--nan-weight-at", "2"))
    assert results[0]["exit_code"] == 3, proc.stderr[-4000:]
    assert "weights are not finite at iteration 2" in results[0]["reason"]
    assert (tmp_path / "weights" / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "weights" / "checkpoints" / "iter_0000002").exists()


# ---------------------------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs whose size the test sets (mount needs root, which CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()

    def resize(size):
        options = f"size={size}" if not os.path.ismount(mount) else f"remount,size={size}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], check=True)
        return mount

    yield resize
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_with_one_message_and_no_partial_save_then_resumes(uninterrupted, tmp_path, small_disk):
    """Before: a multi-rank traceback ending in "unexpected pos 704 vs 598", exit 1, the staging directory left
    filling the disk. Now exit 4 on every rank (train.sbatch does not requeue it), one message with the path, the
    bytes needed and free, nothing partial left, `latest` untouched; with space freed the run resumes bit-exact."""
    _, reference = uninterrupted
    disk = small_disk("1550k")  # above the first save's estimate (1.43 MiB), below what it writes (1.6 MiB)
    ckpt = [f"checkpoint.dir={disk / 'ck'}"]
    proc, results = launch(tmp_path, "run", 2, *SAVES, *ckpt)
    assert [results[r]["exit_code"] for r in (0, 1)] == [4, 4] if results else False, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "harpe-train: error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert f"no space for checkpoint {disk / 'ck' / 'iter_0000002'} (the write failed" in errors[0], errors[0]
    assert "is free on its filesystem" in errors[0] and "nothing partial is left" in errors[0]
    assert sorted(p.name for p in (disk / "ck").iterdir()) == []

    disk = small_disk("2600k")  # one checkpoint fits, not two: the second is refused before writing
    proc, results = launch(tmp_path, "run", 2, *SAVES, *ckpt)
    assert results[0]["exit_code"] == 4, proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if "harpe-train: error:" in line]
    assert len(errors) == 1 and "iter_0000004 (checked before writing): it needs about 1.6" in errors[0], errors
    assert sorted(p.name for p in (disk / "ck").iterdir()) == ["iter_0000002", "latest"]
    assert any(e.startswith("low disk space:") for e in events(tmp_path / "run"))  # said at the save before

    proc, results = launch(tmp_path, "run", 2, *SAVES, *ckpt)  # and at the start of a run that resumes there
    said = events(tmp_path / "run")
    start = max(i for i, e in enumerate(said) if e.startswith("resumed from"))
    assert results[0]["exit_code"] == 4 and said[start + 1].startswith("low disk space:"), said

    small_disk("16m")
    proc, results = launch(tmp_path, "run", 2, *SAVES, *ckpt)
    assert results[0]["exit_code"] == 0, proc.stderr[-4000:]
    resumed = losses(results[0])
    assert sorted(resumed) == [3, 4, 5, 6] and all(resumed[i] == reference[i] for i in resumed), resumed
