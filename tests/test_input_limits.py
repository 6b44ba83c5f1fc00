"""Weights and head files that would make the reader allocate, inflate or wait far beyond what they hold.

Each file here is small and each must be refused, quickly and with an error that names the file (and key),
before its tensors are copied: repeated-memory views, compressed or overlapping zip entries, FIFOs, and
tensors without dense values (meta, sparse, quantized). Files of the same shapes that are legitimate load.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_adamerging.limits import NotARegularFile
from lit_adamerging.models.checkpoints import CheckpointError, read_checkpoint
from lit_adamerging.models.heads import ClassificationHead
from lit_adamerging.models.zoo import head_from_file


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ------------------------------------------------------------------------- views that repeat memory
def test_a_tiny_head_file_declaring_gigabytes_is_refused_before_any_copy(tmp_path):
    path = tmp_path / "head.pt"
    torch.save({"weight": torch.zeros(1).expand(40000, 40000)}, path)  # torch.save keeps the view: 4 bytes stored
    assert path.stat().st_size < 4096
    refused = (
        rf"{re.escape(str(path))}: 'weight' is a torch.float32 tensor of shape \[40000, 40000\] \(6400000000 bytes\) "
        r"over only 4 stored bytes: a view that repeats values \(strides \[0, 0\].*Save materialised weights"
    )
    before = _peak_rss_bytes()
    with pytest.raises(CheckpointError, match=refused):
        head_from_file(str(path), "cars", num_classes=196, features=512)
    for allow_pickle in (False, True):
        with pytest.raises(CheckpointError, match=refused):
            read_checkpoint(path, allow_pickle=allow_pickle)
    assert _peak_rss_bytes() - before < 2**30  # nothing near the 6.4 GB the view declares was allocated


def test_overlapping_view_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    storage = torch.arange(12.0)
    torch.save({"bias": torch.ones(3), "weight": storage.as_strided((8, 5), (1, 1))}, path)  # 40 values over 12
    with pytest.raises(CheckpointError, match=r"model\.pt: 'weight' is a torch.float32 tensor of shape \[8, 5\] "
                                              r"\(160 bytes\) over only 48 stored bytes"):
        read_checkpoint(path)


def test_views_that_do_not_repeat_memory_still_load(tmp_path):
    """Tied weights, slices of one buffer, transposes and an expand over a dimension of one are read as saved."""
    buffer = torch.arange(24.0).reshape(4, 6)
    tied = torch.randn(5, 3)
    state = {
        "embedding.weight": tied,
        "decoder.weight": tied,
        "rows": buffer[1:3],
        "columns": buffer[:, 2],
        "transposed": buffer.t(),
        "position_ids": torch.arange(7).expand(1, -1),  # as Hugging Face CLIP registers it
    }
    path = tmp_path / "model.pt"
    torch.save(state, path)
    loaded = read_checkpoint(path)
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].shape == value.shape and torch.equal(loaded[key], value), key


# ---------------------------------------------------------------------------- heads: shapes first
def test_head_shape_is_compared_with_the_task_before_its_values(tmp_path):
    path = tmp_path / "head.pt"
    torch.save({"weight": torch.full((5, 8), float("nan")), "bias": torch.zeros(5)}, path)
    where = re.escape(f"(head file {path})")
    with pytest.raises(ValueError, match=rf"task 'cars': its head has 5 classes but its dataset has 3 {where}"):
        head_from_file(str(path), "cars", num_classes=3, features=8)
    with pytest.raises(ValueError, match=rf"task 'cars': its head takes 8 features but the encoder returns 16 {where}"):
        head_from_file(str(path), "cars", num_classes=5, features=16)
    with pytest.raises(ValueError, match=r"the head weight has NaN or infinite values"):  # the shape fits: values next
        head_from_file(str(path), "cars", num_classes=5, features=8)


def test_a_fitting_head_loads(tmp_path):
    path = tmp_path / "head.pt"
    weight, bias = torch.randn(3, 8), torch.randn(3)
    torch.save({"weight": weight, "bias": bias}, path)
    head = head_from_file(str(path), "cars", num_classes=3, features=8)
    features = torch.randn(2, 8)
    torch.testing.assert_close(head(features), features @ weight.T + bias)


# --------------------------------------------------------------------------------- zip entries
def _rewrite_zip(path: Path, compression: int) -> None:
    with zipfile.ZipFile(path) as source:
        records = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", compression) as target:
        for name, data in records:
            target.writestr(name, data)


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_compressed_zip_entries_are_refused(tmp_path, allow_pickle):
    path = tmp_path / "finetuned.pt"
    torch.save({"weight": torch.zeros(256, 1024)}, path)  # 1 MiB of zeros, which deflate to about 1 KiB
    _rewrite_zip(path, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 16 * 1024
    refused = (
        r"finetuned\.pt: the zip entries \[.*data/0.*\].* are compressed; torch\.save never compresses them.*"
        r"Re-save the weights with torch\.save"
    )
    with pytest.raises(CheckpointError, match=refused):
        read_checkpoint(path, allow_pickle=allow_pickle)


def test_an_uncompressed_rewrite_still_loads(tmp_path):
    path = tmp_path / "finetuned.pt"
    weight = torch.randn(4, 5)
    torch.save({"weight": weight}, path)
    _rewrite_zip(path, zipfile.ZIP_STORED)
    assert torch.equal(read_checkpoint(path)["weight"], weight)


def _point_entries_at_one_record(path: Path, record: str, copies: int) -> None:
    """Add ``copies`` central-directory entries that all point at ``record``'s data (overlapping entries)."""
    data = path.read_bytes()
    end = data.rindex(b"PK\x05\x06")
    (_, disk, start_disk, on_disk, total, size, offset, comment) = struct.unpack("<4s4H2LH", data[end : end + 22])
    directory = data[offset : offset + size]
    position, entry = 0, None
    while position < len(directory):  # each entry: 46 fixed bytes, then name, extra field and comment
        lengths = struct.unpack("<3H", directory[position + 28 : position + 34])
        length = 46 + sum(lengths)
        name = directory[position + 46 : position + 46 + lengths[0]].decode()
        if name.endswith(record):
            entry = directory[position : position + length]
        position += length
    assert entry is not None
    added = b"".join(entry.replace(record.encode(), f"{record[:-1]}{9 - i}".encode()) for i in range(copies))
    end_record = struct.pack("<4s4H2LH", b"PK\x05\x06", disk, start_disk, on_disk + copies, total + copies,
                             size + len(added), offset, comment)
    path.write_bytes(data[:offset] + directory + added + end_record + data[end + 22 :])


def test_zip_entries_declaring_more_than_the_file_holds_are_refused(tmp_path):
    path = tmp_path / "finetuned.pt"
    torch.save({"weight": torch.zeros(64, 1024)}, path)  # 256 KiB in data/0
    _rewrite_zip(path, zipfile.ZIP_STORED)
    _point_entries_at_one_record(path, "data/0", copies=8)
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:  # a zip reader sees nine entries of 256 KiB in a file of about 256 KiB
        assert sum(info.file_size for info in archive.infolist()) > 8 * 2**18 > size
    with pytest.raises(CheckpointError, match=rf"finetuned\.pt: the zip entries declare \d+ bytes in all, more than "
                                              rf"the file's {size} bytes, so entries overlap"):
        read_checkpoint(path)


# ----------------------------------------------------------------------------- FIFOs, not files
def _fifo_layouts(root: Path, where: str) -> tuple[Path, Path]:
    """A checkpoint (file or Hugging Face folder) whose file ``where`` is a FIFO: (what to read, the FIFO)."""
    if where in ("finetuned.pt", "finetuned.safetensors"):
        os.mkfifo(root / where)
        return root / where, root / where
    folder = root / "clip"
    folder.mkdir()
    if where != "config.json":
        (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    if where == "pytorch_model-00001-of-00001.bin":
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": where}}))
    os.mkfifo(folder / where)
    return folder, folder / where


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
@pytest.mark.parametrize(
    "where",
    ["finetuned.pt", "finetuned.safetensors", "config.json", "model.safetensors", "pytorch_model.bin.index.json",
     "pytorch_model-00001-of-00001.bin"],
)
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, where):
    target, fifo = _fifo_layouts(tmp_path, where)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_checkpoint(target)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # it blocked: open the writing end so that it can finish, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"read_checkpoint({target}) blocked on the FIFO {fifo}")
    (error,) = outcome
    assert isinstance(error, NotARegularFile)
    assert re.match(rf"{re.escape(str(fifo))}: the \w[\w ]* is a FIFO \(named pipe\), not a regular file", str(error))


def test_a_shard_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clip"}))
    torch.save({"w": torch.ones(2)}, tmp_path / "elsewhere.bin")
    index = folder / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../elsewhere.bin"}}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(index))}: the shard '../elsewhere.bin' is not a file "
                                              "name in the folder"):
        read_checkpoint(folder)


# ------------------------------------------------------------------- tensors without dense values
UNUSABLE = {  # how to make it, and what read_checkpoint calls it
    "meta": (lambda: torch.zeros(2, 3, device="meta"), "a meta tensor"),
    "sparse-coo": (lambda: torch.eye(2, 3).to_sparse(), "a sparse tensor"),
    "sparse-csr": (lambda: torch.eye(2, 3).to_sparse_csr(), "a sparse tensor"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.ones(2, 3), 0.1, 0, torch.qint8), "a quantized tensor"),
}


def _holding(tensor: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.register_buffer("weight", tensor)
    module.bias = nn.Parameter(torch.zeros(2))
    return module


@pytest.mark.parametrize("saved", ["state-dict", "state-dict-allow-pickle", "pickled-module"])
@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_tensors_without_dense_values_are_refused_by_key(tmp_path, kind, saved):
    make, called = UNUSABLE[kind]
    path = tmp_path / "finetuned.pt"
    torch.save(_holding(make()) if saved == "pickled-module" else {"bias": torch.zeros(2), "weight": make()}, path)
    with pytest.raises(CheckpointError, match=rf"finetuned\.pt: 'weight' is {called}\b.*only dense tensors with "
                                              r"values, on the CPU, can be used as weights\. Save dense, materialised"):
        read_checkpoint(path, allow_pickle=saved != "state-dict")


class SavedOnDevice:
    """Pickles as torch pickles a tensor of a device without numpy support: a CPU copy and the device's name."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self):
        return torch._utils._rebuild_device_tensor_from_cpu_tensor, (self.tensor, torch.float64, "cuda:0", False)


class Settings:
    """Training settings saved beside the weights: a class torch's weights-only reader refuses."""


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_tensors_saved_from_a_device_are_read_onto_the_cpu(tmp_path, allow_pickle):
    weight = torch.randn(2, 3)
    path = tmp_path / "finetuned.pt"
    state = {"weight": SavedOnDevice(weight), "bias": torch.zeros(2)}
    torch.save({"state_dict": state, "settings": Settings()} if allow_pickle else state, path)
    loaded = read_checkpoint(path, allow_pickle=allow_pickle)
    assert loaded["weight"].device.type == "cpu" and loaded["weight"].dtype == torch.float64
    assert torch.equal(loaded["weight"], weight.double())


@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_head_files_without_dense_values_are_refused(tmp_path, kind):
    make, called = UNUSABLE[kind]
    path = tmp_path / "head.pt"
    torch.save({"weight": make(), "bias": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=rf"head\.pt: 'weight' is {called}\b"):
        head_from_file(str(path), "cars", num_classes=2, features=3)
    with pytest.raises(ValueError, match=rf"^cars head: the head weight is {called}\b.*save materialised ones"):
        ClassificationHead(make(), torch.zeros(2), source="cars head")
