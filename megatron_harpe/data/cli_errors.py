"""How the data tools turn failures into one stderr line and an exit code.

Shared by harpe-preprocess, harpe-upsample and harpe-merge-data so that every tool answers a
bad command line, a bad input, an I/O failure, Ctrl-C or SIGTERM the same way: a message naming
the problem, and the promise (kept by each tool's temp-name-then-rename writing) that no output
was left behind. The contract's flags are the same in every tool (``add_contract_args``):
--debug (or HARPE_DEBUG=1) adds the traceback to a bad-input message, --verbose (or
HARPE_VERBOSE=1) shows the upstream warnings that megatron_harpe/cli.py silences.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from typing import Callable, Sequence, Tuple, Type, TypeVar

from megatron_harpe.cli import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, InputError, debug_requested,
                                setup_output)

T = TypeVar("T")


class UsageError(InputError):
    """A bad command line: the tool prints its usage line and the message, exit code 2."""


class UsageErrorParser(argparse.ArgumentParser):
    """Raises UsageError instead of exiting, so the tool can print its own, shorter usage line."""

    def error(self, message):
        raise UsageError(message)


def add_contract_args(p: argparse.ArgumentParser,
                      verbose_help: str = "show upstream warnings too (HARPE_VERBOSE=1)") -> None:
    """--debug and --verbose, as every harpe-* command has them (megatron_harpe/cli.py)."""
    g = p.add_argument_group("diagnostics")
    g.add_argument("--verbose", action="store_true", help=verbose_help)
    g.add_argument("--debug", action="store_true", help="a traceback with bad-input errors too (HARPE_DEBUG=1)")


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       synopsis: str) -> argparse.Namespace | None:
    """The parsed arguments, or None after printing ``usage: PROG <synopsis>`` and the error (exit code 2)."""
    try:
        return parser.parse_args(argv)
    except UsageError as err:
        print(f"usage: {parser.prog} {synopsis}\n{parser.prog}: error: {err}", file=sys.stderr)
        return None


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the tool runs, SIGTERM (Slurm's scancel, a timeout) raises KeyboardInterrupt, so the
    cleanup of Ctrl-C runs; the previous handling is restored afterwards (tools also run in-process:
    the demo, tests).

    Only in this process: a worker forked from it (multiprocessing's "fork" start) inherits the
    handler until its own initializer runs, and a SIGTERM in that window (Pool.terminate) must end
    the worker, not raise into a copy of the caller's stack, which would go on running the caller's
    code in a second process.
    """
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_reporting_errors(prog: str, work: Callable[[], T], *, usage_errors: Tuple[Type[BaseException], ...] = (),
                         data_errors: Tuple[Type[BaseException], ...] = (),
                         interrupted: str = "no output written (incomplete files removed)",
                         debug: bool = False, verbose: bool = False) -> Tuple[int, T | None]:
    """(0, result) on success; (2, None) for bad usage or bad input data (megatron_harpe/cli.py's contract:
    one message, its traceback only with ``debug`` or HARPE_DEBUG=1), (1, None) when writing the output
    failed (I/O: the machine, not the input), (130, None) on Ctrl-C. Known upstream warnings are silenced
    unless ``verbose`` or HARPE_VERBOSE=1. Any other exception is a bug: it propagates (traceback, exit 1)."""
    setup_output(["--verbose"] if verbose else [])
    try:
        return 0, work()
    except (InputError, *usage_errors, *data_errors) as err:
        # one process, one message: no per-node de-duplication (a script may run the tool twice in one step)
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        if debug or debug_requested():
            traceback.print_exception(err, file=sys.stderr)
        return EXIT_BAD_INPUT, None
    except OSError as err:
        print(f"{prog}: error: {err.strerror or err}: {err.filename or ''} (no output written)", file=sys.stderr)
        return EXIT_INTERNAL, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED, None
