"""What an input file may make the library read, allocate or walk, and how to open one without hanging.

Every limit has a default that real inputs stay far below and an environment variable that raises
it; an input over a limit is refused with an error that names the file, what it saw, the limit
and the variable. Only regular files are opened: a FIFO, socket or device named where a file is
expected (which would block the run or never end) is refused.

Example:
    >>> CHECKPOINT_BYTES.check(1024, "run.ckpt", "bytes")
    >>> CHECKPOINT_BYTES.check(10**12, "run.ckpt", "bytes")
    Traceback (most recent call last):
    ...
    lit_adamerging.limits.LimitExceeded: run.ckpt: 1000000000000 bytes is more than the limit of 268435456 ...
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = [
    "CHECKPOINT_BYTES",
    "NESTING_DEPTH",
    "PICKLED_OBJECTS",
    "Limit",
    "LimitExceeded",
    "NotARegularFile",
    "open_regular_file",
]


class LimitExceeded(ValueError):
    """An input declares or holds more than a :class:`Limit` allows."""


class NotARegularFile(ValueError):
    """A path names a FIFO, socket, device or folder where a file is read."""


@dataclass(frozen=True)
class Limit:
    """A bound on what one input may hold, raised by setting the environment variable ``variable``."""

    variable: str
    default: int
    applies_to: str

    def value(self) -> int:
        """The limit in force: the environment variable's value if set, else the default."""
        given = os.environ.get(self.variable)
        if given is None or given.strip() == "":
            return self.default
        try:
            value = int(given.strip().replace("_", ""))
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"the environment variable {self.variable}={given!r} is not a positive whole number.")
        return value

    def check(self, seen: int, source: str, unit: str) -> None:
        """Raise :class:`LimitExceeded` if ``seen`` (counted in ``unit``) is over the limit."""
        limit = self.value()
        if seen > limit:
            raise LimitExceeded(
                f"{source}: {seen} {unit} is more than the limit of {limit} {unit} for {self.applies_to}. "
                f"If you trust this file, raise the limit: set the environment variable {self.variable} "
                f"(e.g. {self.variable}={max(seen, 2 * limit)})."
            )


# A coefficient checkpoint (coefficients, surgery maps, optimizer state) holds kilobytes to a few megabytes.
CHECKPOINT_BYTES = Limit(
    "LIT_ADAMERGING_MAX_CHECKPOINT_BYTES", 256 * 2**20,
    "a checkpoint of learned merging parameters (--ckpt_path, load_from_checkpoint, coefficients_from)",
)
# Objects a pickled fine-tuned model may make the reader build or visit (a real encoder: thousands).
PICKLED_OBJECTS = Limit(
    "LIT_ADAMERGING_MAX_PICKLED_OBJECTS", 1_000_000, "the objects and weights read from one pickled file",
)
# How deeply containers may nest in a checkpoint or pickle (a real one: under 20).
NESTING_DEPTH = Limit("LIT_ADAMERGING_MAX_NESTING_DEPTH", 200, "the nesting of containers in one file")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


@contextmanager
def open_regular_file(path: str | Path, what: str = "file") -> Iterator[IO[bytes]]:
    """``open(path, "rb")`` for a regular file (links followed); anything else is refused before it can block.

    The file is opened without blocking and checked on the open descriptor, so a path swapped for a
    FIFO between a check and the open cannot hang the reader.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        NotARegularFile: ``path`` is a folder, FIFO, socket or device.
    """
    path = Path(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise NotARegularFile(f"{path}: the {what} is a folder, not a file.") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path}: the {what} is {_kind(mode)}, not a regular file; give the path of a file.")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        handle = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with handle:
        yield handle
