"""The multi-task DataModule: unlabeled batches of every task for fit, labeled loaders for evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from lit_adamerging.data.cache import DecodedImages, collate_batch, decoded_test_set
from lit_adamerging.data.contract import DeclaresFitInputs, EvaluatesInStep, FitInputs, ReportsPreprocess
from lit_adamerging.data.image_file_task import ImageFileTask
from lit_adamerging.data.images import ImageReadError
from lit_adamerging.data.sampling import EvalShardBatches, EvalShardSampler, FitStreamSampler, steps_per_pass
from lit_adamerging.data.tasks import ImagesOnly, TaskData, check_task_name
from lit_adamerging.models.preprocess import Preprocess

CacheMode = Literal["disk", "memory", "none"]
__all__ = ["CacheMode", "FitInputs", "MultiTaskDataModule", "checked_unseen_tasks"]


class _Indices(Dataset):
    """The positions ``0 .. n-1`` of a task's images: fit batches of a model that reads its own per-image data."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class _Numbered(Dataset):
    """``(position, image)`` of a dataset of images (an :class:`ImagesOnly` or an images-only cache)."""

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Tensor]:
        return index, self.images[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        if hasattr(self.images, "__getitems__"):  # a decoded cache reads the rows at once
            images = self.images.__getitems__(indices)
        else:
            images = torch.stack([self.images[index] for index in indices])
        return torch.tensor(indices), images


class _Batches(Dataset):
    """A dataset read a batch at a time: ``batches[indices]`` is the batch of those items, collated."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> Any:
        if isinstance(self.dataset, DecodedImages):  # a decoded cache reads the rows at once, already a batch
            return self.dataset.__getitems__(indices)
        return default_collate([self.dataset[index] for index in indices])


class _NamedTask(Dataset):
    """A task's uncached image files: an unreadable one is reported with the task's name."""

    def __init__(self, dataset: Dataset, task: str) -> None:
        self.dataset = dataset
        self.task = task

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except ImageReadError as error:
            raise error.in_task(self.task) from error


def checked_unseen_tasks(unseen_tasks: Sequence[str], task_names: Sequence[str] | None, where: str) -> list[str]:
    """``unseen_tasks`` in the order of ``task_names``.

    A ``ValueError`` for a plain string instead of a list, a name given twice, and, when the tasks
    are known (``task_names``, named ``where`` in the errors), a name that is not a task or every
    task unseen (nothing left to merge).
    """
    if isinstance(unseen_tasks, str):
        raise ValueError(
            f"unseen_tasks must be a list of task names, got the string {unseen_tasks!r}; write [{unseen_tasks}]."
        )
    unseen = list(unseen_tasks)
    twice = sorted({name for name in unseen if unseen.count(name) > 1})
    if twice:
        raise ValueError(f"unseen_tasks names {twice} more than once; give each task once.")
    if task_names is None:
        return unseen
    unknown = [name for name in unseen if name not in task_names]
    if unknown:
        raise ValueError(
            f"unseen task(s) {unknown} are not among {where} {list(task_names)}; an unseen task is one "
            "of the tasks, marked to be evaluated only."
        )
    if set(unseen) >= set(task_names):
        raise ValueError(
            f"every one of {where} is unseen ({list(task_names)}): there is nothing to merge. Leave at least one "
            "task out of unseen_tasks."
        )
    return [name for name in task_names if name in unseen]


class MultiTaskDataModule(pl.LightningDataModule):
    """Feeds ``{task: images}`` every training step and one labeled loader per task for evaluation.

    Fit reads each task's *test* split without labels (AdaMerging's setting): the fit loaders yield
    images only, so labels cannot reach the loss. Lightning combines the dict of loaders in
    ``max_size_cycle`` mode (smaller tasks cycle). Validation and test loaders are returned in task
    order, so ``dataloader_idx`` is the task's index in :attr:`task_names`.

    Tasks that read image files and were given no ``preprocess`` use the model's eval
    preprocessing: under a Trainer, :meth:`setup` asks the LightningModule's ``eval_preprocess()``
    if it offers one (:class:`~lit_adamerging.data.contract.ReportsPreprocess`;
    :class:`~lit_adamerging.AdaMergingModule` reports its zoo's). The fit loaders yield what the model's
    ``fit_inputs`` says (:class:`~lit_adamerging.data.contract.DeclaresFitInputs`; images without one). The
    data module offers the models :class:`~lit_adamerging.data.contract.UnlabeledImages`.

    With ``cache="disk"`` (default) or ``"memory"`` each image task's test split is decoded once
    (see :mod:`lit_adamerging.data.cache`): its loaders then yield uint8 images, and
    :meth:`on_after_batch_transfer` normalises each batch on the device.

    Fit images come in a fixed order set by ``seed`` (the CLI passes its ``seed_everything``), one
    global batch per step (see :mod:`lit_adamerging.data.sampling`): under DDP each process takes
    its own slice of it (``batch_size`` images per task per process), and a run resumed from a
    checkpoint draws what the uninterrupted run would have drawn (the step count is saved in the
    checkpoint). Evaluation splits each test set across processes without padding, so every image
    is counted exactly once.

    Unseen tasks (``unseen_tasks``) are evaluated but never merged: they get no fit loader, so their
    images never reach the fitting loss and the seen tasks' fit stream is the one a run without them
    draws (the epoch length is counted over the seen tasks only). They still have their validation
    and test loaders. The model needs the same list (the CLI links it, like ``num_classes``).

    The images a method learns from (AdaMerging's fit stream, the passes of Fisher merging, RegMean
    and surgery: :meth:`unlabeled_batches`) are each task's evaluated split, labels left out (the
    paper's setting), unless ``unlabeled`` gives a task another split to learn from.

    Args:
        tasks: ``{task name: TaskData}``. A name may not be one of the logged means' names
            (:data:`~lit_adamerging.data.tasks.AVERAGE_NAMES`: ``avg``, ``avg_seen``, ``avg_unseen``) nor hold
            ``/``, ``.`` or unprintable characters (:func:`~lit_adamerging.data.tasks.check_task_name`).
        unseen_tasks: names among ``tasks`` to evaluate only (no fine-tuned model merged, no fit
            images); at least one task must stay seen. Kept in task order.
        batch_size: images per task per training step. The default 16 is one batch of the paper's
            released code, which sums the entropy means of two such batches per task and step:
            ``configs/paper/data.yaml`` uses 32 (see there).
        eval_batch_size: images per evaluation batch.
        num_workers: DataLoader workers per loader (and for decoding the cache).
        cache: ``"disk"``: decoded test sets stored in ``cache_dir`` and memory-mapped (reused across
            runs, shared by the processes of a machine); ``"memory"``: decoded in each process;
            ``"none"``: every image read from its file each time.
        cache_dir: folder of the disk cache.
        unlabeled: ``{task: TaskData}``, for seen tasks that learn from another split than the one
            they are evaluated on (e.g. ``ImageFolderTask(root, split="train")``); same class count.
            Its labels are never read.
        seed: the seed of the fit image stream (:class:`~lit_adamerging.data.sampling.FitStreamSampler`); the
            same seed draws the same images in the same order. The CLI sets it to the run's ``seed_everything``.
    """

    def __init__(
        self,
        tasks: dict[str, TaskData],
        unseen_tasks: Sequence[str] = (),
        batch_size: int = 16,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        cache: CacheMode = "disk",
        cache_dir: str = "~/.cache/lit_adamerging/decoded",
        unlabeled: dict[str, TaskData] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskDataModule needs at least one task in 'tasks'.")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}.")
        if cache not in ("disk", "memory", "none"):
            raise ValueError(f"cache must be 'disk', 'memory' or 'none', got {cache!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        by_lowercase: dict[str, str] = {}
        for name in tasks:
            check_task_name(name)
            if name.lower() in by_lowercase:
                raise ValueError(
                    f"task names {by_lowercase[name.lower()]!r} and {name!r} differ only in case; give each task "
                    "once, under one name (names pick built-in class names and templates case-insensitively)."
                )
            by_lowercase[name.lower()] = name
        self.tasks = tasks
        self.task_names: list[str] = list(tasks)
        self.num_classes: dict[str, int] = {name: task.num_classes for name, task in tasks.items()}
        self.unseen_tasks: list[str] = checked_unseen_tasks(
            unseen_tasks, self.task_names, "the data's tasks (data.tasks)"
        )
        self.seen_tasks: list[str] = [name for name in self.task_names if name not in self.unseen_tasks]
        self.unlabeled: dict[str, TaskData] = dict(unlabeled or {})
        for name, task in self.unlabeled.items():
            if name not in self.seen_tasks:
                what = "an unseen task, which learns from nothing" if name in self.unseen_tasks else "not a task"
                raise ValueError(
                    f"unlabeled names {name!r}, {what}; give other splits only for the seen tasks {self.seen_tasks}."
                )
            if task.num_classes != self.num_classes[name]:
                raise ValueError(
                    f"task {name!r}: its unlabeled split has {task.num_classes} classes but its evaluated split "
                    f"{self.num_classes[name]}; both must be splits of the same task."
                )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.cache = cache
        self.cache_dir = cache_dir
        self.seed = seed
        self._test_sets: dict[str, Dataset] = {}
        self._normalizers: dict[str, Preprocess] = {}
        self._learning_sets: dict[str, Dataset] = {}  # the images each task learns from
        self._learning_normalizers: dict[str, Preprocess] = {}
        self._built_with: Preprocess | None = None
        # Stores found or built by prepare_data, so setup does not hash the files and read them again.
        self._decoded_sets: dict[tuple[str, Preprocess], DecodedImages] = {}
        self._fit_steps = 0  # fit batches consumed: where the fit image stream resumes

    def model_preprocess(self) -> Preprocess | None:
        """The eval preprocessing of the Trainer's model (``eval_preprocess()``), ``None`` without one."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return module.eval_preprocess() if isinstance(module, ReportsPreprocess) else None

    def _decoded(self, key: str, name: str, task: ImageFileTask, preprocess: Preprocess) -> DecodedImages:
        if (key, preprocess) not in self._decoded_sets:
            cache_dir = self.cache_dir if self.cache == "disk" else None
            self._decoded_sets[key, preprocess] = decoded_test_set(task, name, preprocess, cache_dir, self.num_workers)
        return self._decoded_sets[key, preprocess]

    def _splits(self) -> list[tuple[str, str, TaskData]]:
        """``(key, task name, TaskData)`` of every split to read: the evaluated ones, then the other unlabeled ones."""
        return [
            *((name, name, task) for name, task in self.tasks.items()),
            *((f"{name} (unlabeled)", name, task) for name, task in self.unlabeled.items()),
        ]

    def prepare_data(self) -> None:
        """Build the disk cache (Lightning calls this once per machine, before :meth:`setup`)."""
        if self.cache != "disk":
            return
        preprocess = self.model_preprocess()
        for key, name, task in self._splits():
            if isinstance(task, ImageFileTask):
                self._decoded(key, name, task, task.chosen_preprocess(preprocess))

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._fit_steps = 0  # a checkpoint being resumed sets it afterwards (load_state_dict)
        preprocess = self.model_preprocess()
        if self._test_sets and preprocess == self._built_with:
            return
        sets: dict[str, Dataset] = {}
        normalizers: dict[str, Preprocess] = {}
        for key, name, task in self._splits():
            if isinstance(task, ImageFileTask) and self.cache != "none":
                normalizers[key] = task.chosen_preprocess(preprocess)
                dataset = self._decoded(key, name, task, normalizers[key])
            else:
                dataset = task.test_set(preprocess)
                if isinstance(task, ImageFileTask):
                    dataset = _NamedTask(dataset, name)
            if len(dataset) == 0:  # type: ignore[arg-type]
                split = "unlabeled split" if key != name else "test split"
                raise ValueError(f"task {name!r}: its {split} is empty; there is nothing to merge on.")
            sets[key] = dataset
        learning = {name: f"{name} (unlabeled)" if name in self.unlabeled else name for name in self.tasks}
        self._test_sets = {name: sets[name] for name in self.tasks}
        self._normalizers = {name: normalizers[name] for name in self.tasks if name in normalizers}
        self._learning_sets = {name: sets[key] for name, key in learning.items()}
        self._learning_normalizers = {name: normalizers[key] for name, key in learning.items() if key in normalizers}
        self._built_with = preprocess
        self._decoded_sets = {(key, normalizers[key]): sets[key] for key in normalizers}  # type: ignore[misc]

    def _loader(self, dataset: Dataset, batch_size: int | None, **kwargs: Any) -> DataLoader:
        if isinstance(dataset, DecodedImages):
            kwargs["collate_fn"] = collate_batch  # batches are fetched whole, by DecodedImages.__getitems__
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> dict[str, DataLoader]:
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        self._check_images_per_process(world_size, "fit")
        fit_sets = {name: self._learning_sets[name] for name in self.seen_tasks}  # unseen tasks: no fit images
        steps_per_epoch = max(
            steps_per_pass(len(dataset), self.batch_size, world_size)  # type: ignore[arg-type]
            for dataset in fit_sets.values()
        )
        indices = self._fit_inputs() == "indices"
        loaders = {}
        for name, dataset in fit_sets.items():
            sampler = FitStreamSampler(
                len(dataset), self.batch_size, steps_per_epoch, lambda: self._fit_steps, self.seed, world_size, rank  # type: ignore[arg-type]
            )
            if indices:
                loaders[name] = self._loader(_Indices(len(dataset)), sampler.batch_size, sampler=sampler)  # type: ignore[arg-type]
                continue
            images = dataset.images_only() if isinstance(dataset, DecodedImages) else ImagesOnly(dataset)
            loaders[name] = self._loader(images, sampler.batch_size, sampler=sampler)
        return loaders

    def num_images(self, task: str) -> int:
        """The number of images ``task`` learns from (:meth:`unlabeled_batches`; available after :meth:`setup`)."""
        return len(self._learning_set(task))  # type: ignore[arg-type]

    def _learning_set(self, task: str) -> Dataset:
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; the data module's tasks are {self.task_names}.")
        if task not in self._learning_sets:
            raise RuntimeError(f"task {task!r}: the data module is not set up yet; call setup() (a Trainer does).")
        return self._learning_sets[task]

    def unlabeled_batches(self, task: str, device: torch.device | str = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the images ``task`` learns from (its ``unlabeled`` split if given, else its evaluated
        split), labels left out: ``(positions, images)`` batches on ``device``.

        The images come in order, ``eval_batch_size`` at a time, normalised as the model expects
        (float32); ``positions`` (int64) are their places in the task's split. Under a Trainer with
        several processes each process gets its own share, each image going to exactly one process
        (no padding). This is how Fisher merging, RegMean and surgery read each task once.

        Raises:
            ValueError: a batch holds an image with NaN or infinite values (the message names the task and
                the images' positions): statistics computed from it would be NaN or infinite.
        """
        dataset = self._learning_set(task)
        images = dataset.images_only() if isinstance(dataset, DecodedImages) else ImagesOnly(dataset)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        sampler = None
        if world_size > 1:
            sampler = EvalShardSampler(len(images), world_size, self.trainer.global_rank)  # type: ignore[union-attr]
        loader = DataLoader(
            _Numbered(images), batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate_batch,  # _Numbered.__getitems__ builds whole batches
        )
        for positions, batch in loader:
            batch = batch.to(device, non_blocking=True)
            if task in self._learning_normalizers:
                batch = self._learning_normalizers[task].normalize(batch)
            _check_finite_images(task, positions, batch)
            yield positions.to(device), batch

    def _evaluates_in_step(self) -> bool:
        """Whether the model needs every process to run as many evaluation batches (:class:`EvaluatesInStep`)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return isinstance(module, EvaluatesInStep) and bool(module.evaluates_in_step)

    def _fit_inputs(self) -> FitInputs:
        """What the model's fit batches hold: its ``fit_inputs`` (``"images"`` for a model that declares none)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        inputs = module.fit_inputs if isinstance(module, DeclaresFitInputs) else "images"
        if inputs not in ("images", "indices"):
            raise ValueError(f"{type(module).__name__}.fit_inputs must be 'images' or 'indices', got {inputs!r}.")
        return inputs

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict):
            self._fit_steps += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The fit progress (batches consumed), so a resumed fit continues the image stream where it stopped."""
        return {"fit_steps": self._fit_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fit_steps = int(state_dict.get("fit_steps", 0))

    def _check_images_per_process(self, world_size: int, stage: str) -> None:
        sets = self._test_sets if stage == "evaluate" else {name: self._learning_sets[name] for name in self.seen_tasks}
        for name, dataset in sets.items():
            if len(dataset) < world_size:  # type: ignore[arg-type]
                raise ValueError(
                    f"task {name!r}: its {'test' if stage == 'evaluate' else 'unlabeled'} split has {len(dataset)} "  # type: ignore[arg-type]
                    f"images, fewer than the {world_size} processes; {stage} on fewer devices."
                )

    def _eval_dataloaders(self) -> list[DataLoader]:
        world_size = self.trainer.world_size if self.trainer is not None else 1
        self._check_images_per_process(world_size, "evaluate")
        loaders = []
        for dataset in self._test_sets.values():
            if world_size == 1:
                loaders.append(self._loader(dataset, self.eval_batch_size, shuffle=False))
            elif self._evaluates_in_step():
                # Every process in each forward of a sharded model: as many batches on each (EvalShardBatches).
                rank = self.trainer.global_rank  # type: ignore[union-attr]
                batches = EvalShardBatches(len(dataset), world_size, rank, self.eval_batch_size)  # type: ignore[arg-type]
                loaders.append(self._loader(_Batches(dataset), None, sampler=batches, collate_fn=collate_batch))
            else:
                # No padding (Lightning's default DistributedSampler repeats samples to even out ranks).
                sampler = EvalShardSampler(len(dataset), world_size, self.trainer.global_rank)  # type: ignore[arg-type,union-attr]
                loaders.append(self._loader(dataset, self.eval_batch_size, shuffle=False, sampler=sampler))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_dataloaders()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise the uint8 images of cached tasks on the device (float32, the model's mean and std)."""
        if not self._normalizers and not self._learning_normalizers:
            return batch
        if isinstance(batch, dict):  # fit: {task: images}, or {task: positions} (fit_inputs "indices")
            if self._fit_inputs() == "indices":
                return batch
            return {
                task: self._learning_normalizers[task].normalize(images) if task in self._learning_normalizers
                else images
                for task, images in batch.items()
            }
        task = self.task_names[dataloader_idx]
        if task not in self._normalizers:
            return batch
        images, labels = batch
        return self._normalizers[task].normalize(images), labels


def _check_finite_images(task: str, positions: Tensor, images: Tensor) -> None:
    """A ``ValueError`` naming ``task`` and the positions of its images that hold NaN or infinite values."""
    if not images.is_floating_point():
        return
    finite = images.isfinite().flatten(1).all(dim=1).cpu()
    if bool(finite.all()):
        return
    bad = positions.cpu()[~finite].tolist()
    shown = ", ".join(map(str, bad[:10])) + (f", ... ({len(bad)} in this batch)" if len(bad) > 10 else "")
    raise ValueError(
        f"task {task!r}: the image(s) at position(s) {shown} of the split it learns from hold NaN or infinite "
        "values, so statistics computed from them (Fisher, Gram matrices, features) would not be finite. Fix or "
        "remove those images, or have the task's dataset return finite pixel values."
    )
