"""Checkpoints that try to run code: nothing runs, with or without ``allow_pickle``.

Every payload below creates a marker file when a normal unpickler loads it (checked first, so each test can
fail); read_checkpoint must refuse it, naming what it refused, and leave no marker.
"""

from __future__ import annotations

import builtins
import copyreg
import functools
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_adamerging.limits import LimitExceeded
from lit_adamerging.models.checkpoints import CheckpointError, read_checkpoint


def touch(path: str) -> None:
    """A plain function of an importable module: calling it from a pickle must be refused all the same."""
    Path(path).touch()


# ------------------------------------------------------------------------------------------ payloads
class SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class Eval(SystemCall):
    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


class Exec(SystemCall):
    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


class Popen(SystemCall):
    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.marker)],)


class _ImportOs:
    def __reduce__(self):
        return __import__, ("os",)


class _OsSystem:
    """Pickles as ``getattr(__import__("os"), "system")``."""

    def __call__(self, command: str) -> int:
        raise AssertionError("never called here: only its pickled form is used")

    def __reduce__(self):
        return getattr, (_ImportOs(), "system")


class GetattrChain(SystemCall):
    def __reduce__(self):
        return _OsSystem(), (f"touch '{self.marker}'",)


class Partial(SystemCall):
    def __reduce__(self):
        return functools.partial(os.system, f"touch '{self.marker}'"), ()


class PickleLoads(SystemCall):
    def __reduce__(self):
        return pickle.loads, (pickle.dumps(SystemCall(self.marker), protocol=2),)


class Function(SystemCall):
    def __reduce__(self):
        return touch, (str(self.marker),)


class Method(SystemCall):
    def __reduce__(self):
        return Path.touch, (self.marker,)


PAYLOADS = {  # payload -> the global (module.name) or call the error names
    SystemCall: f"{os.system.__module__}.system",
    Eval: "builtins.eval",
    Exec: "builtins.exec",
    Popen: "subprocess.Popen",
    GetattrChain: "builtins.getattr",
    Partial: "functools.partial",
    PickleLoads: "pickle.loads",
    Function: f"a call of {touch.__module__}.touch",
    Method: "builtins.getattr",  # protocol 2 spells Path.touch as getattr(Path, "touch")
}
PROTOCOL_5 = {  # the names as protocol 5 spells them (raw-pickle); a method is not a class, so calling it is refused
    Method: "a call of pathlib.Path.touch",
    PickleLoads: "_pickle.loads",
}


def run_unsafely(data: bytes) -> None:
    """What a normal unpickler does with the payload (to show that it is live)."""
    result = pickle.loads(data)
    if isinstance(result, subprocess.Popen):
        result.wait()


# -------------------------------------------------------------------------------------- placements
def _tensors() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.ones(2)}


class Carrier(nn.Linear):
    """A module with a payload among its attributes."""

    def __init__(self, payload: object) -> None:
        super().__init__(3, 2)
        self.extra = payload


def _hf_folder(folder: Path, payload: object, sharded: bool) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    state = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(4, 3, 2, 2), "payload": payload}
    if sharded:
        shard = "pytorch_model-00001-of-00001.bin"
        torch.save(state, folder / shard)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(state, shard)}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    return folder


PLACEMENTS = {
    "top-level": lambda p, path: torch.save(p, path),
    "in-state-dict": lambda p, path: torch.save({"state_dict": {**_tensors(), "evil": p}, "epoch": 1}, path),
    "in-ordered-dict": lambda p, path: torch.save(OrderedDict(weight=torch.ones(2), evil=p), path),
    "in-module-tree": lambda p, path: torch.save(nn.Sequential(nn.LayerNorm(3), Carrier(p)), path),
    "raw-pickle-protocol-2": lambda p, path: path.write_bytes(pickle.dumps({"evil": p, **_tensors()}, protocol=2)),
    "raw-pickle": lambda p, path: path.write_bytes(pickle.dumps(p)),
}


def _write(placement: str, payload: object, tmp_path: Path) -> Path:
    if placement.startswith("hf-folder"):
        return _hf_folder(tmp_path / "clip", payload, sharded=placement.endswith("sharded"))
    path = tmp_path / ("evil.bin" if placement == "raw-pickle" else "evil.pt")
    PLACEMENTS[placement](payload, path)
    return path


@pytest.mark.parametrize("placement", [*PLACEMENTS, "hf-folder", "hf-folder-sharded"])
@pytest.mark.parametrize("payload", list(PAYLOADS), ids=lambda cls: cls.__name__)
def test_payloads_execute_nothing(tmp_path, payload, placement):
    marker = tmp_path / "marker"
    run_unsafely(pickle.dumps(payload(marker)))
    assert marker.exists(), "the payload is not live: the test would prove nothing"
    marker.unlink()

    path = _write(placement, payload(marker), tmp_path)
    raw = placement.startswith("raw")  # not written by torch.save: allow_pickle would not make it readable
    refusal = "not a readable PyTorch checkpoint" if raw else "the file holds pickled Python objects"
    with pytest.raises(CheckpointError, match=refusal) as refused:
        read_checkpoint(path)
    assert str(refused.value).startswith(str(path)) and raw != ("allow_pickle" in str(refused.value))
    expected = PROTOCOL_5.get(payload, PAYLOADS[payload]) if placement == "raw-pickle" else PAYLOADS[payload]
    with pytest.raises(CheckpointError, match=rf"refused {re.escape(expected)}, which could run code") as refused:
        read_checkpoint(path, allow_pickle=True)
    assert str(refused.value).startswith(str(path))
    assert not marker.exists()


def test_error_names_the_file_inside_a_hugging_face_folder(tmp_path):
    folder = _hf_folder(tmp_path / "clip", SystemCall(tmp_path / "marker"), sharded=False)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(folder / 'pytorch_model.bin'))}: refused"):
        read_checkpoint(folder, allow_pickle=True)


# ------------------------------------------------------------- importable classes with code of their own
class SetsState(nn.Module):
    """Its __setstate__ would create a marker (pickle's BUILD calls it)."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = str(marker)
        self.scale = nn.Parameter(torch.full((2,), 3.0))

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        super().__setstate__(state)


class MakesNew:
    """Its __new__ would create a marker (pickle's NEWOBJ calls it with what __getnewargs__ gave)."""

    def __new__(cls, marker: str = "") -> MakesNew:
        if marker:
            Path(marker).touch()
        return super().__new__(cls)

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def __getnewargs__(self):
        return (self.marker,)


class Initialises:
    """Its __init__ would create a marker (pickled as a call of the class)."""

    def __init__(self, marker: str) -> None:
        Path(marker).touch()
        self.marker = marker

    def __reduce__(self):
        return Initialises, (self.marker,)


class CountsVotes(Counter):
    """A Counter whose update (which Counter.__init__ runs when unpickled) would create a marker."""

    def update(self, iterable=None, /, **kwds) -> None:
        for key in iterable or ():
            Path(key).touch()
        super().update(iterable, **kwds)


class ListsThings(list):
    """A list whose append and extend (pickle's APPEND and APPENDS call them) would create a marker."""

    def append(self, value: str) -> None:
        Path(value).touch()

    def extend(self, values) -> None:
        for value in values:
            Path(value).touch()


class Tree(nn.Module):
    def __init__(self, markers: dict[str, Path]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3)
        self.sets_state = SetsState(markers["setstate"])
        self.conv = nn.Conv2d(3, 2, 1)
        self.register_buffer("steps", torch.tensor(7))
        self.register_buffer("scratch", torch.ones(2), persistent=False)  # not part of state_dict()
        self.new = MakesNew(str(markers["new"]))
        self.initialised = Initialises(str(markers["init"]))
        self.votes = CountsVotes({str(markers["counter"]): 2})
        self.things = ListsThings()
        list.append(self.things, str(markers["list"]))


def test_importable_classes_are_stood_in_for_without_running_their_code(tmp_path):
    markers = {name: tmp_path / f"{name}.marker" for name in ("setstate", "new", "init", "counter", "list")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tree = Tree(markers)
    for marker in tmp_path.glob("*.marker"):
        marker.unlink()
    path = tmp_path / "tree.pt"
    torch.save(tree, path)
    torch.load(path, weights_only=False)  # live: a normal load runs the code of every one of these classes
    assert sorted(tmp_path.glob("*.marker")) == sorted(markers.values())
    for marker in markers.values():
        marker.unlink()

    loaded = read_checkpoint(path, allow_pickle=True)
    assert not list(tmp_path.glob("*.marker"))
    expected = tree.state_dict()
    assert list(loaded) == list(expected) and "scratch" not in loaded
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


# ------------------------------------------------------------------------------ hand-written pickles
def _torch_file(tmp_path: Path, pickled: bytes) -> Path:
    """A torch.save zip archive whose data.pkl is ``pickled``."""
    path = tmp_path / "crafted.pt"
    torch.save({"weight": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as source:
        records = {info.filename: source.read(info) for info in source.infolist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for name, data in records.items():
            target.writestr(name, pickled if name.endswith("/data.pkl") else data)
    return path


HAND_WRITTEN = {  # opcodes that call something, each pointed at something it must not call
    "INST": (b"(S'M'\ni" + touch.__module__.encode() + b"\ntouch\n.", f"a call of {touch.__module__}.touch"),
    "OBJ": (b"(c" + touch.__module__.encode() + b"\ntouch\nS'M'\no.", f"a call of {touch.__module__}.touch"),
    "NEWOBJ": (b"\x80\x02c" + touch.__module__.encode() + b"\ntouch\nS'M'\n\x85\x81.",
               f"a call of {touch.__module__}.touch"),
    "BUILD": (b"\x80\x02c__builtin__\nset\n)R}S'x'\nS'M'\nsb.", "setting the state of a set object"),
    "REDUCE-of-a-value": (b"\x80\x02cgone\nThing\n0ctorch\nfloat32\n)R.", "a call of a dtype object"),
    "codec": (b"\x80\x02c_codecs\nencode\nS'M'\nS'rot13'\n\x86R.", "_codecs.encode with the codec 'rot13'"),
    "operator.attrgetter": (b"\x80\x02coperator\nattrgetter\nS'system'\n\x85R.", "operator.attrgetter"),
    "types.FunctionType": (b"\x80\x02ctypes\nFunctionType\n)R.", "types.FunctionType"),
    "types.CodeType": (b"\x80\x02ctypes\nCodeType\n)R.", "types.CodeType"),
    "ctypes.CDLL": (b"\x80\x02cctypes\nCDLL\nN\x85R.", "ctypes.CDLL"),
    "importlib.import_module": (b"\x80\x02cimportlib\nimport_module\nS'os'\n\x85R.", "importlib.import_module"),
    "runpy.run_path": (b"\x80\x02crunpy\nrun_path\nS'M'\n\x85R.", "runpy.run_path"),
    "marshal.loads": (b"\x80\x02cmarshal\nloads\nS''\n\x85R.", "marshal.loads"),
    "copyreg._reconstructor": (b"\x80\x02ccopy_reg\n_reconstructor\n)R.", "copyreg._reconstructor"),
    "__import__": (b"\x80\x02c__builtin__\n__import__\nS'os'\n\x85R.", "builtins.__import__"),
    "raw-tensor-pickle": (pickle.dumps(torch.ones(2), protocol=2), "a call of torch.storage._load_from_bytes"),
}


@pytest.mark.parametrize("case", list(HAND_WRITTEN))
@pytest.mark.parametrize("container", ["torch-zip", "raw"])
def test_every_calling_opcode_is_vetted(tmp_path, case, container):
    marker = tmp_path / "marker"
    pickled, refused = HAND_WRITTEN[case]
    pickled = pickled.replace(b"'M'", repr(str(marker)).encode())
    if container == "raw":
        path = tmp_path / "crafted.bin"
        path.write_bytes(pickled)
    else:
        path = _torch_file(tmp_path, pickled)
    with pytest.raises(CheckpointError, match=rf"crafted\.\w+: refused {re.escape(refused)}, which could run code"):
        read_checkpoint(path, allow_pickle=True)
    assert not marker.exists()


def test_extension_codes_go_through_the_same_vetting(tmp_path):
    """EXT opcodes name globals through copyreg's registry; its cache of loaded objects is not trusted."""
    marker = tmp_path / "marker"
    code = 0x7F_F0F0
    copyreg_key = (os.system.__module__, "system")
    copyreg.add_extension(*copyreg_key, code)
    try:
        copyreg._extension_cache[code] = os.system  # as if something had unpickled it before
        data = pickle.dumps(SystemCall(marker), protocol=2)
        assert pickle.EXT4 in data
        path = tmp_path / "ext.pt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"ext\.pt: refused {os.system.__module__}\.system, which could"):
            read_checkpoint(path, allow_pickle=True)
    finally:
        copyreg.remove_extension(*copyreg_key, code)
    assert not marker.exists()


def test_nothing_is_imported_for_a_name(tmp_path):
    """A name whose module is not imported stays a name: the module's import-time code never runs."""
    package = tmp_path / "code" / "sideeffect_pkg"
    package.mkdir(parents=True)
    marker = tmp_path / "marker"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Thing:\n    pass\n")
    pickled = b"\x80\x02csideeffect_pkg\nThing\n)R."
    path = _torch_file(tmp_path, pickled)
    sys.path.insert(0, str(package.parent))
    try:
        with pytest.raises(CheckpointError, match=r"found no tensors to use as weights in a sideeffect_pkg\.Thing"):
            read_checkpoint(path, allow_pickle=True)
        assert "sideeffect_pkg" not in sys.modules
    finally:
        sys.path.remove(str(package.parent))
    assert not marker.exists()


def test_attributes_cannot_hide_methods(tmp_path):
    """Python attributes of tensors are left out (they are not weights); an OrderedDict may carry only _metadata."""
    tensor = torch.arange(4.0)
    tensor.detach = touch  # a name that would be called when the weights are used
    tensor.note = "kept by torch.save, dropped on reading"
    parameter = nn.Parameter(torch.ones(3))
    parameter.to = touch
    path = tmp_path / "attributes.pt"
    torch.save({"tensor": tensor, "parameter": parameter}, path)
    loaded = read_checkpoint(path, allow_pickle=True)
    assert list(loaded) == ["tensor", "parameter"] and type(loaded["parameter"]) is nn.Parameter
    assert torch.equal(loaded["tensor"].detach(), torch.arange(4.0)) and not hasattr(loaded["tensor"], "note")
    assert torch.equal(loaded["parameter"].to(torch.float64), torch.ones(3, dtype=torch.float64))

    state = OrderedDict(weight=torch.ones(2))
    state.values = touch
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"refused setting the state of a OrderedDict object"):
        read_checkpoint(path, allow_pickle=True)


# ---------------------------------------------------------------------- bounded by what the file holds
class Node(nn.Module):
    """A module class of the test's own, read as a stand-in."""


def _shared_tree(depth: int, fan_out: int) -> Node:
    """``depth`` levels, each holding the same child ``fan_out`` times: fan_out**depth paths to one weight."""
    node = Node()
    node.weight = nn.Parameter(torch.ones(1))
    for _ in range(depth):
        parent = Node()
        for i in range(fan_out):
            parent.add_module(str(i), node)
        node = parent
    return node


def test_shared_modules_read_as_state_dict_reads_them(tmp_path):
    tree = _shared_tree(depth=3, fan_out=2)
    path = tmp_path / "shared.pt"
    torch.save(tree, path)
    loaded = read_checkpoint(path, allow_pickle=True)
    expected = tree.state_dict()
    assert list(loaded) == list(expected) and len(expected) == 8  # one key per path, in state_dict()'s order
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())


def test_a_small_pickle_of_shared_references_is_refused_at_the_limit(tmp_path):
    """2**20 paths (a million weights, about a gigabyte) from a file of a few kilobytes, with the default limit."""
    path = tmp_path / "shared.pt"
    torch.save(_shared_tree(depth=20, fan_out=2), path)
    assert path.stat().st_size < 8 * 1024
    with pytest.raises(LimitExceeded, match=r"shared\.pt: \d+ modules, weights and characters of their names is more "
                                            r"than the limit of 1000000 .*LIT_ADAMERGING_MAX_PICKLED_OBJECTS"):
        read_checkpoint(path, allow_pickle=True)


def _put(index: int) -> bytes:  # LONG_BINPUT: keep the top of the stack in the memo
    return b"r" + index.to_bytes(4, "little")


def _get(index: int) -> bytes:  # LONG_BINGET
    return b"j" + index.to_bytes(4, "little")


def _text(value: str) -> bytes:  # BINUNICODE
    return b"X" + len(value).to_bytes(4, "little") + value.encode()


def _module_chain(depth: int) -> bytes:
    """A protocol-2 pickle of ``depth`` nested modules of a class that cannot be imported, written bottom-up
    (no recursion here, nor in the pickle's nesting): each module is the only child (``c``) of the next."""
    out = [b"\x80\x02cgone_package\nNode\n", _put(0), b"0"]
    for level in range(1, depth + 1):
        child = _text("c") + _get(level - 1) + b"s" if level > 1 else b""  # SETITEM in the new _modules dict
        out += [_get(0), b")\x81}", _text("_modules"), b"}", child, b"sb", _put(level), b"0"]  # NEWOBJ, BUILD
    out += [_get(depth), b"."]
    return b"".join(out)


def test_modules_nested_deeper_than_the_limit_are_refused(tmp_path):
    path = _torch_file(tmp_path, _module_chain(5000))
    with pytest.raises(LimitExceeded, match=r"crafted\.pt: 201 levels of nested modules is more than the limit of 200 "
                                            r".*LIT_ADAMERGING_MAX_NESTING_DEPTH"):
        read_checkpoint(path, allow_pickle=True)


def test_the_limits_can_be_raised(tmp_path, monkeypatch):
    path = _torch_file(tmp_path, _module_chain(300))
    monkeypatch.setenv("LIT_ADAMERGING_MAX_NESTING_DEPTH", "400")
    with pytest.raises(CheckpointError, match=r"found no tensors to use as weights in a gone_package\.Node object"):
        read_checkpoint(path, allow_pickle=True)  # read to the end: the chain holds no weights


def test_objects_built_by_a_pickle_count_against_the_limit(tmp_path, monkeypatch):
    module = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    path = tmp_path / "model.pt"
    torch.save(module, path)
    loaded = read_checkpoint(path, allow_pickle=True)  # the default limits read a real module
    assert list(loaded) == list(module.state_dict())
    assert all(torch.equal(loaded[key], value) for key, value in module.state_dict().items())
    monkeypatch.setenv("LIT_ADAMERGING_MAX_PICKLED_OBJECTS", "20")
    with pytest.raises(LimitExceeded, match=r"model\.pt: 21 objects built by the pickle is more than the limit of 20"):
        read_checkpoint(path, allow_pickle=True)


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_a_structure_too_deep_for_python_is_refused_naming_the_file(tmp_path, allow_pickle):
    """A state dict key nested 100,000 tuples deep (built without recursion) exceeds Python's recursion limit."""
    path = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as archive:
        (pickled,) = [archive.read(name) for name in archive.namelist() if name.endswith("/data.pkl")]
    key = b"X\x06\x00\x00\x00weight"
    assert pickled.count(key) == 1
    path = _torch_file(tmp_path, pickled.replace(key, b"K\x00" + b"\x85" * 100_000))
    with pytest.raises(CheckpointError, match=r"crafted\.pt: nested too deeply to read \(Python's recursion limit"):
        read_checkpoint(path, allow_pickle=allow_pickle)
