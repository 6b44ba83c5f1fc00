"""Atomic writes: an interrupted save never leaves a half-written file at the destination."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor


def save_state_dict(state: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write ``state`` to ``path`` (``.safetensors``, or ``.pt``/``.pth`` through ``torch.save``) atomically.

    The file is written next to the destination under a temporary name and renamed over it.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise ValueError(f"{path}: choose a .safetensors, .pt or .pth file name for the state dict.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, temporary)
        else:
            torch.save(tensors, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
