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

Example:
    >>> import torch
    >>> expected = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    >>> checkpoint = {"model.weight": torch.ones(2, 3, dtype=torch.float16), "model.bias": torch.ones(2),
    ...               "head.weight": torch.ones(5, 2)}
    >>> weights = select_encoder_weights(checkpoint, expected, source="example.pt")
    >>> list(weights), weights["weight"].dtype
    (['weight', 'bias'], torch.float32)
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import inspect
import json
import os
import pickle
import re
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from lit_adamerging.limits import NESTING_DEPTH, PICKLED_OBJECTS, LimitExceeded, open_regular_file

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "read_checkpoint",
    "select_encoder_weights",
    "unusable_tensor_kind",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SHOWN = 5  # how many keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not hold the weights the encoder needs."""


# --------------------------------------------------------------------------------------------- reading
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
            false, or (with ``allow_pickle``) would call something that could run code.
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
            return _read_hf_clip_folder(path, allow_pickle=allow_pickle)
        return _read_file(path, allow_pickle=allow_pickle)
    except RecursionError:  # a structure deeper than Python's stack, wherever it was met
        raise CheckpointError(
            f"{path}: nested too deeply to read (Python's recursion limit was reached); the file is corrupt or "
            "crafted. Re-save the weights as a plain state dict (.safetensors) where they were made."
        ) from None


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
            f"{path}: the zip entries {_few(compressed)} are compressed; torch.save never compresses them, so "
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
    if isinstance(value, _UnusableTensor):
        return value.kind
    if value.is_meta:
        return _UNUSABLE_KINDS["torch._utils._rebuild_meta_tensor_no_storage"]
    if value.layout != torch.strided:
        return f"a {'sparse ' if 'sparse' in str(value.layout) else ''}tensor of layout {value.layout}"
    if value.is_quantized:
        return _UNUSABLE_KINDS["torch._utils._rebuild_qtensor"]
    if value.is_nested:
        return _UNUSABLE_KINDS["torch._utils._rebuild_nested_tensor"]
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
    if isinstance(obj, _StandIn):
        return f"{obj.cls.name} object"
    if isinstance(obj, _Global):
        return f"reference to {obj.name}"
    return f"{type(obj).__module__}.{type(obj).__qualname__} object"


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(v, (Tensor, _UnusableTensor)) for v in obj.values())
    )


def _extract_state_dict(obj: Any, source: str, depth: int = 0) -> dict[str, Tensor] | None:
    """The state dict in a loaded object: a dict of tensors, a container of one, or a pickled module."""
    if depth > 4:
        return None
    if isinstance(obj, _StandIn):
        weights = _module_weights(obj, source)
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


# ------------------------------------------------------------------------------ pickled Python objects
# With allow_pickle, files that torch.load(weights_only=True) refuses are read by torch.load with
# _SafeUnpickler. A pickle may call only the tensor and container constructors in _ALLOWED. Any other
# name it refers to is never imported: it becomes a _Global; calling a _Global that names a class (or
# whose module is not imported, so that nothing of it can run) makes an inert _StandIn, calling any
# other name is refused, and names from _CODE_MODULES are refused outright, classes included.
# The pure-Python unpickler is the base because there every opcode that calls something (REDUCE,
# NEWOBJ, NEWOBJ_EX, INST, OBJ, BUILD -> __setstate__, EXT* -> copyreg's registry) can be overridden;
# torch.load subclasses it, routes persistent ids to its storages and storage names to dtype holders,
# and sends every other name through find_class.
class _Refused(Exception):
    """Something in a pickle that could run code; becomes a CheckpointError naming the file."""


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it to spell ``bytes``, for that codec only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"_codecs.encode with the codec {encoding!r}")
    return text.encode("latin1")


def _rebuild_from_type(func: Any, new_type: Any, args: tuple[Any, ...], state: Any) -> Tensor:
    """torch's ``_rebuild_from_type_v2`` for tensors and parameters, without their Python attributes.

    Attributes are not weights, and one named like a method (``detach``) would hide it.
    """
    if new_type is not Tensor and new_type is not nn.Parameter:
        raise _Refused(f"rebuilding a tensor as {new_type!r}")
    tensor = _SafeUnpickler.call(func, args, {})
    if isinstance(tensor, _UnusableTensor) or type(tensor) is new_type:
        return tensor
    return tensor.as_subclass(new_type)


def _rebuild_parameter(data: Any, requires_grad: bool, hooks: Any, state: Any = None) -> Any:
    """torch's ``_rebuild_parameter(_with_state)``, without the Python attributes in ``state``."""
    if isinstance(data, _UnusableTensor):
        return data
    return torch._utils._rebuild_parameter(data, requires_grad, hooks)


def _rebuild_on_cpu(data: Any, dtype: Any, device: Any, requires_grad: bool) -> Any:
    """torch's ``_rebuild_device_tensor_from_cpu_tensor`` with every device mapped to the CPU, as torch.load's
    ``map_location="cpu"`` maps it."""
    if isinstance(data, _UnusableTensor):
        return data
    if not isinstance(data, Tensor) or not isinstance(dtype, torch.dtype):
        raise _Refused("rebuilding a device tensor from something other than a tensor and a dtype")
    return data.to(dtype=dtype)


def _layout_name(name: Any) -> Any:
    """``torch.serialization._get_layout`` for the sparse tensors refused later: the layout is not needed."""
    return name


# The tensors torch pickles through these functions cannot serve as weights; allow_pickle does not rebuild
# them (some allocate their declared size, some run subclass code) but keeps an _UnusableTensor in their place,
# refused by key once the state dict is read.
_UNUSABLE_KINDS = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta tensor (a shape without values)",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch.nested._internal.nested_tensor._rebuild_njt": "a nested tensor",
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass (e.g. a distributed DTensor)",
    "torch._utils._rebuild_device_tensor_from_numpy": "a tensor of a non-CPU device",
    "torch._utils._rebuild_xla_tensor": "a tensor of a non-CPU device",
}


class _UnusableTensor:
    """Where a pickle holds a tensor of a kind in ``_UNUSABLE_KINDS``: its kind, nothing of its data."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _UnusableRebuild:
    """A function of ``_UNUSABLE_KINDS``: called from a pickle, it makes an :class:`_UnusableTensor`."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, *args: Any, **kwargs: Any) -> _UnusableTensor:
        return _UnusableTensor(self.kind)


_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "_codecs.encode": _latin1,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "torch.Tensor": Tensor,
    "torch.nn.parameter.Parameter": nn.Parameter,
    "torch.storage.UntypedStorage": torch.UntypedStorage,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": torch._utils._rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.serialization._get_layout": _layout_name,
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_on_cpu,
}
_ALLOWED_IDS = frozenset(id(value) for value in _ALLOWED.values())

# Modules that exist to run code, import modules, call by name or reach the system: a checkpoint has
# no business naming anything of theirs (their classes too: subprocess.Popen, functools.partial, ...).
_CODE_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "pty", "signal", "shutil",
    "socket", "_socket", "webbrowser", "importlib", "pkgutil", "runpy", "code", "codeop", "pdb", "pickle",
    "_pickle", "marshal", "copyreg", "shelve", "dill", "cloudpickle", "operator", "_operator", "functools",
    "_functools", "types", "ctypes", "_ctypes", "multiprocessing", "_multiprocessing", "threading", "_thread",
    "io", "_io",
})
_UNKNOWN = object()


def _static_lookup(module: str, name: str) -> Any:
    """``module.name`` if that module is already imported, found without running any code; else ``_UNKNOWN``."""
    found: Any = sys.modules.get(module, _UNKNOWN)
    for part in name.split("."):
        if found is _UNKNOWN or found is None:
            return _UNKNOWN
        found = inspect.getattr_static(found, part, _UNKNOWN)
    return found


class _Global:
    """A name a pickle refers to, never imported; called, it makes a stand-in, if it names a class."""

    __slots__ = ("name", "is_class")

    def __init__(self, name: str, is_class: bool) -> None:
        self.name = name
        self.is_class = is_class

    def __call__(self, *args: Any, **kwargs: Any) -> _StandIn:
        if not self.is_class:
            raise _Refused(f"a call of {self.name}")
        return _StandIn(self, args, kwargs)

    @property
    def __name__(self) -> str:  # read by torch's pre-1.6 format loader, which checks each module class's source
        return self.name

    def __repr__(self) -> str:
        return self.name


class _StandIn:
    """An object of a pickled class: the class's name, its pickled arguments and state, none of its code."""

    __slots__ = ("cls", "args", "attributes", "items", "elements")  # no __dict__: nothing can shadow a method

    def __init__(self, cls: _Global, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.cls = cls
        self.args = (args, kwargs)
        self.attributes: dict[Any, Any] = {}
        self.items: dict[Any, Any] = {}  # a pickled dict subclass's items
        self.elements: list[Any] = []  # a pickled list subclass's elements

    def restore(self, state: Any) -> None:
        """Take what pickle's BUILD passes to ``__setstate__``: attributes, a (dict, slots) pair, or else."""
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.attributes.update(state)
        else:
            self.attributes["__state__"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)


def _module_weights(root: _StandIn, source: str) -> dict[str, Any]:
    """What ``state_dict()`` returns for a pickled ``nn.Module``, read from its stand-in tree (no hooks run).

    As ``state_dict()`` does, a module reached along several paths is read once per path (a cycle is not
    followed), so a pickle of shared references could ask for exponentially many weights. The walk uses no
    recursion and holds one entry per module on the current path; every module read, every entry of its
    parameters, buffers and children looked at, and every character of the names made count against
    PICKLED_OBJECTS, the depth against NESTING_DEPTH.
    """
    limit = PICKLED_OBJECTS.value()
    weights: dict[str, Any] = {}
    detached: dict[int, Tensor] = {}  # one detached view per tensor, however many paths reach it
    spent = 0
    path: list[tuple[int, Iterator[tuple[Any, Any]], str]] = []  # per module from the root: id, children left, prefix
    on_path: set[int] = set()
    module: _StandIn | None = root
    prefix = ""
    while module is not None:
        NESTING_DEPTH.check(len(path) + 1, source, "levels of nested modules")
        spent += 1 + len(prefix)
        attributes = module.attributes
        transient = attributes.get("_non_persistent_buffers_set")
        transient = transient if isinstance(transient, (set, frozenset)) else frozenset()
        for group in ("_parameters", "_buffers"):
            tensors = attributes.get(group)
            if not isinstance(tensors, Mapping):
                continue
            for name, value in tensors.items():
                spent += 1
                if not isinstance(name, str) or (group == "_buffers" and name in transient):
                    continue  # state_dict() skips transient buffers
                if isinstance(value, Tensor):
                    if id(value) not in detached:
                        detached[id(value)] = value.detach()
                    value = detached[id(value)]
                elif not isinstance(value, _UnusableTensor):
                    continue
                spent += len(prefix) + len(name)
                weights[prefix + name] = value
        children = attributes.get("_modules")
        path.append((id(module), iter(children.items() if isinstance(children, Mapping) else ()), prefix))
        on_path.add(id(module))
        module = None
        while path and module is None:  # the next child of the deepest module on the path that has one left
            module_id, remaining, parent = path[-1]
            for name, child in remaining:
                spent += 1
                if isinstance(name, str) and isinstance(child, _StandIn) and id(child) not in on_path:
                    module, prefix = child, f"{parent}{name}."
                    break
            else:
                path.pop()
                on_path.discard(module_id)
            if spent > limit:
                PICKLED_OBJECTS.check(spent, source, "modules, weights and characters of their names")
    return weights


class _Opcodes(dict):
    def __missing__(self, opcode: int) -> Any:  # what the C unpickler says; the Python one raises a KeyError
        raise pickle.UnpicklingError(f"invalid load key {bytes([opcode])!r}")


class _SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler, whose opcodes can be overridden
    dispatch = _Opcodes(pickle._Unpickler.dispatch)
    source = "a pickle"  # the file read, in errors; set by _pickle_module_for

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._globals: dict[str, _Global] = {}
        self._built = 0
        self._limit = PICKLED_OBJECTS.value()

    def _counted(self, built: Any) -> Any:
        """``built``, after counting it against PICKLED_OBJECTS."""
        self._built += 1
        if self._built > self._limit:
            PICKLED_OBJECTS.check(self._built, self.source, "objects built by the pickle")
        return built

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as protocol 2 (torch.save's) spells them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED:
            return _ALLOWED[qualified]
        if qualified in _UNUSABLE_KINDS:
            return _UnusableRebuild(_UNUSABLE_KINDS[qualified])
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        if module.partition(".")[0] in _CODE_MODULES:
            raise _Refused(qualified)
        if qualified not in self._globals:
            found = _static_lookup(module, name)
            self._globals[qualified] = _Global(qualified, found is _UNKNOWN or issubclass(type(found), type))
        return self._globals[qualified]

    def get_extension(self, code: int) -> None:  # EXT1/2/4: by copyreg's registry, not its cache of objects
        key = copyreg._inverted_registry.get(code)
        if key is None:
            raise pickle.UnpicklingError(f"unregistered extension code {code}")
        self.append(self.find_class(*key))

    @staticmethod
    def call(func: Any, args: Any, kwargs: Any) -> Any:
        """Call ``func`` if it is allowed, or a name (which makes a stand-in if it names a class)."""
        if type(func) in (_Global, _UnusableRebuild) or id(func) in _ALLOWED_IDS:
            return func(*args, **kwargs)
        raise _Refused(f"a call of a {type(func).__qualname__} object")

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        self.append(self._counted(self.call(klass, args, {})))

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if type(cls) is _Global:
            return cls(*args, **kwargs)
        if id(cls) in _ALLOWED_IDS and isinstance(cls, type):
            return cls.__new__(cls, *args, **kwargs)
        raise _Refused(f"creating a {type(cls).__qualname__} object")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._counted(self.call(self.stack[-1], args, {}))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._counted(self._new(self.stack[-1], args, {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._counted(self._new(self.stack[-1], args, kwargs))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is _StandIn:
            inst.restore(state)
        elif type(inst) is OrderedDict and type(state) is dict and set(state) <= {"_metadata"}:
            inst.__dict__.update(state)  # a state dict's _metadata; other attributes could hide its methods
        else:
            raise _Refused(f"setting the state of a {type(inst).__qualname__} object")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def _pickle_module_for(source: str) -> types.SimpleNamespace:
    """The ``pickle_module`` torch.load reads ``source`` with: :class:`_SafeUnpickler`, naming it in errors."""
    unpickler = type("_SafeUnpickler", (_SafeUnpickler,), {"source": source})

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="lit_adamerging_safe_pickle", Unpickler=unpickler, load=load)


def _load_pickled(file: IO[bytes], path: Path) -> Any:
    file.seek(0)
    try:
        with warnings.catch_warnings():  # the pre-1.6 format's source check has no source to compare for a name
            warnings.filterwarnings("ignore", "Couldn't retrieve source code for container")
            return torch.load(file, map_location="cpu", weights_only=False, pickle_module=_pickle_module_for(str(path)))
    except LimitExceeded:
        raise
    except _Refused as refused:
        raise CheckpointError(
            f"{path}: refused {refused}, which could run code. allow_pickle rebuilds only tensors and containers "
            "and stands in for other classes without running their code; anything else is refused. Do not use "
            "this file; if it comes from a trusted source, convert it to a plain state dict (.safetensors) where "
            "it was made."
        ) from refused
    except Exception as error:
        raise _unreadable(path, error) from error


# ---------------------------------------------------------------------------- Hugging Face CLIP folders
_HF_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


def _read_hf_clip_folder(folder: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise CheckpointError(
            f"{folder}: a folder, but not a Hugging Face model folder (no config.json); give a weights file "
            f"({', '.join(CHECKPOINT_SUFFIXES)}) or a folder saved by transformers' save_pretrained."
        )
    config = _read_json(config_file, "Hugging Face config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a Hugging Face config (a JSON object); the folder is damaged.")
    state: dict[str, Tensor] | None = None
    for name in HF_WEIGHT_FILES:
        if (folder / name).exists():  # not is_file(): a FIFO or folder there is refused, not passed over
            state = _read_hf_weights(folder / name, allow_pickle=allow_pickle)
            break
    if state is None:
        raise CheckpointError(
            f"{folder}: Hugging Face model folder without weights; expected one of {list(HF_WEIGHT_FILES)}."
        )
    return _convert_hf_clip_vision(state, source=str(folder), model_type=str(config.get("model_type")))


def _read_json(file: Path, what: str) -> Any:
    with open_regular_file(file, what) as handle:
        try:
            return json.loads(handle.read())
        except (OSError, ValueError, RecursionError) as error:
            raise CheckpointError(f"{file}: not a readable JSON {what} ({type(error).__name__}: {error}).") from error


def _read_hf_weights(file: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    if not file.name.endswith(".index.json"):
        return _read_file(file, allow_pickle=allow_pickle)
    index = _read_json(file, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(
            f"{file}: not a shard index: it needs a 'weight_map' of weight names to shard file names; the folder "
            "is damaged, so download it again."
        )
    state: dict[str, Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{file}: the shard {shard!r} is not a file name in the folder; a shard index names files beside "
                "it, so the index is damaged or crafted."
            )
        if not (file.parent / shard).exists():
            raise CheckpointError(
                f"{file}: the shard {shard!r} it names is not in the folder; the download is incomplete, so "
                "download the folder again."
            )
        state.update(_read_file(file.parent / shard, allow_pickle=allow_pickle))
    return state


def _hf_vision_prefix(state: Mapping[str, Tensor]) -> str | None:
    """The prefix of a Hugging Face CLIP vision tower's keys (``"vision_model."`` or ``""``), if any."""
    marker = "embeddings.patch_embedding.weight"
    prefixes = [key[: -len(marker)] for key in state if key.endswith(marker)]
    prefixes = sorted((p for p in prefixes if p + "pre_layrnorm.weight" in state), key=len)
    return prefixes[0] if prefixes else None


def _convert_hf_clip_vision(state: Mapping[str, Tensor], *, source: str, model_type: str) -> dict[str, Tensor]:
    """Rename a Hugging Face CLIP image tower to open_clip ``VisionTransformer`` keys."""
    prefix = _hf_vision_prefix(state)
    if prefix is None:
        raise CheckpointError(
            f"{source}: not a Hugging Face CLIP model (model_type {model_type!r}): no "
            "'vision_model.embeddings.patch_embedding.weight' / 'vision_model.pre_layrnorm.weight'; only "
            "CLIPVisionModel, CLIPVisionModelWithProjection and CLIPModel folders are supported."
        )

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(
                f"{source}: Hugging Face CLIP weights lack {key!r}; the folder is incomplete or not a CLIP model."
            )
        return state[key]

    embeddings = f"{prefix}embeddings."
    out: dict[str, Tensor] = {
        "class_embedding": take(f"{embeddings}class_embedding"),
        "positional_embedding": take(f"{embeddings}position_embedding.weight"),
        "proj": torch.empty(0),  # placeholder keeping open_clip's key order; set or removed below
        "conv1.weight": take(f"{embeddings}patch_embedding.weight"),
        "ln_pre.weight": take(f"{prefix}pre_layrnorm.weight"),
        "ln_pre.bias": take(f"{prefix}pre_layrnorm.bias"),
    }
    pattern = re.compile(re.escape(f"{prefix}encoder.layers.") + r"(\d+)\.")
    layers = sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: Hugging Face CLIP encoder layers {layers} are not numbered 0..n-1.")
    for i in layers:
        hf = f"{prefix}encoder.layers.{i}."
        ours = f"transformer.resblocks.{i}."
        attention = f"{hf}self_attn."
        out[ours + "ln_1.weight"] = take(hf + _HF_LAYER["ln_1.weight"])
        out[ours + "ln_1.bias"] = take(hf + _HF_LAYER["ln_1.bias"])
        out[ours + "attn.in_proj_weight"] = torch.cat([take(f"{attention}{p}_proj.weight") for p in "qkv"], dim=0)
        out[ours + "attn.in_proj_bias"] = torch.cat([take(f"{attention}{p}_proj.bias") for p in "qkv"], dim=0)
        for name in list(_HF_LAYER)[2:]:
            out[ours + name] = take(hf + _HF_LAYER[name])
    out["ln_post.weight"] = take(f"{prefix}post_layernorm.weight")
    out["ln_post.bias"] = take(f"{prefix}post_layernorm.bias")
    projection = state.get("visual_projection.weight")
    if projection is None:
        del out["proj"]
    else:
        out["proj"] = projection.t().contiguous()
    return out


# ------------------------------------------------------------------------------------------ selecting
def _candidate_prefixes(state: Mapping[str, Tensor], expected: Collection[str]) -> set[str]:
    """``""`` and every ``P`` (empty or ending in ``.``) with ``P + k`` a checkpoint key for an expected ``k``."""
    prefixes = {""}
    for key in state:
        for position, char in enumerate(key):
            if char == "." and key[position + 1 :] in expected:
                prefixes.add(key[: position + 1])
    return prefixes


def _extra_layers(under_prefix: Collection[str], expected: Collection[str]) -> list[str]:
    """Keys that add numbered children (layers, blocks) to a sequence the encoder has fewer of."""
    children: dict[str, set[str]] = {}
    for key in expected:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                children.setdefault(".".join(parts[:i]), set()).add(part)
    extra = []
    for key in under_prefix:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            parent = ".".join(parts[:i])
            if part.isdigit() and parent in children and part not in children[parent]:
                extra.append(key)
                break
    return extra


def _few(keys: list[str]) -> str:
    more = f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more}"


def select_encoder_weights(
    state: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    *,
    source: str,
    missing_ok: Collection[str] = (),
) -> dict[str, Tensor]:
    """Pick the encoder's entries out of a checkpoint and check them against ``expected``.

    The expected keys are looked for under the prefix (empty or ending in ``.``, e.g. ``module.``,
    ``model.visual.``, ``image_encoder.model.visual.``) under which most of them are found;
    entries outside it (text tower, ``logit_scale``, classifier heads) are ignored.

    Args:
        state: a checkpoint as returned by :func:`read_checkpoint`.
        expected: the encoder's own ``state_dict()``: the keys, shapes and dtypes wanted.
        source: where ``state`` came from (a file name), for error messages.
        missing_ok: keys that may be absent; they are taken from ``expected`` (e.g. ``{"proj"}``
            for a Hugging Face ``CLIPVisionModel`` folder). ``*num_batches_tracked`` always may.

    Returns:
        Exactly the keys of ``expected``, in its order. Floating-point tensors are cast to the
        expected dtype (e.g. from float16), integer tensors to the expected integer dtype.

    Raises:
        CheckpointError: no or not all expected keys are found, the checkpoint has more layers than
            the encoder, a shape differs, floating point meets integer, or a value is NaN or infinite.
    """
    expected_keys = list(expected)
    wanted = set(expected_keys)
    counts = {
        prefix: sum(prefix + key in state for key in expected_keys) for prefix in _candidate_prefixes(state, wanted)
    }
    prefix = min(counts, key=lambda p: (-counts[p], len(p), p))
    hint = ""
    if _hf_vision_prefix(state) is not None:
        hint = (
            " The checkpoint looks like Hugging Face CLIP weights: give the model folder (with config.json) "
            "instead of the weights file, so that they are renamed to open_clip's."
        )
    if counts[prefix] == 0:
        raise CheckpointError(
            f"{source}: none of the encoder's {len(expected_keys)} keys (e.g. {expected_keys[:3]}) is in the "
            f"checkpoint, under any prefix; its keys are {_few(list(state))}. The checkpoint was probably saved "
            f"from a different model or library than the encoder; check the encoder name in the zoo.{hint}"
        )
    allowed_missing = set(missing_ok)
    missing = [
        key
        for key in expected_keys
        if prefix + key not in state and key not in allowed_missing and not key.endswith("num_batches_tracked")
    ]
    where = f" (under the prefix {prefix!r})" if prefix else ""
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} of the encoder's {len(expected_keys)} keys are missing from the "
            f"checkpoint{where}: {_few(missing)}. The checkpoint's architecture probably differs from the "
            f"encoder's; check the encoder name in the zoo.{hint}"
        )
    under_prefix = [key[len(prefix) :] for key in state if key.startswith(prefix) and key[len(prefix) :] not in wanted]
    extra = _extra_layers(under_prefix, wanted)
    if extra:
        raise CheckpointError(
            f"{source}: the checkpoint has layers the encoder lacks{where}: {_few([prefix + k for k in extra])}. "
            "It was probably saved from a deeper architecture; check the encoder name in the zoo."
        )
    selected: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key in expected_keys:
        reference = expected[key]
        if prefix + key not in state:
            selected[key] = reference.detach().clone()
            continue
        name = prefix + key
        value = state[name]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: {name!r} is a {type(value).__name__}, not a tensor.")
        if value.shape != reference.shape:
            mismatched.append(f"{name!r}: checkpoint {list(value.shape)} vs encoder {list(reference.shape)}")
            continue
        selected[key] = _convert(value, reference, name=name, source=source)
    if mismatched:
        more = f" (and {len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else ""
        raise CheckpointError(
            f"{source}: shape mismatch for {'; '.join(mismatched[:_SHOWN])}{more}. The checkpoint's "
            "architecture differs from the encoder's; check the encoder name in the zoo."
        )
    return selected


def _convert(value: Tensor, reference: Tensor, *, name: str, source: str) -> Tensor:
    value = value.detach()
    if value.dtype != reference.dtype:
        if value.is_floating_point() != reference.is_floating_point() or value.is_complex() != reference.is_complex():
            raise CheckpointError(
                f"{source}: {name!r} has dtype {value.dtype} but the encoder's is {reference.dtype}; floating "
                "point and integer weights cannot be exchanged, so the checkpoint does not fit this encoder."
            )
        before = value.dtype
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(_non_finite(source, name))
        value = value.to(reference.dtype)
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: {name!r} overflows to infinity when cast from {before} to the encoder's {reference.dtype}."
            )
    elif (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise CheckpointError(_non_finite(source, name))
    return value


def _non_finite(source: str, name: str) -> str:
    return f"{source}: {name!r} has NaN or infinite values; the checkpoint is corrupt or diverged."
