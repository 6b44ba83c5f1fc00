"""Callbacks: per-task evaluation of each head, coefficient logging, export of the merged encoder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lit_adamerging.data.tasks import AVERAGE_NAMES
from lit_adamerging.io import save_state_dicts
from lit_adamerging.lightning.sharded import is_sharded

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lit_adamerging.lightning.base import MergingModule


class PerTaskAccuracy(pl.Callback):
    """Top-k accuracy of every task's head on that task's labeled split.

    Logs ``<stage>/acc/<task>`` after the task's last batch (so Lightning files it under that
    task's dataloader) and their mean ``<stage>/acc/avg`` at the end of the epoch (stage ``val`` or
    ``test``); with unseen tasks (``pl_module.unseen_tasks``) also the means over the seen tasks,
    ``<stage>/acc/avg_seen``, and over the unseen ones, ``<stage>/acc/avg_unseen``. One
    torchmetrics metric per task (class counts differ); under DDP ``compute()`` gathers the counts
    of every process. The names of the means (:data:`~lit_adamerging.data.tasks.AVERAGE_NAMES`) are refused
    as task names by :class:`~lit_adamerging.MultiTaskDataModule`. Every merging module
    (:class:`~lit_adamerging.MergingModule`) adds this callback when none is configured.
    """

    def __init__(self, top_k: int = 1) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}.")
        self.top_k = top_k
        self._metrics: dict[str, MulticlassAccuracy] = {}
        self._accuracies: dict[str, torch.Tensor] = {}

    def _metric(self, pl_module: MergingModule, task: str, device: torch.device) -> MulticlassAccuracy:
        if task not in self._metrics:
            num_classes = pl_module.num_classes[task]
            self._metrics[task] = MulticlassAccuracy(
                num_classes=num_classes, top_k=min(self.top_k, num_classes), average="micro", validate_args=False
            )
        return self._metrics[task].to(device)

    def _log_task(self, pl_module: MergingModule, stage: str, task: str) -> None:
        metric = self._metrics[task]
        self._accuracies[task] = metric.compute()
        metric.reset()
        pl_module.log(f"{stage}/acc/{task}", self._accuracies[task], add_dataloader_idx=False, batch_size=1)

    def _update(self, trainer: pl.Trainer, pl_module: MergingModule, outputs: dict[str, Any],
                batch_idx: int, dataloader_idx: int, stage: str) -> None:
        task, logits, labels = outputs["task"], outputs["logits"], outputs["labels"]
        num_classes = logits.shape[-1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
            raise ValueError(
                f"task {task!r}: label {bad} is outside the head's {num_classes} classes; "
                "the dataset's classes and the head do not match."
            )
        self._metric(pl_module, task, logits.device).update(logits.detach(), labels)
        if trainer.sanity_checking:
            batches = trainer.num_sanity_val_batches
        else:
            batches = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
        if batch_idx + 1 == batches[dataloader_idx]:
            self._log_task(pl_module, stage, task)

    def _log_average(self, pl_module: MergingModule, stage: str) -> None:
        for task, metric in self._metrics.items():
            if metric.update_called:  # a loader that ended before its announced length
                self._log_task(pl_module, stage, task)
        every, seen, unseen = AVERAGE_NAMES  # the data module refuses tasks of these names
        groups = {every: list(self._accuracies)}
        if pl_module.unseen_tasks:
            groups[seen] = [task for task in self._accuracies if task not in pl_module.unseen_tasks]
            groups[unseen] = [task for task in self._accuracies if task in pl_module.unseen_tasks]
        for name, tasks in groups.items():
            if tasks:
                average = torch.stack([self._accuracies[task] for task in tasks]).mean()
                pl_module.log(f"{stage}/acc/{name}", average, add_dataloader_idx=False)
        self._accuracies = {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, pl_module, outputs, batch_idx, dataloader_idx, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(trainer, pl_module, outputs, batch_idx, dataloader_idx, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._log_average(pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._log_average(pl_module, "test")


class CoefficientLogger(pl.Callback):
    """Logs the learned merging coefficients while fitting an :class:`~lit_adamerging.AdaMergingModule` (other
    modules learn no coefficients: nothing is logged for them).

    Every ``every_n_steps`` optimizer steps: one scalar per merged (seen) task, ``coefficients/<task>``
    (the mean over the merged tensors for layer-wise). At the end of each training epoch: a tasks x tensors
    heatmap figure, ``coefficients/heatmap``, to every TensorBoard logger.
    """

    def __init__(self, every_n_steps: int = 10, heatmap: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        self._last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not _learns_coefficients(pl_module):
            return
        if step % self.every_n_steps == 0 and step != self._last_step:
            # Written to the loggers directly: a value given to self.log in a hook stays in
            # Lightning's results and is logged again, stale, at every later step.
            self._last_step = step
            means = pl_module.coefficients().mean(dim=1)
            metrics = {f"coefficients/{task}": float(value) for task, value in zip(pl_module.seen_tasks, means)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self.heatmap or not trainer.is_global_zero or not _learns_coefficients(pl_module):
            return
        writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if writers:
            figure = coefficient_heatmap(pl_module.coefficients().cpu(), pl_module.seen_tasks)
            for writer in writers:
                writer.add_figure("coefficients/heatmap", figure, global_step=trainer.global_step)


def coefficient_heatmap(coefficients: torch.Tensor, task_names: list[str]) -> Figure:
    """A matplotlib figure of the ``[tasks, tensors]`` coefficient matrix.

    A plain :class:`~matplotlib.figure.Figure`, made without pyplot: no backend is chosen or switched
    and no figure is left open (a notebook still shows it, TensorBoard draws it with Agg).
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, coefficients.shape[1] * 0.06), 1.0 + 0.4 * len(task_names)), layout="tight")
    axes = figure.subplots()
    image = axes.imshow(coefficients.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_yticks(range(len(task_names)), task_names)
    axes.set_xlabel("merged tensor (encoder order)")
    figure.colorbar(image, ax=axes, label="coefficient")
    return figure


class ExportMergedEncoder(pl.Callback):
    """Writes the merged model at the end of fit and of test: what the method's
    :meth:`~lit_adamerging.lightning.base.MergingModule.export` writes.

    For most methods that is the merged encoder as a plain state dict with the original encoder's keys
    (open_clip: ``model.visual``'s; timm: the backbone's), so
    ``encoder.load_state_dict(safetensors.torch.load_file(path))`` works without this library. A method
    whose model is more than one encoder writes more, or another file: Representation Surgery adds its
    maps beside ``path`` (:func:`surgery_path`), EMR-Merging and WEMoE write their own ``.safetensors``
    files (:func:`~lit_adamerging.merging.load_emr`, :func:`~lit_adamerging.merging.load_wemoe` read them).
    Whether every file can be written is checked when the run starts, not after the last step; NaN or
    infinite values are never written (an error names their tensors), and the files of one export are
    written together or not at all.

    Args:
        path: ``.safetensors`` (default choice) or ``.pt``/``.pth``; written atomically.
    """

    def __init__(self, path: str = "merged_encoder.safetensors") -> None:
        if not path.endswith((".safetensors", ".pt", ".pth")):
            raise ValueError(f"export path {path!r} must end in .safetensors, .pt or .pth.")
        self.path = path

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        """Fail now, before any step, if a file to write cannot be: the method does not write that kind of file,
        or it is a folder, or lies under a file or a read-only folder."""
        suffixes = pl_module.EXPORT_SUFFIXES
        if is_sharded(trainer):
            suffixes = (".safetensors",)  # written one tensor at a time, as each is gathered
        if not self.path.endswith(suffixes):
            raise ValueError(
                f"export path {self.path!r}: {type(pl_module).__name__} exports {pl_module.export_description()}, "
                f"written as {' or '.join(suffixes)}; give a path ending in {suffixes[0]}."
            )
        for path, what in pl_module.export_paths(self.path).items():
            _check_writable(path, what, "give another file name")

    def _export(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero or is_sharded(trainer):  # sharded, every process helps gather the tensors
            pl_module.export(self.path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._export(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._export(trainer, pl_module)


def surgery_path(path: str) -> str:
    """Where a model's Representation Surgery maps go beside its encoder's ``path``: ``<stem>.surgery<suffix>``."""
    file = Path(path)
    return str(file.with_suffix(".surgery" + file.suffix))


def save_finite_state_dicts(files: dict[str, tuple[str, dict[str, Tensor]]]) -> None:
    """Write ``{path: (what, state dict)}`` together or not at all, atomically; refuse (naming the tensors) any
    NaN or infinite value before anything is written."""
    for path, (what, state) in files.items():
        bad = [key for key, value in state.items() if value.is_floating_point() and not bool(value.isfinite().all())]
        if bad:
            raise FloatingPointError(
                f"{what} holds NaN or infinite values in {len(bad)} tensor(s) ({bad[:5]}); it was not exported to "
                f"{path}, nor anything else. Check the coefficients, the fine-tuned weights and the training loss."
            )
    save_state_dicts({path: state for path, (_, state) in files.items()})


def _learns_coefficients(pl_module: Any) -> bool:
    from lit_adamerging.lightning.adamerging import AdaMergingModule  # it imports this module

    return isinstance(pl_module, AdaMergingModule)


def _check_writable(path: str, what: str, advice: str) -> None:
    """A ``ValueError`` naming ``path`` if a file cannot be written there: a folder is in the way, a file stands
    where a folder must be, or the folder that would hold it is not writable."""
    absolute = Path(path).absolute()
    if absolute.is_dir():
        raise ValueError(f"{what} {path!r} is a folder; {advice}.")
    existing = absolute.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path!r} cannot be written: {existing} is a file, not a folder. Choose another path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path!r} cannot be written: the folder {existing} is not writable.")
