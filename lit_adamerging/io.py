"""Atomic writes: an interrupted save never leaves a half-written file at the destination.

A file is written under a temporary name next to its destination, ``.<name>.<host>.<pid>.<random>.tmp``,
flushed to disk and renamed over the destination. A writer killed mid-write (``kill -9``, out of
memory) leaves its temporary file behind; the next write to the same destination removes the ones
whose writer is gone (written on this host by a process that no longer runs), never one that a
running process is still writing. :func:`atomic_directory` does the same for a whole folder, and
:func:`write_all_atomic` for several files that must change together, :func:`save_safetensors_stream` for a
state dict produced one tensor at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

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
    temporary = _new_temporary(path)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_all_atomic(writers: Mapping[str | Path, Callable[[str], None]]) -> list[Path]:
    """Write several files, all of them or none: ``write(temporary_path)`` for each destination, then every
    temporary file renamed over its destination, in order.

    If a write fails, no destination is touched. If a rename fails (the destination turned into a folder,
    the disk went read-only), the destinations already replaced get back what they held before (a hard
    link, or a copy, of each old file is kept until every rename succeeded) or are removed if they were
    new; the error is raised. Temporary files are removed either way.
    """
    destinations = [Path(path) for path in writers]
    if len({os.path.abspath(path) for path in destinations}) != len(destinations):
        raise ValueError(f"write_all_atomic: a destination is given twice in {[str(p) for p in destinations]}.")
    temporaries: dict[Path, Path] = {}
    replaced: list[tuple[Path, Path | None]] = []  # destination, and the backup of what it held (None: new)
    try:
        for destination, write in zip(destinations, writers.values()):
            temporaries[destination] = _new_temporary(destination)
            write(str(temporaries[destination]))
            _fsync(temporaries[destination])
        for destination in destinations:
            backup = _backup(destination)
            try:
                os.replace(temporaries[destination], destination)
            except BaseException:
                if backup is not None:
                    backup.unlink(missing_ok=True)
                raise
            del temporaries[destination]
            replaced.append((destination, backup))
    except BaseException:
        _roll_back(replaced)
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        raise
    for _, backup in replaced:
        if backup is not None:
            backup.unlink(missing_ok=True)
    return destinations


def _new_temporary(path: Path) -> Path:
    """An empty temporary file next to ``path`` (its folder created), after removing those of dead writers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    temporary = _temporary_name(path)
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0o666 & ~umask, as open() gives
    return temporary


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)  # the data reaches the disk before the name does
    finally:
        os.close(handle)


def _backup(path: Path) -> Path | None:
    """A second name (hard link, else copy) for the file at ``path``, so that it can be put back; ``None``
    when there is no file there."""
    if not os.path.lexists(path) or path.is_dir():
        return None
    backup = _temporary_name(path)
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def _roll_back(replaced: list[tuple[Path, Path | None]]) -> None:
    """Put back what the replaced destinations held, latest first; a failure to do so is logged, not raised
    (the error that caused the roll-back is the one to report)."""
    for destination, backup in reversed(replaced):
        try:
            if backup is None:
                destination.unlink(missing_ok=True)
            else:
                os.replace(backup, destination)
        except OSError as error:
            log.error("could not restore %s after a failed write of several files: %s", destination, error)


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
    return write_atomic(path, _state_dict_writer(state, Path(path)))


def save_state_dicts(states: Mapping[str | Path, Mapping[str, Tensor]]) -> list[Path]:
    """Write ``{path: state}`` as :func:`save_state_dict` does, all of them or none (:func:`write_all_atomic`)."""
    return write_all_atomic({path: _state_dict_writer(state, Path(path)) for path, state in states.items()})


def _state_dict_writer(state: Mapping[str, Tensor], path: Path) -> Callable[[str], None]:
    """What writes ``state`` to a temporary file, in ``path``'s format."""
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"{path}: choose a .safetensors, .pt or .pth file name for the state dict.")
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return lambda temporary: save_file(tensors, temporary)
    return lambda temporary: torch.save(tensors, temporary)


# The safetensors format's names of the dtypes (what a streamed file may hold, what a row reader understands).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def save_safetensors_stream(
    path: str | Path | None,
    layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
) -> None:
    """Write a ``.safetensors`` file one tensor at a time, never holding them all: atomically, as :func:`atomic_path`.

    ``layout`` is ``{name: (dtype, shape)}``; the header is written from it first, then each tensor of
    ``tensors`` (``(name, tensor)`` pairs in ``layout``'s order) as it comes. ``path`` ``None`` writes
    nothing but still consumes ``tensors`` and checks them, so that processes that only help produce the
    tensors (each gathered from all processes) can run the same loop as the one that writes.

    Example:
        >>> import tempfile, safetensors.torch
        >>> path = Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> save_safetensors_stream(path, {"w": (torch.float32, (2,))}, [("w", torch.ones(2))])
        >>> safetensors.torch.load_file(path)["w"]
        tensor([1., 1.])
    """
    entries: dict[str, Any] = {}
    position = 0
    for name, (dtype, shape) in layout.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which a safetensors file cannot hold.")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        entries[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [position, position + size]
        }
        position += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensors' bytes start 8-byte aligned

    def write_all(file: IO[bytes] | None) -> None:
        if file is not None:
            file.write(struct.pack("<Q", len(header)) + header)
        expected = iter(layout)
        for name, tensor in tensors:
            wanted = next(expected, None)
            if wanted is None or name != wanted or (tensor.dtype, tuple(tensor.shape)) != layout[wanted]:
                got = f"{name!r} ({tensor.dtype}, {tuple(tensor.shape)})"
                raise ValueError(f"save_safetensors_stream: expected {wanted!r} {layout.get(wanted)}, got {got}.")
            if file is not None:
                file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        left = list(expected)
        if left:
            raise ValueError(f"save_safetensors_stream: {len(left)} tensor(s) of the layout not given: {left[:3]}.")

    if path is None:
        write_all(None)
        return
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        write_all(file)
