"""Reading the checkpoints the merging modules write: once, as plain data, within limits.

A checkpoint of learned merging parameters (coefficients, surgery maps, optimizer state) is a
Lightning ``.ckpt`` of kilobytes. Every way one is loaded goes through :func:`fetch_checkpoint` and
:func:`load_checkpoint`:

* the bytes are read once (a local regular file, or a URL downloaded once, never cached), under
  :data:`~lit_adamerging.limits.CHECKPOINT_BYTES`;
* they are unpickled with ``torch.load(weights_only=True)`` passed explicitly, which
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn off;
* the result must be a Lightning checkpoint holding merging coefficients, nest no deeper than
  :data:`~lit_adamerging.limits.NESTING_DEPTH`, declare no more tensor bytes than the limit, and
  hold only finite learned tensors.

The Trainer reads through :class:`SafeCheckpointIO` (the modules install it in ``setup``), so
``trainer.fit/test(ckpt_path=...)`` and its aliases (``"last"``, ``"best"``, ``"hpc"``) are read
the same way; ``load_from_checkpoint`` hands Lightning the bytes it checked; the command line
copies a checkpoint once into a private file (:func:`private_copy`) that both its own checks and
the Trainer read.
"""

from __future__ import annotations

import atexit
import io
import os
import pickle
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from torch import Tensor

from lit_adamerging.limits import CHECKPOINT_BYTES, NESTING_DEPTH, NotARegularFile, open_regular_file

__all__ = [
    "COEFFICIENTS_KEY",
    "GATES_KEY",
    "ROUTERS_PREFIX",
    "SafeCheckpointIO",
    "fetch_checkpoint",
    "is_url",
    "load_checkpoint",
    "private_copy",
    "read_adamerging_checkpoint",
    "source_name",
]

COEFFICIENTS_KEY = "merger.coefficients.raw"
GATES_KEY = "gates.raw"
"""Rank-wise AdaMerging's learned state: its gate logits."""
ROUTERS_PREFIX = "mixture.routers."
"""WEMoE's learned state: the keys of its routers."""
ADVICE = (
    "--ckpt_path (and load_from_checkpoint) take the .ckpt file `lit-adamerging fit` writes "
    "(e.g. runs/tiny/checkpoints/last.ckpt); fine-tuned weights go in the zoo (model.zoo.init_args.finetuned)."
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DOWNLOAD_TIMEOUT_S = 60


def is_url(source: str | Path) -> bool:
    """Whether ``source`` is a URL (``scheme://...``); a local file named ``https_backup.ckpt`` is not."""
    return isinstance(source, str) and _URL.match(source) is not None


def _read_at_most(handle: IO[bytes], limit: int, name: str) -> bytes:
    data = handle.read(limit + 1)
    CHECKPOINT_BYTES.check(len(data), name, "bytes" if len(data) <= limit else f"bytes (at least; read {limit + 1})")
    return data


def source_name(source: str | Path | IO[bytes]) -> str:
    """How errors name a checkpoint: its path or URL, a file object's name."""
    return str(source) if isinstance(source, (str, Path)) else str(getattr(source, "name", "<file object>"))


def fetch_checkpoint(source: str | Path | IO[bytes]) -> bytes:
    """The bytes of the checkpoint at ``source`` (a path or URL, or a binary file read from its position), read
    once and at most the size limit.

    Raises:
        ValueError: nothing (or a folder, FIFO, device) is at ``source``, the download failed, or it
            is larger than :data:`~lit_adamerging.limits.CHECKPOINT_BYTES` (a
            :class:`~lit_adamerging.limits.LimitExceeded`).
    """
    name, limit = source_name(source), CHECKPOINT_BYTES.value()
    if not isinstance(source, (str, Path)):
        return _read_at_most(source, limit, name)
    if not is_url(name):
        path = Path(name).expanduser()
        if not path.exists() or path.is_dir():
            what = "a folder" if path.is_dir() else "no such file"
            raise ValueError(f"{name} is not an AdaMerging checkpoint: {what}. {ADVICE}")
        try:
            with open_regular_file(path, "checkpoint") as handle:
                return _read_at_most(handle, limit, name)
        except NotARegularFile as error:
            raise ValueError(f"{error} {ADVICE}") from None
    scheme = name.partition("://")[0].lower()
    try:
        if scheme in ("http", "https"):
            with urllib.request.urlopen(name, timeout=_DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
                return _read_at_most(response, limit, name)
        filesystem = get_filesystem(name)
        if not filesystem.isfile(name):
            raise ValueError(f"{name} is not an AdaMerging checkpoint: no such file. {ADVICE}")
        with filesystem.open(name, "rb") as handle:
            return _read_at_most(handle, limit, name)
    except (urllib.error.URLError, OSError) as error:
        raise ValueError(f"{name}: the checkpoint could not be downloaded ({error}).") from None


def _torch_load(data: bytes, name: str) -> Any:
    """``torch.load(weights_only=True)`` of ``data``, its failures said in terms of what the file is."""
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(data) >= 9 and data[8:9] == b"{":
        raise ValueError(f"{name} is not an AdaMerging checkpoint: it is a safetensors file (tensors only). {ADVICE}")
    if zipfile.is_zipfile(io.BytesIO(data)):  # what its entries inflate to, before anything inflates them
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            inflated = sum(entry.file_size for entry in archive.infolist())
        CHECKPOINT_BYTES.check(inflated, name, "bytes once its zip entries are inflated")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, RecursionError, zipfile.BadZipFile) as error:
        text = str(error)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        if found:  # torch's advice (weights_only=False, an environment variable) is not for this file
            reason = f"it holds pickled Python objects ({found.group(1)}), not a checkpoint's plain data; it was not " \
                     "unpickled"
        else:
            cause = detail.group(1) if detail else text.strip() or type(error).__name__
            reason = f"torch.load cannot read it ({cause[:200]})"
        raise ValueError(f"{name} is not an AdaMerging checkpoint: {reason}. {ADVICE}") from None


def _check_structure(checkpoint: Any, name: str) -> None:
    """Refuse nesting deeper than the limit and tensors declaring more bytes than the limit, without recursion."""
    tensor_bytes = 0
    pending: list[tuple[Any, int]] = [(checkpoint, 1)]
    seen: set[int] = set()
    while pending:
        value, depth = pending.pop()
        if isinstance(value, Tensor):
            tensor_bytes += value.numel() * value.element_size()
        elif isinstance(value, (Mapping, list, tuple, set, frozenset)) and id(value) not in seen:
            seen.add(id(value))
            NESTING_DEPTH.check(depth, name, "levels of nested containers")
            children = [*value.keys(), *value.values()] if isinstance(value, Mapping) else list(value)
            pending.extend((child, depth + 1) for child in children)
    CHECKPOINT_BYTES.check(tensor_bytes, name, "bytes of tensors (as their shapes declare them)")


def load_checkpoint(data: bytes, name: str) -> dict[str, Any]:
    """The checkpoint ``data`` (read from ``name``) as a dict, after every check of the module docstring.

    Raises:
        ValueError: it is not an AdaMerging checkpoint (a fine-tuned model's weights, a
            ``.safetensors`` file, a pickled object), it exceeds a limit, or a learned tensor holds
            NaN or infinite values; the message names ``name``.
    """
    checkpoint = _torch_load(data, name)
    _check_structure(checkpoint, name)
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, Mapping) or "pytorch-lightning_version" not in checkpoint:
        keys = list(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"{name} is not an AdaMerging checkpoint: it is not a Lightning checkpoint (top level: {keys}). {ADVICE}"
        )
    if not any(key.startswith((COEFFICIENTS_KEY, GATES_KEY, ROUTERS_PREFIX)) for key in state_dict):
        raise ValueError(
            f"{name} is not an AdaMerging checkpoint: it holds no merging coefficients ({COEFFICIENTS_KEY!r}; "
            f"nor rank-wise gates, {GATES_KEY!r}; nor WEMoE routers, {ROUTERS_PREFIX!r}...; its state dict has "
            f"{list(state_dict)[:5]}). {ADVICE}"
        )
    if not isinstance(checkpoint.get("hyper_parameters", {}), Mapping):
        raise ValueError(f"{name}: its 'hyper_parameters' are not a mapping; the file is damaged or was edited.")
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            what = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{name}: its state dict entry {key!r} is a {what}, not a floating-point tensor; the file is damaged "
                "or was edited."
            )
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"{name}: {key!r} holds {bad} NaN or infinite value(s) of {value.numel()}; the run that wrote it "
                "diverged or the file was edited, so it describes no merge. Use an earlier checkpoint or fit again."
            )
    return checkpoint


def read_adamerging_checkpoint(source: str | Path | IO[bytes]) -> dict[str, Any]:
    """:func:`load_checkpoint` of :func:`fetch_checkpoint`: the checked contents of an AdaMerging checkpoint."""
    return load_checkpoint(fetch_checkpoint(source), source_name(source))


_PRIVATE_FOLDERS: list[str] = []


def _remove_private_folders() -> None:
    for folder in _PRIVATE_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


def private_copy(data: bytes, name: str) -> Path:
    """``data`` written to a new file only this user can read, removed when the process exits.

    The command line hands this copy to the Trainer, so that it loads the very bytes that were
    checked, even if the original file or the server's answer changes.
    """
    if not _PRIVATE_FOLDERS:
        atexit.register(_remove_private_folders)
    folder = tempfile.mkdtemp(prefix="lit-adamerging-checkpoint-")  # mode 0o700
    _PRIVATE_FOLDERS.append(folder)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name.rstrip("/")).name)[-64:] or "checkpoint"
    path = Path(folder) / (stem if stem.endswith(".ckpt") else f"{stem}.ckpt")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        handle.write(data)
    return path


class SafeCheckpointIO(CheckpointIO):
    """A Trainer's checkpoint reader for the merging modules: reads as :func:`read_adamerging_checkpoint` does.

    Saving and removing are left to the wrapped ``CheckpointIO``; loading ignores the Trainer's
    ``weights_only`` (it is always ``True``) and records the file read in :attr:`last_source`.
    """

    def __init__(self, inner: CheckpointIO | None = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else TorchCheckpointIO()
        self.last_source: str | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        checkpoint = read_adamerging_checkpoint(str(path))
        self.last_source = str(path)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
