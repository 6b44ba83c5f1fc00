"""ImageFolder trees as tasks: ``root/{train,test}/<class>/<images>``, labels in sorted class folder order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from lit_adamerging.data.corruptions import CorruptionName
from lit_adamerging.data.files import IMAGE_EXTENSIONS, class_folders, fingerprint, images_in, is_visible
from lit_adamerging.data.image_file_task import ImageFileTask, check_preprocess
from lit_adamerging.data.images import ImageList
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.prompts import read_class_names

__all__ = ["ImageFolderTask"]

_LAYOUT = "root/{train,test}/<class>/<images>"


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
            truncated, not an image, or more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (see
            :func:`~lit_adamerging.data.images.read_rgb`).
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
        self.preprocess = check_preprocess("ImageFolderTask", preprocess)
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
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and is_visible(p))
            raise FileNotFoundError(
                f"ImageFolderTask: split folder {str(split_dir)!r} does not exist (folders in root: "
                f"{present or 'none'}); expected the layout {_LAYOUT}."
            )
        folders = class_folders(split_dir)
        if not folders:
            raise ValueError(
                f"ImageFolderTask: split folder {str(split_dir)!r} has no class folders; expected the "
                f"layout {_LAYOUT}, one folder per class."
            )
        samples: list[tuple[Path, int]] = []
        for label, folder in enumerate(folders):
            images = images_in(folder)
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
        return ImageList(self._scan()[1], transform)

    def source_key(self) -> str:
        split_dir = self.split_dir.resolve()
        return f"ImageFolderTask:{split_dir}:{fingerprint(split_dir)}"

    def corruption_identity(self) -> str:
        """``ImageFolderTask:<root folder's name>/<split>``."""
        return f"ImageFolderTask:{Path(self.root).expanduser().resolve().name}/{self.split}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, preprocess={self.preprocess!r}"
                f"{self._corruption_repr()})")
