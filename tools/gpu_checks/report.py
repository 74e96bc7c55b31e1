"""The report: a dictionary written as <out>/gpu_check.json and rendered as <out>/gpu_check.md after every
section (a run killed half way still leaves one), and the one-line summary that closes a run."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .common import CPU_LABEL, PROVES, REPO, SIZES, TITLES, Env, short


def new_report(env: Env, budget: float, caps: Dict[str, float], argv: Optional[List[str]]) -> Dict[str, Any]:
    """The report before any section ran; `argv` as main() was given it (None: the command line)."""
    return {
        "tool": "tools/gpu_check.py", "mode": env.mode, "label": CPU_LABEL if env.cpu else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(), "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None
                                                                                  else sys.argv[1:])),
        "git_commit": git_commit(), "budget_s": budget, "caps_s": caps, "sizes": SIZES[env.mode],
        "gpu": None, "versions": None, "sections": {}, "summary": None, "exit_code": None}


def skipped_section(key: str, budget: float) -> Dict[str, Any]:
    """The record of a section that did not start: the run's budget was spent."""
    return {"key": key, "title": TITLES[key], "proves": PROVES[key], "cap_s": 0.0, "duration_s": 0.0,
            "status": f"skipped: the run's {budget:.0f} s budget is spent", "checks": [], "numbers": {},
            "tables": [], "notes": [], "skipped": [], "error": None}


def finish(report: Dict[str, Any], env: Env, duration_s: float) -> int:
    """Fill in the summary line, the missed targets, where to commit the report and the exit code (0: every
    section that ran is ok); returns the exit code."""
    sections = report["sections"]
    checks = [c for s in sections.values() for c in s["checks"]]
    n = lambda kind, res: sum(1 for c in checks if c["kind"] == kind and c["result"] == res)  # noqa: E731
    ok_sections = [k for k, s in sections.items() if s["status"] == "ok"]
    bad_sections = [f"{k}:{s['status'].split(':')[0]}" for k, s in sections.items() if s["status"] != "ok"]
    exit_code = 0 if len(ok_sections) == len(sections) else 1
    gpu = (report.get("gpu") or {}).get("name") if env.cuda else "CPU"
    report["duration_s"] = round(duration_s, 1)
    missed = [c["name"] for c in checks if c["kind"] == "target" and c["result"] == "missed"]
    report["summary"] = (
        f"gpu_check {'PASS' if exit_code == 0 else 'FAIL'}: {len(ok_sections)}/{len(sections)} sections ok"
        + (f" (not ok: {', '.join(bad_sections)})" if bad_sections else "")
        + f"; checks {n('check', 'pass')} passed, {n('check', 'fail')} failed, {n('check', 'warn')} warned; "
        f"targets {n('target', 'met')} met, {n('target', 'missed')} missed; {report['duration_s']:.0f} s; "
        f"{gpu}; mode {env.mode}" + (" (correctness only)" if env.cpu else ""))
    report["targets_missed"] = missed
    slug = "".join(c if c.isalnum() else "-" for c in (gpu or "cpu").lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    report["suggested_report_path"] = f"docs/gpu/{report['date'][:10]}-{slug}.md" if env.cuda else None
    report["exit_code"] = exit_code
    return exit_code


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Dict[str, Any]) -> str:
    L: List[str] = []
    gpu = report.get("gpu") or {}
    L.append(f"# gpu_check report: {gpu.get('name') or 'CPU'} - {report['date']}")
    L.append("")
    if report["mode"] == "cpu":
        L.append(f"**{CPU_LABEL}.** Tiny sizes, Triton's interpreter for the fused kernel, gloo; timings below "
                 "only show that the timing code runs.")
        L.append("")
    L.append(f"- summary: `{report.get('summary', '(running)')}`")
    L.append(f"- mode: {report['mode']}; command: `{report['command']}`; duration {report.get('duration_s', 0):.0f} s "
             f"of a {report['budget_s']:.0f} s budget")
    L.append(f"- host: {report['host']}; git commit: {report.get('git_commit') or 'unknown'}"
             + (f"; file as `{report['suggested_report_path']}`" if report.get("suggested_report_path") else ""))
    if gpu:
        L.append(f"- GPU: {gpu.get('name')}, {gpu.get('memory')}, compute capability {gpu.get('compute_capability')}, "
                 f"{gpu.get('multiprocessors')} SMs, driver {gpu.get('driver')}")
    versions = report.get("versions") or {}
    if versions:
        L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    L.append("")
    L.append("| section | status | checks passed / failed / warned | targets met / missed | time (cap) |")
    L.append("|---|---|---|---|---|")
    for key, sec in report["sections"].items():
        checks = [c for c in sec["checks"] if c["kind"] == "check"]
        targets = [c for c in sec["checks"] if c["kind"] == "target"]
        cnt = lambda lst, r: sum(1 for c in lst if c["result"] == r)  # noqa: E731
        dur = sec.get("duration_s")
        L.append(f"| {key}. {sec['title']} | {sec['status']} | {cnt(checks, 'pass')} / {cnt(checks, 'fail')} / "
                 f"{cnt(checks, 'warn')} | {cnt(targets, 'met')} / {cnt(targets, 'missed')} | "
                 f"{'-' if dur is None else f'{dur:.1f} s'} ({sec['cap_s']:.0f} s) |")
    L.append("")
    for key, sec in report["sections"].items():
        L.append(f"## {key}. {sec['title']}")
        L.append("")
        L.append(f"Proves: {sec['proves']}.")
        L.append("")
        L.append(f"Status: **{sec['status']}**" + (f", {sec['duration_s']:.1f} s" if sec.get("duration_s") is not None
                                                     else "") + f" (cap {sec['cap_s']:.0f} s)")
        L.append("")
        if sec["checks"]:
            L.append("| check | result | value | tolerance / goal |")
            L.append("|---|---|---|---|")
            for c in sec["checks"]:
                name = c["name"] + (" (target)" if c["kind"] == "target" else "")
                val = short(c["value"]) if not isinstance(c["value"], str) else c["value"]
                if c.get("detail") and c["result"] not in ("pass", "met"):
                    val += f" - {c['detail']}"
                L.append(f"| {_cell(name)} | {c['result'].upper()} | {_cell(val)} | {_cell(c['tolerance'])} |")
            L.append("")
        for t in sec["tables"]:
            L.append(f"**{t['title']}**")
            L.append("")
            L.append("| " + " | ".join(_cell(c) for c in t["columns"]) + " |")
            L.append("|" + "---|" * len(t["columns"]))
            for row in t["rows"]:
                L.append("| " + " | ".join(_cell(c) for c in row) + " |")
            if t.get("note"):
                L.append("")
                L.append(f"_{t['note']}_")
            L.append("")
        scalars = {k: v for k, v in sec["numbers"].items() if k not in ("bench_rows", "loss_trace", "plans",
                                                                         "results")}
        if scalars:
            L.append("<details><summary>numbers</summary>")
            L.append("")
            L.append("```json")
            L.append(json.dumps(scalars, indent=1)[:20000])
            L.append("```")
            L.append("</details>")
            L.append("")
        for n in sec["notes"]:
            L.append(f"- note: {n}")
        for s in sec["skipped"]:
            L.append(f"- skipped: {s['part']}: {s['reason']}")
        if sec["notes"] or sec["skipped"]:
            L.append("")
        if sec.get("error"):
            L.append("```")
            L.append(sec["error"].rstrip()[-6000:])
            L.append("```")
            L.append("")
    return "\n".join(L) + "\n"


def write_report(report: Dict[str, Any], out: Path) -> None:
    from megatron_harpe.files import atomic_write_text

    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(out / "gpu_check.md", render_markdown(report))


def git_commit() -> Optional[str]:
    """The checkout's commit; GPU_CHECK_COMMIT where the tree is a copy without .git (the lent device)."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        return proc.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None

