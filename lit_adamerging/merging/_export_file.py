"""Reading the methods' own export files: a safetensors file whose header metadata names its format and version.

EMR-Merging and WEMoE have no single merged encoder, so each writes a file of its own (what it needs
to rebuild its model) and reads it back through these helpers: the bytes read once, within the size
limits, the header checked before any tensor is trusted, every problem an error naming the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor


def read_export(path: Path, what: str, format_name: str, version: str, error: type[ValueError], hint: str
                ) -> tuple[dict[str, str], dict[str, Tensor]]:
    """``(metadata, tensors)`` of the export file ``path`` after checking that its metadata says ``format_name`` at
    ``version``; any problem raises ``error`` naming ``path`` (``hint`` says what writes such a file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    from lit_adamerging.limits import open_regular_file

    with open_regular_file(path, what) as file:
        data = file.read()
    header = None
    if len(data) >= 8:
        (length,) = struct.unpack("<Q", data[:8])
        if 8 + length <= len(data):
            try:
                header = json.loads(data[8 : 8 + length])
            except (UnicodeDecodeError, ValueError):
                header = None
    if not isinstance(header, dict):
        raise error(f"{path}: not a readable safetensors file (its header is missing or garbled).")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != format_name:
        raise error(f"{path}: not {what} (its metadata lacks format={format_name!r}); {hint}.")
    if metadata.get("version") != version:
        raise error(f"{path}: {what} version {metadata.get('version')!r}; this library reads version {version!r}.")
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as problem:
        raise error(f"{path}: not a readable safetensors file ({problem}); the file may be truncated.") from problem
    return metadata, tensors


def json_field(metadata: Mapping[str, str], key: str, path: Path, error: type[ValueError]) -> object:
    """The metadata's ``key`` decoded from JSON; ``error`` naming ``path`` if it is missing or not JSON."""
    try:
        return json.loads(metadata[key])
    except (KeyError, TypeError, ValueError):
        raise error(f"{path}: the metadata's {key!r} is missing or not JSON; the file is garbled.") from None
