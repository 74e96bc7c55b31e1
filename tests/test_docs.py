"""Documentation examples are tests: every ```python and ```bash / ```sh / ```shell / ```console block in
README.md, docs/**/*.md, slurm/README.md and examples/**/README.md is one test case, named by the file and the
line of its opening fence (`docs/data.md:29`). A broken example fails the suite.

The convention (docs/architecture.md, "Documentation examples are tests", says it for contributors):

- A block without a marker is EXECUTED: Python with this venv's interpreter, shell with `bash -e`, each in a
  fresh temporary directory that links the repository's examples/, slurm/, tools/, requirements/ and docs/
  (the paths the docs name resolve; what the block writes stays out of the checkout), with this venv's bin/
  first on PATH (`harpe-*` and `python` are this checkout's). Write such blocks at tiny sizes: this whole
  file must stay well under a minute on two cores.
- An HTML comment on the line right before the opening fence marks a block that cannot run here, with one or
  more of these words (comma-separated), e.g. `<!-- docs-test: cluster, external -->`:

      cluster   a Slurm cluster, several nodes, or more processes than this machine should start
      gpu       a CUDA GPU
      long      minutes here (the demo, a study, a benchmark); what it runs is tested elsewhere at tiny sizes
      external  what the repository does not hold: a download, a real model or corpus, another project's tool
      synopsis  a command's shape with placeholders (CONFIG.yaml, [dotted.key=value ...]), not a command

  A marked block is CHECKED instead, without running it (tests/docs_check.py, in one child process for all of
  them): Python parses, its imports resolve, the names it uses exist, calls of imported functions bind to
  their signatures; shell commands of this project (`harpe-*`, `python -m megatron_harpe...`,
  `python tools/*.py`, also under torchrun/srun/mpiexec/sbatch, and what slurm/*.sbatch pass on) parse with
  the program's own argparse parser, `dotted.key=value` overrides name real config keys (and load with a
  config of this repository), `make` targets exist, and every path into the repository exists.
- `<!-- docs-test: launcher -->` executes a Python block as rank 0 of a one-process launch (RANK, WORLD_SIZE,
  LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT set as torchrun sets them): for code that is written
  to run under a launcher.

An unknown word, or a marker that is not right before a fence of a checked language, fails
test_markers_are_known_and_placed.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LANGUAGES = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell",
             "console": "shell"}
CHECK_ONLY = {"cluster", "gpu", "long", "external", "synopsis"}
MODIFIERS = {"launcher"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
#: what an executed block's temporary directory links from the repository
LINKED = ("examples", "slurm", "tools", "requirements", "docs", "Makefile", "setup.py")
TIMEOUT_S = 180


@dataclass
class Block:
    id: str          # "docs/data.md:29": the file and the line of the opening fence
    lang: str        # "python" | "shell"
    code: str
    line: int        # the markdown line of the first code line
    marks: tuple     # the marker's words


def markdown_files() -> list[Path]:
    files = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md")), REPO_ROOT / "slurm/README.md",
             *sorted((REPO_ROOT / "examples").rglob("README.md"))]
    return [f for f in dict.fromkeys(files) if f.is_file()]


def _closes(line: str, ticks: str) -> bool:
    """A closing fence: at least as many of the same fence character, nothing else."""
    text = line.strip()
    return text.startswith(ticks) and not text.strip(ticks[0])


def _blocks_and_markers():
    blocks, markers = [], []  # markers: (where, words, problem or None)
    for path in markdown_files():
        rel = path.relative_to(REPO_ROOT).as_posix()
        lines = path.read_text().split("\n")
        i = 0
        while i < len(lines):
            marker = MARKER.match(lines[i])
            if marker:
                words = tuple(w for w in re.split(r"[,\s]+", marker.group(1)) if w)
                nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                problem = None
                if nxt is None or nxt.group(3).lower() not in LANGUAGES:
                    problem = "is not on the line right before a ```python/bash/sh/shell/console fence"
                elif set(words) - CHECK_ONLY - MODIFIERS or not words:
                    problem = f"has unknown word(s) {sorted(set(words) - CHECK_ONLY - MODIFIERS) or words}"
                markers.append((f"{rel}:{i + 1}", words, problem))
            fence = FENCE.match(lines[i])
            if not fence:
                i += 1
                continue
            indent, ticks, lang = fence.group(1), fence.group(2), fence.group(3).lower()
            j = i + 1
            while j < len(lines) and not _closes(lines[j], ticks):
                j += 1
            if lang in LANGUAGES:
                body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j]]
                if lang == "console":  # commands are the `$ ` lines; the rest is their output
                    body = [ln[2:] if ln.startswith("$ ") else "" for ln in body]
                prev = MARKER.match(lines[i - 1]) if i > 0 else None
                marks = tuple(w for w in re.split(r"[,\s]+", prev.group(1)) if w) if prev else ()
                blocks.append(Block(f"{rel}:{i + 1}", LANGUAGES[lang], "\n".join(body), i + 2, marks))
            i = j + 1
    return blocks, markers


BLOCKS, MARKERS = _blocks_and_markers()
EXECUTED = [b for b in BLOCKS if not set(b.marks) & CHECK_ONLY]
CHECKED = [b for b in BLOCKS if set(b.marks) & CHECK_ONLY]


def test_markers_are_known_and_placed():
    bad = [f"{where}: <!-- docs-test: {' '.join(words)} --> {problem}" for where, words, problem in MARKERS if problem]
    assert not bad, "\n".join(bad) + "\n(tests/test_docs.py's docstring lists the words)"
    assert len(BLOCKS) > 20 and EXECUTED and CHECKED  # the files were found and parsed


# ------------------------------------------------------------------------------------------------ executed
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(block: Block) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for name in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID"):  # a block must say what it needs itself
        env.pop(name, None)
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    if "launcher" in block.marks:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    return env


@pytest.mark.parametrize("block", EXECUTED, ids=[b.id for b in EXECUTED])
def test_block_runs(block, tmp_path):
    for name in LINKED:
        (tmp_path / name).symlink_to(REPO_ROOT / name)
    if block.lang == "python":
        script = tmp_path / "block.py"
        cmd = [sys.executable, str(script)]
    else:
        script = tmp_path / "block.sh"
        cmd = ["bash", "-e", str(script)]
    script.write_text(block.code + "\n")
    proc = subprocess.run(cmd, cwd=tmp_path, env=_environment(block), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    out = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, (f"{block.id} (run in {tmp_path}) exited {proc.returncode}; mark it in the "
                                  f"markdown only if it cannot run here (tests/test_docs.py):\n{out}")


# ------------------------------------------------------------------------------------------------- checked
#: Broken examples the checker must catch (run in the same child process as the real blocks), so that a
#: checker that silently finds nothing fails here instead of passing every marked block.
CANARIES = [
    (Block("canary:python", "python", "from megatron_harpe.data.gpt import build_gpt_datasets\n"
           "from megatron_harpe.data.gpt_dataset import build_gpt_datasets\n"
           "build_gpt_datasets(['out/x'], seq_len=128)\nprint(tokenizer)\n", 1, ()),
     ["No module named 'megatron_harpe.data.gpt'", "does not take these arguments", "'tokenizer' is used"]),
    (Block("canary:shell", "shell", "harpe-eval ppl --model M --data d.jsonl --lengths 2k --windw 256\n"
           "harpe-train --config examples/tiny/harpe.yaml training.iteratons=2\n"
           "torchrun --nproc-per-node 2 -m megatron_harpe.train --config examples/tiny/harpe.yaml --nope\n"
           "srun -n 2 harpe-train --config examples/tiny/harpe.yaml training.iterations=two\n"
           "sbatch --nodes=8 slurm/train.sbatch examples/tiny/nope.yaml\n"
           "OVERRIDES='model.nope=1' sbatch slurm/train.sbatch examples/tiny/harpe.yaml\n"
           "make demoo\n", 1, ()),
     ["unrecognized arguments: --windw", "no config key training.iteratons", "unrecognized arguments: --nope",
      "training.iterations must be an integer", "examples/tiny/nope.yaml: no such file", "no config key model.nope",
      "no target 'demoo'"]),
]


@pytest.fixture(scope="module")
def check_results(tmp_path_factory):
    """tests/docs_check.py over every marked block (and the canaries), in one child process."""
    where = tmp_path_factory.mktemp("docs-check")
    (where / "in.json").write_text(json.dumps([
        {"id": b.id, "lang": b.lang, "code": b.code, "line": b.line} for b in CHECKED + [c for c, _ in CANARIES]]))
    proc = subprocess.run([sys.executable, "-m", "tests.docs_check", str(where / "in.json"), str(where / "out.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"tests/docs_check.py failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return json.loads((where / "out.json").read_text())


@pytest.mark.parametrize("block", CHECKED, ids=[b.id for b in CHECKED])
def test_block_checks(block, check_results):
    problems = check_results[block.id]
    assert not problems, (f"{block.id} (<!-- docs-test: {', '.join(block.marks)} -->, checked, not run):\n"
                          + "\n".join(problems))


def test_the_checker_finds_broken_examples(check_results):
    for canary, expected in CANARIES:
        found = "\n".join(check_results[canary.id])
        missed = [e for e in expected if e not in found]
        assert not missed, f"{canary.id}: the checker missed {missed}; it found:\n{found}"
