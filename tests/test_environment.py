"""The software-stack record (megatron_harpe/environment.py, issue 21 check 7): what it holds, what counts as a
change, and that every checkpoint carries it and every reader of one says when it was written on another stack.

Real runs: harpe-train in one process (plain launch, the tiny example, 2 iterations), the trainer's resume and
init_from paths, and harpe-convert megatron-to-hf in this process. "Another stack" is made by rewriting the
record stored in a real checkpoint (torch.save of its common state, as megatron-core does): a second torch
cannot be installed for a test.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from megatron_harpe.backends import setup_backend

setup_backend()

from megatron_harpe.environment import (ENVIRONMENT_KEY, IGNORED_KEYS, LABELS, describe_environment,  # noqa: E402
                                        environment_changes, environment_record)
from megatron_harpe.models.checkpoint import read_common_state  # noqa: E402
from tests.launch import REPO_ROOT  # noqa: E402

TINY = REPO_ROOT / "examples" / "tiny" / "harpe.yaml"
RUN = ("training.iterations=2", "checkpoint.save_interval=1")  # checkpoints iter_0000001 and iter_0000002
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
OTHER_TORCH = "2.6.0"


def _installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- the record
def test_the_record_names_the_installed_stack_and_is_plain_json():
    record = environment_record()
    assert record["torch"] == str(torch.__version__)  # with its build tag (+cpu, +cu130), which metadata may lack
    assert record["torch"].split("+")[0] == _installed("torch").split("+")[0]
    assert record["megatron_core"] == _installed("megatron-core")
    assert record["python"] == platform.python_version()
    assert record["torch_cuda"] == torch.version.cuda
    assert record["transformer_engine"] == (_installed("transformer-engine") or _installed("transformer_engine")
                                            or _installed("transformer-engine-torch"))
    assert record["triton"] == (_installed("triton") or _installed("pytorch-triton"))
    cuda = torch.cuda.is_available()
    assert record["gpu_count"] == (torch.cuda.device_count() if cuda else 0)
    if not cuda:
        assert record["nccl"] is None and record["gpu_name"] is None
    else:
        assert record["nccl"] == ".".join(map(str, torch.cuda.nccl.version()))
    assert set(record) == set(LABELS)
    assert json.loads(json.dumps(record)) == record  # strings, ints and None only
    record["torch"] = "changed by a caller"
    assert environment_record()["torch"] == str(torch.__version__)  # each call a copy of the per-process cache


def test_changes_name_each_difference_and_ignore_host_and_old_records():
    current = environment_record()
    saved = {**current, "torch": OTHER_TORCH, "megatron_core": "0.12.0", "transformer_engine": "1.13.0",
             "hostname": "another-node", "platform": "Linux-5.4-x86_64"}
    assert environment_changes(saved, current) == [
        f"torch {OTHER_TORCH} -> {current['torch']}",
        f"megatron-core 0.12.0 -> {current['megatron_core']}",
        f"Transformer Engine 1.13.0 -> {current['transformer_engine'] or 'not installed'}"]
    assert environment_changes(current, current) == []
    moved = {**current, **{key: "elsewhere" for key in IGNORED_KEYS}}
    assert environment_changes(moved, current) == []  # a resume on other nodes is no change
    assert environment_changes(None, current) == []  # a checkpoint from before the record
    assert environment_changes({"torch": current["torch"]}, current) == []  # an older record: its keys only
    assert environment_changes({"driver": "535.104.05"}, {**current, "driver": None}) == [
        "NVIDIA driver 535.104.05 -> none"]


def test_describe_gives_a_row_per_key_and_says_what_is_missing():
    record = {**environment_record(), "transformer_engine": None, "driver": None, "gpu_name": None}
    rows = dict(describe_environment(record))
    assert list(rows) == list(LABELS.values())
    assert rows["Transformer Engine"] == "not installed" and rows["NVIDIA driver"] == "none" and rows["GPU"] == "none"
    assert rows["torch"] == str(torch.__version__)
    assert all(isinstance(v, str) for v in rows.values())


# ----------------------------------------------------------------------------- checkpoints carry it
def test_write_checkpoint_stamps_the_record_unless_the_caller_gives_one(tmp_path):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_harpe.config.loader import load_config
    from megatron_harpe.convert.megatron_io import single_process_world
    from megatron_harpe.models.checkpoint import write_checkpoint

    model_cfg = load_config(str(TINY)).model
    with single_process_world():
        state = lambda: {"x": ShardedTensor.from_rank_offsets("x", torch.arange(4.0), replica_id=0)}  # noqa: E731
        write_checkpoint(tmp_path / "stamped", state(), model_cfg, common={"note": 1})
        given = {"torch": OTHER_TORCH}
        write_checkpoint(tmp_path / "given", state(), model_cfg, common={ENVIRONMENT_KEY: given})
    assert read_common_state(tmp_path / "stamped")[ENVIRONMENT_KEY] == environment_record()
    assert read_common_state(tmp_path / "given")[ENVIRONMENT_KEY] == given


def harpe_train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """harpe-train in one process (plain launch) on the tiny example."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "megatron_harpe.train", "--config", str(TINY), f"run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def events(run_dir: Path):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines if '"event"' in line]


def restamp(checkpoint: Path, **changes) -> None:
    """Rewrite the record stored in `checkpoint` as another stack would have written it. The common state is
    megatron-core's common.pt (torch.save); 0.19 keeps it in the shard files instead, but reads a common.pt
    first (0.16's checkpoints have one), so writing one works on both."""
    common = read_common_state(checkpoint)
    common[ENVIRONMENT_KEY] = {**common[ENVIRONMENT_KEY], **changes}
    torch.save(common, checkpoint / "common.pt")
    assert read_common_state(checkpoint)[ENVIRONMENT_KEY] == common[ENVIRONMENT_KEY]


def listed_changes(warning: str) -> str:
    """The changes a warning lists (between "software stack: " and "; ")."""
    return warning.split("software stack: ", 1)[1].split("; ", 1)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-iteration tiny run with checkpoints at 1 and 2, as this stack wrote them."""
    run = tmp_path_factory.mktemp("environment") / "run"
    harpe_train(run, *RUN)
    return run


def test_training_checkpoints_carry_the_record(trained):
    for name in ("iter_0000001", "iter_0000002"):
        assert read_common_state(trained / "checkpoints" / name)[ENVIRONMENT_KEY] == environment_record()
    assert not any("software stack" in e for e in events(trained))


def test_resume_from_a_checkpoint_of_another_stack_warns_and_saves_this_stack(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints" / "iter_0000002")
    (run / "checkpoints" / "latest").write_text("iter_0000001\n")
    (run / "metrics.jsonl").unlink()
    first = run / "checkpoints" / "iter_0000001"
    restamp(first, torch=OTHER_TORCH)
    proc = harpe_train(run, *RUN)
    warnings = [e for e in events(run) if "software stack" in e]
    torch_change = f"torch {OTHER_TORCH} -> {torch.__version__}"
    assert len(warnings) == 1 and f"checkpoint {first} " in warnings[0] and torch_change in warnings[0], warnings
    assert listed_changes(warnings[0]) == torch_change  # only what changed (not the host, say)
    assert torch_change in proc.stdout
    # the checkpoint the resumed run writes records the stack that wrote it
    assert read_common_state(run / "checkpoints" / "iter_0000002")[ENVIRONMENT_KEY] == environment_record()


def test_init_from_a_checkpoint_of_another_stack_warns(trained, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(trained / "checkpoints" / "iter_0000001", source)
    restamp(source, torch=OTHER_TORCH, megatron_core="0.12.0")
    run = tmp_path / "continued"
    harpe_train(run, "training.iterations=1", f"training.init_from={source}")
    warnings = [e for e in events(run) if "software stack" in e]
    assert len(warnings) == 1, events(run)
    assert f"training.init_from checkpoint {source} " in warnings[0]
    assert listed_changes(warnings[0]) == (f"torch {OTHER_TORCH} -> {torch.__version__}, "
                                           f"megatron-core 0.12.0 -> {metadata.version('megatron-core')}")


def test_the_converter_warns_on_stderr_and_still_exports(trained, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from megatron_harpe.convert.cli import main

    source = tmp_path / "iter_0000001"
    shutil.copytree(trained / "checkpoints" / "iter_0000001", source)
    assert main(["megatron-to-hf", "--load", str(source), "--out", str(tmp_path / "same"), "--no-progress"]) == 0
    assert "software stack" not in capsys.readouterr().err  # this stack wrote it: nothing to say
    restamp(source, torch=OTHER_TORCH)
    assert main(["megatron-to-hf", "--load", str(source), "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "software stack" in line]
    assert len(lines) == 1 and lines[0].startswith("harpe-convert: warning: checkpoint ")
    assert str(source) in lines[0] and f"torch {OTHER_TORCH} -> {torch.__version__}" in lines[0]
    assert "harpe-convert megatron-to-hf:" in captured.out and (tmp_path / "hf" / "config.json").is_file()
