"""Spectral merges as LightningModules: TSV-M and isotropic merging (Iso-C, Iso-CTS); nothing to learn, ``test`` only.

The merged task vector is computed once, when evaluation starts (or at ``merged_state_dict()``), on
the device the module is on, from the seen tasks' task vectors (:mod:`lit_adamerging.merging.spectral`
says which tensors are matrices and how each merge treats them); evaluation runs with
``theta_0 + merged``. ``fit`` and checkpoints are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from lit_adamerging.lightning.base import MergingModule, StorageDtype, check_storage_dtype
from lit_adamerging.merging import BufferPolicy, MergedEncoder, ShardedMergedEncoder
from lit_adamerging.merging.spectral import (
    ISO_ALPHA,
    ISO_COMMON_FRACTION,
    TSV_ALPHA,
    check_alpha,
    check_common_fraction,
    check_rank_fraction,
    iso_task_vector,
    spectral_matrices,
    tsv_task_vector,
)
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo


class SpectralMergingModule(MergingModule):
    """What TSV-M and isotropic merging share: the task vectors, the matrix rule, the merge computed once.

    Subclasses implement :meth:`merged_task_vector`.

    Args:
        zoo, num_classes, unseen_tasks: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        buffer_policy: floating-point buffers: ``"pretrained"`` keeps them (default), ``"merge"`` gives them
            ``alpha`` times the mean of their task vectors, ``"require_equal"`` checks that they were not changed.
        task_vector_dtype: storage dtype of the stacked task vectors (the decompositions run in float64).
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *MergingModule.CHECKPOINT_SETTINGS, "buffer_policy", "task_vector_dtype",
    )
    SHARDS: ClassVar[bool] = True

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
    ) -> None:
        check_storage_dtype(task_vector_dtype)
        super().__init__(zoo, num_classes, unseen_tasks)
        self._merged: dict[str, Tensor] | None = None
        self.matrices: list[str] = []

    def build_merger(self, encoder: nn.Module, loaded: LoadedZoo) -> MergedEncoder | ShardedMergedEncoder:
        """The encoder with the seen tasks' task vectors (their coefficients unused: the merge is spectral)."""
        task_vectors = self.task_vectors(
            encoder, loaded, buffer_policy=self.hparams.buffer_policy, dtype=self.hparams.task_vector_dtype
        )
        self.matrices = [name for name in spectral_matrices(encoder) if name in task_vectors]
        return self.fixed_merger(encoder, task_vectors, 1.0)

    def merged_task_vector(self, task_vectors: Mapping[str, Tensor], matrices: list[str]) -> dict[str, Tensor]:
        """The method's merged task vector ``{name: Tensor[*shape]}`` from the stacked ``{name: Tensor[T, *shape]}``,
        the tensors named in ``matrices`` merged as matrices."""
        raise NotImplementedError

    def evaluation_tensors(self) -> dict[str, Tensor]:
        """``theta_0 + merged task vector`` for every tensor with task vectors, computed the first time."""
        merger = self._built_merger()
        if self._merged is None:
            with torch.inference_mode(False), torch.no_grad():
                theta0 = merger.pretrained_tensors()
                merged = merger.apply_merge(self.merged_task_vector, self.matrices)
                self._merged = {
                    name: (theta0[name].float() + update).to(theta0[name].dtype) for name, update in merged.items()
                }
        device = next(iter(merger.stacked_task_vectors().values())).device
        if any(tensor.device != device for tensor in self._merged.values()):  # the module moved since
            self._merged = {name: tensor.to(device) for name, tensor in self._merged.items()}
        return self._merged


class TSVMergingModule(SpectralMergingModule):
    """TSV-M, Task Singular Vectors merge (Gargiulo et al., CVPR 2025): nothing to learn, ``test`` only.

    Per matrix (linear and convolution weights, attention's packed in-projection as one), each task
    keeps its top ``rank_fraction`` of the layer's singular components; the tasks' left and right
    singular vectors are concatenated and decorrelated (``X = P S Q^T -> P Q^T``) and the layer
    becomes ``alpha * X_perp diag(sigma) Y_perp^T``. Other tensors: ``alpha`` times the mean of their
    task vectors. The same merge on plain state dicts: :func:`~lit_adamerging.merging.tsv_merging`.

    Example:
        >>> from lit_adamerging import SyntheticZoo
        >>> module = TSVMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5})
        >>> module.hparams.alpha, module.hparams.rank_fraction, module.LEARNS
        (1.0, None, False)

    Args:
        zoo, num_classes, unseen_tasks: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        alpha: the scale of the merged task vector (the paper's 1.0).
        rank_fraction: each task's share of every layer's rank, in (0, 1]; ``None`` (the paper's):
            ``1 / number of merged tasks``, so the tasks together fill the layer's rank.
        buffer_policy, task_vector_dtype: see :class:`SpectralMergingModule`.
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *SpectralMergingModule.CHECKPOINT_SETTINGS, "alpha", "rank_fraction",
    )

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        alpha: float = TSV_ALPHA,
        rank_fraction: float | None = None,
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
    ) -> None:
        check_alpha(alpha)
        check_rank_fraction(rank_fraction)
        super().__init__(zoo, num_classes, unseen_tasks, buffer_policy, task_vector_dtype)

    def merged_task_vector(self, task_vectors: Mapping[str, Tensor], matrices: list[str]) -> dict[str, Tensor]:
        return tsv_task_vector(task_vectors, self.hparams.alpha, self.hparams.rank_fraction, matrices=matrices)


class IsotropicMergingModule(SpectralMergingModule):
    """Isotropic merging, Iso-CTS and Iso-C (Marczak et al., ICML 2025): nothing to learn, ``test`` only.

    Per matrix, the top ``common_fraction`` of the summed task vector's singular directions form a
    common subspace; each task's vector, projected off it, adds its own top directions (an equal
    share of the remaining rank per task); the directions are concatenated, decorrelated as in
    TSV-M, and every singular value becomes their mean: ``alpha * mean(sigma) * X_perp Y_perp^T``.
    ``common_fraction=1.0`` leaves no task-specific share: that is Iso-C, the sum's spectrum
    flattened to its mean singular value, so both methods are this class (``iso_c_merging`` and
    ``iso_cts_merging`` presets). Other tensors: ``alpha`` times the mean of their task vectors. The
    same merges on plain state dicts: :func:`~lit_adamerging.merging.iso_cts_merging`,
    :func:`~lit_adamerging.merging.iso_c_merging`.

    Example:
        >>> from lit_adamerging import SyntheticZoo
        >>> module = IsotropicMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5})
        >>> module.hparams.alpha, module.hparams.common_fraction
        (1.0, 0.8)

    Args:
        zoo, num_classes, unseen_tasks: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        alpha: the scale of the merged task vector (FusionBench's 1.0; the paper tunes it on validation data).
        common_fraction: the share of each layer's rank taken from the summed task vector, in [0, 1]:
            0.8 (the authors' Iso-CTS config), 1.0 for Iso-C.
        buffer_policy, task_vector_dtype: see :class:`SpectralMergingModule`.
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *SpectralMergingModule.CHECKPOINT_SETTINGS, "alpha", "common_fraction",
    )

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        alpha: float = ISO_ALPHA,
        common_fraction: float = ISO_COMMON_FRACTION,
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
    ) -> None:
        check_alpha(alpha)
        check_common_fraction(common_fraction)
        super().__init__(zoo, num_classes, unseen_tasks, buffer_policy, task_vector_dtype)

    def merged_task_vector(self, task_vectors: Mapping[str, Tensor], matrices: list[str]) -> dict[str, Tensor]:
        return iso_task_vector(task_vectors, self.hparams.alpha, self.hparams.common_fraction, matrices=matrices)
