"""Check 7: the software and hardware every rank runs, in the report - and the same on every rank.

The record (megatron_harpe/environment.py) is what every checkpoint also carries, so a resumed run or a
conversion on another stack says so. Here it is gathered from every rank of the launch: a node with another
torch, megatron-core, Transformer Engine, NCCL or driver (a half-updated container image, a node outside the
pool) fails the check, because its numerics and collectives are not the others'.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List

from megatron_harpe.environment import describe_environment, environment_changes, environment_record
from megatron_harpe.preflight.layout_run import gather_objects
from megatron_harpe.preflight.result import FAIL, PASS, CheckResult

NAME = "environment"


def environment_check() -> CheckResult:
    """Collective: every rank's record; the verdict on every rank."""
    started = time.perf_counter()
    records: List[Dict[str, Any]] = gather_objects(environment_record())
    first = records[0]
    odd = [(rank, environment_changes(first, record)) for rank, record in enumerate(records)]
    odd = [(rank, changes) for rank, changes in odd if changes]
    shown = ", ".join(f"{name} {value}" for name, value in describe_environment(first) if name != "hostname")
    details = {"record": first, "ranks": len(records),
               "hosts": sorted({r.get("hostname") for r in records if r.get("hostname")})}
    if odd:
        rank, changes = odd[0]
        details["differs"] = {str(r): c for r, c in odd}
        return CheckResult(NAME, FAIL, f"rank {rank} runs another stack than rank 0: {'; '.join(changes)} "
                                       f"({len(odd)} rank(s) differ)", "the same record on every rank", details,
                           time.perf_counter() - started)
    return CheckResult(NAME, PASS, f"{shown}; the same on all {len(records)} rank(s)",
                       "the same record on every rank", details, time.perf_counter() - started)
