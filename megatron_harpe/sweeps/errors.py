"""The sweep tools' bad-input error (exit 2 through megatron_harpe.cli.run_command), in its own module so
that sweep.py, local.py, manifest.py and report.py can all raise it without importing each other."""
from megatron_harpe.cli import InputError


class SweepError(InputError):
    """A bad grid, sweep directory or manifest: the message names it and the fix."""


__all__ = ["SweepError"]
