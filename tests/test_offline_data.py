"""Where the offline benchmark's datasets are found, and the torchvision download path (no network).

Torchvision's raw files are faked exactly as its own download leaves them (IDX files, pickled
CIFAR batches, GTSRB's .ppm folders and test CSV), with few, distinct random images, so the
builder runs torchvision's real readers; the network is cut off in every test.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_adamerging.data import offline
from lit_adamerging.data.datasets import ImageFolderTask
from lit_adamerging.data.offline import (
    DATA_ENV,
    MARKER,
    DataNotFoundError,
    checkout_datasets_dir,
    default_cache_dir,
    download_datasets,
    find_data_root,
    has_dataset,
)
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.prompts import class_names

NAMES = ("mnist", "fashion_mnist", "cifar10", "gtsrb")
SIZES = {"mnist": (7, 5), "fashion_mnist": (7, 5), "cifar10": (8, 6), "gtsrb": (9, 6)}
GREY = {"mnist": True, "fashion_mnist": True, "cifar10": False, "gtsrb": False}
SIDE = {"mnist": 28, "fashion_mnist": 28, "cifar10": 32, "gtsrb": 32}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every URL torchvision opens fails as it does offline; no test depends on the user's settings."""

    def offline_urlopen(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline_urlopen)
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setattr(offline, "checkout_datasets_dir", lambda package_dir=None: None)


# --------------------------------------------------------------------------------------------- #
# Torchvision's files as its download leaves them. Each returns {split: [(expected HxW[xC] uint8, label)]}
# in split order: the image a PNG of that split must decode to.
# --------------------------------------------------------------------------------------------- #


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic (0, 0, 0x08 = unsigned byte, number of dimensions), big-endian dimensions, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(raw: Path, folder: str, rng: np.random.Generator) -> dict[str, list[tuple[np.ndarray, int]]]:
    result = {}
    for split, prefix, count in (("train", "train", 20), ("test", "t10k", 12)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)  # every digit in each split
        _write_idx(raw / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        result[split] = [(image, int(label)) for image, label in zip(images, labels, strict=True)]
    return result


def _fake_cifar10(raw: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Five train batches and a test batch of pickled dicts; torchvision's md5 list set to these files."""
    from torchvision.datasets import CIFAR10

    folder = raw / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    result: dict[str, list] = {"train": [], "test": []}
    md5: dict[str, str] = {}
    for file, split, count in [*((f"data_batch_{i}", "train", 4) for i in range(1, 6)), ("test_batch", "test", 15)]:
        images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count).tolist()
        rows = images.transpose(0, 3, 1, 2).reshape(count, 3072)  # CIFAR stores the red, green, blue planes
        (folder / file).write_bytes(pickle.dumps({"batch_label": file, "labels": labels, "data": rows}))
        result[split] += list(zip(images, labels, strict=True))
        md5[file] = hashlib.md5((folder / file).read_bytes()).hexdigest()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane"] + ["x"] * 9}))
    md5["batches.meta"] = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return result


def _fake_gtsrb(raw: Path, rng: np.random.Generator) -> dict[str, list]:
    """Training/<class>/*.ppm (32x32 random images; two classes hold two), Final_Test/Images/*.ppm of
    varying sizes in one colour each (resized, they stay that colour) and GT-final_test.csv."""
    base = raw / "gtsrb"
    result: dict[str, list] = {"train": [], "test": []}
    for label in range(43):
        for track in range(2 if label in (5, 42) else 1):
            image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            folder = base / "GTSRB" / "Training" / f"{label:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{track:05d}_00000.ppm")
            result["train"].append((image, label))
        (base / "GTSRB" / "Training" / f"{label:05d}" / f"GT-{label:05d}.csv").write_text("not an image\n")
    images = base / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for index in range(14):
        width, height = (int(v) for v in rng.integers(20, 60, size=2))
        colour = np.array([index * 17 % 256, 255 - index, 40 + index], dtype=np.uint8)
        label = int(rng.integers(0, 43))
        Image.fromarray(np.broadcast_to(colour, (height, width, 3)).copy()).save(images / f"{index:05d}.ppm")
        rows.append(f"{index:05d}.ppm;{width};{height};5;5;{width - 5};{height - 5};{label}")
        result["test"].append((np.broadcast_to(colour, (32, 32, 3)), label))
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return result


def fake_raw(name: str, cache: Path, monkeypatch: pytest.MonkeyPatch, seed: int = 0) -> dict[str, list]:
    raw, rng = cache / "torchvision", np.random.default_rng(seed)
    if name in ("mnist", "fashion_mnist"):
        return _fake_mnist(raw, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name], rng)
    if name == "cifar10":
        return _fake_cifar10(raw, rng, monkeypatch)
    return _fake_gtsrb(raw, rng)


def png_files(tree: Path, split: str) -> list[Path]:
    return sorted((tree / split).glob("*/*"))


def tree_bytes(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def make_tree(root: Path, names: tuple[str, ...] | list[str], marker: bool = False) -> Path:
    """Empty ImageFolder-shaped trees (train/test folders): enough for the search, which reads no image."""
    for name in names:
        (root / name / "train").mkdir(parents=True)
        (root / name / "test").mkdir()
        if marker:
            (root / name / MARKER).write_text("{}\n")
    return root


# --------------------------------------------------------------------------------------------- #
# The download path
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", NAMES)
def test_downloaded_tree_is_the_offline_layout_with_the_source_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    cache = tmp_path / "cache"
    source = fake_raw(name, cache, monkeypatch)
    assert download_datasets([name], cache, sizes=SIZES) == cache
    tree = cache / name
    names = class_names(name)
    assert (tree / "classes.txt").read_text(encoding="utf-8") == "".join(f"{n}\n" for n in names)
    folders = [f"{label:02d}_{re.sub(r'[^a-z0-9]+', '_', n.lower()).strip('_')}" for label, n in enumerate(names)]
    assert sorted(p.name for p in tree.iterdir()) == sorted([MARKER, "SOURCE.md", "classes.txt", "test", "train"])
    matched = {}
    for split, size in zip(("train", "test"), SIZES[name], strict=True):
        assert sorted(p.name for p in (tree / split).iterdir()) == folders  # every class, even without images
        files = png_files(tree, split)
        assert len(files) == size
        assert sorted(p.name for p in files) == [f"{i:05d}.png" for i in range(size)]
        by_pixels = {image.tobytes(): (index, label) for index, (image, label) in enumerate(source[split])}
        assert len(by_pixels) == len(source[split])  # the fake images are distinct
        indices = {}
        for path in files:
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == ("L" if GREY[name] else "RGB")
                assert image.size == (SIDE[name], SIDE[name])
                pixels = np.asarray(image)
            index, label = by_pixels[pixels.tobytes()]  # KeyError: not an image of this split
            assert path.parent.name == folders[label]
            indices[int(path.stem)] = index
        assert len(set(indices.values())) == size  # no source image twice
        assert [indices[i] for i in range(size)] == sorted(indices.values())  # file order = split order
        matched[split] = by_pixels
    assert not set(matched["train"]) & set(matched["test"])  # so each lookup above proves the PNG's split
    assert has_dataset(cache, name, require_marker=True)


def test_the_library_reads_a_downloaded_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = fake_raw("mnist", tmp_path, monkeypatch)
    download_datasets(["mnist"], tmp_path, sizes={"mnist": (20, 12)})  # whole splits: every class has images
    for split in ("train", "test"):
        task = ImageFolderTask(root=str(tmp_path / "mnist"), split=split, preprocess=Preprocess(image_size=28))
        assert task.class_names() == class_names("mnist")
        data = task.test_set()
        assert sorted(int(data[i][1]) for i in range(len(data))) == sorted(label for _, label in source[split])


def test_gtsrb_class_folders_and_names_match_the_offline_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_raw("gtsrb", tmp_path, monkeypatch)
    download_datasets(["gtsrb"], tmp_path, sizes=SIZES)
    folders = sorted(p.name for p in (tmp_path / "gtsrb" / "train").iterdir())
    assert len(folders) == 43
    assert folders[10] == "10_no_passing_for_vehicles_over_3_5_tons"
    assert folders[11] == "11_right_of_way_at_the_next_intersection"
    assert (tmp_path / "gtsrb" / "classes.txt").read_text().splitlines()[0] == "speed limit 20 km/h"


@pytest.mark.parametrize("name", NAMES)
def test_downloaded_tree_matches_the_shared_offline_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, offline_datasets
) -> None:
    shared = offline_datasets(name)  # session-scoped: found before no_network hides the user's settings
    fake_raw(name, tmp_path, monkeypatch)
    download_datasets([name], tmp_path, sizes=SIZES)
    ours = tmp_path / name
    assert (ours / "classes.txt").read_bytes() == (shared / name / "classes.txt").read_bytes()
    for split in ("train", "test"):
        assert sorted(p.name for p in (ours / split).iterdir()) == sorted(
            p.name for p in (shared / name / split).iterdir()
        )
        theirs = next((shared / name / split).glob("*/*.png"))
        with Image.open(theirs) as a, Image.open(png_files(ours, split)[0]) as b:
            assert (a.mode, a.size) == (b.mode, b.size)
        assert len(theirs.stem) == len(png_files(ours, split)[0].stem)


def test_download_is_deterministic_and_follows_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trees = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        fake_raw("cifar10", tmp_path / run, monkeypatch)  # the same raw files (seeded fakes)
        download_datasets(["cifar10"], tmp_path / run, sizes=SIZES, seed=seed)
        trees[run] = tree_bytes(tmp_path / run / "cifar10")
    assert trees["a"] == trees["b"]
    pngs = {run: {k: v for k, v in tree.items() if k.endswith(".png")} for run, tree in trees.items()}
    assert set(pngs["c"].values()) != set(pngs["a"].values())


def test_subset_sizes_and_labels_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_raw("mnist", tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=r"mnist: the test subset has 13 images, but torchvision's test split only 12"):
        download_datasets(["mnist"], tmp_path, sizes={"mnist": (5, 13)})
    for pair in [None, (5,), (5, 0), (5, 2.0), (True, 2)]:
        with pytest.raises(ValueError, match=r"sizes\['mnist'\] must be \(train, test\) positive image counts"):
            download_datasets(["mnist"], tmp_path, sizes={"mnist": pair} if pair else {"cifar10": (5, 5)})
    with pytest.raises(ValueError, match=r"cannot download \['svhn'\]; choose from mnist, fashion_mnist, cifar10"):
        download_datasets(["svhn"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchvision"]
    fake_raw("gtsrb", tmp_path, monkeypatch)
    csv = tmp_path / "torchvision" / "gtsrb" / "GT-final_test.csv"
    csv.write_text(re.sub(r";\d+\n", ";43\n", csv.read_text()))  # GTSRB has classes 0..42
    with pytest.raises(ValueError, match=r"GTSRB test image \d+ has label 43, not in \[0, 43\); its files under"):
        download_datasets(["gtsrb"], tmp_path, sizes=SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchvision"]


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_offline_download_fails_naming_the_other_options(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataNotFoundError) as caught:
        find_data_root([name], cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "--data-root" in message and DATA_ENV in message and "beside a source checkout" in message
    assert f"{tmp_path / 'cache'} lacks ['{name}']" in message
    assert "simulated: no network" in message  # torchvision's own exception, named
    expected = RuntimeError if name == "mnist" else urllib.error.URLError  # MNIST wraps its mirrors' errors
    assert isinstance(caught.value.__cause__, expected)
    assert f"{type(caught.value.__cause__).__name__}: " in message
    assert not (tmp_path / "cache" / name).exists()


# --------------------------------------------------------------------------------------------- #
# Search order
# --------------------------------------------------------------------------------------------- #


def test_search_order_explicit_env_checkout_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["mnist", "gtsrb"]
    explicit, env, beside = (make_tree(tmp_path / place, names) for place in ("explicit", "env", "beside"))
    cache = make_tree(tmp_path / "cache", names, marker=True)
    monkeypatch.setattr(offline, "checkout_datasets_dir", lambda package_dir=None: beside)
    monkeypatch.setenv(DATA_ENV, str(env))
    assert find_data_root(names, explicit, cache_dir=cache) == explicit
    assert find_data_root(names, cache_dir=cache) == env
    monkeypatch.setenv(DATA_ENV, "")  # empty counts as unset
    assert find_data_root(names, cache_dir=cache) == beside
    (beside / "gtsrb" / "test").rmdir()  # beside the checkout, but incomplete: the cache has both
    assert find_data_root(names, cache_dir=cache) == cache
    (cache / "gtsrb" / MARKER).unlink()  # a cache tree without its marker is not complete
    with pytest.raises(DataNotFoundError, match=r"(?s)lacks \['gtsrb'\].*lacks \['gtsrb'\]"):
        find_data_root(names, cache_dir=cache, download=False)


def test_chosen_roots_must_hold_every_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path / "data", ["mnist"])
    make_tree(tmp_path / "cache", ["mnist", "cifar10"], marker=True)  # never a fallback for a chosen root
    with pytest.raises(
        DataNotFoundError,
        match=r"data_root argument \(--data-root\) names '.*data', which has no "
        r"ImageFolder tree for \['cifar10'\].*holds the folders \['mnist'\]",
    ):
        find_data_root(["mnist", "cifar10"], root, cache_dir=tmp_path / "cache")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match=rf"environment variable {DATA_ENV} names '.*nowhere'.*not a folder"):
        find_data_root(["mnist"], cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="name each dataset once"):
        find_data_root(["mnist", "mnist"], root)


def test_nothing_found_lists_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataNotFoundError) as caught:
        find_data_root(["mnist", "svhn"], cache_dir=tmp_path / "cache", download=False)
    message = str(caught.value)
    assert f"{DATA_ENV}: not set" in message
    assert "beside the checkout: the package is not imported from a source checkout" in message
    assert f"the download cache: {tmp_path / 'cache'} lacks ['mnist', 'svhn']" in message
    assert "downloading is off" in message
    monkeypatch.setattr(offline, "checkout_datasets_dir", lambda package_dir=None: make_tree(tmp_path / "b", ["mnist"]))
    with pytest.raises(
        DataNotFoundError, match=r"b lacks \['svhn'\](?s:.*)\['svhn'\] cannot be downloaded \(only mnist, "
    ):
        find_data_root(["mnist", "svhn"], cache_dir=tmp_path / "cache")


def test_download_fills_the_cache_with_what_it_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_tree(tmp_path / "cache", ["cifar10"], marker=True)  # cifar10 is not read again
    monkeypatch.setattr(offline, "checkout_datasets_dir", lambda package_dir=None: make_tree(tmp_path / "b", ["mnist"]))
    fake_raw("mnist", cache, monkeypatch)
    assert find_data_root(["mnist", "cifar10"], cache_dir=cache, sizes=SIZES) == cache
    assert len(png_files(cache / "mnist", "train")) == SIZES["mnist"][0]
    assert not any((cache / "cifar10" / "train").iterdir())


def test_checkout_is_recognised_only_by_its_setup_cfg(tmp_path: Path) -> None:
    repo = Path(offline.__file__).resolve().parents[2]
    beside = repo.parent / "shared" / "datasets" if (repo / "setup.cfg").is_file() else None
    assert checkout_datasets_dir() == beside  # from a checkout (the tests' usual place), or None when installed
    site = tmp_path / "site-packages" / "lit_adamerging"
    site.mkdir(parents=True)
    assert checkout_datasets_dir(site) is None  # an installed wheel: nothing beside it
    (tmp_path / "site-packages" / "setup.cfg").write_text("[metadata]\nname = another_project\n")
    assert checkout_datasets_dir(site) is None
    (tmp_path / "site-packages" / "setup.cfg").write_text("[metadata]\nname = lit_adamerging\n")
    assert checkout_datasets_dir(site) == tmp_path / "shared" / "datasets"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "lit_adamerging" / "datasets"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lit_adamerging" / "datasets"


# --------------------------------------------------------------------------------------------- #
# Half-written trees
# --------------------------------------------------------------------------------------------- #


def test_an_interrupted_download_leaves_no_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_raw("mnist", tmp_path, monkeypatch)
    save, calls = Image.Image.save, []

    def failing_save(self: Image.Image, *args: object, **kwargs: object) -> None:
        calls.append(args[0])
        if len(calls) == 4:
            raise OSError("disk full")
        save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        download_datasets(["mnist"], tmp_path, sizes=SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["torchvision"]  # neither the tree nor its temporary folder
    with pytest.raises(DataNotFoundError, match="downloading is off"):
        find_data_root(["mnist"], cache_dir=tmp_path, download=False)


def test_a_killed_writers_folder_is_never_used_and_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32]
    leftover = tmp_path / f".mnist.{host}.{int(ended.stdout)}.0123456789abcdef.tmp"  # as a killed writer leaves it
    make_tree(leftover, ["mnist"], marker=True)
    assert not has_dataset(tmp_path, "mnist", require_marker=True)
    fake_raw("mnist", tmp_path, monkeypatch)
    download_datasets(["mnist"], tmp_path, sizes=SIZES)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "torchvision"]


def test_a_cache_tree_without_its_marker_is_neither_used_nor_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, ["mnist"])
    (tmp_path / "mnist" / "train" / "00_0").mkdir()
    fake_raw("mnist", tmp_path, monkeypatch)
    assert not has_dataset(tmp_path, "mnist", require_marker=True) and has_dataset(tmp_path, "mnist")
    with pytest.raises(
        FileExistsError,
        match=rf"mnist exists but was not written completely by lit_adamerging "
        rf"\(no {re.escape(MARKER)} in it\): it is not used\. Remove it to download mnist again",
    ):
        find_data_root(["mnist"], cache_dir=tmp_path, sizes=SIZES)
    assert (tmp_path / "mnist" / "train" / "00_0").is_dir() and not (tmp_path / "mnist" / MARKER).exists()


@pytest.mark.parametrize("complete", [True, False])
def test_a_tree_written_meanwhile_by_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, complete: bool
) -> None:
    fake_raw("mnist", tmp_path, monkeypatch)
    save = Image.Image.save

    def save_after_the_other_writer(self: Image.Image, *args: object, **kwargs: object) -> None:
        if not (tmp_path / "mnist").exists():  # the other process renames its finished tree into place first
            make_tree(tmp_path, ["mnist"], marker=complete)
        save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_after_the_other_writer)
    if complete:
        assert download_datasets(["mnist"], tmp_path, sizes=SIZES) == tmp_path
    else:
        with pytest.raises(FileExistsError, match=r"mnist already exists; the folder written next to it was discarded"):
            download_datasets(["mnist"], tmp_path, sizes=SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist", "torchvision"]  # no temporary folder left
    assert not any((tmp_path / "mnist" / "train").iterdir())  # the other writer's tree, untouched
