"""Real-image tasks: Preprocess, ImageFolderTask and TorchvisionTask (all offline, no downloads)."""

from __future__ import annotations

import bz2
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_adamerging.data import (
    ImageFolderTask,
    ImageReadError,
    MultiTaskDataModule,
    TaskData,
    TorchvisionTask,
    eurosat_split_indices,
    eurosat_test_indices,
    sun397_test_indices,
)
from lit_adamerging.data.datasets import TORCHVISION_NUM_CLASSES
from lit_adamerging.models.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

EXPECTED_CLASSES = {
    "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "gtsrb": 43, "usps": 10, "svhn": 10,
    "eurosat": 10, "dtd": 47, "sun397": 397, "cars": 196, "resisc45": 45,
}  # fmt: skip


def write_image(path: Path, size: tuple[int, int] = (10, 12), mode: str = "RGB", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)
    return path


def make_tree(root: Path, classes: dict[str, int], split: str = "test", ext: str = ".png") -> Path:
    """``root/split/<class>/<i><ext>`` with ``classes[class]`` small images each."""
    for name, count in classes.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(root / split / name / f"{i}{ext}", value=10 * i)
    return root


# --------------------------------------------------------------------------------------------- #
# Preprocess
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("mode", "size", "kwargs", "expected"),
    [
        ("L", (28, 28), {}, (3, 224, 224)),
        ("L", (28, 40), {"image_size": 64}, (3, 64, 64)),
        ("RGB", (50, 30), {"image_size": 32}, (3, 32, 32)),
        ("RGB", (50, 30), {"image_size": 32, "center_crop": False, "interpolation": "bilinear"}, (3, 32, 32)),
        ("RGBA", (17, 9), {"image_size": 16}, (3, 16, 16)),
        ("P", (9, 17), {"image_size": 16}, (3, 16, 16)),
    ],
)
def test_preprocess_output_shape(mode: str, size: tuple[int, int], kwargs: dict, expected: tuple) -> None:
    out = Preprocess(**kwargs).transform()(Image.new(mode, size))
    assert out.dtype == torch.float32
    assert tuple(out.shape) == expected


def test_preprocess_defaults_are_clip_and_normalise() -> None:
    pre = Preprocess()
    assert (pre.image_size, pre.interpolation, pre.center_crop) == (224, "bicubic", True)
    assert pre.mean == (0.48145466, 0.4578275, 0.40821073) and pre.std == (0.26862954, 0.26130258, 0.27577711)
    out = Preprocess(image_size=8).transform()(Image.new("L", (20, 10), 255))  # white grey image
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    pickle.loads(pickle.dumps(pre.transform()))  # DataLoader workers may pickle it


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 2.5}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"mean": (0.5, math.nan, 0.5)}, "mean"),
        ({"mean": "abc"}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": (0.2, 0.2, -1.0)}, "std"),
        ({"interpolation": "nearest"}, "interpolation"),
        ({"center_crop": "yes"}, "center_crop"),
    ],
)
def test_preprocess_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"Preprocess\.{field}"):
        Preprocess(**kwargs)


def test_preprocess_crop_pct_keeps_the_center() -> None:
    image = Image.new("L", (40, 40), 0)
    image.paste(255, (10, 10, 30, 30))  # a white 20x20 square in the middle of a black image
    white = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    black = torch.tensor([(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    # crop_pct 0.5: resize to 16 px, keep the central 8 px = the white square (edges blur a little)
    center = Preprocess(image_size=8, crop_pct=0.5).transform()(image)
    torch.testing.assert_close(center[:, 2:6, 2:6].mean(dim=(1, 2)), white, atol=0.05, rtol=0)
    # crop_pct 1: the whole image, a quarter of it white
    whole = Preprocess(image_size=8).transform()(image).mean(dim=(1, 2))
    torch.testing.assert_close(whole, 0.25 * white + 0.75 * black, atol=0.1, rtol=0)


@pytest.mark.parametrize("crop_pct", [0, 1.5, True, "0.9"])
def test_preprocess_crop_pct_validation(crop_pct) -> None:
    with pytest.raises(ValueError, match=r"Preprocess\.crop_pct must be a number in \(0, 1\]"):
        Preprocess(crop_pct=crop_pct)


def test_task_uses_its_own_preprocess_else_the_models(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 1, "b": 1})
    model = Preprocess(image_size=12)
    assert tuple(ImageFolderTask(root=str(root)).test_set(model)[0][0].shape) == (3, 12, 12)
    own = ImageFolderTask(root=str(root), preprocess=Preprocess(image_size=6))
    assert tuple(own.test_set(model)[0][0].shape) == (3, 6, 6)
    with pytest.raises(
        ValueError, match=r"ImageFolderTask\(root=.*ds'.*has no eval preprocessing: give the task a `preprocess`"
    ):
        ImageFolderTask(root=str(root)).test_set()
    with pytest.raises(ValueError, match=r"TorchvisionTask\(dataset='mnist'.*has no eval preprocessing"):
        TorchvisionTask(dataset="mnist", root=str(tmp_path)).test_set()


# --------------------------------------------------------------------------------------------- #
# ImageFolderTask on the offline datasets
# --------------------------------------------------------------------------------------------- #


def test_image_folder_mnist(offline_datasets) -> None:
    root = offline_datasets("mnist")
    task = ImageFolderTask(root=str(root / "mnist"), preprocess=Preprocess(image_size=64))
    assert isinstance(task, TaskData)
    assert task.num_classes == 10
    data = task.test_set()
    assert len(data) == 2000
    image, label = data[0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 64, 64)
    assert label == 0 and isinstance(label, int)
    assert data[len(data) - 1][1] == 9
    folders = sorted(p.name for p in (root / "mnist" / "test").iterdir() if p.is_dir())
    assert task.class_folders() == folders
    labels = [label for _, label in data.samples]
    assert labels == sorted(labels)  # class-major
    assert all(path.parent.name == folders[label] for path, label in data.samples)
    names = [line.strip() for line in (root / "mnist" / "classes.txt").read_text().splitlines() if line.strip()]
    assert task.class_names() == names


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "gtsrb"])
def test_image_folder_other_offline_trees(name: str, offline_datasets) -> None:
    task = ImageFolderTask(root=str(offline_datasets(name) / name), preprocess=Preprocess(image_size=16))
    assert task.num_classes == EXPECTED_CLASSES[name]
    assert len(task.class_names()) == task.num_classes
    image, label = task.test_set()[0]
    assert tuple(image.shape) == (3, 16, 16) and label == 0


def test_datamodule_fit_batches_are_label_free(offline_datasets) -> None:
    task = ImageFolderTask(root=str(offline_datasets("mnist") / "mnist"), preprocess=Preprocess(image_size=32))
    datamodule = MultiTaskDataModule({"mnist": task}, batch_size=8, cache="none")
    assert datamodule.num_classes == {"mnist": 10}
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()["mnist"]))
    assert isinstance(batch, torch.Tensor)  # images only: no labels reach the loss
    assert tuple(batch.shape) == (8, 3, 32, 32) and batch.dtype == torch.float32


# --------------------------------------------------------------------------------------------- #
# ImageFolderTask on tiny trees
# --------------------------------------------------------------------------------------------- #


def test_image_folder_tiny_tree_order_and_filtering(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"b_second": 2, "a_first": 1, "c_third": 3})
    write_image(root / "test" / "a_first" / "UPPER.JPG")  # case-insensitive extensions
    write_image(root / "test" / "a_first" / ".hidden.png")  # hidden file: ignored
    (root / "test" / "a_first" / "notes.txt").write_text("not an image")  # other file: ignored
    write_image(root / "test" / ".cache" / "x.png")  # hidden folder: not a class
    (root / "test" / "README").write_text("a file, not a class folder")
    task = ImageFolderTask(root=str(root), preprocess=Preprocess(image_size=8))
    assert task.num_classes == 3
    assert task.class_folders() == ["a_first", "b_second", "c_third"]
    assert task.class_names() == ["a_first", "b_second", "c_third"]  # no classes.txt: folder names
    data = task.test_set()
    assert [label for _, label in (data[i] for i in range(len(data)))] == [0, 0, 1, 1, 2, 2, 2]
    assert [p.name for p, _ in data.samples[:2]] == ["0.png", "UPPER.JPG"]
    copy = pickle.loads(pickle.dumps(data))  # DataLoader workers may pickle the dataset
    torch.testing.assert_close(copy[3][0], data[3][0])
    (root / "classes.txt").write_text("first\nsecond\nthird\n")
    assert ImageFolderTask(root=str(root)).class_names() == ["first", "second", "third"]
    assert ImageFolderTask(root=str(root), class_names_file=None).class_names() == task.class_folders()
    make_tree(root, {"x": 1, "y": 1}, split="train")
    assert ImageFolderTask(root=str(root), split="train", class_names_file=None).num_classes == 2


def test_image_folder_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*root/\{train,test\}/<class>/<images>"):
        ImageFolderTask(root=str(missing)).num_classes


def test_image_folder_missing_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 1}, split="train")
    with pytest.raises(FileNotFoundError, match=r"split folder '.*ds/test' does not exist.*root/\{train,test\}"):
        ImageFolderTask(root=str(root)).test_set(Preprocess())


def test_image_folder_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "ds" / "test").mkdir(parents=True)
    write_image(tmp_path / "ds" / "test" / "loose.png")  # an image not inside a class folder
    with pytest.raises(ValueError, match=r"'.*ds/test' has no class folders.*root/\{train,test\}/<class>"):
        ImageFolderTask(root=str(tmp_path / "ds")).num_classes


def test_image_folder_empty_class(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"cat": 2, "dog": 0})
    (root / "test" / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder 'dog' .*has no images.*root/\{train,test\}/<class>/<images>"):
        ImageFolderTask(root=str(root)).test_set(Preprocess())


def test_image_folder_unreadable_image(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 1, "b": 1})
    broken = root / "test" / "b" / "broken.png"
    broken.write_bytes(b"definitely not a png")
    truncated = root / "test" / "b" / "truncated.png"
    write_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    data = ImageFolderTask(root=str(root), preprocess=Preprocess(image_size=8)).test_set()  # listing is fine
    assert len(data) == 4 and tuple(data[0][0].shape) == (3, 8, 8)
    names = [p.name for p, _ in data.samples]
    with pytest.raises(OSError, match=r"cannot read image file '.*b/broken\.png'"):
        data[names.index("broken.png")]
    with pytest.raises(OSError, match=r"cannot read image file '.*b/truncated\.png'"):
        data[names.index("truncated.png")]


def scaled_to_8_bits(values: np.ndarray) -> np.ndarray:
    """The plain 16 -> 8 bit conversion: round(value * 255 / 65535), in floating point."""
    return np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


def sixteen_bit_values(size: int, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).integers(0, 65536, size=(size, size), dtype=np.uint16)
    values.flat[:6] = [0, 65535, 128, 129, 32767, 257 * 200 + 128]  # extremes and values next to a rounding step
    return values


def test_16_bit_grayscale_files_are_scaled_not_clipped(tmp_path: Path) -> None:
    size = 24
    folder = tmp_path / "ds" / "test" / "a"
    folder.mkdir(parents=True)
    png_values, pgm_values = sixteen_bit_values(size, 0), sixteen_bit_values(size, 1)
    Image.fromarray(png_values).save(folder / "0_png16.png")
    # 16-bit PGM, a format ImageFolderTask reads under .ppm; Pillow opens it as mode "I"
    (folder / "1_pgm16.ppm").write_bytes(f"P5 {size} {size} 65535\n".encode() + pgm_values.astype(">u2").tobytes())
    with Image.open(folder / "0_png16.png") as png, Image.open(folder / "1_pgm16.ppm") as pgm:
        assert (png.mode, pgm.mode) == ("I;16", "I")
    task = ImageFolderTask(root=str(tmp_path / "ds"), preprocess=Preprocess(image_size=size))
    decoded = task.decoded_test_set()
    normalised = task.test_set()
    for index, values in enumerate((png_values, pgm_values)):
        want = torch.from_numpy(scaled_to_8_bits(values)).expand(3, size, size)
        assert torch.equal(decoded[index][0], want)
        assert torch.equal(normalised[index][0], task.preprocess.normalize(want))
        # the clipping this replaces: most pixels far off
        assert (np.minimum(values, 255) != scaled_to_8_bits(values)).mean() > 0.9
    # the decoded test-set cache reads through the same path
    from lit_adamerging.data.cache import decoded_test_set

    stored = decoded_test_set(task, "deep", task.preprocess, tmp_path / "cache")
    assert torch.equal(stored.images[0], torch.from_numpy(scaled_to_8_bits(png_values)).expand(3, size, size))


def test_16_bit_images_in_memory_are_scaled_by_the_preprocessing() -> None:
    values = sixteen_bit_values(16, 2)
    want = torch.from_numpy(scaled_to_8_bits(values)).expand(3, 16, 16)
    decode = Preprocess(image_size=16).decode()
    big_endian = Image.frombytes("I;16B", (16, 16), values.astype(">u2").tobytes())
    for image in (Image.fromarray(values), big_endian, Image.fromarray(values.astype(np.int32))):
        assert image.mode in ("I;16", "I;16B", "I")
        assert torch.equal(decode(image), want), image.mode
    with pytest.raises(ValueError, match=r"pixels from 0 to 70000 are not a 16-bit image"):
        decode(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)))


def test_image_folder_class_names_count_mismatch(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "ds", {"a": 1, "b": 1, "c": 1})
    (root / "classes.txt").write_text("alpha\nbeta\n")
    with pytest.raises(ValueError, match=r"'.*ds/classes\.txt' has 2 names but .* has 3 class folders"):
        ImageFolderTask(root=str(root)).num_classes
    names = tmp_path / "names.txt"  # an absolute names file
    names.write_text("alpha\nbeta\ngamma\n")
    assert ImageFolderTask(root=str(root), class_names_file=str(names)).class_names() == ["alpha", "beta", "gamma"]


def test_tasks_reject_a_preprocess_of_another_type(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"ImageFolderTask\.preprocess must be a Preprocess or None, got dict"):
        ImageFolderTask(root=str(tmp_path), preprocess={"image_size": 32})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"TorchvisionTask\.preprocess must be a Preprocess"):
        TorchvisionTask(dataset="mnist", root=str(tmp_path), preprocess=32)  # type: ignore[arg-type]


@pytest.mark.parametrize("split", ["", "a/b", ".."])
def test_image_folder_bad_split(tmp_path: Path, split: str) -> None:
    with pytest.raises(ValueError, match="ImageFolderTask.split"):
        ImageFolderTask(root=str(tmp_path), split=split)


def test_image_folder_from_config(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    root = make_tree(tmp_path / "ds", {"a": 1, "b": 1})
    parser = ArgumentParser()
    parser.add_argument("--task", type=TaskData)
    config = parser.parse_object(
        {
            "task": {
                "class_path": "lit_adamerging.data.ImageFolderTask",
                "init_args": {"root": str(root), "preprocess": {"image_size": 16, "mean": [0.5, 0.5, 0.5]}},
            }
        }
    )
    task = parser.instantiate_classes(config).task
    assert isinstance(task, ImageFolderTask) and task.preprocess == Preprocess(image_size=16, mean=(0.5, 0.5, 0.5))
    assert tuple(task.test_set()[0][0].shape) == (3, 16, 16)


# --------------------------------------------------------------------------------------------- #
# TorchvisionTask
# --------------------------------------------------------------------------------------------- #


def test_torchvision_num_classes_without_files(tmp_path: Path) -> None:
    assert TORCHVISION_NUM_CLASSES == EXPECTED_CLASSES
    for name, count in EXPECTED_CLASSES.items():
        task = TorchvisionTask(dataset=name, root=str(tmp_path / "does-not-exist"))  # type: ignore[arg-type]
        assert task.num_classes == count
        assert len(task.class_names()) == count
    assert not (tmp_path / "does-not-exist").exists()


def test_torchvision_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TorchvisionTask\.dataset must be one of mnist, .*; got 'imagenet'"):
        TorchvisionTask(dataset="imagenet", root=str(tmp_path))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_torchvision_missing_files(tmp_path: Path, name: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    task = TorchvisionTask(dataset=name, root=str(root))  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError) as info:
        task.test_set(Preprocess())  # the model's preprocessing
    message = str(info.value)
    assert f"dataset {name!r}" in message and str(root) in message and "expected root/" in message
    if name in ("cars", "resisc45"):
        assert "cannot be downloaded automatically" in message
    else:
        assert "download: true" in message
    assert list(root.iterdir()) == []  # nothing was downloaded or created


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The big-endian IDX format torchvision's MNIST reads: magic (0, 0, type 0x08 = ubyte, ndim), dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_mnist_from_idx_files(tmp_path: Path, name: str, folder: str) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    values = [0, 50, 100, 200, 255]
    images = np.stack([np.full((28, 28), v, dtype=np.uint8) for v in values])
    _write_idx(tmp_path / folder / "raw" / "t10k-images-idx3-ubyte", images)
    _write_idx(tmp_path / folder / "raw" / "t10k-labels-idx1-ubyte", labels)
    # torchvision checks that the train files exist too (it does not read them for train=False)
    _write_idx(tmp_path / folder / "raw" / "train-images-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / folder / "raw" / "train-labels-idx1-ubyte", np.array([7, 7], dtype=np.uint8))
    task = TorchvisionTask(dataset=name, root=str(tmp_path), preprocess=Preprocess(image_size=32))
    data = task.test_set()
    assert len(data) == 5
    for index, (value, label) in enumerate(zip(values, labels.tolist())):
        image, got = data[index]
        assert got == label and isinstance(got, int)
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 32, 32)
        expected = torch.tensor([(value / 255 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
        torch.testing.assert_close(image.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)


def test_torchvision_usps_from_bz2(tmp_path: Path) -> None:
    pixels = {1: -1.0, 10: 1.0, 7: 1.0}  # USPS stores pixels in [-1, 1] as "index:value" pairs
    lines = [f"{label} " + " ".join(f"{j + 1}:{value}" for j in range(256)) for label, value in pixels.items()]
    (tmp_path / "usps.t.bz2").write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    data = TorchvisionTask(dataset="usps", root=str(tmp_path), preprocess=Preprocess(image_size=16)).test_set()
    assert [data[i][1] for i in range(3)] == [0, 9, 6]  # USPS labels 1..10 become 0..9
    assert tuple(data[0][0].shape) == (3, 16, 16)


def test_eurosat_split_indices() -> None:
    train, val, test = eurosat_split_indices(27_000)
    assert (len(train), len(val), len(test)) == (21_600, 2_700, 2_700)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test) and set(val).isdisjoint(test)
    assert sorted(train + val + test) == list(range(27_000))
    assert eurosat_split_indices(27_000) == (train, val, test)  # deterministic
    assert eurosat_test_indices(27_000) == test and test == sorted(test)
    assert eurosat_test_indices(27_000, seed=1) != test
    for n in (0, 9, 10, 37, 1000):
        tr, va, te = eurosat_split_indices(n)
        assert (len(va), len(te)) == (n // 10, n // 10) and sorted(tr + va + te) == list(range(n))
    with pytest.raises(ValueError, match="non-negative integer"):
        eurosat_split_indices(-1)


EUROSAT_CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]  # fmt: skip


def test_torchvision_eurosat_fake_tree(tmp_path: Path) -> None:
    per_class = 4
    for name in reversed(EUROSAT_CLASSES):
        for i in range(per_class):
            write_image(tmp_path / "eurosat" / "2750" / name / f"{name}_{i + 1}.jpg", size=(64, 64), value=20 * i)
    task = TorchvisionTask(dataset="eurosat", root=str(tmp_path), preprocess=Preprocess(image_size=16))
    data = task.test_set()
    expected = eurosat_test_indices(10 * per_class)
    assert len(data) == len(expected) == 4
    assert [data[i][1] for i in range(len(data))] == [index // per_class for index in expected]  # sorted folders
    assert tuple(data[0][0].shape) == (3, 16, 16)
    assert task.test_set().indices == data.indices  # deterministic
    for name in EUROSAT_CLASSES[2:]:  # only 2 classes left: labels would not match the 10-way head
        for file in (tmp_path / "eurosat" / "2750" / name).iterdir():
            file.unlink()
        (tmp_path / "eurosat" / "2750" / name).rmdir()
    with pytest.raises(ValueError, match="'eurosat' .* has 2 classes, expected 10"):
        task.test_set()


def _sun397_tree(root: Path) -> list[str]:
    data_dir = root / "SUN397"
    classes = ["/a/abbey", "/b/bar"] + [f"/z/zz_class_{i:03d}" for i in range(395)]
    data_dir.mkdir(parents=True)
    (data_dir / "ClassName.txt").write_text("\n".join(classes) + "\n")
    files = []
    for cls in classes[:2]:
        for i in range(4):
            write_image(data_dir / cls.lstrip("/") / f"sun_{cls[3:]}{i}.jpg")
            files.append(f"{cls}/sun_{cls[3:]}{i}.jpg")
    return files


def test_torchvision_sun397_partition_file(tmp_path: Path) -> None:
    files = _sun397_tree(tmp_path)
    (tmp_path / "SUN397" / "Testing_01.txt").write_text("\n".join([files[5], files[0], files[6]]) + "\n")
    data = TorchvisionTask(dataset="sun397", root=str(tmp_path), preprocess=Preprocess(image_size=8)).test_set()
    assert len(data) == 3 and [data[i][1] for i in range(3)] == [1, 0, 1]
    (tmp_path / "SUN397" / "Testing_01.txt").write_text(files[0] + "\n/b/bar/sun_missing.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 images listed in .*Testing_01\.txt.*sun_missing"):
        TorchvisionTask(dataset="sun397", root=str(tmp_path)).test_set(Preprocess())


def test_torchvision_sun397_fallback_split(tmp_path: Path) -> None:
    _sun397_tree(tmp_path)
    task = TorchvisionTask(dataset="sun397", root=str(tmp_path), preprocess=Preprocess(image_size=8))
    with pytest.warns(UserWarning, match="Testing_01.txt"):
        data = task.test_set()
    assert len(data) == 4 and sorted(data[i][1] for i in range(4)) == [0, 0, 1, 1]  # half of 4 per class
    keys = [f"c{i % 3}/{i}" for i in range(300)]
    labels = [i % 3 for i in range(300)]
    chosen = sun397_test_indices(keys, labels)
    assert len(chosen) == 150 and chosen == sun397_test_indices(keys, labels)
    order = list(reversed(range(300)))  # independent of the order the files were listed in
    again = sun397_test_indices([keys[i] for i in order], [labels[i] for i in order])
    assert sorted(order[i] for i in again) == chosen


def _resisc45_tree(root: Path, num_classes: int = 45) -> list[str]:
    names = [f"class_{i:02d}" for i in range(num_classes)]
    for name in names:
        for i in (1, 2):
            write_image(root / "NWPU-RESISC45" / name / f"{name}_{i:03d}.jpg", size=(16, 16))
    return names


def test_torchvision_resisc45_fake_tree(tmp_path: Path) -> None:
    names = _resisc45_tree(tmp_path)
    task = TorchvisionTask(dataset="resisc45", root=str(tmp_path), preprocess=Preprocess(image_size=8))
    with pytest.raises(FileNotFoundError, match=r"no split file '.*resisc45-test\.txt'.*cannot be downloaded"):
        task.test_set()
    listed = [f"{names[44]}_002.jpg", f"{names[0]}_001.jpg", f"{names[7]}/{names[7]}_001.jpg", ""]
    (tmp_path / "resisc45-test.txt").write_text("\n".join(listed) + "\n")
    data = task.test_set()
    assert len(data) == 3 and [data[i][1] for i in range(3)] == [44, 0, 7]
    assert tuple(data[0][0].shape) == (3, 8, 8)
    (tmp_path / "resisc45-test.txt").write_text(f"{names[0]}_001.jpg\nclass_00_999.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 images listed in .*resisc45-test\.txt.*class_00_999"):
        task.test_set()


def test_torchvision_resisc45_wrong_class_count(tmp_path: Path) -> None:
    _resisc45_tree(tmp_path, num_classes=3)
    (tmp_path / "resisc45-test.txt").write_text("class_00_001.jpg\n")
    with pytest.raises(ValueError, match=r"NWPU-RESISC45' has 3 class folders, expected 45"):
        TorchvisionTask(dataset="resisc45", root=str(tmp_path)).test_set(Preprocess())


def test_torchvision_dtd_and_gtsrb_fake_files(tmp_path: Path) -> None:
    dtd = tmp_path / "dtd" / "dtd"
    classes = [f"texture{i:02d}" for i in range(47)]
    for name in classes:
        write_image(dtd / "images" / name / f"{name}_0001.jpg")
    (dtd / "labels").mkdir()
    (dtd / "labels" / "test1.txt").write_text("\n".join(f"{name}/{name}_0001.jpg" for name in reversed(classes)))
    data = TorchvisionTask(dataset="dtd", root=str(tmp_path), preprocess=Preprocess(image_size=8)).test_set()
    assert len(data) == 47 and data[0][1] == 46 and tuple(data[0][0].shape) == (3, 8, 8)

    images = tmp_path / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    write_image(images / "00000.ppm")
    write_image(images / "00001.ppm")
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
        "00000.ppm;10;12;0;0;9;11;42\n"
        "00001.ppm;10;12;0;0;9;11;7\n"
    )
    data = TorchvisionTask(dataset="gtsrb", root=str(tmp_path), preprocess=Preprocess(image_size=8)).test_set()
    assert [data[0][1], data[1][1]] == [42, 7] and tuple(data[1][0].shape) == (3, 8, 8)


# --------------------------------------------------------------------------------------------- #
# TorchvisionTask against torchvision's own datasets, on files laid out as torchvision lays them out
# --------------------------------------------------------------------------------------------- #

SUN397_CLASSES = ["/a/abbey", "/b/bakery/shop", "/o/ocean"] + [f"/z/zz_class_{i:03d}" for i in range(394)]


def _sun397_sized_tree(root: Path, per_class: tuple[int, ...] = (5, 2, 7)) -> dict[tuple[int, int], str]:
    """SUN397's layout (``ClassName.txt``, ``SUN397/<letter>/<class>/sun_<id>.jpg``, classes nested two deep too),
    every image of its own size; returns ``{image size: key}`` (the path under ``SUN397``)."""
    data_dir = root / "SUN397"
    data_dir.mkdir(parents=True)
    (data_dir / "ClassName.txt").write_text("\n".join(SUN397_CLASSES) + "\n")
    keys = {}
    for label, count in enumerate(per_class):
        folder = SUN397_CLASSES[label].lstrip("/")
        for i in range(count):
            size = (8 + label, 8 + i)
            write_image(data_dir / folder / f"sun_{label}{i:03d}.jpg", size=size, value=20 * label + 10 * i)
            keys[size] = f"{folder}/sun_{label}{i:03d}.jpg"
    write_image(data_dir / "a" / "abbey" / "thumb_0.jpg")  # not sun_*.jpg: neither lists it
    write_image(data_dir / "a" / "abbey" / "sun_0.png")
    (data_dir / "README.txt").write_text("not an image")
    return keys


def _torchvision_items(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def _assert_same_items(ours, reference) -> None:
    assert len(ours) == len(reference)
    for (image, label), (expected, expected_label) in zip(ours, reference):
        assert label == expected_label and isinstance(label, int)
        assert torch.equal(image, expected)


@pytest.mark.parametrize("partition", [False, True])
def test_sun397_lists_the_files_torchvision_lists_in_its_order(tmp_path: Path, partition: bool) -> None:
    from torchvision.datasets import SUN397

    keys_by_size = _sun397_sized_tree(tmp_path)
    preprocess = Preprocess(image_size=8)
    raw = _torchvision_items(SUN397(str(tmp_path)))  # PIL images: the size tells the file
    keys = [keys_by_size[image.size] for image, _ in raw]
    labels = [label for _, label in raw]
    assert sorted(keys) == sorted(keys_by_size.values())
    reference = _torchvision_items(SUN397(str(tmp_path), transform=preprocess.transform()))
    if partition:
        listed = [keys[9], keys[0], keys[13], keys[4]]
        (tmp_path / "Testing_01.txt").write_text("\n".join(f"/{key}" for key in listed) + "\n")
        expected = [keys.index(key) for key in listed]
        data = TorchvisionTask("sun397", str(tmp_path), preprocess=preprocess).test_set()
    else:
        expected = sun397_test_indices(keys, labels)
        with pytest.warns(UserWarning, match="Testing_01.txt"):
            data = TorchvisionTask("sun397", str(tmp_path), preprocess=preprocess).test_set()
    assert data.indices == expected
    _assert_same_items([data.dataset[i] for i in range(len(data.dataset))], reference)  # same files, same order
    _assert_same_items([data[i] for i in range(len(data))], [reference[i] for i in expected])


def test_sun397_without_its_files(tmp_path: Path) -> None:
    task = TorchvisionTask("sun397", str(tmp_path), preprocess=Preprocess(image_size=8))
    with pytest.raises(FileNotFoundError, match=r"dataset 'sun397' not found .*no folder '.*SUN397'"):
        task.test_set()
    (tmp_path / "SUN397").mkdir()
    with pytest.raises(FileNotFoundError, match=r"dataset 'sun397' not found .*ClassName\.txt"):
        task.test_set()
    (tmp_path / "SUN397" / "ClassName.txt").write_text("/a/abbey\n")
    with pytest.raises(ValueError, match=r"'sun397' .* has 1 classes, expected 397"):
        task.test_set()


def _gtsrb_files(root: Path) -> None:
    images = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate([42, 7, 0, 7]):
        write_image(images / f"{i:05d}.ppm", size=(10 + i, 12), value=30 * i)
        rows.append(f"{i:05d}.ppm; 10;12;0;0;9;11; {label}")  # torchvision skips the spaces after ';'
    (root / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def _dtd_files(root: Path) -> None:
    dtd = root / "dtd" / "dtd"
    classes = [f"texture{i:02d}" for i in range(47)]
    for i, name in enumerate(classes):
        # Pillow reads the content, not the extension: grey, palette and RGBA images among the JPEGs
        mode = ("L", "P", "RGBA", "RGB")[i % 4]
        color = 3 * i if mode in ("L", "P") else (3 * i, 90, 200, 128)[: len(mode)]
        (dtd / "images" / name).mkdir(parents=True)
        image = Image.new(mode, (9 + i % 5, 11), color)
        image.save(dtd / "images" / name / f"{name}_0001.jpg", format="JPEG" if mode == "RGB" else "PNG")
    (dtd / "labels").mkdir()
    (dtd / "labels" / "test1.txt").write_text("\n".join(f"{name}/{name}_0001.jpg" for name in reversed(classes)))


def _cars_files(root: Path) -> None:
    from scipy import io

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([f"car {i}" for i in range(196)],
                                                                          dtype=object)})
    annotations = np.array([(f"{i:05d}.jpg", label) for i, label in enumerate([196, 1, 50])],
                           dtype=[("fname", object), ("class", object)])
    io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    for i in range(3):
        write_image(base / "cars_test" / f"{i:05d}.jpg", size=(10 + i, 12), value=40 * i)


def _eurosat_files(root: Path) -> None:
    for c, name in enumerate(EUROSAT_CLASSES):
        for i in range(2):
            write_image(root / "eurosat" / "2750" / name / f"{name}_{i + 1}.jpg", size=(8 + i, 9), value=20 * c)


TORCHVISION_LAYOUTS = {  # the files, and torchvision's class and arguments for the test split
    "gtsrb": (_gtsrb_files, "GTSRB", {"split": "test"}),
    "dtd": (_dtd_files, "DTD", {"split": "test", "partition": 1}),
    "cars": (_cars_files, "StanfordCars", {"split": "test"}),
    "eurosat": (_eurosat_files, "EuroSAT", {}),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION_LAYOUTS))
def test_image_files_are_read_as_torchvision_reads_them(tmp_path: Path, name: str) -> None:
    import torchvision

    write_files, cls, kwargs = TORCHVISION_LAYOUTS[name]
    write_files(tmp_path)
    preprocess = Preprocess(image_size=8)
    dataset = getattr(torchvision.datasets, cls)(str(tmp_path), transform=preprocess.transform(), **kwargs)
    reference = _torchvision_items(dataset)
    data = TorchvisionTask(name, str(tmp_path), preprocess=preprocess).test_set()  # type: ignore[arg-type]
    _assert_same_items([data.dataset[i] for i in range(len(data.dataset))], reference)
    indices = eurosat_test_indices(len(reference)) if name == "eurosat" else list(range(len(reference)))
    _assert_same_items([data[i] for i in range(len(data))], [reference[i] for i in indices])
    copy = pickle.loads(pickle.dumps(data))  # DataLoader workers may pickle the dataset
    _assert_same_items([copy[0]], [data[0]])


def _first_file(root: Path, name: str) -> Path:
    """The file of the first test item of ``name`` in the layouts above."""
    if name == "gtsrb":
        return root / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00000.ppm"
    if name == "dtd":
        return root / "dtd" / "dtd" / "images" / "texture46" / "texture46_0001.jpg"
    if name == "cars":
        return root / "stanford_cars" / "cars_test" / "00000.jpg"
    first = eurosat_test_indices(20)[0]
    folder = EUROSAT_CLASSES[first // 2]
    return root / "eurosat" / "2750" / folder / f"{folder}_{first % 2 + 1}.jpg"


@pytest.mark.parametrize("name", [*sorted(TORCHVISION_LAYOUTS), "sun397"])
def test_an_unreadable_torchvision_file_is_named_with_its_item(tmp_path: Path, name: str) -> None:
    if name == "sun397":
        from torchvision.datasets import SUN397

        keys = _sun397_sized_tree(tmp_path)
        (tmp_path / "Testing_01.txt").write_text(f"/{keys[(9, 9)]}\n/{keys[(8, 8)]}\n")
        bad = tmp_path / "SUN397" / keys[(9, 9)]
        item = [image.size for image, _ in _torchvision_items(SUN397(str(tmp_path)))].index((9, 9))  # torchvision's
    else:
        TORCHVISION_LAYOUTS[name][0](tmp_path)
        bad = _first_file(tmp_path, name)
        item = eurosat_test_indices(20)[0] if name == "eurosat" else 0
    bad.write_bytes(b"definitely not an image")
    data = TorchvisionTask(name, str(tmp_path), preprocess=Preprocess(image_size=8)).test_set()  # type: ignore[arg-type]
    expected = rf"cannot read image file '{bad}' \(item {item} of torchvision's dataset\): .*replace it with an intact"
    with pytest.raises(ImageReadError, match=expected) as info:
        data[0]
    assert isinstance(info.value.__cause__, OSError)  # Pillow's own error, kept as the cause
