"""harpe-sweep --grid: a grid file is the same sweep as its flags (configs byte for byte), the command line adds
to / overrides it as documented, and a bad file is refused with exit 2 naming the file and the key. Dry runs only:
no training."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_harpe.sweeps import sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = REPO_ROOT / "examples" / "tiny"

GRID = """\
name: g
methods: {harpe: tiny/harpe.yaml, pi: tiny/pi.yaml}
seq_lengths: [64, 128]
layouts: {tp1: {tp: 1}, tp2: {tp: 2, sp: true}}
seeds: [1, 2]
set: {training.iterations: 3, data.split: "98,2,0", training.probe.lengths: [64, 128]}
local: true
"""
FLAGS = ["--name", "g", "--method", "harpe={d}/tiny/harpe.yaml", "--method", "pi={d}/tiny/pi.yaml",
         "--seq-length", "64", "--seq-length", "128", "--layout", "tp1:tp=1", "--layout", "tp2:tp=2,sp=true",
         "--seed", "1", "--seed", "2", "--set", "training.iterations=3", "--set", "data.split=98,2,0",
         "--set", "training.probe.lengths=[64, 128]", "--local"]


def _grid_dir(tmp_path: Path, text: str = GRID) -> Path:
    """A grid file beside a copy of the tiny configs, so its relative method paths are the file's own."""
    d = tmp_path / "grids"
    (d / "tiny").mkdir(parents=True)
    for name in ("harpe", "pi", "yarn"):
        (d / "tiny" / f"{name}.yaml").write_text((TINY / f"{name}.yaml").read_text())
    (d / "grid.yaml").write_text(text)
    return d


def _dry(tmp_path: Path, out: str, *argv: str) -> int:
    return sweep.main(["--dry-run", "--no-validate", "--out-dir", str(tmp_path / out),
                       "--runs-root", str(tmp_path / "runs"), *argv])


def _configs(tmp_path: Path, out: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((tmp_path / out / "g" / "configs").glob("*.yaml"))}


def test_grid_file_gives_the_same_configs_as_its_flags(tmp_path, capsys, monkeypatch):
    _grid_dir(tmp_path)
    monkeypatch.chdir(tmp_path)  # relative paths: the grid's methods resolve to grids/tiny/..., as the flags say
    assert _dry(tmp_path, "from_file", "--grid", "grids/grid.yaml") == 0, capsys.readouterr().err
    assert _dry(tmp_path, "from_flags", *[a.format(d="grids") for a in FLAGS]) == 0, capsys.readouterr().err
    from_file, from_flags = _configs(tmp_path, "from_file"), _configs(tmp_path, "from_flags")
    assert len(from_file) == 2 * 2 * 2 * 2 and from_file == from_flags
    assert "training.probe.lengths=[64, 128]" in from_file["pi-s64-tp2-seed1.yaml"]
    cfg = yaml.safe_load(from_file["pi-s64-tp2-seed1.yaml"].split("\n", 2)[2])
    assert cfg["data"]["split"] == "98,2,0" and cfg["parallel"]["sequence_parallel"] is True
    assert cfg["training"]["probe"]["lengths"] == [64, 128] and cfg["training"]["seed"] == 1


def test_command_line_adds_to_and_overrides_the_grid_file(tmp_path, capsys):
    d = _grid_dir(tmp_path)
    code = _dry(tmp_path, "s", "--grid", str(d / "grid.yaml"), "--name", "g",  # single value: replaces
                "--method", f"pi={d / 'tiny' / 'yarn.yaml'}",  # same name: replaces the file's pi
                "--method", f"yarn={d / 'tiny' / 'yarn.yaml'}",  # new name: added
                "--seed", "3", "--set", "training.iterations=5")  # lists: added, --set after the file's
    assert code == 0, capsys.readouterr().err
    configs = _configs(tmp_path, "s")
    assert len(configs) == 3 * 2 * 2 * 3
    pi = yaml.safe_load(configs["pi-s64-tp1-seed3.yaml"].split("\n", 2)[2])
    assert pi["model"]["position"]["kind"] == "yarn" and pi["training"]["iterations"] == 5
    manifest = yaml.safe_load((tmp_path / "s" / "g" / "sweep.json").read_text())
    assert manifest["mode"] == "local" and manifest["grid_file"] == str(d / "grid.yaml")


@pytest.mark.parametrize("text, key, message", [
    (GRID + "seed: [1]\n", "seed", "unknown key; known keys: name, methods"),
    (GRID.replace("seeds: [1, 2]", "seeds: 1"), "seeds", "expected a list of integers"),
    (GRID.replace("tiny/pi.yaml", "tiny/nope.yaml"), "methods.pi", "does not exist"),
    (GRID.replace("local: true", "local: yes please"), "local", "expected true or false"),
    (GRID.replace("{tp: 1}", "[1]"), "layouts.tp1", "expected a mapping of single values"),
    (GRID + "chain: later\n", "chain", "expected one of none, afterok, afterany"),
    ("- name: g\n", None, "expected a mapping of keys"),
    (GRID.replace("name: g\n", ""), None, "the sweep needs a name"),
])
def test_bad_grid_files_are_refused_naming_the_key(tmp_path, capsys, text, key, message):
    d = _grid_dir(tmp_path, text)
    assert sweep.main(["--grid", str(d / "grid.yaml"), "--dry-run", "--out-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    if key:
        assert f"--grid {d / 'grid.yaml'}: {key}" in err, err
    assert not (tmp_path / "s").exists()  # refused before anything is written


def test_missing_grid_file_is_exit_2(tmp_path, capsys):
    assert sweep.main(["--grid", str(tmp_path / "none.yaml"), "--dry-run"]) == 2
    assert "cannot read it" in capsys.readouterr().err


@pytest.mark.parametrize("grid", ["cpu.yaml", "llama2_7b_128k.yaml"])
def test_the_study_grid_files_resolve(tmp_path, capsys, grid):
    """examples/study: both grid files name existing configs and give 5 methods x their seeds (no data needed)."""
    code = sweep.main(["--grid", str(REPO_ROOT / "examples" / "study" / grid), "--dry-run", "--no-validate",
                       "--out-dir", str(tmp_path / "s"), "--runs-root", str(tmp_path / "runs")])
    assert code == 0, capsys.readouterr().err
    configs = list((tmp_path / "s").glob("*/configs/*.yaml"))
    methods = {p.stem.split("-")[0] for p in configs}
    assert methods == {"abf_single", "abf_multi", "pi", "yarn", "harpe"} and len(configs) % 5 == 0
