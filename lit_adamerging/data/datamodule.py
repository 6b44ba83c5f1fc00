"""The multi-task DataModule: unlabeled batches of every task for fit, labeled loaders for evaluation."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from lit_adamerging.data.tasks import ImagesOnly, TaskData


class MultiTaskDataModule(pl.LightningDataModule):
    """Feeds ``{task: images}`` every training step and one labeled loader per task for evaluation.

    Fit reads each task's *test* split without labels (AdaMerging's setting): the fit loaders yield
    images only, so labels cannot reach the loss. Lightning combines the dict of loaders in
    ``max_size_cycle`` mode (smaller tasks cycle). Validation and test loaders are returned in task
    order, so ``dataloader_idx`` is the task's index in :attr:`task_names`.

    Args:
        tasks: ``{task name: TaskData}``.
        batch_size: images per task per training step (paper: 16).
        eval_batch_size: images per evaluation batch.
        num_workers: DataLoader workers per loader.
    """

    def __init__(
        self,
        tasks: dict[str, TaskData],
        batch_size: int = 16,
        eval_batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskDataModule needs at least one task in 'tasks'.")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}.")
        self.tasks = tasks
        self.task_names: list[str] = list(tasks)
        self.num_classes: dict[str, int] = {name: task.num_classes for name, task in tasks.items()}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._test_sets: dict[str, Dataset] = {}

    def setup(self, stage: str) -> None:
        for name, task in self.tasks.items():
            if name not in self._test_sets:
                dataset = task.test_set()
                if len(dataset) == 0:  # type: ignore[arg-type]
                    raise ValueError(f"task {name!r}: its test split is empty; there is nothing to merge on.")
                self._test_sets[name] = dataset

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {
            name: DataLoader(
                ImagesOnly(dataset),
                batch_size=self.batch_size,
                shuffle=True,
                drop_last=len(dataset) >= self.batch_size,  # type: ignore[arg-type]
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
            )
            for name, dataset in self._test_sets.items()
        }

    def _eval_dataloaders(self) -> list[DataLoader]:
        return [
            DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)
            for dataset in self._test_sets.values()
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders()
