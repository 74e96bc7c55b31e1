"""Thin wrapper: `python tools/evaluate.py niah --model DIR ...` is `harpe-eval niah --model DIR ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_harpe.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
