"""Bad inputs found by the robustness review, each refused with an error that names it and says what to do.

Image files that cannot be decoded (a decompression bomb, Pillow's warning-level size, a truncated file, a
file that is not an image) name the file and the task on every cache mode; images with NaN or infinite
pixels name the task and the positions before Fisher merging or RegMean reads them; a task vector that
float16 cannot hold names the task, the tensor and the sizes; task names that collide with the logged
means or break metric names are refused; an export that cannot write the surgery maps fails before any
step and never leaves one file new and the other old.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from helpers import TINY_CLIP, TINY_CONFIG, load_config, run_cli
from lit_adamerging import (
    AdaMergingModule,
    ExportMergedEncoder,
    ImageFolderTask,
    MultiTaskDataModule,
    Preprocess,
    SyntheticTask,
    SyntheticZoo,
    TaskData,
    TorchvisionTask,
)
from lit_adamerging.data.datasets import ImageReadError, eurosat_test_indices
from lit_adamerging.data.tasks import AVERAGE_NAMES
from lit_adamerging.io import write_all_atomic
from lit_adamerging.lightning.base import intended_warnings_ignored
from lit_adamerging.lightning.statistics import FisherMergingModule, RegMeanModule
from lit_adamerging.merging.task_vectors import TaskVectorError, stack_task_vectors


# ----------------------------------------------------------------------------- 1. image files
def png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` 8-bit grey pixels and whose data holds almost none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def truncated_png(path: Path) -> Path:
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def not_an_image(path: Path) -> Path:
    path.write_text("a text file with an image's name")
    return path


BAD_FILES = {  # how to make it, what the message says about it, what it says to do
    "bomb": (lambda path: png_declaring(path, 20_000, 20_000), r"400000000 pixels", "downscaled copy"),
    "warning_level": (lambda path: png_declaring(path, 10_000, 10_000), r"100000000 pixels", "downscaled copy"),
    "truncated": (truncated_png, r"truncated", "replace it with an intact copy"),
    "not_an_image": (not_an_image, r"cannot identify image file", "replace it with an intact copy"),
}


def tree_with(root: Path, bad: str) -> Path:
    """``root/test/{a,b}/`` with two good images each and, in ``b``, the bad file ``bad.png``."""
    for label in ("a", "b"):
        (root / "test" / label).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (12, 10), (40 * index, 90, 200)).save(root / "test" / label / f"{index}.png")
    BAD_FILES[bad][0](root / "test" / "b" / "bad.png")
    return root


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_an_image_that_cannot_be_decoded_names_the_file_the_task_and_what_to_do(tmp_path, bad, cache):
    limit = Image.MAX_IMAGE_PIXELS
    root = tree_with(tmp_path / "ds", bad)
    tasks = {
        "good": SyntheticTask(num_classes=2, num_images=4, image_size=8),
        "shapes": ImageFolderTask(str(root), preprocess=Preprocess(image_size=8)),
    }
    data = MultiTaskDataModule(tasks, cache=cache, cache_dir=str(tmp_path / "cache"), eval_batch_size=8)
    _, says, advice = BAD_FILES[bad]
    expected = rf"task 'shapes': .*cannot read image file '{root}/test/b/bad\.png'.*{says}.*{advice}"
    with pytest.raises(ImageReadError, match=expected):
        data.setup("test")  # the caches decode every image here
        next(iter(data.test_dataloader()[1]))  # uncached: when the loader reads the file
    if cache == "none":  # the pass Fisher merging, RegMean and surgery read names it too
        with pytest.raises(ImageReadError, match=expected):
            list(data.unlabeled_batches("shapes"))
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's setting is read, never changed


def test_a_torchvision_image_that_cannot_be_decoded_names_the_file_and_the_task(tmp_path):
    classes = sorted(["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                      "PermanentCrop", "Residential", "River", "SeaLake"])
    for name in classes:  # EuroSAT's layout, four files a class, none of them an image
        (tmp_path / "eurosat" / "2750" / name).mkdir(parents=True)
        for index in range(4):
            not_an_image(tmp_path / "eurosat" / "2750" / name / f"{name}_{index + 1}.jpg")
    first = eurosat_test_indices(40)[0]  # the first test image, in torchvision's sorted order
    path = tmp_path / "eurosat" / "2750" / classes[first // 4] / f"{classes[first // 4]}_{first % 4 + 1}.jpg"
    task = TorchvisionTask("eurosat", str(tmp_path), preprocess=Preprocess(image_size=8))
    data = MultiTaskDataModule({"satellite": task}, cache="memory")
    expected = rf"task 'satellite': cannot read image file '{path}' \(item {first} of torchvision's dataset\).*intact"
    with pytest.raises(ImageReadError, match=expected):
        data.setup("test")


# ----------------------------------------------------------------------------- 3. non-finite pixels
class NonFiniteImages(TaskData):
    """Random images of which those at ``positions`` hold ``value`` in one pixel."""

    def __init__(self, value: float, positions: list[int], num_images: int = 10) -> None:
        self.value, self.positions, self.num_images = value, positions, num_images

    @property
    def num_classes(self) -> int:
        return 3

    def test_set(self, preprocess: Preprocess | None = None) -> Dataset:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(self.num_images, 3, 32, 32, generator=generator)
        images[self.positions, 1, 4, 5] = self.value
        return TensorDataset(images, torch.randint(3, (self.num_images,), generator=generator))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_unlabeled_batches_name_the_task_and_the_positions_of_non_finite_images(value):
    tasks = {"fine": SyntheticTask(num_classes=3, num_images=6, image_size=32),
             "broken": NonFiniteImages(value, [3, 7])}
    data = MultiTaskDataModule(tasks, eval_batch_size=10, cache="none")
    data.setup("test")
    positions = torch.cat([positions for positions, _ in data.unlabeled_batches("fine")])
    assert positions.tolist() == list(range(6))
    with pytest.raises(ValueError, match=r"task 'broken': the image\(s\) at position\(s\) 3, 7 .*NaN or infinite"):
        list(data.unlabeled_batches("broken"))


@pytest.mark.parametrize(("module_class", "value"), [(RegMeanModule, math.nan), (FisherMergingModule, math.inf)])
def test_statistics_methods_name_the_task_with_a_non_finite_image(tmp_path, module_class, value):
    tasks = {"fine": SyntheticTask(num_classes=3, num_images=6, image_size=32), "broken": NonFiniteImages(value, [2])}
    data = MultiTaskDataModule(tasks, eval_batch_size=4, cache="none")
    model = module_class(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes, num_images=None)
    export = tmp_path / "merged.safetensors"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ExportMergedEncoder(str(export))], default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"task 'broken': the image\(s\) at position\(s\) 2 of"):
        with intended_warnings_ignored():
            trainer.test(model, datamodule=data, verbose=False)
    assert not export.exists()


# ----------------------------------------------------------------------------- 4. float16 overflow
def test_a_task_vector_float16_cannot_hold_is_named_with_its_size():
    pretrained = {"w": torch.zeros(4), "b": torch.zeros(2)}
    finetuned = {
        "first": {"w": torch.ones(4), "b": torch.ones(2)},
        "second": {"w": torch.tensor([1.0, -1e5, 3.0, 7e4]), "b": torch.zeros(2)},
    }
    message = (r"task 'second', key 'w': the task vector holds entries up to 100000 in magnitude, beyond float16's "
               r"largest finite value 65504, so 2 of them would be stored as infinities\. .*bfloat16.*float32")
    with pytest.raises(TaskVectorError, match=message):
        stack_task_vectors(pretrained, finetuned, dtype=torch.float16)
    stored = stack_task_vectors(pretrained, finetuned, dtype=torch.bfloat16)["w"]  # float32's range: kept
    assert stored.dtype == torch.bfloat16
    assert stored.float().tolist() == [[1.0, 1.0, 1.0, 1.0], [1.0, -99840.0, 3.0, 70144.0]]  # bfloat16's roundings
    small = stack_task_vectors(pretrained, {"first": finetuned["first"]}, dtype=torch.float16)["w"]
    assert small.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_the_module_with_float16_task_vectors_names_the_overflow_before_any_step():
    zoo = SyntheticZoo(TINY_CLIP, perturbation=1e6)  # fine-tuned weights far from the pretrained ones
    module = AdaMergingModule(zoo, num_classes={"a": 3, "b": 4}, task_vector_dtype="float16")
    with pytest.raises(TaskVectorError, match=r"task 'a', key '.*': .*beyond float16's largest finite value 65504"):
        module.configure_model()


# ----------------------------------------------------------------------------- 5. task names
@pytest.mark.parametrize("name", AVERAGE_NAMES)
def test_a_task_named_like_a_logged_mean_is_refused(name):
    tasks = {name: SyntheticTask(num_classes=2), "beta": SyntheticTask(num_classes=3)}
    with pytest.raises(ValueError, match=rf"task name '{name}' is reserved: .*avg, avg_seen, avg_unseen.*Rename"):
        MultiTaskDataModule(tasks)


@pytest.mark.parametrize(("name", "says"), [
    ("a/b", r"holds '/'"), ("mnist.v2", r"holds '\.'"), ("tab\there", r"holds '\\t'"),
    ("", "is not a non-empty string"), (3, "is not a non-empty string"),
])
def test_a_task_name_that_breaks_metric_or_module_names_is_refused(name, says):
    with pytest.raises(ValueError, match=re.escape(f"task name {name!r} ") + says):
        MultiTaskDataModule({name: SyntheticTask(num_classes=2)})  # type: ignore[dict-item]
    MultiTaskDataModule({"avg_task": SyntheticTask(num_classes=2), "fashion-mnist_2": SyntheticTask(num_classes=2)})


@pytest.mark.slow  # runs the command in another process
def test_the_command_refuses_a_task_named_avg(tmp_path):
    config = load_config()
    config["data"]["tasks"] = {"avg": config["data"]["tasks"]["alpha"], "beta": config["data"]["tasks"]["beta"]}
    (tmp_path / "avg.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(tmp_path, "test", "--config", "avg.yaml", "--method", "task_arithmetic")
    assert result.returncode != 0
    assert "task name 'avg' is reserved" in result.stderr and "avg, avg_seen, avg_unseen" in result.stderr
    assert "test/acc" not in result.stdout  # nothing was evaluated


# ----------------------------------------------------------------------------- 6. the export
@pytest.mark.slow  # runs the command in another process
def test_a_folder_at_the_surgery_maps_path_fails_the_fit_before_any_step(tmp_path):
    run = tmp_path / "runs" / "tiny"
    maps = run / "merged_encoder.surgery.safetensors"
    (maps / "inside").mkdir(parents=True)
    encoder = run / "merged_encoder.safetensors"
    encoder.write_bytes(b"the previous fit's encoder")
    result = run_cli(tmp_path, "fit", "--config", str(TINY_CONFIG), "--method", "task_arithmetic_surgery")
    assert result.returncode != 0
    assert "the surgery maps' export path 'runs/tiny/merged_encoder.surgery.safetensors' is a folder" in result.stderr
    assert "IsADirectoryError" not in result.stderr
    assert encoder.read_bytes() == b"the previous fit's encoder"
    assert not (run / "checkpoints" / "last.ckpt").exists()  # no step ran, so no checkpoint was saved
    assert maps.is_dir() and [p.name for p in maps.iterdir()] == ["inside"]


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.mark.parametrize("first_existed", [True, False])
def test_write_all_atomic_rolls_the_first_file_back_when_the_second_rename_fails(tmp_path, first_existed):
    first, second, third = tmp_path / "first.bin", tmp_path / "second.bin", tmp_path / "third.bin"
    if first_existed:
        first.write_bytes(b"old first")

    calls = []

    def second_turns_into_a_folder(temporary: str) -> None:
        Path(temporary).write_bytes(b"new second")
        if not calls:  # the first time: after the writes, before the renames, a folder takes its place
            (second / "inside").mkdir(parents=True)
        calls.append(temporary)

    writers = {
        first: lambda temporary: Path(temporary).write_bytes(b"new first"),
        second: second_turns_into_a_folder,
        third: lambda temporary: Path(temporary).write_bytes(b"new third"),
    }
    with pytest.raises(IsADirectoryError):
        write_all_atomic(writers)
    if first_existed:
        assert first.read_bytes() == b"old first"  # renamed over, then put back
    else:
        assert not first.exists()  # renamed into place, then removed again
    assert not third.exists() and second.is_dir()
    assert leftovers(tmp_path) == []  # no temporary file, no backup left

    shutil.rmtree(second)
    assert write_all_atomic(writers) == [first, second, third]  # now every rename succeeds
    assert [path.read_bytes() for path in (first, second, third)] == [b"new first", b"new second", b"new third"]
    assert leftovers(tmp_path) == []


def test_write_all_atomic_touches_nothing_when_a_write_fails(tmp_path):
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(b"old first")

    def fails(temporary: str) -> None:
        Path(temporary).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_all_atomic({first: lambda temporary: Path(temporary).write_bytes(b"new first"), second: fails})
    assert first.read_bytes() == b"old first" and not second.exists() and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="given twice"):
        write_all_atomic({first: fails, str(first): fails})
    assert os.listdir(tmp_path) == ["first.bin"]
