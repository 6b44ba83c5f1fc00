"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation on unlabeled images."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lit_adamerging.lightning.base import MergingModule, StorageDtype, check_storage_dtype, check_ties
from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY
from lit_adamerging.merging import BufferPolicy, Granularity, MergedEncoder, ShardedMergedEncoder, entropy
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo


class EntropyObjective:
    """The entropy objective of the learned merges, shared by :class:`AdaMergingModule` and
    :class:`~lit_adamerging.RankWiseAdaMergingModule` (put before :class:`MergingModule` in the bases).

    The loss is the sum over the seen tasks of the mean Shannon entropy of their heads' predictions
    on a batch of their unlabeled images, all tasks in one forward and one backward; a non-finite
    loss is reported one step later, naming the task(s), and nothing is saved or evaluated after it.
    A method says how a training batch is encoded (:meth:`_training_features`).
    """

    _last_entropies: tuple[int, Tensor] | None = None  # (step, entropy per task), checked one step later

    def _training_features(self, images: Tensor) -> Tensor:
        """The merged encoder's features of ``images``, differentiable in what the method learns."""
        return self._built_merger()(images)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_last_entropies()  # never save what a non-finite loss has updated
        super().on_save_checkpoint(checkpoint)

    def on_train_end(self) -> None:
        self._check_last_entropies()

    def _check_last_entropies(self) -> None:
        """Raise if the last training step's loss was not finite, naming the task(s) whose entropy was not.

        Checked one step later (and before saving, evaluating or ending the fit), so that reading
        the value does not make every step wait for the device.
        """
        if self._last_entropies is None:
            return
        step, entropies = self._last_entropies
        self._last_entropies = None
        values = entropies.tolist()
        bad = {task: value for task, value in zip(self.seen_tasks, values) if not math.isfinite(value)}
        if bad:
            raise FloatingPointError(
                f"training step {step}: the loss is not finite: the entropy of task(s) {list(bad)} is "
                f"{list(bad.values())}. "
                "Their images, heads or fine-tuned weights hold NaN or infinite values, or the encoder overflows "
                "(with precision 16-mixed, try bf16-mixed or 32-true). Nothing was saved or exported from this step on."
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._check_last_entropies()
        tasks = self.seen_tasks
        missing = [task for task in tasks if task not in batch]
        if missing:
            raise KeyError(f"the training batch has no images for task(s) {missing}; got {list(batch)}.")
        unseen = [task for task in self.unseen_tasks if task in batch]
        if unseen:
            raise ValueError(
                f"the training batch holds images of the unseen task(s) {unseen}; unseen tasks are evaluated only. "
                "Give the data module the same unseen_tasks (MultiTaskDataModule(..., unseen_tasks=...))."
            )
        sizes = [batch[task].shape[0] for task in tasks]
        features = self._training_features(torch.cat([batch[task] for task in tasks]))
        entropies = {
            task: entropy(self.heads[task](chunk)).mean() for task, chunk in zip(tasks, features.split(sizes))
        }
        stacked = torch.stack(list(entropies.values()))
        self._last_entropies = (self.global_step + 1, stacked.detach())
        loss = stacked.sum()
        total = sum(sizes)
        self.log("train/loss", loss, prog_bar=True, batch_size=total)
        self.log_dict({f"train/entropy/{task}": value for task, value in entropies.items()}, batch_size=total)
        return loss


class AdaMergingModule(EntropyObjective, MergingModule):
    """Learns merging coefficients by minimising the entropy of every task head on unlabeled images.

    Task-wise (``granularity="task"``: one coefficient per task) or layer-wise (``"layer"``: one per
    task and parameter tensor) AdaMerging; AdaMerging++ with ``ties_k=0.2`` (TIES-trimmed task
    vectors). The loss is the sum over the seen tasks of the mean Shannon entropy of their heads'
    predictions on a batch of their unlabeled images, all tasks in one forward and one backward.
    A checkpoint holds only the coefficients (and Adam's state): kilobytes.

    With the same seed and seen tasks, the learned coefficients are the same with or without
    unseen tasks. Lightning warns at the start of ``fit`` that modules are in eval mode: that is
    intended (see :meth:`train`); :func:`~lit_adamerging.lightning.base.intended_warnings_ignored` hides it.

    Example:
        >>> from lit_adamerging import SyntheticZoo
        >>> module = AdaMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5}, granularity="task")
        >>> module.coefficients()[:, 0]  # [tasks, merged tensors]; task-wise, each row repeats one value
        tensor([0.3000, 0.3000])

    Args:
        zoo, num_classes, unseen_tasks: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        granularity: ``"task"`` (one coefficient per task) or ``"layer"`` (one per task and tensor).
        init: initial coefficient; ``None`` means ``1 / number of merged tasks``.
        clamp: clamp coefficients to ``[0, 1]`` in the forward (the paper's default).
        ties_k: if set, TIES trim/elect/disjoint the task vectors first, keeping this fraction (AdaMerging++).
        ties_normalize: divide TIES vectors by the number of tasks keeping each entry.
        buffer_policy: what to do with floating-point buffers (see :data:`~lit_adamerging.merging.BufferPolicy`).
        task_vector_dtype: storage dtype of the stacked task vectors (the merge runs in fp32).
        lr: Adam learning rate.
        betas: Adam betas.
        cuda_graphs: on CUDA, capture each training step's merge and encoder (forward and backward)
            as CUDA graphs once and replay them (see :class:`~lit_adamerging.merging.MergedEncoder`);
            same results, fewer host calls. An encoder that cannot be captured falls back to eager.
    """

    LEARNS: ClassVar[bool] = True
    # The optimiser's settings (lr, betas) do not change what the coefficients mean.
    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *MergingModule.CHECKPOINT_SETTINGS, "granularity", "init", "clamp", "ties_k", "ties_normalize",
        "buffer_policy", "task_vector_dtype",
    )
    LEARNED_STATE: ClassVar[tuple[str, ...]] = (COEFFICIENTS_KEY,)
    SHARDS: ClassVar[bool] = True

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        granularity: Granularity = "layer",
        init: float | None = 0.3,
        clamp: bool = True,
        ties_k: float | None = None,
        ties_normalize: bool = False,
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        cuda_graphs: bool = True,
    ) -> None:
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}.")
        check_storage_dtype(task_vector_dtype)
        check_ties(ties_k, ties_normalize)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        super().__init__(zoo, num_classes, unseen_tasks)
        self._last_entropies: tuple[int, Tensor] | None = None  # (step, entropy per task), checked one step later

    # ----------------------------------------------------------------- building
    def build_merger(self, encoder: nn.Module, loaded: LoadedZoo) -> MergedEncoder | ShardedMergedEncoder:
        hp = self.hparams
        task_vectors = self.task_vectors(
            encoder, loaded, buffer_policy=hp.buffer_policy, dtype=hp.task_vector_dtype, ties_k=hp.ties_k,
            ties_normalize=hp.ties_normalize,
        )
        init = 1.0 / len(self.seen_tasks) if hp.init is None else hp.init
        return self.merged_encoder(encoder, task_vectors, hp.granularity, init, hp.clamp, cuda_graphs=hp.cuda_graphs)

    # ----------------------------------------------------------------- coefficients
    def coefficients(self) -> Tensor:
        """The coefficients in use, ``[merged tasks, 1 or merged tensors]`` (clamped if ``clamp``)."""
        return self._built_merger().coefficients().detach()

    def load_learned_state(self, learned: Mapping[str, Tensor]) -> None:
        merger = self._built_merger()
        set_coefficients(merger, learned[COEFFICIENTS_KEY], len(self.seen_tasks), self.hparams.granularity)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self._built_merger().coefficients.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas)
        )

    def evaluation_tensors(self) -> dict[str, Tensor]:
        """The merge of the coefficients (checked first: no evaluation after a non-finite loss)."""
        self._check_last_entropies()
        return self.coefficient_merge()


def set_coefficients(
    merger: MergedEncoder | ShardedMergedEncoder, raw: Tensor, merged_tasks: int, granularity: str
) -> None:
    """Copy learned raw coefficients into ``merger``, after checking their shape and values."""
    target = merger.coefficients.raw
    if raw.shape != target.shape:
        raise ValueError(
            f"the checkpoint's coefficients have shape {tuple(raw.shape)} but this model needs "
            f"{tuple(target.shape)} ({merged_tasks} merged tasks, granularity {granularity!r}); it was saved for "
            "other tasks, models or settings."
        )
    if not bool(torch.isfinite(raw).all()):
        raise ValueError(
            "the coefficients being loaded hold NaN or infinite values; they describe no merge (clamping would "
            "turn +inf into 1 silently). Load coefficients from a run that did not diverge."
        )
    with torch.no_grad():
        target.copy_(raw)
