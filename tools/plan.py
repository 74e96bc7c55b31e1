#!/usr/bin/env python
"""Thin wrapper: `python tools/plan.py ...` is `harpe-plan ...` (see docs/planning.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.planning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
