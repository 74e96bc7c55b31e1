"""How the data tools turn failures into one stderr line and an exit code.

Shared by harpe-preprocess, harpe-upsample and harpe-merge-data so that every tool answers a
bad input, an I/O failure or Ctrl-C the same way: a message naming the problem, and the
promise (kept by each tool's temp-name-then-rename writing) that no output was left behind.
"""
from __future__ import annotations

import sys
from typing import Callable, Tuple, Type, TypeVar

T = TypeVar("T")


def run_reporting_errors(prog: str, work: Callable[[], T], *, usage_errors: Tuple[Type[BaseException], ...] = (),
                         data_errors: Tuple[Type[BaseException], ...] = (),
                         interrupted: str = "no output written (incomplete files removed)") -> Tuple[int, T | None]:
    """(0, result) on success; (2, None) for usage errors, (1, None) for bad data or I/O, (130, None) on Ctrl-C."""
    try:
        return 0, work()
    except usage_errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2, None
    except data_errors as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1, None
    except OSError as err:
        print(f"{prog}: error: {err.strerror or err}: {err.filename or ''} (no output written)", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130, None
