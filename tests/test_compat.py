"""Each private API of lit_adamerging._compat, checked against the installed dependency versions."""

from __future__ import annotations

import copyreg
import importlib
import io
import pickle

import pytest
import torch
from torch import nn

from lit_adamerging import _compat
from lit_adamerging.models.checkpoints import CheckpointError, read_checkpoint


# ------------------------------------------------------------------- pickle and torch.load, for allow_pickle
def test_the_running_versions_were_checked_for_the_pickle_internals():
    assert _compat.unchecked_pickle_versions() is None, (
        "check each private API below for these versions (the tests here must pass unchanged), then widen "
        "PICKLE_PYTHON / PICKLE_TORCH in lit_adamerging/_compat.py"
    )


@pytest.mark.parametrize(("python", "torch_version", "unchecked"), [
    ((3, 9), "2.14.1", "Python 3.9 (checked: 3.10 to 3.14)"),
    ((3, 15, 0), "2.14.1+cu130", "Python 3.15 (checked: 3.10 to 3.14)"),
    ((3, 11), "2.13.1", "torch 2.13.1 (checked: 2.14)"),
    ((3, 11), "2.15.0.dev20270101", "torch 2.15.0.dev20270101 (checked: 2.14)"),
    ((3, 11), "unknown", "torch unknown (checked: 2.14)"),
    ((3, 16), "3.0.0", "Python 3.16 (checked: 3.10 to 3.14) and torch 3.0.0 (checked: 2.14)"),
])
def test_versions_outside_the_checked_ranges_are_named(python, torch_version, unchecked):
    assert _compat.unchecked_pickle_versions(python, torch_version) == unchecked


def test_unchecked_versions_refuse_allow_pickle_before_reading(tmp_path, monkeypatch):
    pickled, plain = tmp_path / "model.pt", tmp_path / "plain.pt"
    torch.save(nn.Linear(3, 2), pickled)
    torch.save({"weight": torch.ones(2)}, plain)
    monkeypatch.setattr(torch, "__version__", "2.15.0")
    for use in (_compat.pure_python_unpickler, _compat.torch_tensor_rebuilders, lambda: _compat.extension_name(1),
                lambda: _compat.python3_name("__builtin__", "set")):
        with pytest.raises(_compat.UncheckedVersion, match=r"not checked for torch 2\.15\.0 \(checked: 2\.14\)"):
            use()
    refusal = r"model\.pt: reading pickled objects \(allow_pickle\) relies on .* torch 2\.15\.0 .* rather than risk"
    with pytest.raises(CheckpointError, match=refusal):
        read_checkpoint(pickled, allow_pickle=True)
    assert torch.equal(read_checkpoint(plain, allow_pickle=True)["weight"], torch.ones(2))  # weights_only reads it


class _Recording:
    """Mixed into the pure-Python unpickler: records each hook the safe unpickler overrides."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    def find_class(self, module, name):
        self.calls.append(("find_class", module, name))
        return f"{module}.{name}"

    def _instantiate(self, klass, args):
        self.calls.append(("_instantiate", klass, args))
        self.append("instance")

    def get_extension(self, code):
        self.calls.append(("get_extension", code))
        self.append("extension")


def _reduce(unpickler) -> None:  # a replacement for REDUCE, reading and writing the unpickler's stack
    args = unpickler.stack.pop()
    unpickler.calls.append(("REDUCE", unpickler.stack[-1], args, unpickler.proto, unpickler.fix_imports))
    unpickler.stack[-1] = "reduced"


class _Opcodes(dict):
    def __missing__(self, opcode):
        raise LookupError(f"opcode {opcode}")


def _recording_unpickler(data: bytes):
    base = _compat.pure_python_unpickler()
    dispatch = _Opcodes(base.dispatch)
    dispatch[pickle.REDUCE[0]] = _reduce
    recording = type("Recording", (_Recording, base), {"dispatch": dispatch})
    return recording(io.BytesIO(data))


_FOUND = ("find_class", "mod", "name")


@pytest.mark.parametrize(("opcodes", "result", "calls"), [
    (b"cmod\nname\n.", "mod.name", [_FOUND]),  # GLOBAL
    (b"\x80\x04X\x03\x00\x00\x00modX\x04\x00\x00\x00name\x93.", "mod.name", [_FOUND]),  # STACK_GLOBAL
    (b"(K\x01imod\nname\n.", "instance", [_FOUND, ("_instantiate", "mod.name", [1])]),  # INST
    (b"(cmod\nname\nK\x01o.", "instance", [_FOUND, ("_instantiate", "mod.name", [1])]),  # OBJ
    (b"\x80\x02\x82\x05.", "extension", [("get_extension", 5)]),  # EXT1
    (b"\x80\x02\x83\x05\x01.", "extension", [("get_extension", 261)]),  # EXT2
    (b"\x80\x02\x84\x00\x00\x01\x00.", "extension", [("get_extension", 65536)]),  # EXT4
    (b"\x80\x02cmod\nname\nK\x01\x85R.", "reduced", [_FOUND, ("REDUCE", "mod.name", (1,), 2, True)]),
])
def test_the_pure_python_unpickler_runs_opcodes_through_the_hooks_overridden(opcodes, result, calls):
    unpickler = _recording_unpickler(opcodes)
    assert unpickler.load() == result
    assert unpickler.calls == calls


def test_the_pure_python_unpickler_looks_each_opcode_up_in_dispatch():
    assert b"\xff"[0] not in _compat.pure_python_unpickler().dispatch
    with pytest.raises(LookupError, match="opcode 255"):  # through the table's __missing__, not a KeyError of its own
        _recording_unpickler(b"\xff").load()


@pytest.mark.parametrize(("module", "name"), [
    ("__builtin__", "set"), ("__builtin__", "xrange"), ("copy_reg", "_reconstructor"), ("exceptions", "StandardError"),
    ("UserDict", "UserDict"), ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
])
def test_python3_names_are_those_pickle_resolves(module, name):
    resolved = pickle.Unpickler(io.BytesIO(b""), fix_imports=True).find_class(module, name)  # protocol 0: < 3
    python3_module, python3_name = _compat.python3_name(module, name)
    assert getattr(importlib.import_module(python3_module), python3_name) is resolved


def test_extension_names_are_those_pickle_resolves():
    code, key = 0x7F_F0F1, ("lit_adamerging_compat_test", "Thing")
    copyreg.add_extension(*key, code)
    try:
        assert _compat.extension_name(code) == key
        base = _compat.pure_python_unpickler()
        found = type("Finding", (base,), {"find_class": lambda self, module, name: (module, name)})
        assert found(io.BytesIO(pickle.EXT4 + code.to_bytes(4, "little") + pickle.STOP)).load() == key
    finally:
        copyreg.remove_extension(*key, code)
    assert _compat.extension_name(code) is None


def _pickle_module(unpickler: type) -> object:
    """What torch.load takes as its pickle_module: a module with an Unpickler class and a load function."""
    module = type(pickle)("recording_pickle")
    module.Unpickler, module.load = unpickler, lambda file, **kwargs: unpickler(file, **kwargs).load()
    return module


def test_torch_tensor_rebuilders_invert_what_torch_save_writes(tmp_path):
    rebuilders = _compat.torch_tensor_rebuilders()
    assert {f"{function.__module__}.{function.__name__}" for function in rebuilders.values()} == set(rebuilders)
    tensors = {  # strided, conjugate (metadata), a dtype without a typed storage (v3), requiring grad
        "strided": torch.arange(6.0).reshape(2, 3).t(), "conj": torch.tensor([1 + 2j, 3 - 1j]).conj(),
        "uint16": torch.tensor([0, 1, 2, 3], dtype=torch.uint16)[1:], "grad": torch.ones(2, requires_grad=True),
    }
    path = tmp_path / "tensors.pt"
    torch.save(tensors, path)
    used = set()

    class Unpickler(_compat.pure_python_unpickler()):
        def find_class(self, module, name):
            if f"{module}.{name}" in rebuilders:
                used.add(f"{module}.{name}")
                return rebuilders[f"{module}.{name}"]
            return super().find_class(module, name)

    loaded = torch.load(path, weights_only=False, pickle_module=_pickle_module(Unpickler))
    assert used == {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3"}
    for key, tensor in tensors.items():
        rebuilt = loaded[key]
        assert rebuilt.dtype == tensor.dtype and rebuilt.stride() == tensor.stride(), key
        assert rebuilt.is_conj() == tensor.is_conj() and rebuilt.requires_grad == tensor.requires_grad, key
        assert torch.equal(*(t.detach().resolve_conj().to(torch.complex128) for t in (rebuilt, tensor))), key
    storage = torch.arange(6.0).__reduce_ex__(2)[1][0]  # older files call _rebuild_tensor with a storage and its view
    assert torch.equal(rebuilders["torch._utils._rebuild_tensor"](storage, 1, (2, 2), (1, 2)),
                       torch.tensor([[1.0, 3.0], [2.0, 4.0]]))


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_load_sends_the_globals_through_the_pickle_modules_unpickler(tmp_path, zip_format):
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(3, 2), path, _use_new_zipfile_serialization=zip_format)
    names: list[str] = []

    class Unpickler(_compat.pure_python_unpickler()):
        def find_class(self, module, name):
            names.append(f"{module}.{name}")
            return super().find_class(module, name)

    assert isinstance(torch.load(path, weights_only=False, pickle_module=_pickle_module(Unpickler)), nn.Linear)
    assert {"torch.nn.modules.linear.Linear", "torch._utils._rebuild_parameter", "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2"} <= set(names)
