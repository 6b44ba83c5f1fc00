"""The private APIs of our dependencies that this library still needs, each behind a version guard.

Everything that reaches into a dependency's internals lives here and nowhere else, with the reason,
the versions it was checked against, and a test in tests/test_compat.py. A dependency version
outside the checked range raises a clear error at the call instead of misbehaving.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import pickle
import re
import sys
from collections.abc import Callable
from typing import Any

# ------------------------------------------------------------------- pickle and torch.load, for allow_pickle
# lit_adamerging.models._safe_unpickler reads torch.save files holding pickled Python objects without running any
# of their code. torch.load(weights_only=True) with torch.serialization.safe_globals cannot do that: it calls,
# builds (cls.__new__) and sets the state (__setstate__) of exactly the objects it is given, looks torch's own
# allowlist up before them (so they cannot replace a default), sets any attribute a pickle gives an OrderedDict
# or a tensor (hiding methods), counts nothing it builds, and parses only protocol 2 without EXT opcodes. So
# that reader subclasses Python's pure-Python unpickler and rebuilds tensors with torch's own functions, all
# reached through the names below. It also relies on what torch.load does with a pickle_module (subclasses its
# Unpickler, overriding find_class for storage names and persistent_load; the pre-1.6 format reads each
# module class's __name__), which the torch range covers too.
# Checked: Python 3.11 (tests/test_compat.py) and the pickle.py of CPython's main branch (read: the same hooks,
# unchanged since 3.8); torch 2.14. Outside these ranges the names below raise UncheckedVersion, and
# allow_pickle refuses to read rather than risk running code.
PICKLE_PYTHON = ((3, 10), (3, 15))  # Python versions checked: from, up to (excluded)
PICKLE_TORCH = ((2, 14), (2, 15))  # torch versions checked: from, up to (excluded)


class UncheckedVersion(RuntimeError):
    """A Python or torch version whose internals, used here, were not checked."""


def _spelled(bounds: tuple[tuple[int, int], tuple[int, int]]) -> str:
    first, last = bounds[0], (bounds[1][0], bounds[1][1] - 1)
    return ".".join(map(str, first)) + ("" if first == last else " to " + ".".join(map(str, last)))


def unchecked_pickle_versions(python: tuple[int, ...] | None = None, torch_version: str | None = None) -> str | None:
    """Which of the Python and torch versions (by default, the running ones) the pickle internals were not checked for.

    Example:
        >>> unchecked_pickle_versions((3, 11, 7), "2.14.1+cu130") is None
        True
        >>> unchecked_pickle_versions((3, 11), "2.15.0")
        'torch 2.15.0 (checked: 2.14)'
    """
    if python is None:
        python = sys.version_info[:2]
    if torch_version is None:
        import torch

        torch_version = str(torch.__version__)
    found = re.match(r"(\d+)\.(\d+)", torch_version)
    torch_minor = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    unchecked = []
    if not PICKLE_PYTHON[0] <= tuple(python[:2]) < PICKLE_PYTHON[1]:
        unchecked.append(f"Python {'.'.join(map(str, python[:2]))} (checked: {_spelled(PICKLE_PYTHON)})")
    if not PICKLE_TORCH[0] <= torch_minor < PICKLE_TORCH[1]:
        unchecked.append(f"torch {torch_version} (checked: {_spelled(PICKLE_TORCH)})")
    return " and ".join(unchecked) or None


def _require_pickle_versions() -> None:
    unchecked = unchecked_pickle_versions()
    if unchecked is not None:
        raise UncheckedVersion(
            f"reading pickled objects (allow_pickle) relies on internals of Python's pickle module and of torch that "
            f"were not checked for {unchecked}, so it is refused rather than risk running code. Convert the file to a "
            "plain state dict (.safetensors) where it was made, or use a checked version (lit_adamerging/_compat.py "
            "and tests/test_compat.py say what to check for a new one)."
        )


def pure_python_unpickler() -> type:
    """Python's pure-Python unpickler, ``pickle._Unpickler``, to subclass.

    Unlike the C ``pickle.Unpickler``, it runs each opcode through the functions of its ``dispatch`` dict (keyed
    by opcode, a KeyError for one missing), which a subclass can replace; INST and OBJ call
    ``self._instantiate(klass, args)``, EXT1/2/4 ``self.get_extension(code)``, GLOBAL and STACK_GLOBAL
    ``self.find_class(module, name)``, and those functions work on ``self.stack``, ``self.append``,
    ``self.proto`` and ``self.fix_imports``.
    """
    _require_pickle_versions()
    return pickle._Unpickler


def python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global as a protocol 0-2 pickle spells it, mapped as pickle's ``fix_imports`` maps it.

    Example:
        >>> python3_name("__builtin__", "set"), python3_name("copy_reg", "_reconstructor")
        (('builtins', 'set'), ('copyreg', '_reconstructor'))
    """
    _require_pickle_versions()
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def extension_name(code: int) -> tuple[str, str] | None:
    """The ``(module, name)`` registered under the extension ``code`` by ``copyreg.add_extension``, or None.

    The registry of names only: pickle's own lookup takes an object from copyreg's cache of what earlier
    unpickling loaded first, which a checkpoint must not reach without its name being vetted.
    """
    _require_pickle_versions()
    return copyreg._inverted_registry.get(code)


def torch_tensor_rebuilders() -> dict[str, Callable[..., Any]]:
    """torch's functions that rebuild a dense tensor from a storage, under the names torch.save pickles them by.

    They invert ``Tensor.__reduce_ex__`` (storage, offset, size, stride, ``requires_grad``, and the conjugate and
    negative bits, which only ``torch._C`` sets), so they are used rather than redone.
    """
    _require_pickle_versions()
    from torch import _utils

    return {
        "torch._utils._rebuild_tensor": _utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _utils._rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _utils._rebuild_tensor_v3,
    }
