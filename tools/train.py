"""Thin wrapper: `python tools/train.py --config ...` is `harpe-train --config ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_harpe.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
