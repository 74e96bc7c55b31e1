"""The one error type of the converters: a bad input, named, with the fix."""
from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint or option that cannot be converted; the message names it and says what to do."""
