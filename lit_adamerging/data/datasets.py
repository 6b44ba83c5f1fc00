"""Real image datasets as tasks: offline ImageFolder trees and the AdaMerging paper's test splits.

Each task reads images with the eval preprocessing of the merged model: by default the one the
model zoo reports (:meth:`ModelZoo.preprocess`, passed in by :class:`MultiTaskDataModule`), or a
:class:`~lit_adamerging.models.preprocess.Preprocess` given to the task.

* :class:`ImageFolderTask` reads ``root/{train,test}/<class>/<images>`` trees such as the offline
  datasets under ``/work/shared/datasets``; labels follow the sorted class folder names.
* :class:`TorchvisionTask` builds the test split the paper evaluates on (and adapts the merge on)
  for MNIST, Fashion-MNIST, CIFAR-10, GTSRB, USPS, SVHN, EuroSAT, DTD, SUN397, Stanford Cars and
  RESISC45, through torchvision where torchvision has the dataset.

Splits that torchvision does not define are fixed here, deterministically and independent of the
library versions (indices are ranked by the SHA-256 of ``"<seed>:<key>"``, no RNG involved):

* EuroSAT: the 27,000 images (in torchvision's sorted ImageFolder order) are split 80/10/10 into
  21,600 / 2,700 / 2,700 train/val/test images with :data:`EUROSAT_SPLIT_SEED`; see
  :func:`eurosat_split_indices`.
* SUN397: the official ``Testing_01.txt`` partition file (19,850 images, 50 per class) when it is
  found in ``root``; otherwise (with a warning) 50 images per class chosen with
  :data:`SUN397_SPLIT_SEED` (fewer for classes under 100 images: half of them); see
  :func:`sun397_test_indices`.
* RESISC45: the published ``resisc45-test.txt`` split file (6,300 images), which must be in ``root``.

Any of these tasks can corrupt its test images with one of ImageNet-C's corruptions
(``corruption="motion_blur", severity=3``; see :mod:`lit_adamerging.data.corruptions`): each image
is corrupted after the resize and crop, the same way in every run, and the decoded test-set cache
keeps the corrupted split.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from abc import abstractmethod
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from PIL import Image
from torch.utils.data import Dataset

from lit_adamerging.data.corruptions import (
    MIN_IMAGE_SIZE,
    CorruptedImages,
    CorruptionName,
    check_corruption,
    corruption_library,
)
from lit_adamerging.data.tasks import TaskData
from lit_adamerging.models.preprocess import Preprocess, to_rgb
from lit_adamerging.models.prompts import class_names as _prompt_class_names
from lit_adamerging.models.prompts import read_class_names

__all__ = [
    "EUROSAT_SPLIT_SEED",
    "IMAGE_EXTENSIONS",
    "SUN397_SPLIT_SEED",
    "TORCHVISION_NUM_CLASSES",
    "ImageFileTask",
    "ImageFolderTask",
    "ImageReadError",
    "TorchvisionTask",
    "eurosat_split_indices",
    "eurosat_test_indices",
    "fingerprint",
    "read_rgb",
    "sun397_test_indices",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
"""Image file extensions read by :class:`ImageFolderTask` (compared case-insensitively)."""

EUROSAT_SPLIT_SEED = 0
"""Seed of the fixed EuroSAT train/val/test split (:func:`eurosat_split_indices`)."""

SUN397_SPLIT_SEED = 0
"""Seed of the fallback SUN397 test split used when no partition file is found."""

_LAYOUT = "root/{train,test}/<class>/<images>"


def _check_preprocess(owner: str, preprocess: Any) -> Preprocess | None:
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise TypeError(f"{owner}.preprocess must be a Preprocess or None, got {type(preprocess).__name__}.")
    return preprocess


def fingerprint(*paths: Path) -> str:
    """SHA-256 of the names, sizes and modification times of every file under ``paths`` (files or folders).

    Symbolic links are followed, to files and to folders: a file is keyed by its target's real path, size
    and time, so a task whose class folder links elsewhere gets a new fingerprint when the images behind
    the link change or the link is pointed elsewhere.
    """
    digest = hashlib.sha256()
    for top in paths:
        top = top.expanduser()
        for path in _files_under(top):
            stat = path.stat()  # follows links: the target's size and time
            shown = path.relative_to(top.parent).as_posix()
            digest.update(f"{shown}\0{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _files_under(top: Path) -> list[Path]:
    """``top`` if it is a file, else the files under it in sorted order, through linked folders (each folder
    once, so a link back up the tree cannot loop)."""
    if top.is_file():
        return [top]
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, names in os.walk(top, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders.sort()
        files.extend(path for path in (Path(folder) / name for name in names) if path.is_file())
    return sorted(files)


class ImageFileTask(TaskData):
    """A task whose test split is read from image files, with a :class:`Preprocess` (its own or the model's).

    Besides :meth:`test_set` it offers :meth:`decoded_test_set` (resized, and corrupted if the task
    has a ``corruption``, uint8 images: what the decoded test-set cache stores), :meth:`source_key`
    (what identifies its files) and :meth:`corruption_settings` (what identifies the corruption).
    """

    preprocess: Preprocess | None
    corruption: str | None = None
    severity: int | None = None
    corruption_seed: int = 0

    def _set_corruption(self, corruption: str | None, severity: int | None, corruption_seed: int) -> None:
        """Check and keep the corruption settings (so a bad config fails before anything is read)."""
        owner = type(self).__name__
        check_corruption(corruption, severity, owner)
        if isinstance(corruption_seed, bool) or not isinstance(corruption_seed, int):
            raise ValueError(f"{owner}.corruption_seed must be an integer, got {corruption_seed!r}.")
        self.corruption, self.severity, self.corruption_seed = corruption, severity, corruption_seed

    def chosen_preprocess(self, model_preprocess: Preprocess | None = None) -> Preprocess:
        """The task's own preprocessing if it has one, else ``model_preprocess``; an error if neither is known."""
        chosen = self.preprocess or model_preprocess
        if chosen is None:
            raise ValueError(
                f"{self!r} has no eval preprocessing: give the task a `preprocess`, or run it through "
                "MultiTaskDataModule under a Trainer with a model whose zoo reports one (ModelZoo.preprocess)."
            )
        return _check_preprocess(type(self).__name__, chosen)  # type: ignore[return-value]

    def test_set(self, preprocess: Preprocess | None = None) -> Dataset:
        """The test split as ``(float tensor [3, S, S], int label)`` items: :meth:`decoded_test_set` normalised.

        ``preprocess`` (the model's) is used when the task has no ``preprocess`` of its own.
        """
        chosen = self.chosen_preprocess(preprocess)
        if self.corruption is None:
            return self._images(chosen.transform())
        return _Normalized(self.decoded_test_set(chosen), chosen)

    def decoded_test_set(self, preprocess: Preprocess | None = None) -> Dataset:
        """The test split as ``(uint8 tensor [3, S, S], int label)``: resized and cropped, then corrupted if the
        task has a ``corruption``; not normalised."""
        chosen = self.chosen_preprocess(preprocess)
        images = self._images(chosen.decode())
        if self.corruption is None:
            return images
        if chosen.image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"{self!r}: the ImageNet-C corruptions need images of at least {MIN_IMAGE_SIZE} px, and its "
                f"preprocessing gives {chosen.image_size} px; use a larger image_size or no corruption."
            )
        return CorruptedImages(images, self.corruption, self.severity, self.corruption_seed,  # type: ignore[arg-type]
                               self.corruption_identity())

    def corruption_settings(self) -> dict[str, Any] | None:
        """Everything the corrupted images depend on besides the files and the preprocessing (the decoded
        cache's key holds it); ``None`` without a corruption."""
        if self.corruption is None:
            return None
        return {
            "corruption": self.corruption,
            "severity": self.severity,
            "seed": self.corruption_seed,
            "identity": self.corruption_identity(),
            "library": corruption_library(),
        }

    @abstractmethod
    def _images(self, transform: Callable[[Image.Image], Any]) -> Dataset:
        """The test split's ``(transform(image), int label)`` items."""

    @abstractmethod
    def source_key(self) -> str:
        """A string that changes whenever the test split's images or labels may have changed."""

    @abstractmethod
    def corruption_identity(self) -> str:
        """What tells this task's images apart from another task's in their corruption seeds: the same on
        every machine (no absolute paths, no file times), so a corrupted split is the same everywhere."""

    def _corruption_repr(self) -> str:
        if self.corruption is None:
            return ""
        return f", corruption={self.corruption!r}, severity={self.severity}, corruption_seed={self.corruption_seed}"


# --------------------------------------------------------------------------------------------- #
# Datasets
# --------------------------------------------------------------------------------------------- #


class ImageReadError(OSError):
    """An image file cannot be decoded: damaged, truncated, not an image, or too many pixels (a decompression
    bomb). The message names the file and says what to do; the data module adds the task's name."""

    def in_task(self, task: str) -> ImageReadError:
        """The same error, naming the task whose image it is."""
        return ImageReadError(f"task {task!r}: {self}")


# What decoding a file may raise: Pillow's errors (OSError, UnidentifiedImageError, SyntaxError and EOFError
# from damaged data, ValueError from odd modes) and its decompression-bomb error, or its warning when a
# caller's filters turn warnings into errors.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)  # fmt: skip


def read_rgb(path: str | Path) -> Image.Image:
    """The image file at ``path`` decoded (truncated files fail here) as 8-bit RGB (16-bit grayscale scaled).

    Raises:
        PIL.Image.DecompressionBombError: the file declares more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``
            (read when called, never changed here). Pillow itself only warns up to twice that limit and
            decodes the image; here that is an error too: such an image costs hundreds of megabytes per
            decode in every worker only to be resized to a few hundred pixels, a merging dataset has none,
            and the warning would be lost in a DataLoader worker's log. Whoever trusts such files raises
            the limit in their own script.
    """
    with Image.open(path) as opened:
        limit = Image.MAX_IMAGE_PIXELS
        width, height = opened.size
        if limit is not None and width * height > limit:
            raise Image.DecompressionBombError(
                f"it declares {width} x {height} = {width * height} pixels, more than Pillow's limit of {limit} "
                "(PIL.Image.MAX_IMAGE_PIXELS), so it may be a decompression bomb"
            )
        return to_rgb(opened)


def unreadable_image(path: str | Path, error: BaseException, where: str = "") -> ImageReadError:
    """The :class:`ImageReadError` for ``path`` that failed to decode with ``error``: what went wrong and what to do."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        advice = ("replace it with a downscaled copy (the model sees a few hundred pixels a side), or remove it "
                  "from the dataset")
    else:
        advice = "the file is damaged, truncated or not an image: replace it with an intact copy, or remove it"
    return ImageReadError(f"cannot read image file {str(path)!r}{where}: {str(error).rstrip('.')}; {advice}.")


class _ImageList(Dataset):
    """``(transform(image), label)`` over a list of ``(image path, label)``; names the file it cannot read."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], Any]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            image = read_rgb(path)
        except _DECODE_ERRORS as error:
            raise unreadable_image(path, error, f" (item {index})") from error
        return self.transform(image), label


class _Normalized(Dataset):
    """``(preprocess.normalize(image), label)`` over ``(uint8 image, label)`` items: the float images the model
    takes, equal bit for bit to a cached split normalised batch by batch."""

    def __init__(self, dataset: Dataset, preprocess: Preprocess) -> None:
        self.dataset = dataset
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.preprocess.normalize(image), label


class _IntLabels(Dataset):
    """A (optionally index-selected) view of a dataset whose labels are returned as Python ints."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = None if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.indices is not None:
            index = self.indices[index]
        try:
            image, label = self.dataset[index]
        except _DECODE_ERRORS as error:
            path = _item_file(self.dataset, index)
            if path is None:  # not a dataset of image files: the error is not about one
                raise
            raise unreadable_image(path, error, f" (item {index} of torchvision's dataset)") from error
        return image, int(label)


def _item_file(dataset: Any, index: int) -> str | None:
    """The image file of item ``index`` of a torchvision dataset that lists its files, else ``None``."""
    for attribute in ("samples", "_samples", "_image_files"):  # ImageFolder/EuroSAT; GTSRB, Cars; DTD, SUN397
        items = getattr(dataset, attribute, None)
        if isinstance(items, list) and 0 <= index < len(items):
            item = items[index]
            return str(item[0] if isinstance(item, tuple) else item)
    return None


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path) -> bool:
    return path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_folders(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


# --------------------------------------------------------------------------------------------- #
# ImageFolder trees
# --------------------------------------------------------------------------------------------- #


class ImageFolderTask(ImageFileTask):
    """One split of an ImageFolder tree ``root/{train,test}/<class>/<images>`` as a task.

    Labels are the positions of the class folders in sorted (by name) order; the optional
    ``class_names_file`` (relative to ``root`` unless absolute) holds readable class names in that
    same order, one per line, for :meth:`class_names`. Images are the files directly inside each
    class folder with one of :data:`IMAGE_EXTENSIONS` (any case); hidden files and folders (name
    starting with ``.``) and other files are ignored. The tree is scanned on first use (``num_classes``,
    :meth:`test_set` or :meth:`class_names`); images are read when an item is loaded.

    Args:
        root: the dataset folder, e.g. ``/work/shared/datasets/mnist``.
        split: the split folder under ``root`` (``"test"``: the split AdaMerging adapts on).
        preprocess: the eval preprocessing of the images; ``None``: the model's (see :meth:`test_set`).
        class_names_file: readable class names file, or ``None``.
        corruption: one of :data:`~lit_adamerging.data.corruptions.CORRUPTIONS` to apply to every test
            image (after the resize and crop), or ``None``.
        severity: the corruption's ImageNet-C severity, 1 to 5 (required with ``corruption``).
        corruption_seed: the seed of the corrupted split (each image's own seed derives from it, the
            folder's name, the split, the image's position, the corruption and the severity).

    Raises:
        ValueError: (at construction) ``split`` is not a plain folder name, or an unknown corruption or
            a severity outside 1-5 (the message lists the valid ones).
        TypeError: (at construction) ``preprocess`` is not a :class:`Preprocess` or ``None``.
        FileNotFoundError: ``root`` or ``root/split`` is missing.
        ValueError: ``root/split`` has no class folders, a class folder has no images, or the class
            names file's line count differs from the class folder count.
        ImageReadError: (an OSError, when an item is loaded) its image file cannot be decoded: damaged,
            truncated, not an image, or more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (see :func:`read_rgb`).
    """

    def __init__(
        self,
        root: str,
        split: str = "test",
        preprocess: Preprocess | None = None,
        class_names_file: str | None = "classes.txt",
        corruption: CorruptionName | None = None,
        severity: int | None = None,
        corruption_seed: int = 0,
    ) -> None:
        if not isinstance(split, str) or not split or "/" in split or "\\" in split or split in (".", ".."):
            raise ValueError(f"ImageFolderTask.split must be a folder name such as 'test', got {split!r}.")
        self.root = str(root)
        self.split = split
        self.preprocess = _check_preprocess("ImageFolderTask", preprocess)
        self.class_names_file = class_names_file
        self._set_corruption(corruption, severity, corruption_seed)
        self._classes: list[str] | None = None
        self._samples: list[tuple[Path, int]] | None = None

    @property
    def split_dir(self) -> Path:
        return Path(self.root).expanduser() / self.split

    def _names_path(self) -> Path | None:
        if self.class_names_file is None:
            return None
        path = Path(self.class_names_file).expanduser()
        return path if path.is_absolute() else Path(self.root).expanduser() / path

    def _scan(self) -> tuple[list[str], list[tuple[Path, int]]]:
        if self._classes is not None and self._samples is not None:
            return self._classes, self._samples
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"ImageFolderTask: dataset folder {str(root)!r} does not exist (or is not a folder); "
                f"expected the layout {_LAYOUT}."
            )
        split_dir = self.split_dir
        if not split_dir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
            raise FileNotFoundError(
                f"ImageFolderTask: split folder {str(split_dir)!r} does not exist (folders in root: "
                f"{present or 'none'}); expected the layout {_LAYOUT}."
            )
        folders = _class_folders(split_dir)
        if not folders:
            raise ValueError(
                f"ImageFolderTask: split folder {str(split_dir)!r} has no class folders; expected the "
                f"layout {_LAYOUT}, one folder per class."
            )
        samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            images = _images_in(folder)
            if not images:
                raise ValueError(
                    f"ImageFolderTask: class folder {folder.name!r} ({str(folder)!r}) has no images "
                    f"(extensions {', '.join(IMAGE_EXTENSIONS)}); expected the layout {_LAYOUT}."
                )
            samples.extend((image, label) for image in images)
        classes = [folder.name for folder in folders]
        names_path = self._names_path()
        if names_path is not None and names_path.is_file():
            names = read_class_names(names_path)
            if len(names) != len(classes):
                raise ValueError(
                    f"ImageFolderTask: class names file {str(names_path)!r} has {len(names)} names but "
                    f"{str(split_dir)!r} has {len(classes)} class folders; it must hold one line per class "
                    "folder, in sorted folder order."
                )
        self._classes, self._samples = classes, samples
        return classes, samples

    @property
    def num_classes(self) -> int:
        return len(self._scan()[0])

    def class_folders(self) -> list[str]:
        """The class folder names, in label order."""
        return list(self._scan()[0])

    def class_names(self) -> list[str]:
        """Readable class names in label order: the class names file, else the class folder names."""
        classes, _ = self._scan()
        names_path = self._names_path()
        if names_path is not None and names_path.is_file():
            return read_class_names(names_path)
        return list(classes)

    def _images(self, transform: Callable[[Image.Image], Any]) -> Dataset:
        """Class-major, files sorted by name."""
        return _ImageList(self._scan()[1], transform)

    def source_key(self) -> str:
        split_dir = self.split_dir.resolve()
        return f"ImageFolderTask:{split_dir}:{fingerprint(split_dir)}"

    def corruption_identity(self) -> str:
        """``ImageFolderTask:<root folder's name>/<split>``."""
        return f"ImageFolderTask:{Path(self.root).expanduser().resolve().name}/{self.split}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, preprocess={self.preprocess!r}"
                f"{self._corruption_repr()})")


# --------------------------------------------------------------------------------------------- #
# Deterministic splits
# --------------------------------------------------------------------------------------------- #


def _seeded_order(keys: Sequence[str], seed: int) -> list[int]:
    """Positions of ``keys`` ranked by SHA-256 of ``"<seed>:<key>"``: a fixed, version-proof shuffle."""
    digests = [hashlib.sha256(f"{seed}:{key}".encode()).digest() for key in keys]
    return sorted(range(len(keys)), key=lambda i: (digests[i], i))


def eurosat_split_indices(n: int, seed: int = EUROSAT_SPLIT_SEED) -> tuple[list[int], list[int], list[int]]:
    """Fixed train/val/test split of ``n`` images: ``n - 2 * (n // 10)`` / ``n // 10`` / ``n // 10``.

    Indices ``0..n-1`` are ranked by the SHA-256 of ``"<seed>:<index>"``; the first ``n // 10`` are
    the test set, the next ``n // 10`` the validation set, the rest the training set. Each list is
    sorted. For EuroSAT's 27,000 images that is 21,600 / 2,700 / 2,700.

    Example:
        >>> train, val, test = eurosat_split_indices(27_000)
        >>> len(train), len(val), len(test)
        (21600, 2700, 2700)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"eurosat_split_indices: n must be a non-negative integer, got {n!r}.")
    order = _seeded_order([str(i) for i in range(n)], seed)
    part = n // 10
    return sorted(order[2 * part :]), sorted(order[part : 2 * part]), sorted(order[:part])


def eurosat_test_indices(n: int, seed: int = EUROSAT_SPLIT_SEED) -> list[int]:
    """The test part (``n // 10`` sorted indices) of :func:`eurosat_split_indices`."""
    return eurosat_split_indices(n, seed)[2]


def sun397_test_indices(
    keys: Sequence[str], labels: Sequence[int], per_class: int = 50, seed: int = SUN397_SPLIT_SEED
) -> list[int]:
    """Fallback SUN397 test split: ``min(per_class, count // 2)`` images of every class.

    Within each class the images are ranked by the SHA-256 of ``"<seed>:<key>"`` (``key``: the
    image's path relative to the ``SUN397`` folder), so the result does not depend on the order
    the files were listed in. Returns sorted positions into ``keys``.
    """
    if len(keys) != len(labels):
        raise ValueError(f"sun397_test_indices: {len(keys)} keys but {len(labels)} labels.")
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    chosen: list[int] = []
    for members in by_class.values():
        order = _seeded_order([keys[i] for i in members], seed)
        chosen.extend(members[i] for i in order[: min(per_class, len(members) // 2)])
    return sorted(chosen)


# --------------------------------------------------------------------------------------------- #
# The paper's datasets
# --------------------------------------------------------------------------------------------- #

TorchvisionName = Literal[
    "mnist", "fashion_mnist", "cifar10", "gtsrb", "usps", "svhn", "eurosat", "dtd", "sun397", "cars", "resisc45"
]

TORCHVISION_NUM_CLASSES: dict[str, int] = {
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "gtsrb": 43,
    "usps": 10,
    "svhn": 10,
    "eurosat": 10,
    "dtd": 47,
    "sun397": 397,
    "cars": 196,
    "resisc45": 45,
}
"""Class count of every :class:`TorchvisionTask` dataset (known without reading any file)."""

_EXPECTED_LAYOUT: dict[str, str] = {
    "mnist": "root/MNIST/raw/t10k-images-idx3-ubyte and root/MNIST/raw/t10k-labels-idx1-ubyte (torchvision "
    "also requires the train-images-idx3-ubyte and train-labels-idx1-ubyte files next to them)",
    "fashion_mnist": "root/FashionMNIST/raw/t10k-images-idx3-ubyte and root/FashionMNIST/raw/t10k-labels-idx1-ubyte "
    "(torchvision also requires the train-images-idx3-ubyte and train-labels-idx1-ubyte files next to them)",
    "cifar10": "root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (checksums verified)",
    "gtsrb": "root/gtsrb/GT-final_test.csv and root/gtsrb/GTSRB/Final_Test/Images/<image>.ppm",
    "usps": "root/usps.t.bz2",
    "svhn": "root/test_32x32.mat (checksum verified)",
    "eurosat": "root/eurosat/2750/<class>/<image>.jpg with the 10 class folders",
    "dtd": "root/dtd/dtd/images/<class>/<image>.jpg and root/dtd/dtd/labels/test1.txt",
    "sun397": "root/SUN397/ClassName.txt and root/SUN397/<letter>/<class>/sun_<id>.jpg, and optionally the official "
    "partition file Testing_01.txt in root/SUN397, root or root/Partitions (without it a fixed-seed split is used)",
    "cars": "root/stanford_cars/devkit/cars_meta.mat, root/stanford_cars/cars_test_annos_withlabels.mat and "
    "root/stanford_cars/cars_test/<image>.jpg",
    "resisc45": "root/NWPU-RESISC45/<class>/<image>.jpg (45 class folders) and the published split file "
    "root/resisc45-test.txt (one image file name per line)",
}

_NOT_DOWNLOADABLE: dict[str, str] = {
    "cars": "Stanford Cars cannot be downloaded automatically (torchvision's download URL is broken); "
    "place the files there yourself",
    "resisc45": "RESISC45 is not in torchvision and cannot be downloaded automatically; place the files there "
    "yourself (resisc45-test.txt is the published test split of Neumann et al.'s remote sensing benchmark, "
    "also used by torchgeo)",
}

_PROMPT_TASK = {"usps": "mnist"}

_SUN397_PARTITION_CANDIDATES = ("SUN397/Testing_01.txt", "Testing_01.txt", "Partitions/Testing_01.txt",
                                "SUN397/Partitions/Testing_01.txt")  # fmt: skip


def _is_not_found(error: BaseException) -> bool:
    if isinstance(error, FileNotFoundError):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and "Dataset" in message and "not found" in message and (
        "scipy" not in message.lower()
    )


class TorchvisionTask(ImageFileTask):
    """The test split the AdaMerging paper evaluates (and adapts) on, for one of 11 datasets.

    MNIST, Fashion-MNIST, CIFAR-10 and USPS use ``train=False``; GTSRB, SVHN and Stanford Cars
    ``split="test"``; DTD ``split="test", partition=1``. EuroSAT: torchvision has no split, so the
    27,000 images are split 21,600 / 2,700 / 2,700 with :func:`eurosat_split_indices` (seed
    :data:`EUROSAT_SPLIT_SEED`) and the 2,700 test images are used. SUN397: torchvision has no split;
    the official ``Testing_01.txt`` partition (19,850 images) is used when found in ``root/SUN397``,
    ``root`` or ``root/Partitions``, else (with a warning) :func:`sun397_test_indices`, 50 images per
    class. RESISC45 is not in torchvision: it is read from ``root/NWPU-RESISC45/<class>/<image>``
    (labels: sorted class folder names) restricted to the images listed in ``root/resisc45-test.txt``.

    ``num_classes`` is known without reading anything; the data is read by :meth:`test_set`.

    Args:
        dataset: which dataset.
        root: the folder torchvision reads the dataset from (the layout per dataset is in the error
            raised when it is missing).
        preprocess: the eval preprocessing of the images; ``None``: the model's (see :meth:`test_set`).
        download: let torchvision download the dataset into ``root`` when it is missing (not
            possible for ``cars`` and ``resisc45``).
        corruption: one of :data:`~lit_adamerging.data.corruptions.CORRUPTIONS` to apply to every test
            image (after the resize and crop), or ``None``.
        severity: the corruption's ImageNet-C severity, 1 to 5 (required with ``corruption``).
        corruption_seed: the seed of the corrupted split (each image's own seed derives from it, the
            dataset, the image's position, the corruption and the severity).

    Raises:
        ValueError: unknown ``dataset``, or an unknown corruption or a severity outside 1-5 (the message
            lists the valid ones).
        TypeError: ``preprocess`` is not a :class:`Preprocess` or ``None``.
        FileNotFoundError: (:meth:`test_set`) the dataset's files are missing under ``root``.
    """

    def __init__(
        self,
        dataset: TorchvisionName,
        root: str,
        preprocess: Preprocess | None = None,
        download: bool = False,
        corruption: CorruptionName | None = None,
        severity: int | None = None,
        corruption_seed: int = 0,
    ) -> None:
        if not isinstance(dataset, str) or dataset not in TORCHVISION_NUM_CLASSES:
            raise ValueError(
                f"TorchvisionTask.dataset must be one of {', '.join(get_args(TorchvisionName))}; got {dataset!r}."
            )
        self.dataset = dataset
        self.root = str(root)
        self.preprocess = _check_preprocess("TorchvisionTask", preprocess)
        self.download = bool(download)
        self._set_corruption(corruption, severity, corruption_seed)

    @property
    def num_classes(self) -> int:
        return TORCHVISION_NUM_CLASSES[self.dataset]

    def class_names(self) -> list[str]:
        """Readable class names in label order (from :mod:`lit_adamerging.models.prompts`)."""
        return _prompt_class_names(_PROMPT_TASK.get(self.dataset, self.dataset))

    def _missing(self, detail: str = "") -> FileNotFoundError:
        root = str(Path(self.root).expanduser())
        if self.dataset in _NOT_DOWNLOADABLE:
            hint = _NOT_DOWNLOADABLE[self.dataset] + "."
        elif self.download:
            hint = "download: true did not produce these files."
        else:
            hint = "Set `download: true` (TorchvisionTask(download=True)) to fetch it with torchvision."
        detail = f" ({detail})" if detail else ""
        return FileNotFoundError(
            f"TorchvisionTask: dataset {self.dataset!r} not found under root {root!r}{detail}; expected "
            f"{_EXPECTED_LAYOUT[self.dataset]}. {hint}"
        )

    def source_key(self) -> str:
        root = Path(self.root).expanduser().resolve()
        return f"TorchvisionTask:{self.dataset}:{root}:{fingerprint(root) if root.exists() else 'absent'}"

    def corruption_identity(self) -> str:
        """``TorchvisionTask:<dataset>``."""
        return f"TorchvisionTask:{self.dataset}"

    def _images(self, transform: Callable[[Image.Image], Any]) -> Dataset:
        if self.dataset == "resisc45":
            return self._resisc45(transform)
        try:
            dataset = self._build(transform)
        except (RuntimeError, OSError) as error:
            if not _is_not_found(error):
                raise
            raise self._missing(str(error)) from error
        classes = getattr(dataset, "classes", None)
        if classes is not None and len(classes) != self.num_classes:
            raise ValueError(
                f"TorchvisionTask: dataset {self.dataset!r} under {self.root!r} has {len(classes)} classes, "
                f"expected {self.num_classes}; expected {_EXPECTED_LAYOUT[self.dataset]}."
            )
        indices = None
        if self.dataset == "eurosat":
            indices = eurosat_test_indices(len(dataset))  # type: ignore[arg-type]
        elif self.dataset == "sun397":
            indices = self._sun397_indices(dataset)
        return _IntLabels(dataset, indices)

    def _build(self, transform: Callable[[Image.Image], Any]) -> Dataset:
        from torchvision import datasets as tv

        root, download, name = str(Path(self.root).expanduser()), self.download, self.dataset
        if name in ("mnist", "fashion_mnist", "cifar10", "usps"):
            cls = {"mnist": tv.MNIST, "fashion_mnist": tv.FashionMNIST, "cifar10": tv.CIFAR10, "usps": tv.USPS}[name]
            return cls(root, train=False, transform=transform, download=download)
        if name == "gtsrb":
            return tv.GTSRB(root, split="test", transform=transform, download=download)
        if name == "svhn":
            return tv.SVHN(root, split="test", transform=transform, download=download)
        if name == "dtd":
            return tv.DTD(root, split="test", partition=1, transform=transform, download=download)
        if name == "cars":  # torchvision's download raises (broken URL): never ask for it
            return tv.StanfordCars(root, split="test", transform=transform, download=False)
        if name == "eurosat":
            return tv.EuroSAT(root, transform=transform, download=download)
        if name == "sun397":
            return tv.SUN397(root, transform=transform, download=download)
        raise AssertionError(name)  # pragma: no cover

    def _sun397_indices(self, dataset: Any) -> list[int]:
        data_dir = Path(self.root).expanduser() / "SUN397"
        keys = [path.relative_to(data_dir).as_posix() for path in dataset._image_files]
        root = Path(self.root).expanduser()
        partition = next((root / c for c in _SUN397_PARTITION_CANDIDATES if (root / c).is_file()), None)
        if partition is None:
            warnings.warn(
                f"SUN397: no official partition file Testing_01.txt in {str(data_dir)!r}, {str(root)!r} or "
                f"{str(root / 'Partitions')!r}; using a fixed-seed split of 50 test images per class "
                f"(seed {SUN397_SPLIT_SEED}) instead, which is not the official test partition.",
                UserWarning,
                stacklevel=3,
            )
            return sun397_test_indices(keys, dataset._labels)
        position = {key: i for i, key in enumerate(keys)}
        return [position[line] for line in self._listed(partition, position)]

    def _resisc45(self, transform: Callable[[Image.Image], Any]) -> Dataset:
        root = Path(self.root).expanduser()
        image_dir = root / "NWPU-RESISC45"
        split_file = root / "resisc45-test.txt"
        if not image_dir.is_dir():
            raise self._missing(f"no folder {str(image_dir)!r}")
        if not split_file.is_file():
            raise self._missing(f"no split file {str(split_file)!r}")
        folders = _class_folders(image_dir)
        if len(folders) != self.num_classes:
            raise ValueError(
                f"TorchvisionTask: {str(image_dir)!r} has {len(folders)} class folders, expected "
                f"{self.num_classes}; expected {_EXPECTED_LAYOUT['resisc45']}."
            )
        by_name: dict[str, tuple[Path, int]] = {}
        for label, folder in enumerate(folders):
            for image in _images_in(folder):
                by_name[image.name] = by_name[f"{folder.name}/{image.name}"] = (image, label)
        return _ImageList([by_name[line] for line in self._listed(split_file, by_name)], transform)

    def _listed(self, split_file: Path, known: Collection[str]) -> list[str]:
        """The image names a split file lists (one per line, leading '/' dropped), all of them in ``known``."""
        lines = [line.strip().lstrip("/") for line in split_file.read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line]
        missing = [line for line in lines if line not in known]
        if missing:
            raise self._missing(
                f"{len(missing)} of the {len(lines)} images listed in {str(split_file)!r} are missing, "
                f"e.g. {missing[:3]}"
            )
        return lines

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dataset={self.dataset!r}, root={self.root!r}, "
            f"preprocess={self.preprocess!r}, download={self.download}{self._corruption_repr()})"
        )
