"""Task datasets: what each task's labeled test split is."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from lit_adamerging.models.preprocess import Preprocess

AVERAGE_NAMES: tuple[str, ...] = ("avg", "avg_seen", "avg_unseen")
"""What :class:`~lit_adamerging.PerTaskAccuracy` logs its means under (``<stage>/acc/avg``, over every task;
``avg_seen`` and ``avg_unseen``), beside each task's ``<stage>/acc/<task>``: no task may bear one of these names."""

FORBIDDEN_IN_TASK_NAMES: tuple[str, ...] = ("/", ".")
"""Characters a task name may not hold: ``/`` nests metric names (``test/acc/<task>``), ``.`` separates module
names (the heads and surgery maps are kept under the task's name)."""


def check_task_name(name: object) -> str:
    """``name`` if it can name a task; else a ``ValueError`` naming it and the rule it breaks."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name {name!r} is not a non-empty string; name each task with a word such as 'mnist'.")
    if name in AVERAGE_NAMES:
        raise ValueError(
            f"task name {name!r} is reserved: the means of the accuracies are logged as <stage>/acc/<name> under "
            f"the reserved names {', '.join(AVERAGE_NAMES)}, so this task's own accuracy would be hidden behind a "
            f"mean. Rename the task (e.g. {name + '_task'!r})."
        )
    bad = sorted({char for char in name if char in FORBIDDEN_IN_TASK_NAMES or not char.isprintable()})
    if bad:
        raise ValueError(
            f"task name {name!r} holds {', '.join(map(repr, bad))}: a task name becomes part of metric names "
            f"(<stage>/acc/<task>) and module names, which {' and '.join(map(repr, FORBIDDEN_IN_TASK_NAMES))} and "
            "unprintable characters break. Rename the task with letters, digits, '_' or '-'."
        )
    return name


class TaskData(ABC):
    """One task's labeled test split: a dataset of ``(image tensor, label)`` and its class count."""

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes of the task (the width of its head)."""

    @abstractmethod
    def test_set(self, preprocess: Preprocess | None = None) -> Dataset:
        """The test split, yielding ``(image [C, H, W] float tensor, label int)``.

        ``preprocess`` is the model's eval preprocessing, for tasks that read images and were not
        given a preprocessing of their own.
        """


class SyntheticTask(TaskData):
    """Random images with random labels, for tests and smoke runs (deterministic for a seed).

    Example:
        >>> images, label = SyntheticTask(num_classes=3, num_images=4, image_size=8).test_set()[0]
        >>> images.shape
        torch.Size([3, 8, 8])
    """

    def __init__(self, num_classes: int = 10, num_images: int = 64, image_size: int = 32, seed: int = 0) -> None:
        if num_classes < 1 or num_images < 1 or image_size < 1:
            raise ValueError(
                f"SyntheticTask needs positive sizes, got num_classes={num_classes}, "
                f"num_images={num_images}, image_size={image_size}."
            )
        self._num_classes = num_classes
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def test_set(self, preprocess: Preprocess | None = None) -> Dataset:
        """Random image tensors; ``preprocess`` does not apply (there are no image files)."""
        generator = torch.Generator().manual_seed(self.seed)
        images = torch.randn(self.num_images, 3, self.image_size, self.image_size, generator=generator, device="cpu")
        labels = torch.randint(self.num_classes, (self.num_images,), generator=generator, device="cpu")
        return TensorDataset(images, labels)


class ImagesOnly(Dataset):
    """The images of a labeled dataset without their labels: what AdaMerging may train on."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:
        return self.dataset[index][0]
