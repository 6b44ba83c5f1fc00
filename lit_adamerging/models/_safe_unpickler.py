"""Read pickled Python objects without running any of their code: the unpickler behind ``allow_pickle``.

With allow_pickle, files that ``torch.load(weights_only=True)`` refuses are read by ``torch.load`` with the
unpickler of :func:`pickle_module_for`. A pickle may call only the tensor and container constructors in
``_allowed()``. Any other name it refers to is never imported: it becomes a :class:`Global`; calling a Global
that names a class (or whose module is not imported, so that nothing of it can run) makes an inert
:class:`StandIn`, calling any other name is refused, and names from ``_CODE_MODULES`` are refused outright,
classes included. :func:`module_weights` reads a pickled ``nn.Module``'s weights from its stand-ins.

The pure-Python unpickler is the base because there every opcode that calls something (REDUCE, NEWOBJ,
NEWOBJ_EX, INST, OBJ, BUILD -> ``__setstate__``, EXT* -> copyreg's registry) can be overridden; torch.load
subclasses it, routes persistent ids to its storages and storage names to dtype holders, and sends every other
name through ``find_class``. That base and torch's tensor rebuilding functions are private APIs, reached through
:mod:`lit_adamerging._compat`, which refuses versions they were not checked for.
"""

from __future__ import annotations

import functools
import inspect
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_adamerging import _compat
from lit_adamerging.limits import NESTING_DEPTH, PICKLED_OBJECTS

__all__ = ["UNUSABLE_KINDS", "Global", "Refused", "StandIn", "UnusableTensor", "module_weights", "pickle_module_for"]


class Refused(Exception):
    """Something in a pickle that could run code; becomes a CheckpointError naming the file."""


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it to spell ``bytes``, for that codec only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise Refused(f"_codecs.encode with the codec {encoding!r}")
    return text.encode("latin1")


def _rebuild_from_type(func: Any, new_type: Any, args: tuple[Any, ...], state: Any) -> Tensor:
    """torch's ``_rebuild_from_type_v2`` for tensors and parameters, without their Python attributes.

    Attributes are not weights, and one named like a method (``detach``) would hide it.
    """
    if new_type is not Tensor and new_type is not nn.Parameter:
        raise Refused(f"rebuilding a tensor as {new_type!r}")
    tensor = _call(func, args, {})
    if isinstance(tensor, UnusableTensor) or type(tensor) is new_type:
        return tensor
    return tensor.as_subclass(new_type)


def _rebuild_parameter(data: Any, requires_grad: bool, hooks: Any, state: Any = None) -> Any:
    """torch's ``_rebuild_parameter(_with_state)``, without the Python attributes in ``state``.

    Nor its backward hooks, which torch.save writes as an empty dict (kept for old files): hooks are not weights.
    """
    if isinstance(data, UnusableTensor):
        return data
    return nn.Parameter(data, requires_grad)


def _rebuild_on_cpu(data: Any, dtype: Any, device: Any, requires_grad: bool) -> Any:
    """torch's ``_rebuild_device_tensor_from_cpu_tensor`` with every device mapped to the CPU, as torch.load's
    ``map_location="cpu"`` maps it."""
    if isinstance(data, UnusableTensor):
        return data
    if not isinstance(data, Tensor) or not isinstance(dtype, torch.dtype):
        raise Refused("rebuilding a device tensor from something other than a tensor and a dtype")
    return data.to(dtype=dtype)


def _layout_name(name: Any) -> Any:
    """``torch.serialization._get_layout`` for the sparse tensors refused later: the layout is not needed."""
    return name


# The tensors torch pickles through these functions cannot serve as weights; allow_pickle does not rebuild
# them (some allocate their declared size, some run subclass code) but keeps an UnusableTensor in their place,
# refused by key once the state dict is read.
UNUSABLE_KINDS = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta tensor (a shape without values)",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch.nested._internal.nested_tensor._rebuild_njt": "a nested tensor",
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass (e.g. a distributed DTensor)",
    "torch._utils._rebuild_device_tensor_from_numpy": "a tensor of a non-CPU device",
    "torch._utils._rebuild_xla_tensor": "a tensor of a non-CPU device",
}


class UnusableTensor:
    """Where a pickle holds a tensor of a kind in ``UNUSABLE_KINDS``: its kind, nothing of its data."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _UnusableRebuild:
    """A function of ``UNUSABLE_KINDS``: called from a pickle, it makes an :class:`UnusableTensor`."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, *args: Any, **kwargs: Any) -> UnusableTensor:
        return UnusableTensor(self.kind)


@functools.cache
def _allowed() -> dict[str, Any]:
    """What a pickle may call or build, by the name it refers to: tensor and container constructors."""
    return {
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
        **_compat.torch_tensor_rebuilders(),
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch.serialization._get_layout": _layout_name,
        "torch._utils._rebuild_device_tensor_from_cpu_tensor": _rebuild_on_cpu,
    }


@functools.cache
def _allowed_ids() -> frozenset[int]:
    return frozenset(id(value) for value in _allowed().values())


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


class Global:
    """A name a pickle refers to, never imported; called, it makes a stand-in, if it names a class."""

    __slots__ = ("name", "is_class")

    def __init__(self, name: str, is_class: bool) -> None:
        self.name = name
        self.is_class = is_class

    def __call__(self, *args: Any, **kwargs: Any) -> StandIn:
        if not self.is_class:
            raise Refused(f"a call of {self.name}")
        return StandIn(self, args, kwargs)

    @property
    def __name__(self) -> str:  # read by torch's pre-1.6 format loader, which checks each module class's source
        return self.name

    def __repr__(self) -> str:
        return self.name


class StandIn:
    """An object of a pickled class: the class's name, its pickled arguments and state, none of its code."""

    __slots__ = ("cls", "args", "attributes", "items", "elements")  # no __dict__: nothing can shadow a method

    def __init__(self, cls: Global, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
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


def module_weights(root: StandIn, source: str) -> dict[str, Any]:
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
    module: StandIn | None = root
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
                elif not isinstance(value, UnusableTensor):
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
                if isinstance(name, str) and isinstance(child, StandIn) and id(child) not in on_path:
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




def _call(func: Any, args: Any, kwargs: Any) -> Any:
    """Call ``func`` if it is allowed, or a name (which makes a stand-in if it names a class)."""
    if type(func) in (Global, _UnusableRebuild) or id(func) in _allowed_ids():
        return func(*args, **kwargs)
    raise Refused(f"a call of a {type(func).__qualname__} object")


class _SafeUnpickling:
    """What the safe unpickler changes in the pure-Python one it is mixed into by :func:`_unpickler_class`."""

    source = "a pickle"  # the file read, in errors; set by pickle_module_for
    # the pure-Python unpickler's state, which the methods below work on (see _compat.pure_python_unpickler)
    stack: list[Any]
    append: Callable[[Any], None]
    proto: int
    fix_imports: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._globals: dict[str, Global] = {}
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
            module, name = _compat.python3_name(module, name)
        qualified = f"{module}.{name}"
        allowed = _allowed()
        if qualified in allowed:
            return allowed[qualified]
        if qualified in UNUSABLE_KINDS:
            return _UnusableRebuild(UNUSABLE_KINDS[qualified])
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        if module.partition(".")[0] in _CODE_MODULES:
            raise Refused(qualified)
        if qualified not in self._globals:
            found = _static_lookup(module, name)
            self._globals[qualified] = Global(qualified, found is _UNKNOWN or issubclass(type(found), type))
        return self._globals[qualified]

    def get_extension(self, code: int) -> None:  # EXT1/2/4: by copyreg's registry, not its cache of objects
        key = _compat.extension_name(code)
        if key is None:
            raise pickle.UnpicklingError(f"unregistered extension code {code}")
        self.append(self.find_class(*key))

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ
        self.append(self._counted(_call(klass, args, {})))

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if type(cls) is Global:
            return cls(*args, **kwargs)
        if id(cls) in _allowed_ids() and isinstance(cls, type):
            return cls.__new__(cls, *args, **kwargs)
        raise Refused(f"creating a {type(cls).__qualname__} object")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._counted(_call(self.stack[-1], args, {}))

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
        if type(inst) is StandIn:
            inst.restore(state)
        elif type(inst) is OrderedDict and type(state) is dict and set(state) <= {"_metadata"}:
            inst.__dict__.update(state)  # a state dict's _metadata; other attributes could hide its methods
        else:
            raise Refused(f"setting the state of a {type(inst).__qualname__} object")


@functools.cache
def _unpickler_class(base: type) -> type:
    """:class:`_SafeUnpickling` mixed into ``base``, with its opcodes in place of those that call something."""
    dispatch = _Opcodes(base.dispatch)
    dispatch[pickle.REDUCE[0]] = _SafeUnpickling.load_reduce
    dispatch[pickle.NEWOBJ[0]] = _SafeUnpickling.load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _SafeUnpickling.load_newobj_ex
    dispatch[pickle.BUILD[0]] = _SafeUnpickling.load_build
    return type("_SafeUnpickler", (_SafeUnpickling, base), {"dispatch": dispatch})


def pickle_module_for(source: str) -> types.SimpleNamespace:
    """The ``pickle_module`` torch.load reads ``source`` with: the safe unpickler, naming ``source`` in errors.

    Raises:
        lit_adamerging._compat.UncheckedVersion: the running Python or torch was not checked for the private
            APIs the unpickler relies on.
    """
    unpickler = type("_SafeUnpickler", (_unpickler_class(_compat.pure_python_unpickler()),), {"source": source})

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="lit_adamerging_safe_pickle", Unpickler=unpickler, load=load)
