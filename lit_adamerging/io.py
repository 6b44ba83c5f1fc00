"""Atomic writes: an interrupted save never leaves a half-written file at the destination.

A file is written under a temporary name next to its destination, ``.<name>.<host>.<pid>.<random>.tmp``,
flushed to disk and renamed over the destination. A writer killed mid-write (``kill -9``, out of
memory) leaves its temporary file behind; the next write to the same destination removes the ones
whose writer is gone (written on this host by a process that no longer runs), never one that a
running process is still writing. :func:`atomic_directory` does the same for a whole folder.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` for the block to write; renamed over ``path`` if the block succeeds.

    On an error the temporary file is removed. Temporary files of ``path`` left by writers that
    were killed are removed before the new one is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = _temporary_name(path)
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0o666 & ~umask, as open() gives
    try:
        yield temporary
        handle = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(handle)  # the data reaches the disk before the name does
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A new empty folder next to ``path`` for the block to fill; renamed to ``path`` if the block succeeds.

    Readers see either no ``path`` or the complete folder. On an error the temporary folder is
    removed; those left by writers that were killed are removed before the new one is created.

    Raises:
        FileExistsError: ``path`` exists (and is not an empty folder) when the block ends; the
            temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = _temporary_name(path)
    temporary.mkdir()
    try:
        yield temporary
        if hasattr(os, "sync"):  # the files reach the disk before the folder's name does
            os.sync()
        try:
            os.rename(temporary, path)
        except OSError as error:
            if not path.exists():
                raise
            raise FileExistsError(f"{path} already exists; the folder written next to it was discarded.") from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` next to ``path``, then rename the result over ``path``.

    See :func:`atomic_path`.
    """
    with atomic_path(path) as temporary:
        write(str(temporary))
    return Path(path)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f"{_temporary_prefix(path)}{os.getpid()}.{secrets.token_hex(8)}.tmp")


def _temporary_prefix(path: Path) -> str:
    """``.<name>.<host>.``: the writer's pid, a random part and ``.tmp`` follow."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32]
    return f".{path.name}.{host}."


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` written on this host by processes that no longer run."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return
    pattern = re.compile(re.escape(_temporary_prefix(path)) + r"(\d+)\.[0-9a-f]+\.tmp")
    for entry in os.scandir(path.parent):
        match = pattern.fullmatch(entry.name)
        if match is None or _is_running(int(match.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):  # left by atomic_directory
                shutil.rmtree(entry.path)
                log.info("removed the folder %s, left by an interrupted write of %s", entry.path, path)
                continue
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except FileNotFoundError:  # another process removed it first
            continue
        log.info("removed %s (%d bytes), left by an interrupted write of %s", entry.path, size, path)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_atomic(path, lambda temporary: Path(temporary).write_text(text))


def save_state_dict(state: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write ``state`` to ``path`` (``.safetensors``, or ``.pt``/``.pth`` through ``torch.save``) atomically."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"{path}: choose a .safetensors, .pt or .pth file name for the state dict.")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return write_atomic(path, lambda temporary: save_file(tensors, temporary))
    return write_atomic(path, lambda temporary: torch.save(tensors, temporary))
