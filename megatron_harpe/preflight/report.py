"""The verdict: a short table on stdout, preflight.md for people and preflight.json for scripts (run dir)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

from megatron_harpe.files import atomic_write_text
from megatron_harpe.preflight.result import FAIL, PASS, CheckResult

MARK = {PASS: "PASS", FAIL: "FAIL"}


def verdict(results: Sequence[CheckResult]) -> str:
    failed = [r.name for r in results if r.failed]
    run = sum(r.status == PASS for r in results)
    if failed:
        return f"FAIL: {', '.join(failed)} ({len(failed)} of {run + len(failed)} checks run failed)"
    return f"PASS: {run} checks passed, {len(results) - run} not run"


def table(results: Sequence[CheckResult], width: int = 118) -> str:
    name_w = max(len(r.name) for r in results)
    lines = []
    for r in results:
        mark = MARK.get(r.status, "----")
        text = r.summary if r.status != "not run" else f"not run: {r.summary}"
        head = f"  {mark}  {r.name:<{name_w}}  {r.seconds:6.1f} s  "
        room = max(width - len(head), 40)
        lines.append(head + (text if len(text) <= room else text[:room - 3] + "..."))
    return "\n".join(lines)


def markdown(results: Sequence[CheckResult], header: Dict[str, Any]) -> str:
    out = ["# harpe-preflight", ""]
    out += [f"- {key}: {value}" for key, value in header.items()]
    out += ["", f"**{verdict(results)}**", "", "| check | result | what was measured | tolerance | time |",
            "|---|---|---|---|---|"]
    for r in results:
        cells = [r.name, r.status.upper(), r.summary, r.tolerance or "-", f"{r.seconds:.1f} s"]
        out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(out) + "\n"


def write_reports(run_dir: Path, results: List[CheckResult], header: Dict[str, Any]) -> List[Path]:
    """preflight.md and preflight.json in `run_dir`, each written whole or not at all."""
    run_dir.mkdir(parents=True, exist_ok=True)
    md, js = run_dir / "preflight.md", run_dir / "preflight.json"
    atomic_write_text(md, markdown(results, header))
    payload = {"passed": not any(r.failed for r in results), "verdict": verdict(results), **header,
               "checks": [r.to_dict() for r in results]}
    atomic_write_text(js, json.dumps(payload, indent=2, default=str) + "\n")
    return [md, js]
