#!/usr/bin/env python
"""Thin wrapper: `python tools/harpe_bases.py ...` is `harpe-bases ...` (see docs/base_search.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.rope.bases_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
