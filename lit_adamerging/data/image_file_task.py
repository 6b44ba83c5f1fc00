"""The base of tasks whose images are files: the preprocessing they are read with, and their optional corruption.

Each task reads images with the eval preprocessing of the merged model: by default the one the
model zoo reports (:meth:`ModelZoo.preprocess`, passed in by :class:`MultiTaskDataModule`), or a
:class:`~lit_adamerging.models.preprocess.Preprocess` given to the task.

Any of these tasks can corrupt its test images with one of ImageNet-C's corruptions
(``corruption="motion_blur", severity=3``; see :mod:`lit_adamerging.data.corruptions`): each image
is corrupted after the resize and crop, the same way in every run, and the decoded test-set cache
keeps the corrupted split.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from lit_adamerging.data.corruptions import MIN_IMAGE_SIZE, CorruptedImages, check_corruption, corruption_library
from lit_adamerging.data.tasks import TaskData
from lit_adamerging.models.preprocess import Preprocess

__all__ = ["ImageFileTask", "check_preprocess"]


def check_preprocess(owner: str, preprocess: Any) -> Preprocess | None:
    """``preprocess`` if it is a :class:`Preprocess` or ``None``; else a ``TypeError`` naming ``owner``."""
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise TypeError(f"{owner}.preprocess must be a Preprocess or None, got {type(preprocess).__name__}.")
    return preprocess


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
        return check_preprocess(type(self).__name__, chosen)  # type: ignore[return-value]

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
