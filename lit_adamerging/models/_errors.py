"""The error of checkpoint reading, and how its messages list keys."""

from __future__ import annotations

SHOWN = 5  # how many keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not hold the weights the encoder needs."""


def few(keys: list[str]) -> str:
    """The first :data:`SHOWN` of ``keys``, and how many more there are.

    Example:
        >>> few(["a", "b", "c", "d", "e", "f", "g"])
        "['a', 'b', 'c', 'd', 'e'] (and 2 more)"
    """
    more = f" (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return f"{keys[:SHOWN]}{more}"
