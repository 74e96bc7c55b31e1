"""`make demo` (megatron_harpe/demo.py) at its smoke-test size: the whole pipeline runs from nothing, the three
models are trained alike but for their position encoding, exported, evaluated, and the output is quiet (no upstream
warning lines) and ends with the comparison table."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
#: what an upstream warning line looks like in a log (warnings.showwarning's "file:line: XWarning: text", or a
#: logger's "WARNING"); the demo's own lines never say so
WARNING_LINE = re.compile(r"(\w+Warning:|\bwarnings\.warn\b|^WARNING\b|\bUserWarning\b|\bFutureWarning\b)")


def test_demo_quick_trains_three_models_and_ends_with_the_comparison(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("HARPE_VERBOSE", None)
    run_dir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "megatron_harpe.demo", "--quick", "--run-dir", str(run_dir)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    noisy = [line for line in out.splitlines() if WARNING_LINE.search(line)]
    assert not noisy, noisy[:5]

    # three runs, same data and steps, different only in model.position
    configs = {}
    for key in ("harpe", "rope", "abf"):
        run = run_dir / key
        assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
        losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        assert len(losses) == 2 and losses[-1] < losses[0], (key, losses)
        configs[key] = yaml.safe_load((run / "config.yaml").read_text())
    positions = {k: c["model"].pop("position") for k, c in configs.items()}
    for c in configs.values():
        c.pop("run_dir")
    assert configs["harpe"] == configs["rope"] == configs["abf"]
    assert positions["harpe"]["bases"] == [10000.0, 500000.0]
    assert (positions["rope"]["kind"], positions["rope"]["base"]) == ("rope", 10000.0)
    assert (positions["abf"]["kind"], positions["abf"]["base"]) == ("rope", 500000.0)

    # exported with HARPE's own modeling code
    hf = json.loads((run_dir / "hf" / "harpe" / "config.json").read_text())
    assert hf["harpe_bases"] == [10000.0, 500000.0] and "auto_map" in hf

    # the comparison: written to comparison.md and the last thing printed before the summary line
    report = (run_dir / "comparison.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3, report
    assert [c.strip() for c in table[0].strip("|").split("|")][3:] == [
        "ppl 256 (1x)", "ppl 512 (2x)", "ppl 1024 (4x)", "passkey 256 (1x)", "passkey 512 (2x)", "passkey 1024 (4x)"]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["HARPE", "RoPE", "ABF"]
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(re.fullmatch(r"[\d,]+(\.\d+)?", c) for c in cells[3:6]), row  # perplexities measured
        assert all(re.fullmatch(r"\d+%", c) for c in cells[6:]), row                # passkey scored
    stdout_lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    assert stdout_lines[-1].startswith("harpe-demo: done in ")
    assert report.strip().splitlines()[-1] in stdout_lines[-2]
    assert table[-1] in proc.stdout
