"""EMR-Merging as a LightningModule: every task evaluated with its own modulated weights (see
:mod:`lit_adamerging.merging.emr`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from lit_adamerging.lightning.base import MergingModule, StorageDtype, check_storage_dtype
from lit_adamerging.merging import BufferPolicy, MergedEncoder
from lit_adamerging.merging.emr import RESCALER_SUMS, EMRMerge, EMRStorage, RescalerSum, emr_elect, save_emr
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo


class EMRMergingModule(MergingModule):
    """EMR-Merging (Huang et al., NeurIPS 2024): a unified task vector, one bit mask and one rescaler per task.

    Nothing to learn, ``test`` only. Task ``k`` is evaluated with ``theta_0 + lambda_k * M_k * tau_uni``
    (:func:`~lit_adamerging.merging.emr_elect` says how they are elected and which tensors take part), so
    the task must be known at inference; the data module's per-task loaders say it. Each task's
    weights are computed once per evaluation, when its first batch arrives (the test loaders run task
    by task), and kept until the next task's replace them.

    There is no single merged encoder: :meth:`merged_state_dict` is refused, :meth:`task_state_dict`
    gives one task's encoder, and :class:`~lit_adamerging.ExportMergedEncoder` writes the unified
    vector, the packed masks and the rescalers (:meth:`save_emr`; read back with
    :func:`~lit_adamerging.merging.load_emr`). Unseen tasks are refused: they have no mask nor rescaler.

    Example:
        >>> from lit_adamerging import SyntheticZoo
        >>> module = EMRMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5})
        >>> module.hparams.rescaler_sum, module.LEARNS
        ('entries', False)

    Args:
        zoo, num_classes: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        unseen_tasks: must be empty (the CLI links it from ``data.unseen_tasks``).
        rescaler_sum: ``"entries"`` (the paper's sums over every entry) or ``"tensor_means"`` (the
            authors' released code: sums of each tensor's mean); see :data:`~lit_adamerging.merging.emr.RescalerSum`.
        buffer_policy: floating-point buffers: ``"pretrained"`` keeps them in every task's weights, ``"merge"``
            makes them take part like parameters (see :data:`~lit_adamerging.merging.BufferPolicy`).
        task_vector_dtype: storage dtype of the task vectors and of the unified vector (the modulated weights
            are computed in float32).
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *MergingModule.CHECKPOINT_SETTINGS, "rescaler_sum", "buffer_policy", "task_vector_dtype",
    )

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        rescaler_sum: RescalerSum = "entries",
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
    ) -> None:
        check_storage_dtype(task_vector_dtype)
        if rescaler_sum not in RESCALER_SUMS:
            raise ValueError(f"rescaler_sum must be one of {RESCALER_SUMS}, got {rescaler_sum!r}.")
        if unseen_tasks:
            raise ValueError(
                f"EMR-Merging cannot evaluate the unseen task(s) {list(unseen_tasks)}: each task runs with its own "
                "mask and rescaler, elected from its fine-tuned model, and an unseen task has none. Merge it (give its "
                "fine-tuned weights and leave it out of data.unseen_tasks) or evaluate it with another method."
            )
        super().__init__(zoo, num_classes, unseen_tasks)
        self._packed_masks: dict[str, Tensor] | None = None
        self._rescalers: Tensor | None = None
        self._task_weights: tuple[str, torch.device, dict[str, Tensor]] | None = None  # the current task's

    def build_merger(self, encoder: nn.Module, loaded: LoadedZoo) -> MergedEncoder:
        """The encoder holding the unified vector (its one "task vector"); the masks and rescalers are kept beside."""
        hp = self.hparams
        task_vectors = self.task_vectors(encoder, loaded, buffer_policy=hp.buffer_policy, dtype=hp.task_vector_dtype)
        merge = emr_elect(task_vectors, self.seen_tasks, hp.rescaler_sum)
        del task_vectors
        self._packed_masks, self._rescalers = merge.packed_masks, merge.rescalers
        unified = {name: value.unsqueeze(0) for name, value in merge.unified.items()}
        return self.fixed_merger(encoder, unified, 1.0)

    def emr_merge(self) -> EMRMerge:
        """The merge: the unified vector (the merger's, on the module's device), the packed masks and rescalers."""
        merger = self._built_merger()
        assert self._packed_masks is not None and self._rescalers is not None
        rows = merger.stacked_task_vectors()
        return EMRMerge(
            {name: rows[name][0] for name in merger.tensor_names}, self._packed_masks, self._rescalers,
            tuple(self.seen_tasks), self.hparams.rescaler_sum,
        )

    # ----------------------------------------------------------------- evaluation
    def task_evaluation_tensors(self, task: str) -> Mapping[str, Tensor]:
        """``theta_0 + lambda_k * M_k * tau_uni`` for ``task``, computed when it differs from the last task asked."""
        merger = self._built_merger()
        device = merger.stacked_task_vectors()[merger.tensor_names[0]].device
        if self._task_weights is None or self._task_weights[:2] != (task, device):
            self._task_weights = None  # the previous task's weights go before the next ones are made
            with torch.no_grad():
                tensors = self.emr_merge().task_tensors(merger.encoder.state_dict(), task)
            self._task_weights = (task, device, tensors)
        return self._task_weights[2]

    def evaluation_tensors(self) -> dict[str, Tensor]:
        """Refused: EMR-Merging has no tensors shared by every task (see :meth:`task_evaluation_tensors`)."""
        raise ValueError(self._no_single_encoder())

    def merged_state_dict(self) -> dict[str, Tensor]:
        """Refused: EMR-Merging has no single merged encoder (see :meth:`task_state_dict` and :meth:`save_emr`)."""
        raise ValueError(self._no_single_encoder())

    def _no_single_encoder(self) -> str:
        return (
            "EMR-Merging has no single merged encoder: task k runs theta_0 + lambda_k * M_k * tau_uni. Use "
            "task_state_dict(task) for one task's encoder, or save_emr(path) (ExportMergedEncoder calls it) for the "
            "unified vector, masks and rescalers, which lit_adamerging.merging.load_emr reads back."
        )

    def task_state_dict(self, task: str) -> dict[str, Tensor]:
        """Task ``task``'s encoder as a plain state dict with the encoder's keys (loads into the original model)."""
        with torch.no_grad():
            return self.emr_merge().task_state_dict(self._built_merger().encoder.state_dict(), task)

    EXPORT_SUFFIXES: ClassVar[tuple[str, ...]] = (".safetensors",)

    def export_description(self) -> str:
        return "its unified vector, masks and rescalers (there is no single merged encoder)"

    def export(self, path: str) -> None:
        """:meth:`save_emr`: the unified vector, packed masks and rescalers, which
        :func:`~lit_adamerging.merging.load_emr` reads back."""
        self.save_emr(path)

    def save_emr(self, path: str | Path) -> Path:
        """Write the unified vector, the packed masks and the rescalers to ``path`` (see
        :func:`~lit_adamerging.merging.save_emr`), atomically."""
        return save_emr(self.emr_merge(), path)

    def storage(self) -> EMRStorage:
        """The bytes of the unified vector, masks and rescalers, against a full copy of the merged tensors per task."""
        return self.emr_merge().storage()

    def on_validation_start(self) -> None:
        self._task_weights = None

    def on_validation_end(self) -> None:
        self._task_weights = None

    def on_test_start(self) -> None:
        self._task_weights = None

    def on_test_end(self) -> None:
        self._task_weights = None
