"""Data-free merges as a LightningModule: weight averaging, task arithmetic and TIES-merging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

from lit_adamerging.lightning.base import MergingModule, StorageDtype, check_storage_dtype, check_ties
from lit_adamerging.merging import BufferPolicy, MergedEncoder, ShardedMergedEncoder
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo


class TaskArithmeticModule(MergingModule):
    """``theta_0 + scale * sum_k tau_k`` over the merged tasks' task vectors: nothing to learn, ``test`` only.

    Task arithmetic (Ilharco et al., 2023) with ``scale=0.3``; weight averaging with ``scale=None``
    (``1 / number of merged tasks``); TIES-merging (Yadav et al., 2023) with ``ties_k=0.2,
    ties_normalize=True`` (trim to the top 20% of each task vector, elect signs, disjoint mean).
    The same merges on plain state dicts: :func:`~lit_adamerging.merging.task_arithmetic`,
    :func:`~lit_adamerging.merging.weight_averaging`, :func:`~lit_adamerging.merging.ties_merging`.

    Example:
        >>> from lit_adamerging import SyntheticZoo
        >>> module = TaskArithmeticModule(SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5}, scale=0.3)
        >>> module.hparams.scale, module.LEARNS
        (0.3, False)

    Args:
        zoo, num_classes, unseen_tasks: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        scale: the coefficient of every task vector; ``None``: ``1 / number of merged tasks``.
        ties_k: if set, TIES trim/elect/disjoint the task vectors first, keeping this fraction.
        ties_normalize: divide TIES vectors by the number of tasks keeping each entry (TIES-merging).
        buffer_policy: what to do with floating-point buffers (see :data:`~lit_adamerging.merging.BufferPolicy`).
        task_vector_dtype: storage dtype of the stacked task vectors (the merge runs in fp32).
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *MergingModule.CHECKPOINT_SETTINGS, "scale", "ties_k", "ties_normalize", "buffer_policy", "task_vector_dtype",
    )
    SHARDS: ClassVar[bool] = True

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        scale: float | None = 0.3,
        ties_k: float | None = None,
        ties_normalize: bool = False,
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
    ) -> None:
        check_storage_dtype(task_vector_dtype)
        check_ties(ties_k, ties_normalize)
        super().__init__(zoo, num_classes, unseen_tasks)

    def build_merger(self, encoder: nn.Module, loaded: LoadedZoo) -> MergedEncoder | ShardedMergedEncoder:
        hp = self.hparams
        task_vectors = self.task_vectors(
            encoder, loaded, buffer_policy=hp.buffer_policy, dtype=hp.task_vector_dtype, ties_k=hp.ties_k,
            ties_normalize=hp.ties_normalize,
        )
        scale = 1.0 / len(self.seen_tasks) if hp.scale is None else hp.scale
        return self.fixed_merger(encoder, task_vectors, scale)

    def evaluation_tensors(self) -> dict[str, Tensor]:
        return self.coefficient_merge()
