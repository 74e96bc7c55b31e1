#!/usr/bin/env python
"""Thin wrapper: `python tools/upsample.py ...` is `harpe-upsample ...` (see docs/data.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.data.upsample import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
