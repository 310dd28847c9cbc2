"""The one exception type users see: a message that says what is wrong and how to fix it.

``PilotError`` is for what a user can fix (config, data, weights, resume). Building blocks check
their own contracts with ``ValueError``/``RuntimeError``, which keep their traceback; where such a
check guards values a user chose, the learner says so with ``config_values``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class PilotError(Exception):
    """Bad input (config, data, weights, resume). The CLI prints it without a traceback."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error comes back as ``type(error)(its whole traceback)``: keep the message.
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


@contextmanager
def config_values(*keys: str) -> Iterator[None]:
    """A ``ValueError`` raised inside comes from the values of these config keys: make it a PilotError."""
    try:
        yield
    except ValueError as err:
        names = ", ".join(f"'{key}'" for key in keys)
        raise PilotError(f"{err} (set by the config key{'s' if len(keys) > 1 else ''} {names}; fix its value "
                         f"in the JSON file or with --set).") from None
