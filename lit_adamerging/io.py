"""Atomic writes: an interrupted save never leaves a half-written file at the destination."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary_path)`` next to ``path``, then rename the result over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


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
