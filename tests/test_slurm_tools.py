"""The Slurm tooling without a cluster: harpe-merge-data, the run-dir helper of train.sbatch, harpe-sweep's
grid (dry run), and the batch scripts' syntax. The real cluster runs are in tests/test_slurm.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_harpe.data.indexed import IndexedDatasetWriter
from megatron_harpe.data.merge import main as merge_main
from megatron_harpe.data.merge import merge_datasets
from megatron_harpe.data.preprocess import main as preprocess_main
from megatron_harpe.sweeps import runinfo, sweep
from tests.data_fixtures import corpus_jsonl, data_dir, spm_model  # noqa: F401  (fixtures)
from tests.launch import REPO_ROOT

SCRIPTS = ["train.sbatch", "preprocess.sbatch", "convert.sbatch", "submit_preprocess.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_batch_scripts_parse_and_are_executable(script):
    path = REPO_ROOT / "slurm" / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(path, os.X_OK)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "error", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_train_sbatch_asks_for_the_signal_requeue_and_append():
    text = (REPO_ROOT / "slurm" / "train.sbatch").read_text()
    for directive in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                      "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8"):
        assert directive in text
    assert "scontrol requeue" in text and "SLURM_RESTART_COUNT" in text


# ------------------------------------------------------------------------------------------ merge
def _shards(tmp_path, corpus, spm, n=3):
    lines = Path(corpus).read_text().splitlines(keepends=True)
    size = len(lines) // n + 1
    inputs = []
    for i in range(n):
        path = tmp_path / f"part-{i}.jsonl"
        path.write_text("".join(lines[i * size:(i + 1) * size]))
        inputs.append(str(path))
    common = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", spm, "--append-eod", "--workers", "1",
              "--no-progress"]
    for i, path in enumerate(inputs):
        assert preprocess_main(["--input", path, "--output-prefix", str(tmp_path / "shards" / f"shard_{i:05d}"),
                                *common]) == 0
    assert preprocess_main(["--input", *inputs, "--output-prefix", str(tmp_path / "single"), *common]) == 0
    return [str(tmp_path / "shards" / f"shard_{i:05d}_text_document") for i in range(n)]


def test_merge_of_shards_is_byte_identical_to_one_preprocess_run(tmp_path, capsys, corpus_jsonl, spm_model):  # noqa: F811
    _shards(tmp_path, corpus_jsonl, spm_model)
    out = tmp_path / "merged" / "all_text_document"
    assert merge_main(["--input", str(tmp_path / "shards" / "shard_*_text_document.idx"),
                       "--output-prefix", str(out), "--no-progress"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("harpe-merge-data: done: 3 datasets ->") and "documents" in summary
    for ext in (".bin", ".idx"):
        assert Path(f"{out}{ext}").read_bytes() == (tmp_path / f"single_text_document{ext}").read_bytes()
    assert not list(out.parent.glob("*incomplete*"))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out))
    assert len(ds) == ds.document_indices.size - 1 > 0


def _dataset(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(d)
    w.commit()
    return str(prefix)


def test_merge_keeps_the_order_given_and_sorts_globs(tmp_path):
    a = _dataset(tmp_path / "d_00002", [[1, 2], [3]])
    b = _dataset(tmp_path / "d_00010", [[4, 5, 6]])
    merge_datasets([b, a + ".bin"], str(tmp_path / "ba"))
    merge_datasets([str(tmp_path / "d_*.idx")], str(tmp_path / "glob"))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ba, glob_ = IndexedDataset(str(tmp_path / "ba")), IndexedDataset(str(tmp_path / "glob"))
    assert [ba[i].tolist() for i in range(len(ba))] == [[4, 5, 6], [1, 2], [3]]
    assert [glob_[i].tolist() for i in range(len(glob_))] == [[1, 2], [3], [4, 5, 6]]
    assert list(glob_.document_indices) == [0, 1, 2, 3]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("twice", "is given twice"),
    ("dtype", "holds int32 tokens"),
    ("output_is_input", "is also an input"),
    ("glob_nothing", "matches no .bin/.idx file"),
    ("truncated", "is not a valid indexed dataset"),
    ("garbage_idx", "is not a megatron indexed-dataset index"),
    ("empty_pair", "is not a megatron indexed-dataset index"),
    ("cut_idx", "cut short"),
    ("output_is_a_directory", "is a directory"),
    ("output_under_a_file", "cannot create the output directory"),
    ("unknown_flag", "unrecognized arguments: --bogus"),
])
def test_merge_bad_inputs_are_named(tmp_path, capsys, case, message):
    """Exit code 2, one message naming the input, no traceback, nothing written: not even the output
    directory (it is made only once every input has been checked)."""
    a = _dataset(tmp_path / "a", [[1, 2]])
    bad = tmp_path / "bad"
    args = {"missing": [a, str(tmp_path / "nope")], "twice": [a, a + ".idx"],
            "dtype": [a, _dataset(tmp_path / "wide", [[70000]], np.int32)], "output_is_input": [a],
            "glob_nothing": [str(tmp_path / "zz*")], "truncated": [a, _dataset(tmp_path / "cut", [[1, 2, 3]])],
            "garbage_idx": [a, str(bad)], "empty_pair": [a, str(bad)],
            "cut_idx": [a, _dataset(tmp_path / "cutidx", [[1, 2, 3], [4]])]}.get(case, [a])
    named = {"missing": "nope", "twice": a, "dtype": "wide", "truncated": "cut", "garbage_idx": "bad.idx",
             "empty_pair": "bad.idx", "cut_idx": "cutidx.idx", "glob_nothing": "zz*"}.get(case, "")
    if case == "truncated":
        with open(tmp_path / "cut.bin", "r+b") as f:
            f.truncate(2)
    if case == "cut_idx":
        with open(tmp_path / "cutidx.idx", "r+b") as f:
            f.truncate(40)
    if case == "garbage_idx":
        (tmp_path / "bad.bin").write_bytes(b"\0" * 8)
        (tmp_path / "bad.idx").write_bytes(os.urandom(100))
    if case == "empty_pair":
        (tmp_path / "bad.bin").write_bytes(b"")
        (tmp_path / "bad.idx").write_bytes(b"")
    (tmp_path / "afile").write_text("x")
    out = {"output_is_input": a, "output_is_a_directory": str(tmp_path),
           "output_under_a_file": str(tmp_path / "afile" / "sub" / "out")}.get(case, str(tmp_path / "new" / "out"))
    extra = ["--bogus"] if case == "unknown_flag" else []
    assert merge_main(["--input", *args, "--output-prefix", out, "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and named in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "new").exists() and not (tmp_path / "out.idx").exists()
    assert (tmp_path / "afile").read_text() == "x"


def test_merge_into_a_new_directory_and_debug(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HARPE_DEBUG", raising=False)
    a = _dataset(tmp_path / "a", [[1, 2]])
    b = _dataset(tmp_path / "b", [[3]])
    out = tmp_path / "new" / "deeper" / "ab"
    assert merge_main(["--input", a, b, "--output-prefix", str(out), "--no-progress"]) == 0
    assert "2 datasets" in capsys.readouterr().out
    assert sorted(os.listdir(out.parent)) == ["ab.bin", "ab.idx"]
    assert merge_main(["--input", a, a, "--output-prefix", str(tmp_path / "x"), "--no-progress", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "is given twice" in err and "Traceback" in err


# ------------------------------------------------------------------------------------------ runinfo
def test_runinfo_follows_harpe_train_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: runs/x\ncheckpoint: {keep_last: 2}\n")
    assert runinfo.run_info(str(cfg), []) == {"RUN_DIR": str(tmp_path / "runs/x"),
                                              "CKPT_DIR": str(tmp_path / "runs/x/checkpoints"), "LATEST": ""}
    info = runinfo.run_info(str(cfg), ["run_dir=/abs/y", "checkpoint.dir=ck"])
    assert (info["RUN_DIR"], info["CKPT_DIR"]) == ("/abs/y", str(tmp_path / "ck"))
    assert runinfo.run_info(str(cfg), ["checkpoint={dir: /c2}"])["CKPT_DIR"] == "/c2"
    (tmp_path / "runs/x/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/x/checkpoints/latest").write_text("iter_0000100\n")
    assert runinfo.run_info(str(cfg), [])["LATEST"] == "iter_0000100"
    from megatron_harpe.config.schema import Config

    assert runinfo.run_info(None, [])["RUN_DIR"] == str(tmp_path / Config().run_dir)  # same default
    with pytest.raises(runinfo.RunInfoError, match="unknown key\\(s\\): checkpoint.dri"):  # harpe-train's loader
        runinfo.run_info(str(cfg), ["checkpoint.dri=typo"])


def test_runinfo_cli_prints_shell_assignments_and_fails_on_bad_input(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_dir: 'runs/with space'\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "megatron_harpe.sweeps.runinfo", "--config", str(cfg)]
    proc = subprocess.run(["bash", "-c", 'eval "$("$@")"; echo "$RUN_DIR|$LATEST"', "x", *cmd],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == f"{tmp_path}/runs/with space|", proc.stderr
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.yaml")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


# ------------------------------------------------------------------------------------------ sweep
TINY = REPO_ROOT / "examples" / "tiny"


def run_sweep(tmp_path, *args):
    return sweep.main(["--name", "g", "--out-dir", str(tmp_path / "sweeps"), "--runs-root", str(tmp_path / "runs"),
                       "--dry-run", *args])


def test_sweep_dry_run_writes_one_config_per_point(tmp_path, capsys):
    code = run_sweep(tmp_path, "--method", f"harpe={TINY / 'harpe.yaml'}", "--method", f"yarn={TINY / 'yarn.yaml'}",
                     "--seq-length", "64", "--seq-length", "128", "--layout", "tp1:nodes=1",
                     "--layout", "tp2:nodes=2,tp=2,dp_opt=true", "--tasks-per-node", "2",
                     "--set", "training.iterations=3", "--sbatch-arg=--time=1:00:00")
    out = capsys.readouterr().out
    assert code == 0, out
    names = [f"{m}-s{s}-{lay}" for m in ("harpe", "yarn") for s in (64, 128) for lay in ("tp1", "tp2")]
    sweep_dir = tmp_path / "sweeps" / "g"
    assert sorted(p.stem for p in (sweep_dir / "configs").glob("*.yaml")) == sorted(names)
    from megatron_harpe.config.loader import load_config

    cfg = load_config(sweep_dir / "configs" / "yarn-s64-tp2.yaml")
    assert (cfg.data.seq_length, cfg.parallel.tensor, cfg.parallel.distributed_optimizer) == (64, 2, True)
    assert cfg.training.iterations == 3 and cfg.run_dir == str(tmp_path / "runs" / "g" / "yarn-s64-tp2")
    tiny_yarn = load_config(TINY / "yarn.yaml")
    assert cfg.model.position.yarn_factor == pytest.approx(tiny_yarn.model.position.yarn_factor * 64 / 128)
    lines = [line for line in out.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 8
    assert "--nodes=2 --ntasks-per-node=2" in lines[1] and "--time=1:00:00" in lines[1]
    assert lines[1].endswith(f"train.sbatch {sweep_dir / 'configs' / 'harpe-s64-tp2.yaml'}")
    assert "harpe-sweep: 8 point(s), 0 submitted (dry run)" in out
    assert (sweep_dir / "jobs.tsv").read_text().count("\n") == 9


def test_sweep_validates_every_point_before_submitting(tmp_path, capsys):
    code = run_sweep(tmp_path, "--method", str(TINY / "harpe.yaml"), "--layout", "bad:nodes=1,tp=4",
                     "--tasks-per-node", "2")
    assert code == 2
    err = capsys.readouterr().err
    assert "point harpe-bad (world size 2 = 1 node(s) x 2)" in err and "not divisible" in err


@pytest.mark.parametrize("args, message", [
    (["--method", str(TINY / "abf_multi.yaml"), "--seq-length", "64"], "has `stages`"),
    (["--method", str(TINY / "nope.yaml")], "does not exist"),
    (["--method", str(TINY / "pi.yaml"), "--layout", "nocolon"], "expected NAME:key=value"),
    (["--method", f"a={TINY / 'pi.yaml'}", "--method", f"a={TINY / 'yarn.yaml'}"], "method names repeat"),
])
def test_sweep_bad_grids_are_refused(tmp_path, capsys, args, message):
    assert run_sweep(tmp_path, *args) == 2
    assert message in capsys.readouterr().err


def test_sweep_chains_dependencies():
    class Args:
        name, tasks_per_node, chain, sbatch_arg, script = "g", 8, "afterok", ["--time=5"], "slurm/train.sbatch"

    point = sweep.Point("harpe", "harpe", "x.yaml", None, sweep.Layout("default", 4), [], config_path=Path("c.yaml"))
    cmd = sweep.sbatch_command(point, Args, Path("sweeps/g"), previous="123")
    assert "--dependency=afterok:123" in cmd and "--kill-on-invalid-dep=yes" in cmd and "--nodes=4" in cmd
    assert cmd[-2:] == ["slurm/train.sbatch", "c.yaml"]
    assert not any(a.startswith("--dependency") for a in sweep.sbatch_command(point, Args, Path("s"), None))
