"""The one error type of the evaluation tools: a bad input, named, with the fix."""
from __future__ import annotations

from megatron_harpe.cli import InputError


class EvalError(InputError):
    """A model, data file, task or option the evaluation cannot use; the message names it and the fix."""
