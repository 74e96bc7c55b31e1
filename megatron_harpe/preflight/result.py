"""One check's verdict, the unit every preflight module returns and the report prints."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"


@dataclass
class CheckResult:
    """`status`: pass, fail, or not run (the check does not apply to this config, or cannot run on this machine:
    `summary` says which and why). `summary` is one line with the measured value against the tolerance;
    `tolerance` states the bound and why it is that; `details` holds the numbers for preflight.json."""

    name: str
    status: str
    summary: str
    tolerance: str = ""
    details: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
