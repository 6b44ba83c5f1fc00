"""WEMoE (Tang et al., ICML 2024): the encoder's MLPs as weight-ensembling mixtures whose routers learn by entropy.

What the paper and FusionBench do, and where this module differs, is in docs/wemoe.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from lit_adamerging.lightning.adamerging import EntropyObjective
from lit_adamerging.lightning.base import MergingModule, StorageDtype, check_storage_dtype
from lit_adamerging.lightning.checkpoint_io import ROUTERS_PREFIX
from lit_adamerging.lightning.checks import load_learned_module
from lit_adamerging.merging import BufferPolicy, MergedEncoder
from lit_adamerging.merging.rank_wise import check_scale
from lit_adamerging.merging.wemoe import WeightEnsemblingMixture, check_router, save_wemoe
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo


class WEMoEModule(EntropyObjective, MergingModule):
    """WEMoE: each MLP of the encoder a mixture whose per-sample weights a router picks; the routers learn by
    entropy.

    The encoder's tensors outside the MLPs are merged by task arithmetic at ``scale``; each MLP
    (:func:`~lit_adamerging.merging.find_mlp_modules`: a transformer block's MLP, or a timm inverted
    residual block's pointwise expansion and projection) runs, for every sample ``x``, with
    ``theta_0 + sum_k r_k(x) tau_k``, where ``r(x)`` is its router's output on the MLP's input
    (:class:`~lit_adamerging.merging.wemoe.Router`, initialised so that ``r`` starts near ``init``:
    task arithmetic). Only the routers train, by AdaMerging's entropy objective
    (:class:`~lit_adamerging.lightning.adamerging.EntropyObjective`). Unseen tasks are routed like any
    input.

    A checkpoint holds the routers (``mixture.routers.*``) and Adam's state; export
    (:class:`~lit_adamerging.ExportMergedEncoder`) writes the encoder with its static merge, the MLPs'
    task vectors and the routers (:meth:`save_wemoe`), which
    :func:`~lit_adamerging.merging.load_wemoe` rebuilds on an encoder of the same architecture.

    Example:
        >>> from lit_adamerging import SyntheticZoo
        >>> module = WEMoEModule(SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5})
        >>> module.configure_model(); module.mixture.mlp_modules[:1]
        ['transformer.resblocks.0.mlp']

    Args:
        zoo, num_classes, unseen_tasks: see :class:`~lit_adamerging.lightning.base.MergingModule`.
        mlp_modules: the encoder's modules to make mixtures (each one's linear layers and pointwise
            convolutions are mixed, its router reads its input); ``None`` (default): found by
            :func:`~lit_adamerging.merging.find_mlp_modules`.
        scale: task arithmetic's coefficient for every tensor outside the mixtures (WEMoE's 0.3).
        init: the routers' initial output for every task (the last layer's bias; WEMoE's 0.3).
        router_depth: linear layers per router, hidden width the MLP's input width (WEMoE's 2; 0: a learned
            per-task vector that ignores the input).
        seed: seed of the routers' initial weights (the same in every process and run, whatever the global seed).
        buffer_policy: what to do with floating-point buffers (see :data:`~lit_adamerging.merging.BufferPolicy`).
        task_vector_dtype: storage dtype of the stacked task vectors.
        lr, betas: Adam's (FusionBench's WEMoE config: 1e-4; the optimiser's defaults).
    """

    LEARNS: ClassVar[bool] = True
    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *MergingModule.CHECKPOINT_SETTINGS, "mlp_modules", "scale", "init", "router_depth", "buffer_policy",
        "task_vector_dtype",
    )
    LEARNED_STATE: ClassVar[tuple[str, ...]] = (ROUTERS_PREFIX,)
    EXPORT_SUFFIXES: ClassVar[tuple[str, ...]] = (".safetensors",)

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        mlp_modules: list[str] | None = None,
        scale: float = 0.3,
        init: float = 0.3,
        router_depth: int = 2,
        seed: int = 0,
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        check_scale(scale)
        check_router(router_depth, init)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be a whole number, got {seed!r}.")
        if mlp_modules is not None and (not mlp_modules or not all(isinstance(m, str) for m in mlp_modules)):
            raise ValueError(f"mlp_modules must be a non-empty list of module names (or None: found), got "
                             f"{mlp_modules!r}.")
        check_storage_dtype(task_vector_dtype)
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        super().__init__(zoo, num_classes, unseen_tasks)
        self.mixture: WeightEnsemblingMixture | None = None
        self._static: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- building
    def build_merger(self, encoder: nn.Module, loaded: LoadedZoo) -> MergedEncoder:
        """Task arithmetic on the tensors outside the MLPs; the MLPs' task vectors go to the mixture, hooked onto
        the encoder."""
        hp = self.hparams
        task_vectors = self.task_vectors(encoder, loaded, buffer_policy=hp.buffer_policy, dtype=hp.task_vector_dtype)
        # The mixture finds the MLPs and keeps their task vectors; the merger (on the same encoder) takes the rest.
        self.mixture = WeightEnsemblingMixture(encoder, task_vectors, hp.mlp_modules, hp.router_depth, hp.init, hp.seed)
        mixed = set(self.mixture.tensor_names)
        static = {name: value for name, value in task_vectors.items() if name not in mixed}
        if not static:
            raise ValueError("every merged tensor of the encoder lies in an MLP mixture; WEMoE needs the rest of the "
                             "encoder to merge statically (name fewer mlp_modules).")
        merger = self.fixed_merger(encoder, static, hp.scale)
        return merger

    def _mixture(self) -> WeightEnsemblingMixture:
        self._built_merger()
        assert self.mixture is not None
        return self.mixture

    def static_tensors(self) -> dict[str, Tensor]:
        """Task arithmetic's merge of the tensors outside the MLPs (fixed: computed once per device)."""
        merger = self._built_merger()
        device = next(iter(merger.stacked_task_vectors().values())).device
        if self._static is None or next(iter(self._static.values())).device != device:
            self._static = self.coefficient_merge()
        return self._static

    # ----------------------------------------------------------------- training and evaluation
    def _training_features(self, images: Tensor) -> Tensor:
        return self._built_merger()(images, self.static_tensors())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        routers = self._mixture().routers
        return torch.optim.Adam(routers.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def evaluation_tensors(self) -> dict[str, Tensor]:
        """The static merge; the mixtures route each sample themselves (checked first: no evaluation after a
        non-finite loss)."""
        self._check_last_entropies()
        return self.static_tensors()

    def routing(self, images: Tensor) -> dict[str, Tensor]:
        """Each mixture's routing weights ``[images, merged tasks]`` for ``images``, by MLP module name."""
        merger, static = self._built_merger(), self.static_tensors()
        with torch.no_grad(), self._mixture().recording() as seen:
            merger(images, static)
        return seen

    # ----------------------------------------------------------------- checkpoints and export
    def load_learned_state(self, learned: Mapping[str, Tensor]) -> None:
        """Load the routers (``mixture.routers.*``), checking their keys, shapes and values."""
        routers = {key[len(ROUTERS_PREFIX):]: value for key, value in learned.items()}
        load_learned_module(self._mixture().routers, routers, "router", "one router per MLP module")

    def merged_state_dict(self) -> dict[str, Tensor]:
        """Refused: WEMoE's MLP weights differ per sample (see :meth:`save_wemoe`)."""
        raise ValueError(
            "WEMoE has no single merged encoder: each MLP's weights depend on its input. Use save_wemoe(path) "
            "(ExportMergedEncoder calls it) for the encoder, the MLPs' task vectors and the routers, which "
            "lit_adamerging.merging.load_wemoe rebuilds."
        )

    def export_description(self) -> str:
        return "the encoder with its static merge, the MLPs' task vectors and the routers (no single merged encoder)"

    def export(self, path: str) -> None:
        """:meth:`save_wemoe`."""
        self.save_wemoe(path)

    def save_wemoe(self, path: str | Path) -> Path:
        """Write the encoder (static merge, MLPs pretrained), the MLPs' task vectors and the routers to ``path``
        (:func:`~lit_adamerging.merging.save_wemoe`), atomically."""
        self._check_last_entropies()
        merger = self._built_merger()
        static = self.static_tensors()
        encoder_state = {
            name: (static[name] if name in static else tensor).detach()
            for name, tensor in merger.encoder.state_dict().items()
        }
        return save_wemoe(encoder_state, self._mixture(), self.seen_tasks, path)
