#!/usr/bin/env python
"""One script that proves the GPU path the moment a GPU is lent (docs/gpu_check.md).

    PYTHONUNBUFFERED=1 python tools/gpu_check.py --out gpu_check_out           # a GPU: ~5-8.5 minutes
    python tools/gpu_check.py --cpu --out /tmp/gc                              # CPU: correctness only, < 60 s

The entry point only: the sections, the report and the run loop are the package tools/gpu_checks/ (its
docstring, which --help prints, lists the sections, the outputs and the exit codes).
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.gpu_checks.cli import main  # noqa: E402 - needs REPO on sys.path (tools/ is a namespace package)

if __name__ == "__main__":
    sys.exit(main())
