"""What a model and the data module offer each other, declared as protocols (checked with ``isinstance``).

The model's side, read by :class:`~lit_adamerging.MultiTaskDataModule` through ``trainer.lightning_module``:

* :class:`ReportsPreprocess`: ``eval_preprocess()``, the preprocessing of the tasks given none of their own;
* :class:`DeclaresFitInputs`: ``fit_inputs``, what its fit batches hold (``"images"`` or ``"indices"``);
* :class:`ReadsImagesAs`: both. A model that offers neither gets each task's own preprocessing and images.
* :class:`EvaluatesInStep`: ``evaluates_in_step``, whether every process must run as many evaluation batches
  (a model sharded across the processes gathers its weights from all of them in each forward).

The data module's side, read by the models through ``trainer.datamodule``:

* :class:`DescribesTasks`: ``num_classes`` and ``unseen_tasks``, to compare with the model's own;
* :class:`UnlabeledImages`: those, and ``num_images(task)`` and ``unlabeled_batches(task, device)``, the images a
  method learns its statistics from (Fisher merging, RegMean, surgery).

Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from lit_adamerging.models.preprocess import Preprocess

__all__ = [
    "DeclaresFitInputs", "DescribesTasks", "EvaluatesInStep", "FitInputs", "ReadsImagesAs", "ReportsPreprocess",
    "UnlabeledImages",
]

FitInputs = Literal["images", "indices"]
"""What a model's fit batches hold per task: its images, or their positions in the task's split (a model that reads
its own per-image data, such as surgery's features)."""


@runtime_checkable
class ReportsPreprocess(Protocol):
    """A model that says how its images are preprocessed."""

    def eval_preprocess(self) -> Preprocess | None:
        """The eval preprocessing of the images the model takes; ``None`` when it does not know one."""
        ...


@runtime_checkable
class DeclaresFitInputs(Protocol):
    """A model that says what its fit batches hold."""

    fit_inputs: FitInputs


@runtime_checkable
class EvaluatesInStep(Protocol):
    """A model that says whether its processes must run evaluation in step (as many batches on each)."""

    @property
    def evaluates_in_step(self) -> bool:
        """``True`` when every forward needs every process (weights sharded across them)."""
        ...


@runtime_checkable
class ReadsImagesAs(ReportsPreprocess, DeclaresFitInputs, Protocol):
    """Everything a model tells the data module about the images it takes: its preprocessing and its fit inputs."""


@runtime_checkable
class DescribesTasks(Protocol):
    """A data module that says which tasks it holds."""

    @property
    def num_classes(self) -> Mapping[str, int]:
        """``{task: class count}``, in task order."""
        ...

    @property
    def unseen_tasks(self) -> Sequence[str]:
        """The tasks that are evaluated only, never merged, in task order."""
        ...


@runtime_checkable
class UnlabeledImages(DescribesTasks, Protocol):
    """A data module that gives a model each task's unlabeled images, in order, a pass at a time."""

    def num_images(self, task: str) -> int:
        """How many images ``task`` learns from (what one pass of :meth:`unlabeled_batches` yields in all)."""
        ...

    def unlabeled_batches(self, task: str, device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over ``task``'s images, labels left out: ``(positions, images)`` batches on ``device``, this
        process's share of them."""
        ...
