"""The one error type of the evaluation tools: a bad input, named, with the fix."""
from __future__ import annotations


class EvalError(ValueError):
    """A model, data file, task or option the evaluation cannot use; the message names it and the fix."""
