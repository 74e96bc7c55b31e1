"""The one error type of the converters: a bad input, named, with the fix."""
from __future__ import annotations

from megatron_harpe.cli import InputError


class ConversionError(InputError):
    """A checkpoint or option that cannot be converted; the message names it and says what to do."""
