"""The error contract of harpe-train and harpe-convert (megatron_harpe/cli.py): bad input -> exit 2, one message
naming the input and the fix, no traceback, nothing half-made left behind; upstream warnings silenced.

One tiny run is trained once (single process: the launcher is "single") and copied for each case; the cases
run the commands' main() in this process (a launch costs ~5 s of imports), the warning check in a child."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import REPO_ROOT

TINY = str(REPO_ROOT / "examples" / "tiny" / "harpe.yaml")


def harpe(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HARPE_DEBUG", "HARPE_VERBOSE"):
        env.pop(key, None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    proc.seconds = time.monotonic() - started
    return proc


class Result:
    def __init__(self, returncode, stdout, stderr, seconds):
        self.returncode, self.stdout, self.stderr, self.seconds = returncode, stdout, stderr, seconds


def run_main(capsys, module, *args):
    """A command's main() in this process, as the console script runs it."""
    import importlib

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    capsys.readouterr()
    started = time.monotonic()
    code = importlib.import_module(module).main(list(args))
    out = capsys.readouterr()
    return Result(code, out.out, out.err, time.monotonic() - started)


def assert_bad_input(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("errors") / "base"
    proc = harpe("megatron_harpe.train", "--config", TINY, f"run_dir={run}", "training.iterations=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def test_train_needs_a_config_and_answers_config_errors_fast(tmp_path):
    proc = harpe("megatron_harpe.train")
    assert proc.returncode == 2 and "--config" in proc.stderr
    proc = harpe("megatron_harpe.train", "--config", TINY, f"run_dir={tmp_path / 'x'}", "model.hidden_size=63")
    assert_bad_input(proc, "model", "hidden_size (63)")
    assert proc.seconds < 10, proc.seconds  # ~0.3 s measured here: checked before torch is imported
    assert not (tmp_path / "x").exists()


def test_a_clean_run_prints_no_upstream_warnings(trained):
    log = (trained / "metrics.jsonl").read_text()
    assert "finished 2 iterations" in log
    proc = harpe("megatron_harpe.train", "--config", TINY, f"run_dir={trained}", "training.iterations=2")
    assert proc.returncode == 0, proc.stderr[-3000:]  # nothing left to do: the finished run says so
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    # upstream's log records too (megatron-core 0.19: GPTModel deprecation, MLP spec rewrapping, async save)
    for notice in ("DEPRECATED", "deprecated", "Rewrapping"):
        assert notice not in proc.stderr, proc.stderr[-3000:]


def test_truncated_checkpoint_is_named_on_resume_and_on_export(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    checkpoint = run / "checkpoints" / "iter_0000002"
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={run}", "training.iterations=2")
    assert_bad_input(proc, str(checkpoint), f"{shard.name} is cut short")
    proc = run_main(capsys, "megatron_harpe.convert.cli", "megatron-to-hf", "--load", str(run), "--out",
                    str(tmp_path / "hf"))
    assert_bad_input(proc, str(checkpoint), "incomplete")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
    shard.unlink()
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={run}", "training.iterations=2")
    assert_bad_input(proc, f"{shard.name} is missing")


def test_another_architecture_is_refused_by_name(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={run}", "training.iterations=2",
                 "model.ffn_hidden_size=192")
    assert_bad_input(proc, "holds another model", "mlp.linear_fc")
    fresh = tmp_path / "fresh"
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={fresh}", "model.ffn_hidden_size=192",
                 f"training.init_from={trained / 'checkpoints'}")
    assert_bad_input(proc, "holds another model")
    assert not fresh.exists()  # nothing of the run was made


def test_init_from_takes_a_run_directory_and_refuses_what_holds_no_checkpoint(trained, tmp_path, capsys):
    empty = tmp_path / "no_checkpoint"
    (empty / "checkpoints").mkdir(parents=True)
    fresh = tmp_path / "fresh"
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={fresh}",
                    f"training.init_from={empty}")
    assert_bad_input(proc, f"training.init_from: {empty}", "run directory with checkpoints/latest")
    assert not fresh.exists()
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={fresh}", "training.iterations=1",
                    f"training.init_from={trained}")  # the run directory, as a user names "the model"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "iter_0000002" in proc.stdout  # loaded the run's newest checkpoint


def test_a_changed_schedule_on_resume_is_refused_or_replanned(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={run}", "training.iterations=3")
    assert_bad_input(proc, "total_iterations 2 -> 3", "scheduler.replan_on_resume=true")
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={run}", "training.iterations=3",
                 "scheduler.replan_on_resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learning-rate schedule re-planned at iteration 2: total_iterations 2 -> 3" in proc.stdout


def test_corrupt_index_is_named_before_anything_is_made(tmp_path, corpus_prefix, capsys):
    bad = tmp_path / "bad_text_document"
    shutil.copy(f"{corpus_prefix}.bin", f"{bad}.bin")
    index = Path(f"{corpus_prefix}.idx").read_bytes()
    Path(f"{bad}.idx").write_bytes(index[:-40])
    run = tmp_path / "run"
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={run}", "data.kind=indexed",
                 f"data.blend=[{bad}]", "model.vocab_size=1024")
    assert_bad_input(proc, f"{bad}.idx is cut short", "harpe-preprocess")
    assert not run.exists()


@pytest.fixture(scope="module")
def corpus_prefix(tmp_path_factory, spm_model, corpus_jsonl):
    from megatron_harpe.data import preprocess

    prefix = tmp_path_factory.mktemp("corpus") / "c"
    assert preprocess.main(["--input", str(corpus_jsonl), "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                            str(spm_model), "--output-prefix", str(prefix), "--workers", "1", "--append-eod"]) == 0
    return f"{prefix}_text_document"


from tests.data_fixtures import corpus_jsonl, data_dir, spm_model  # noqa: E402,F401  (fixtures)


from tests.data_fixtures import data_dir, spm_model  # noqa: E402,F401  (a real sentencepiece model of 1,000 pieces)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_anything_starts(spm_model, tmp_path, capsys):
    """The "Llama-3 data, Llama-2 model" mistake (issue 23): before, harpe-train started and died in the embedding
    with IndexError (a device-side assert on a GPU). Now: exit 2 before anything is made, both numbers and the key."""
    run = tmp_path / "run"
    proc = run_main(capsys, "megatron_harpe.train", "--config", TINY, f"run_dir={run}",
                    f"data.tokenizer_model={spm_model}")  # the tiny model's vocabulary is 256
    assert_bad_input(proc, spm_model, "1,000 tokens", "model.vocab_size) is 256", "model.vocab_size >= 1,000")
    assert not run.exists()
