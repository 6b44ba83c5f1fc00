"""Rank-wise AdaMerging: one gate per singular component of every task vector's matrices, learned by entropy.

AdaRank's idea (Lee et al., *AdaRank: Adaptive Rank Pruning for Enhanced Model Merging*, arXiv
2503.22178, ICLR 2026) on this library's machinery; what the paper and its released code do, and
where this module differs, is in docs/rank_wise_adamerging.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lit_adamerging.lightning.adamerging import EntropyObjective
from lit_adamerging.lightning.base import MergingModule, StorageDtype, check_storage_dtype
from lit_adamerging.lightning.checkpoint_io import GATES_KEY
from lit_adamerging.merging import BufferPolicy, MergedEncoder
from lit_adamerging.merging.rank_wise import (
    RANK_BASES,
    RANK_WISE_SCALE,
    RankBase,
    RankComponents,
    check_scale,
    rank_components,
    rank_wise_task_vector,
)
from lit_adamerging.merging.spectral import check_rank_fraction, spectral_matrices
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo

GATE_INIT = 0.1
"""The gates' initial logit: AdaRank's code starts every kept component's mask logit at 0.1."""

GATE_TEMPERATURE = 10.0
"""The sigmoid's temperature: AdaRank's ``mask_temp`` for task arithmetic's task vectors (ViT configs)."""


class RankGates(nn.Module):
    """One learnable gate per task, matrix and singular component: ``g = sigmoid(raw / temperature)``.

    With ``straight_through`` (AdaRank's default) the forward uses the hard gate ``g > 0.5`` (a 0/1
    mask) and the backward the sigmoid's gradient (a straight-through estimator); without it the
    relaxed value ``g`` in [0, 1] is used both ways.
    """

    def __init__(self, num_gates: int, init: float, temperature: float, straight_through: bool) -> None:
        super().__init__()
        self.temperature = temperature
        self.straight_through = straight_through
        self.raw = nn.Parameter(torch.full((num_gates,), float(init)))

    def relaxed(self) -> Tensor:
        """The relaxed gates ``sigmoid(raw / temperature)``, in [0, 1]."""
        return torch.sigmoid(self.raw / self.temperature)

    def forward(self) -> Tensor:
        relaxed = self.relaxed()
        if not self.straight_through:
            return relaxed
        hard = (relaxed > 0.5).to(relaxed.dtype)
        return relaxed + (hard - relaxed).detach()


class RankWiseAdaMergingModule(EntropyObjective, MergingModule):
    """Rank-wise AdaMerging: learns which singular components of each task vector to merge, by entropy.

    Per matrix (the spectral merges' rule: linear and convolution weights, attention's packed
    in-projection as one matrix; :func:`~lit_adamerging.merging.spectral_matrices`) and task, the task
    vector is split once into singular components ``tau_k = U_k diag(s_k) V_k^T``
    (:func:`~lit_adamerging.merging.rank_components`), each with a gate ``g = sigmoid(raw / temperature)``;
    the merged layer is ``theta_0 + scale * sum_k U_k diag(g_k * s_k) V_k^T``. Every other tensor
    (biases, norms, embeddings, buffers with ``buffer_policy="merge"``) keeps task arithmetic's merge,
    ``theta_0 + scale * sum_k tau_k``. The gates are trained by AdaMerging's entropy objective
    (:class:`~lit_adamerging.lightning.adamerging.EntropyObjective`); the encoder, the components
    and ``scale`` are fixed.

    With ``straight_through`` (the default, AdaRank's) training runs with the hard mask ``g > 0.5``
    and the sigmoid's gradient, and the final merge is read out the same way: a component is kept
    (gate 1) or dropped (gate 0). Without it, training and read-out use the relaxed ``g``.
    A checkpoint holds only the gate logits (``gates.raw``, one float per task, matrix and
    component) and Adam's state; export (:class:`~lit_adamerging.ExportMergedEncoder`) writes the
    merged encoder.

    Example:
        >>> from lit_adamerging import SyntheticZoo
        >>> module = RankWiseAdaMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5})
        >>> module.gate_values().unique().tolist()  # every component kept at the start
        [1.0]

    Args:
        zoo, num_classes, unseen_tasks: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        scale: the task vectors' coefficient, fixed (task arithmetic's 0.3, AdaRank's ``prior``).
        init: the gates' initial logit (AdaRank's 0.1: every gate just above 0.5, every component kept).
        temperature: the sigmoid's temperature (AdaRank's 10 for task arithmetic).
        straight_through: hard 0/1 gates in the forward and the read-out, the sigmoid's gradient in the
            backward (AdaRank's default); ``False``: relaxed gates throughout.
        rank_fraction: each task keeps its top ``rank_fraction`` of every matrix's components, in (0, 1];
            ``None`` (default): all of them (with ``base="tsv"``: TSV-M's ``1 / T``).
        base: whose components are gated: ``"task_arithmetic"`` (default; each task's own singular
            components, the other tensors ``scale * sum``) or ``"tsv"`` (TSV-M's decorrelated components,
            gates at 1 give TSV-M's merge at ``scale``, the other tensors ``scale * mean``; preset
            ``rank_wise_adamerging_tsv``, with TSV-M's ``scale`` 1.0).
        buffer_policy: what to do with floating-point buffers (see :data:`~lit_adamerging.merging.BufferPolicy`).
        task_vector_dtype: storage dtype of the stacked task vectors (the decompositions run in float64,
            the components are kept in float32).
        lr, betas: Adam's (AdaRank's code: 1e-3, (0.9, 0.999)).
    """

    LEARNS: ClassVar[bool] = True
    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *MergingModule.CHECKPOINT_SETTINGS, "scale", "init", "temperature", "straight_through", "rank_fraction",
        "base", "buffer_policy", "task_vector_dtype",
    )
    LEARNED_STATE: ClassVar[tuple[str, ...]] = (GATES_KEY,)

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        scale: float = RANK_WISE_SCALE,
        init: float = GATE_INIT,
        temperature: float = GATE_TEMPERATURE,
        straight_through: bool = True,
        rank_fraction: float | None = None,
        base: RankBase = "task_arithmetic",
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        check_scale(scale)
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(
                f"init must be a finite number (the gates' initial logit; AdaRank's 0.1 keeps every component), "
                f"got {init!r}."
            )
        if (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0
            or not math.isfinite(temperature)
        ):
            raise ValueError(f"temperature must be a positive number (AdaRank's 10.0), got {temperature!r}.")
        check_rank_fraction(rank_fraction)
        if base not in RANK_BASES:
            raise ValueError(
                f"base must be one of {', '.join(RANK_BASES)} (whose singular components are gated), got {base!r}."
            )
        check_storage_dtype(task_vector_dtype)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        super().__init__(zoo, num_classes, unseen_tasks)
        self.components: RankComponents | None = None
        self.gates: RankGates | None = None

    # ----------------------------------------------------------------- building
    def build_merger(self, encoder: nn.Module, loaded: LoadedZoo) -> MergedEncoder:
        """The encoder with the seen tasks' task vectors; their matrices factorised once into components."""
        hp = self.hparams
        task_vectors = self.task_vectors(encoder, loaded, buffer_policy=hp.buffer_policy, dtype=hp.task_vector_dtype)
        matrices = [name for name in spectral_matrices(encoder) if name in task_vectors]
        if not matrices:
            raise ValueError(
                f"the encoder {type(encoder).__name__} has no matrix with task vectors (no linear, convolution or "
                "attention weight): rank-wise AdaMerging has no singular components to gate."
            )
        components = rank_components(task_vectors, matrices, hp.rank_fraction, hp.base)
        merger = MergedEncoder(encoder, task_vectors, "task", hp.scale, clamp=False, cuda_graphs=False)
        merger.coefficients.requires_grad_(False)
        self.components = components.to(next(iter(task_vectors.values())).device)
        self.gates = RankGates(components.num_gates, hp.init, hp.temperature, hp.straight_through)
        return merger

    def _apply(self, fn: Any, recurse: bool = True) -> RankWiseAdaMergingModule:
        super()._apply(fn, recurse)
        if self.components is not None and self.merger is not None:  # the components follow the task vectors
            device = next(iter(self.merger.stacked_task_vectors().values())).device
            if self.components.u[0].device != device:
                self.components = self.components.to(device)
        return self

    def _set_gates(self, raw: Tensor) -> None:
        assert self.gates is not None
        target = self.gates.raw
        if raw.shape != target.shape:
            raise ValueError(
                f"the checkpoint's gates have shape {tuple(raw.shape)} but this model needs {tuple(target.shape)} "
                "(one per task, matrix and singular component); it was saved for other tasks, models or settings."
            )
        if not bool(torch.isfinite(raw).all()):
            raise ValueError("the gates being loaded hold NaN or infinite values; load gates from a run that did not "
                             "diverge.")
        with torch.no_grad():
            target.copy_(raw)

    # ----------------------------------------------------------------- the merge
    def gate_values(self) -> Tensor:
        """The gate values in use, flat ``[tasks x matrices x components]`` (0/1 with ``straight_through``)."""
        self._built_merger()
        assert self.gates is not None
        return self.gates().detach()

    def merged_tensors(self) -> dict[str, Tensor]:
        """``theta_0 + scale * (gated components | task vectors)`` for every merged tensor, differentiable in the
        gates."""
        merger = self._built_merger()
        assert self.components is not None and self.gates is not None
        task_vectors = merger.stacked_task_vectors()
        update = rank_wise_task_vector(task_vectors, self.components, self.gates(), self.hparams.scale)
        theta0 = merger.encoder.state_dict()
        return {name: (theta0[name].float() + delta).to(theta0[name].dtype) for name, delta in update.items()}

    def _training_features(self, images: Tensor) -> Tensor:
        return self._built_merger()(images, self.merged_tensors())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._built_merger()
        assert self.gates is not None
        return torch.optim.Adam(self.gates.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def evaluation_tensors(self) -> dict[str, Tensor]:
        """The merge of the current gates, read out as in training (checked first: no evaluation after a
        non-finite loss)."""
        self._check_last_entropies()
        with torch.no_grad():
            return {name: value.detach() for name, value in self.merged_tensors().items()}

    # ----------------------------------------------------------------- checkpoints
    def load_learned_state(self, learned: Mapping[str, Tensor]) -> None:
        self._set_gates(learned[GATES_KEY])
