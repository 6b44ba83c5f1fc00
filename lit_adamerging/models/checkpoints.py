"""Read model weights from the checkpoint formats found in the wild, and pick an encoder's weights out.

:func:`read_checkpoint` turns a file or folder into a flat ``{key: tensor}`` dict:

* ``.safetensors`` files;
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` files written by ``torch.save``: a plain state dict, or a
  container holding one under ``state_dict`` (Lightning), ``model_state_dict``, ``model``,
  ``module`` (DeepSpeed) or ``ema``;
* with ``allow_pickle=True`` only, ``torch.save`` files holding pickled Python objects, such as whole
  ``nn.Module`` objects (``torch.save(model)``, e.g. the task_vectors release's ``finetuned.pt``, whose
  ``src.modeling.ImageEncoder`` objects load without that project's source tree). No code from such a
  file runs: tensors, storages, dtypes, ``torch.Size``, ``OrderedDict`` and sets are rebuilt; every
  other class is replaced by an inert stand-in holding only its pickled state (a module's weights are
  read from it), even when the class could be imported; and a file that calls anything else
  (``eval``, ``os.system``, ``getattr``, a function of any module) or refers to a module that runs code
  (``os``, ``subprocess``, ``builtins``, ``importlib``, ``pickle``, ``functools``, ...) is refused;
* a Hugging Face CLIP folder (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``,
  possibly sharded) of a ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``:
  its image tower, renamed to open_clip's ``VisionTransformer`` keys.

:func:`select_encoder_weights` then finds the encoder's keys in such a dict under whatever prefix
they were saved (``module.``, ``model.visual.``, ...), ignores everything else (text tower, heads)
and checks names, shapes, dtypes and values against the encoder's own ``state_dict()``.

The reading is here; the rest is in private modules beside this one: ``_safe_unpickler`` (``allow_pickle``),
``_hf_clip`` (Hugging Face CLIP folders), ``_select`` (:func:`select_encoder_weights`) and ``_errors``
(:class:`CheckpointError`).
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from lit_adamerging._compat import UncheckedVersion
from lit_adamerging.limits import LimitExceeded, open_regular_file
from lit_adamerging.models._errors import CheckpointError, few
from lit_adamerging.models._hf_clip import HF_WEIGHT_FILES as HF_WEIGHT_FILES  # re-exported, as before the split
from lit_adamerging.models._hf_clip import read_hf_clip_folder
from lit_adamerging.models._safe_unpickler import (
    UNUSABLE_KINDS,
    Global,
    Refused,
    StandIn,
    UnusableTensor,
    module_weights,
    pickle_module_for,
)
from lit_adamerging.models._select import LazyTensor, select_encoder_weights

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "LazyTensor",
    "read_checkpoint",
    "read_checkpoint_rows",
    "select_encoder_weights",
    "unusable_tensor_kind",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema")


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read weights from a file or folder into a flat ``{key: tensor}`` dict.

    What a file may make the reader do is bounded by the file itself, so a small file cannot make it
    allocate or walk much more than it holds:

    * only regular files are opened (a FIFO, socket or device named as a weights file, config or shard
      is refused before it can block the run);
    * a ``torch.save`` zip must hold its entries uncompressed, as ``torch.save`` writes them, and they may
      declare no more bytes in all than the file has (no entry can inflate beyond the file);
    * every tensor must be dense, on the CPU and hold values: sparse, meta, quantized and nested tensors
      are refused by key;
    * no tensor may declare more bytes (elements times element size) than its storage holds: such a view
      (stride 0 or overlapping, e.g. from ``expand()``) repeats memory and would grow to its declared
      size when copied, so it is refused by key rather than materialised. A tensor that shares its
      storage with others (tied weights, views of one buffer) is read as it is;
    * with ``allow_pickle``, the objects a pickle builds and the modules, weights and weight-name
      characters read from a pickled module count against
      :data:`~lit_adamerging.limits.PICKLED_OBJECTS`, and modules may nest no deeper than
      :data:`~lit_adamerging.limits.NESTING_DEPTH` (modules reached along several paths are read once
      per path, as ``state_dict()`` does, so that limit also bounds a pickle of shared references).

    Args:
        path: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file, or a Hugging Face
            CLIP model folder.
        allow_pickle: also accept ``torch.save`` files holding pickled Python objects (whole modules,
            custom classes), which ``torch.load(weights_only=True)`` refuses. They are read without
            running any code from the file: tensors, storages, dtypes, ``torch.Size``,
            ``torch.device``, ``OrderedDict`` and sets are rebuilt; every other class becomes an inert
            stand-in keeping only its pickled state (a pickled module's weights are read from it),
            even when the class could be imported; any other call (``eval``, ``os.system``,
            ``getattr``, a function of any module), and any name from a module that runs code
            (``os``, ``subprocess``, ``builtins``, ``importlib``, ``pickle``, ``functools``, ...), is
            refused with a :class:`CheckpointError` naming it.

    Returns:
        The state dict as saved (keys keep their prefixes; see :func:`select_encoder_weights`). For
        a Hugging Face CLIP folder, the image tower under open_clip ``VisionTransformer`` names without
        prefix (the keys of ``open_clip.create_model(name).visual.state_dict()``); ``proj`` is absent
        when the folder holds a plain ``CLIPVisionModel`` (no projection). Hugging Face's
        ``hidden_act`` is not carried over: OpenAI CLIP weights use QuickGELU, so build the open_clip
        encoder with ``force_quick_gelu=True`` (or a ``-quickgelu`` model) for them.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointError: the file type is unsupported, the file is unreadable, holds no tensors, holds
            a tensor refused above (naming its key), holds pickled objects while ``allow_pickle`` is
            false, or (with ``allow_pickle``) would call something that could run code or needs reading
            with a Python or torch version the unpickler's private APIs were not checked for (see
            :mod:`lit_adamerging._compat`).
        lit_adamerging.limits.NotARegularFile: the file (or a config or shard of a folder) is a FIFO,
            socket, device or folder.
        lit_adamerging.limits.LimitExceeded: a pickle builds or nests more than a limit allows; the
            message names the environment variable that raises it.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check the path in the zoo configuration. The paper's "
            "fine-tuned CLIP encoders are published by the task_vectors project (zeroshot.pt and "
            "<Task>/finetuned.pt, linked from github.com/mlfoundations/task_vectors) and, as Hugging Face "
            "folders, by FusionBench (e.g. tanganke/clip-vit-base-patch32_<task>; download them with "
            "`huggingface-cli download <repo> --local-dir <folder>`)."
        )
    try:
        if path.is_dir():
            return _read_folder(path, allow_pickle=allow_pickle)
        return _read_file(path, allow_pickle=allow_pickle)
    except RecursionError:  # a structure deeper than Python's stack, wherever it was met
        raise CheckpointError(
            f"{path}: nested too deeply to read (Python's recursion limit was reached); the file is corrupt or "
            "crafted. Re-save the weights as a plain state dict (.safetensors) where they were made."
        ) from None


def read_checkpoint_rows(
    path: str | Path,
    select: Callable[[Mapping[str, Tensor | LazyTensor]], dict[str, Tensor]],
    *,
    allow_pickle: bool = False,
) -> dict[str, Tensor]:
    """``select(state)`` of the checkpoint at ``path``, where ``select`` reads what it needs of each entry.

    A ``.safetensors`` file is not read whole: its entries are :class:`LazyTensor` s, so only the rows that
    ``select`` indexes are read (a process of a sharded merge reads its rows of each tensor). Any other
    format is read whole by :func:`read_checkpoint` first (``torch.save`` files cannot be read in part), then
    given to ``select`` as tensors.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return select(read_checkpoint(path, allow_pickle=allow_pickle))
    from safetensors import SafetensorError, safe_open

    with open_regular_file(path, "checkpoint") as file:
        try:
            with safe_open(_same_file_path(file, path), framework="pt", device="cpu") as handle:
                state = {key: LazyTensor(handle.get_slice(key)) for key in handle.keys()}  # noqa: SIM118
                if not state:
                    raise CheckpointError(
                        f"{path}: the safetensors file holds no tensors; it is not a model checkpoint."
                    )
                unknown = [key for key, value in state.items() if value.dtype is None]
                if unknown:
                    raise CheckpointError(f"{path}: tensor {unknown[0]!r} has a dtype this reader does not know.")
                return select(state)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({error}); the file may be truncated."
            ) from error


def _read_folder(folder: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    if not (folder / "config.json").exists():
        raise CheckpointError(
            f"{folder}: a folder, but not a Hugging Face model folder (no config.json); give a weights file "
            f"({', '.join(CHECKPOINT_SUFFIXES)}) or a folder saved by transformers' save_pretrained."
        )
    return read_hf_clip_folder(folder, functools.partial(_read_file, allow_pickle=allow_pickle))


def _read_file(path: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        state = _read_torch_file(path, allow_pickle=allow_pickle)
    else:
        raise CheckpointError(
            f"{path}: unsupported checkpoint file type {path.suffix!r}; give a file ending in one of "
            f"{', '.join(CHECKPOINT_SUFFIXES)}, or a Hugging Face CLIP model folder."
        )
    _refuse_unusable_tensors(state, path)
    return state


def _same_file_path(file: IO[bytes], path: Path) -> str:
    """A path that opens the very file ``file`` has open, for readers that take a path, not a file.

    Giving them ``path`` again would open whatever is there by then, e.g. a FIFO swapped in after the check.
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        reopened = f"{folder}/{file.fileno()}"
        if os.path.exists(reopened):
            return reopened
    return str(path)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with open_regular_file(path, "checkpoint") as file:
        try:
            state = load_file(_same_file_path(file, path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({error}); the file may be truncated."
            ) from error
    if not state:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors; it is not a model checkpoint.")
    return state


def _read_torch_file(path: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    with open_regular_file(path, "checkpoint") as file:
        is_zip = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC  # how torch.load tells its zip format from the legacy one
        if is_zip:
            _check_zip_entries(file, path)
        file.seek(0)
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if not allow_pickle:
                raise _refusal(path, file, is_zip, error) from error
            # Only pickles get here: TorchScript and legacy tar archives fail above with a RuntimeError.
            loaded = _load_pickled(file, path)
        except Exception as error:  # zip/EOF/key errors of corrupt or foreign files
            raise _unreadable(path, error) from error
    state = _extract_state_dict(loaded, str(path))
    if state is None:
        raise CheckpointError(
            f"{path}: found no tensors to use as weights in a {_describe(loaded)}; expected a state dict, "
            f"or a dict holding one under one of the keys {list(CONTAINER_KEYS)}."
        )
    return state


def _has_zip_end_record(file: IO[bytes]) -> bool:
    file.seek(0)
    try:
        return zipfile.is_zipfile(file)
    except zipfile.BadZipFile:  # an end record that cannot be used
        return True


def _check_zip_entries(file: IO[bytes], path: Path) -> None:
    """Refuse a zip whose entries could inflate beyond the file: compressed, or together larger than it.

    A file without a zip end record (e.g. truncated) is left to torch.load, whose reader looks for that
    record in the same place, finds none either and reads no entry; it says why the file is unreadable.
    """
    size = os.fstat(file.fileno()).st_size
    try:
        with zipfile.ZipFile(file) as archive:  # a ZipFile given a file object leaves it open
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        if not _has_zip_end_record(file):
            return
        raise _unreadable(path, error) from error
    compressed = [entry.filename for entry in entries if entry.compress_type != zipfile.ZIP_STORED]
    if compressed and any(entry.filename.rpartition("/")[2] == "constants.pkl" for entry in entries):
        raise CheckpointError(  # torch.jit.save compresses its code entries
            f"{path}: not a readable PyTorch checkpoint (it is one of the TorchScript archives that torch.jit.save "
            "writes, a program rather than weights); save the model's state_dict() with torch.save and give that "
            "file."
        )
    if compressed:
        raise CheckpointError(
            f"{path}: the zip entries {few(compressed)} are compressed; torch.save never compresses them, so "
            "another tool rewrote the file, and a compressed entry can inflate to far more than the file holds. "
            "Re-save the weights with torch.save (or as .safetensors) and give that file."
        )
    declared = sum(entry.file_size for entry in entries)
    if declared > size:
        raise CheckpointError(
            f"{path}: the zip entries declare {declared} bytes in all, more than the file's {size} bytes, so "
            "entries overlap or the zip directory is corrupt. Re-save the weights with torch.save (or as "
            ".safetensors) and give that file."
        )


_UNUSABLE_ADVICE = (
    "only dense tensors with values, on the CPU, can be used as weights. Save dense, materialised weights "
    "(load the real weights into the model, then save `{k: v.to_dense().contiguous().cpu()}` for each "
    "tensor, with torch.save or as .safetensors) and give that file."
)


def unusable_tensor_kind(value: Any) -> str | None:
    """What kind of tensor ``value`` is if it cannot serve as weights (sparse, meta, quantized, nested), or None.

    Example:
        >>> unusable_tensor_kind(torch.zeros(2, device="meta")), unusable_tensor_kind(torch.zeros(2))
        ('a meta tensor (a shape without values)', None)
    """
    if isinstance(value, UnusableTensor):
        return value.kind
    if value.is_meta:
        return UNUSABLE_KINDS["torch._utils._rebuild_meta_tensor_no_storage"]
    if value.layout != torch.strided:
        return f"a {'sparse ' if 'sparse' in str(value.layout) else ''}tensor of layout {value.layout}"
    if value.is_quantized:
        return UNUSABLE_KINDS["torch._utils._rebuild_qtensor"]
    if value.is_nested:
        return UNUSABLE_KINDS["torch._utils._rebuild_nested_tensor"]
    return None


def _refuse_unusable_tensors(state: Mapping[str, Any], path: Path) -> None:
    """The checks of :func:`read_checkpoint` on each tensor read: usable kind, CPU, no more bytes than stored."""
    for key, value in state.items():
        kind = unusable_tensor_kind(value)
        if kind is None and value.device.type != "cpu":
            kind = f"a tensor on the device {value.device}"
        if kind is not None:
            raise CheckpointError(f"{path}: {key!r} is {kind}; {_UNUSABLE_ADVICE}")
        declared = value.numel() * value.element_size()
        stored = value.untyped_storage().nbytes()
        if declared > stored:
            raise CheckpointError(
                f"{path}: {key!r} is a {value.dtype} tensor of shape {list(value.shape)} ({declared} bytes) over "
                f"only {stored} stored bytes: a view that repeats values (strides {list(value.stride())}, e.g. "
                "made by expand()), which would take all its declared bytes once copied, so it is refused. Save "
                "materialised weights (`.contiguous()` or `.clone()` of each tensor before torch.save, or "
                ".safetensors) and give that file."
            )


def _reason(error: Exception) -> str:
    """The informative first sentence of a torch.load error (``weights_only`` ones are long)."""
    message = str(error).split("WeightsUnpickler error:")[-1].strip()
    first = message.splitlines()[0].split(". ")[0].strip() if message else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    reason = "the file is empty" if path.stat().st_size == 0 else _reason(error)
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint ({reason}); the file may be truncated or not written by "
        "torch.save."
    )


_ZIP_MAGIC = b"PK\x03\x04"  # how torch.save >= 1.6 files begin
_LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)  # how torch.save < 1.6 files begin


def _refusal(path: Path, file: IO[bytes], is_zip: bool, error: Exception) -> CheckpointError:
    """The error for a file that ``torch.load(weights_only=True)`` refused, when ``allow_pickle`` is false."""
    file.seek(0)
    if not is_zip and file.read(len(_LEGACY_HEADER)) != _LEGACY_HEADER:
        return _unreadable(path, error)  # random bytes, or a plain pickle: allow_pickle would not help
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        what = f"the file holds pickled Python objects (it references {found.group(1)}), not just tensors"
    else:  # e.g. pickle protocol 4, which that reader does not parse
        what = f"torch's weights-only reader cannot read the file ({_reason(error)})"
    return CheckpointError(
        f"{path}: {what}. If it comes from a source you trust, set `allow_pickle: true` on the zoo (Python: "
        "`allow_pickle=True`) to read its tensors: other classes are then stood in for without running their "
        "code, and anything that could run code is refused. Better, convert it to a plain state dict "
        "(.safetensors) where it was made."
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)
        more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
        return f"dict with top-level keys {keys[:10]}{more}"
    if isinstance(obj, StandIn):
        return f"{obj.cls.name} object"
    if isinstance(obj, Global):
        return f"reference to {obj.name}"
    return f"{type(obj).__module__}.{type(obj).__qualname__} object"


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, (Tensor, UnusableTensor)) for v in obj.values())
    )


def _extract_state_dict(obj: Any, source: str, depth: int = 0) -> dict[str, Tensor] | None:
    """The state dict in a loaded object: a dict of tensors, a container of one, or a pickled module."""
    if depth > 4:
        return None
    if isinstance(obj, StandIn):
        weights = module_weights(obj, source)
        if weights:
            return weights
        obj = obj.items or obj.attributes  # a dict subclass's items, or an object's attributes
    if _is_state_dict(obj):
        return {str(key): value for key, value in obj.items()}
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if key in obj:
                found = _extract_state_dict(obj[key], source, depth + 1)
                if found is not None:
                    return found
    return None


def _load_pickled(file: IO[bytes], path: Path) -> Any:
    try:
        pickle_module = pickle_module_for(str(path))
    except UncheckedVersion as error:
        raise CheckpointError(f"{path}: {error}") from None
    file.seek(0)
    try:
        with warnings.catch_warnings():  # the pre-1.6 format's source check has no source to compare for a name
            warnings.filterwarnings("ignore", "Couldn't retrieve source code for container")
            return torch.load(file, map_location="cpu", weights_only=False, pickle_module=pickle_module)
    except LimitExceeded:
        raise
    except Refused as refused:
        raise CheckpointError(
            f"{path}: refused {refused}, which could run code. allow_pickle rebuilds only tensors and containers "
            "and stands in for other classes without running their code; anything else is refused. Do not use "
            "this file; if it comes from a trusted source, convert it to a plain state dict (.safetensors) where "
            "it was made."
        ) from refused
    except Exception as error:
        raise _unreadable(path, error) from error
