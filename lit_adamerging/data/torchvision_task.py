"""The test splits the AdaMerging paper evaluates (and adapts) on, read through torchvision where it has the dataset.

Per dataset (the layouts are :data:`~lit_adamerging.data.paper_datasets.EXPECTED_LAYOUT`):

* MNIST, Fashion-MNIST, CIFAR-10 and USPS: torchvision's ``train=False``; SVHN and Stanford Cars
  ``split="test"``; DTD ``split="test", partition=1``.
* EuroSAT: torchvision's 27,000 images, of which the 2,700 of :func:`~lit_adamerging.data.splits.eurosat_test_indices`.
* GTSRB: the images and labels listed in ``gtsrb/GT-final_test.csv``, the files torchvision's test split reads.
* SUN397: the ``sun_*.jpg`` files under ``root/SUN397`` as torchvision lists them (``pathlib``'s ``rglob``, in
  its order; labels from ``ClassName.txt``), restricted to the official ``Testing_01.txt`` partition when it
  is found (:data:`~lit_adamerging.data.paper_datasets.SUN397_PARTITION_CANDIDATES`), else (with a warning)
  to :func:`~lit_adamerging.data.splits.sun397_test_indices`.
* RESISC45 (not in torchvision): ``root/NWPU-RESISC45/<class>/<image>`` (labels: sorted class folder names)
  restricted to the images listed in ``root/resisc45-test.txt``.

The image files of GTSRB, DTD, EuroSAT, SUN397 and Stanford Cars are read as torchvision reads them (Pillow,
converted to RGB), by a loader of ours, so that a file that cannot be decoded is named in an
:class:`~lit_adamerging.data.images.ImageReadError` with its position; torchvision downloads them.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, get_args

from PIL import Image
from torch.utils.data import Dataset

from lit_adamerging.data.corruptions import CorruptionName
from lit_adamerging.data.files import class_folders, fingerprint, images_in
from lit_adamerging.data.image_file_task import ImageFileTask, check_preprocess
from lit_adamerging.data.images import DECODE_ERRORS, ImageList, unreadable_image
from lit_adamerging.data.paper_datasets import (
    EXPECTED_LAYOUT,
    NOT_DOWNLOADABLE,
    PROMPT_TASK,
    SUN397_PARTITION_CANDIDATES,
    TORCHVISION_NUM_CLASSES,
    TorchvisionName,
)
from lit_adamerging.data.splits import SUN397_SPLIT_SEED, eurosat_test_indices, sun397_test_indices
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.prompts import class_names as _prompt_class_names

__all__ = ["TorchvisionTask"]


class _Unreadable(Exception):
    """An image file that did not decode: raised by :class:`_ReadFile`, named with its item by :class:`_IntLabels`."""

    def __init__(self, path: str, error: BaseException) -> None:
        super().__init__(path, error)
        self.path, self.error = path, error


class _ReadFile:
    """``transform`` of the image file at a path, read as torchvision's Pillow loader reads it (converted to RGB).

    A failure (decoding or transforming) raises :class:`_Unreadable` with the path. torchvision's datasets take
    it as their ``loader`` (with no ``transform`` of their own); it is picklable, for DataLoader workers.
    """

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        self.transform = transform

    def __call__(self, path: str | Path) -> Any:
        try:
            with open(path, "rb") as file:
                image = Image.open(file).convert("RGB")
            return self.transform(image)
        except DECODE_ERRORS as error:
            raise _Unreadable(str(path), error) from error


class _Files(Dataset):
    """``(read(path), label)`` over a list of ``(path, label)``: a dataset whose files are listed here."""

    def __init__(self, samples: Sequence[tuple[str | Path, int]], read: _ReadFile,
                 classes: list[str] | None = None) -> None:  # fmt: skip
        self.samples = list(samples)
        self.read = read
        self.classes = classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        return self.read(path), label


class _IntLabels(Dataset):
    """A (optionally index-selected) view of a dataset whose labels are returned as Python ints; an image file
    that cannot be decoded raises an :class:`ImageReadError` naming it and its item in the whole dataset."""

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
        except _Unreadable as failure:
            raise unreadable_image(failure.path, failure.error, f" (item {index} of torchvision's dataset)") from (
                failure.error
            )
        return image, int(label)


def _gtsrb_test_files(root: Path) -> list[tuple[str | Path, int]]:
    """GTSRB's test images as torchvision's ``split="test"`` lists them: the rows of ``gtsrb/GT-final_test.csv``
    (``Filename``, ``ClassId``), files in ``gtsrb/GTSRB/Final_Test/Images``."""
    images = root / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    if not images.is_dir():
        raise FileNotFoundError(f"no folder {str(images)!r}")
    with open(root / "gtsrb" / "GT-final_test.csv") as table:
        rows = csv.DictReader(table, delimiter=";", skipinitialspace=True)
        return [(str(images / row["Filename"]), int(row["ClassId"])) for row in rows]


def _sun397_files(root: Path) -> tuple[list[tuple[str | Path, int]], list[str]]:
    """SUN397's images and class names as torchvision lists them: ``sun_*.jpg`` under ``root/SUN397`` in
    ``rglob``'s order, each labelled by its class folder's line in ``ClassName.txt`` (``/<letter>/<class>``)."""
    data_dir = root / "SUN397"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"no folder {str(data_dir)!r}")
    with open(data_dir / "ClassName.txt") as names:
        classes = [line[3:].strip() for line in names]
    label = dict(zip(classes, range(len(classes))))
    files = list(data_dir.rglob("sun_*.jpg"))  # not sorted: the split positions are in torchvision's order
    return [(path, label["/".join(path.relative_to(data_dir).parts[1:-1])]) for path in files], classes


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
        self.preprocess = check_preprocess("TorchvisionTask", preprocess)
        self.download = bool(download)
        self._set_corruption(corruption, severity, corruption_seed)

    @property
    def num_classes(self) -> int:
        return TORCHVISION_NUM_CLASSES[self.dataset]

    def class_names(self) -> list[str]:
        """Readable class names in label order (from :mod:`lit_adamerging.models.prompts`)."""
        return _prompt_class_names(PROMPT_TASK.get(self.dataset, self.dataset))

    def _missing(self, detail: str = "") -> FileNotFoundError:
        root = str(Path(self.root).expanduser())
        if self.dataset in NOT_DOWNLOADABLE:
            hint = NOT_DOWNLOADABLE[self.dataset] + "."
        elif self.download:
            hint = "download: true did not produce these files."
        else:
            hint = "Set `download: true` (TorchvisionTask(download=True)) to fetch it with torchvision."
        detail = f" ({detail})" if detail else ""
        return FileNotFoundError(
            f"TorchvisionTask: dataset {self.dataset!r} not found under root {root!r}{detail}; expected "
            f"{EXPECTED_LAYOUT[self.dataset]}. {hint}"
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
                f"expected {self.num_classes}; expected {EXPECTED_LAYOUT[self.dataset]}."
            )
        indices = None
        if self.dataset == "eurosat":
            indices = eurosat_test_indices(len(dataset))  # type: ignore[arg-type]
        elif self.dataset == "sun397":
            indices = self._sun397_indices(dataset)  # type: ignore[arg-type]
        return _IntLabels(dataset, indices)

    def _build(self, transform: Callable[[Image.Image], Any]) -> Dataset:
        from torchvision import datasets as tv

        root, download, name = Path(self.root).expanduser(), self.download, self.dataset
        if name in ("mnist", "fashion_mnist", "cifar10", "usps"):
            cls = {"mnist": tv.MNIST, "fashion_mnist": tv.FashionMNIST, "cifar10": tv.CIFAR10, "usps": tv.USPS}[name]
            return cls(str(root), train=False, transform=transform, download=download)
        if name == "svhn":
            return tv.SVHN(str(root), split="test", transform=transform, download=download)
        read = _ReadFile(transform)
        if name == "dtd":
            return tv.DTD(str(root), split="test", partition=1, loader=read, download=download)
        if name == "cars":  # torchvision's download raises (broken URL): never ask for it
            return tv.StanfordCars(str(root), split="test", loader=read, download=False)
        if name == "eurosat":
            return tv.EuroSAT(str(root), loader=read, download=download)
        if name == "gtsrb":
            if download and not (root / "gtsrb" / "GTSRB" / "Final_Test" / "Images").is_dir():
                tv.GTSRB(str(root), split="test", download=True)
            return _Files(_gtsrb_test_files(root), read)
        if name == "sun397":
            if download and not (root / "SUN397").is_dir():
                tv.SUN397(str(root), download=True)
            samples, classes = _sun397_files(root)
            return _Files(samples, read, classes)
        raise AssertionError(name)  # pragma: no cover

    def _sun397_indices(self, dataset: _Files) -> list[int]:
        data_dir = Path(self.root).expanduser() / "SUN397"
        keys = [Path(path).relative_to(data_dir).as_posix() for path, _ in dataset.samples]
        root = Path(self.root).expanduser()
        partition = next((root / c for c in SUN397_PARTITION_CANDIDATES if (root / c).is_file()), None)
        if partition is None:
            warnings.warn(
                f"SUN397: no official partition file Testing_01.txt in {str(data_dir)!r}, {str(root)!r} or "
                f"{str(root / 'Partitions')!r}; using a fixed-seed split of 50 test images per class "
                f"(seed {SUN397_SPLIT_SEED}) instead, which is not the official test partition.",
                UserWarning,
                stacklevel=3,
            )
            return sun397_test_indices(keys, [label for _, label in dataset.samples])
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
        folders = class_folders(image_dir)
        if len(folders) != self.num_classes:
            raise ValueError(
                f"TorchvisionTask: {str(image_dir)!r} has {len(folders)} class folders, expected "
                f"{self.num_classes}; expected {EXPECTED_LAYOUT['resisc45']}."
            )
        by_name: dict[str, tuple[Path, int]] = {}
        for label, folder in enumerate(folders):
            for image in images_in(folder):
                by_name[image.name] = by_name[f"{folder.name}/{image.name}"] = (image, label)
        return ImageList([by_name[line] for line in self._listed(split_file, by_name)], transform)

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
