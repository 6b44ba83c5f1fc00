"""Representation Surgery on a merged encoder, as a LightningModule (see :mod:`lit_adamerging.merging.surgery`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY, read_adamerging_checkpoint
from lit_adamerging.lightning.module import AdaMergingModule, StorageDtype, checkpoint_settings_differences
from lit_adamerging.merging import BufferPolicy, Granularity, check_compatible
from lit_adamerging.merging.surgery import SURGERY_RANK, SurgeryModules
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo

SURGERY_PREFIX = "surgery."


class SurgeryModule(AdaMergingModule):
    """Trains one Representation Surgery map per merged task on a frozen merged encoder.

    The merged encoder is the one :class:`AdaMergingModule` builds from the same settings, its
    coefficients frozen: task arithmetic with the defaults (``granularity="task", init=0.3``), or
    the coefficients an AdaMerging fit learned (``coefficients_from``, its checkpoint; give the
    settings it was made with, e.g. ``granularity="layer"``). Task ``k``'s surgery
    (:class:`~lit_adamerging.merging.surgery.FeatureSurgery`, rank ``rank``) sits between the encoder
    and task ``k``'s frozen head. It is trained on the unlabeled images of task ``k`` (the data
    module's split, the test split by default) to minimise the L1 distance between the surgered merged
    features and the features of task ``k``'s own fine-tuned encoder, the tasks' mean distances
    summed; Adam, lr ``1e-3``, betas ``(0.9, 0.999)`` (the paper's released code).

    The encoder stays frozen, so when a fit starts each task's merged and individual features are
    computed once per image (one forward each, no backward; under DDP each process computes its
    share and every process then holds all of them) and the steps only look them up: the fit's
    loaders yield image positions (``fit_inputs = "indices"``, the same seeded stream AdaMerging's
    images follow). The individual encoder is the zoo's fine-tuned model itself (its state dict run
    through the pretrained encoder's architecture), not ``theta_0 + tau_k``, which differs from it
    under TIES trimming, with bf16/fp16 task vectors and in buffers the merge keeps pretrained.

    Unseen tasks have no fine-tuned model to learn from: no surgery, their heads read the merged
    features. A checkpoint holds the surgery maps and the merging coefficients (so an AdaMerging
    reader accepts it) with the hyperparameters, never encoder weights. :class:`ExportMergedEncoder`
    writes the merged encoder and, beside it, the surgery maps (:meth:`surgery_state_dict`).

    Args:
        zoo: the pretrained encoder, the fine-tuned encoders (one per merged task: surgery learns from
            them) and the heads.
        num_classes: ``{task: number of classes}`` in task order (the CLI links it from the data).
        unseen_tasks: tasks evaluated with the merged encoder only (the CLI links it from the data).
        granularity: ``"task"``, or ``"layer"`` with ``coefficients_from`` (a layer-wise AdaMerging fit's).
        init: every coefficient when ``coefficients_from`` is not given (``None``: ``1 / tasks``);
            0.3 is task arithmetic.
        clamp: clamp the coefficients to ``[0, 1]`` (as AdaMerging).
        ties_k: TIES-trim the task vectors first, keeping this fraction (TIES-merging with ``ties_normalize``).
        ties_normalize: TIES-merging's division by the number of tasks keeping each entry.
        buffer_policy: floating-point buffers of the merged encoder (see :data:`BufferPolicy`).
        task_vector_dtype: storage dtype of the stacked task vectors.
        coefficients_from: the checkpoint of an AdaMerging fit (``lit-adamerging fit`` writes it)
            whose learned coefficients are used, read without running code and checked against these
            settings (zoo, tasks, granularity, ...); ``None``: ``init``. A checkpoint being loaded
            (``ckpt_path``, :meth:`load_from_checkpoint`) brings its own coefficients and takes precedence.
        rank: rank of each surgery map (the paper's 16).
        lr: Adam learning rate of the surgery maps.
        betas: Adam betas.
    """

    fit_inputs: ClassVar[Literal["indices"]] = "indices"
    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (*AdaMergingModule.CHECKPOINT_SETTINGS, "rank")

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        granularity: Granularity = "task",
        init: float | None = 0.3,
        clamp: bool = True,
        ties_k: float | None = None,
        ties_normalize: bool = False,
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
        coefficients_from: str | None = None,
        rank: int = SURGERY_RANK,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be a positive integer (the paper's 16), got {rank}.")
        if granularity == "layer" and coefficients_from is None:
            raise ValueError(
                "granularity 'layer' without coefficients_from would merge every tensor with the same init, which is "
                "granularity 'task'. Give coefficients_from, the checkpoint of a layer-wise AdaMerging fit "
                "(lit-adamerging fit --method layer_wise), or use granularity 'task'."
            )
        # The coefficients are frozen: no CUDA graphs of a training merge.
        super().__init__(
            zoo, num_classes, unseen_tasks, granularity, init, clamp, ties_k, ties_normalize, buffer_policy,
            task_vector_dtype, lr, betas, cuda_graphs=False,
        )
        self.surgery: SurgeryModules | None = None
        self._pending_surgery: dict[str, Tensor] | None = None
        self._individual: Mapping[str, dict[str, Tensor]] | None = None
        self._coefficients_set = False  # by a checkpoint, or from coefficients_from on first use
        self._features: dict[str, tuple[Tensor, Tensor]] | None = None  # task: (merged, individual), by image

    # ----------------------------------------------------------------- building
    def _load_zoo(self, seen: list[str]) -> LoadedZoo:
        loaded = super()._load_zoo(seen)
        missing = [task for task in seen if task not in loaded.finetuned]
        if missing:
            raise ValueError(
                f"surgery needs each merged task's own fine-tuned model, but the zoo {type(self.zoo).__name__} "
                f"gave none for task(s) {missing}. Give their fine-tuned weights in the zoo, or make them unseen "
                "tasks (data.unseen_tasks: evaluated with the merged encoder, no surgery)."
            )
        # Kept to compute the individual features when a fit starts (a lazy mapping: read again then).
        self._individual = loaded.finetuned
        return loaded

    def configure_model(self) -> None:
        if self.merger is not None:
            return
        super().configure_model()
        assert self.merger is not None
        self.merger.coefficients.requires_grad_(False)
        width = self.heads[self.seen_tasks[0]].weight.shape[1]
        self.surgery = SurgeryModules(self.seen_tasks, width, self.hparams.rank)
        if self._pending_surgery is not None:
            self._load_surgery(self._pending_surgery)
            self._pending_surgery = None
        # Under DDP only the surgery maps are trained and synchronised.
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in [*self.named_parameters(), *self.named_buffers()] if not name.startswith(SURGERY_PREFIX)
        ]

    def _built_merger(self) -> Any:
        merger = super()._built_merger()
        if not self._coefficients_set:
            self._coefficients_set = True
            if self.hparams.coefficients_from is not None:
                self._set_coefficients(self._learned_coefficients(self.hparams.coefficients_from))
        return merger

    def _learned_coefficients(self, path: str) -> Tensor:
        """The coefficients of the AdaMerging checkpoint ``path``, after checking it was made with these settings."""
        try:
            checkpoint = read_adamerging_checkpoint(path)
        except ValueError as error:
            raise ValueError(
                f"model.coefficients_from: {error} It takes the checkpoint of an AdaMerging fit "
                "(lit-adamerging fit --method layer_wise writes runs/.../checkpoints/last.ckpt)."
            ) from None
        stored = checkpoint.get("hyper_parameters", {})
        lines = checkpoint_settings_differences(stored, self.hparams, AdaMergingModule.CHECKPOINT_SETTINGS)
        if lines:
            raise ValueError(
                f"coefficients_from={path!r} was learned with other settings than this surgery's, so its "
                "coefficients would not mean the same merge:\n" + "\n".join(lines) + "\n"
                "Give the surgery the settings of that AdaMerging fit (the same zoo, tasks in the same order, "
                "unseen tasks and method settings: e.g. granularity 'layer' for layer-wise AdaMerging)."
            )
        return checkpoint["state_dict"][COEFFICIENTS_KEY]

    def _load_surgery(self, state: Mapping[str, Tensor]) -> None:
        assert self.surgery is not None
        ours = self.surgery.state_dict()
        if set(state) != set(ours):
            raise ValueError(
                f"the checkpoint's surgery maps {sorted(state)} do not match this model's {sorted(ours)} (one per "
                "merged task); it was saved for other tasks."
            )
        for key, value in state.items():
            if value.shape != ours[key].shape:
                raise ValueError(
                    f"the checkpoint's surgery tensor {key!r} has shape {tuple(value.shape)} but this model needs "
                    f"{tuple(ours[key].shape)} (rank {self.hparams.rank}, the encoder's feature width)."
                )
        self.surgery.load_state_dict(state)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the coefficients and the surgery maps; the frozen weights are rebuilt from the zoo."""
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items()
            if key == COEFFICIENTS_KEY or key.startswith(SURGERY_PREFIX)
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load the coefficients and the surgery maps (before the model is built too, like AdaMergingModule)."""
        surgery = {key[len(SURGERY_PREFIX):]: value for key, value in state_dict.items()
                   if key.startswith(SURGERY_PREFIX)}
        if not surgery:
            raise KeyError(
                f"the state dict has no surgery maps ({SURGERY_PREFIX}*; keys: {list(state_dict)[:5]}): it is not a "
                "SurgeryModule checkpoint. An AdaMerging checkpoint's coefficients go in coefficients_from."
            )
        result = super().load_state_dict(state_dict, strict, assign)
        self._coefficients_set = True
        if self.surgery is None:
            self._pending_surgery = {key: value.detach().clone() for key, value in surgery.items()}
        else:
            self._load_surgery(surgery)
        return result

    # ----------------------------------------------------------------- features
    def on_train_start(self) -> None:
        """Compute every merged task's merged and individual features once (after any checkpoint was restored)."""
        self._features = self._compute_features()

    def on_train_end(self) -> None:
        self._features = None

    @torch.no_grad()
    def _compute_features(self) -> dict[str, tuple[Tensor, Tensor]]:
        datamodule = self.trainer.datamodule
        if not callable(getattr(datamodule, "unlabeled_batches", None)):
            raise TypeError(
                "SurgeryModule reads each task's unlabeled images through its data module: fit it with a "
                "MultiTaskDataModule (trainer.fit(module, datamodule=...)); it has no use for plain dataloaders."
            )
        merger = self._built_merger()
        assert self.surgery is not None and self._individual is not None
        merged_tensors = self.evaluation_tensors()
        pretrained = merger.encoder.state_dict()
        features = {}
        for task in self.seen_tasks:
            state = self._individual[task]
            check_compatible(pretrained, state, task)
            state = {key: value.to(self.device) for key, value in state.items()}
            total = datamodule.num_images(task)
            merged = torch.zeros(total, self.surgery.width, device=self.device)
            individual = torch.zeros_like(merged)
            seen = torch.zeros(total, dtype=torch.int32, device=self.device)
            with self.trainer.precision_plugin.forward_context():
                for positions, images in datamodule.unlabeled_batches(task, self.device):
                    merged[positions] = merger(images, merged_tensors).float()
                    individual[positions] = functional_call(merger.encoder, state, (images,)).float()
                    seen[positions] += 1
            del state
            # Every image was encoded on exactly one process: summing gives every process all the rows.
            merged, individual, seen = (
                self.trainer.strategy.reduce(values, reduce_op="sum") for values in (merged, individual, seen)
            )
            if not bool((seen == 1).all()):
                raise RuntimeError(
                    f"task {task!r}: the data module's unlabeled_batches gave {int((seen == 0).sum())} of its {total} "
                    f"images to no process and {int((seen > 1).sum())} more than once; each must be encoded once."
                )
            for name, values in (("merged", merged), ("fine-tuned", individual)):
                if not bool(values.isfinite().all()):
                    raise FloatingPointError(
                        f"task {task!r}: the {name} encoder's features hold NaN or infinite values; check its "
                        "weights and images (with precision 16-mixed, try bf16-mixed or 32-true)."
                    )
            features[task] = (merged, individual)
        return features

    # ----------------------------------------------------------------- steps
    def forward(self, images: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head on the surgered merged features (unseen tasks: the merged features)."""
        features = self._built_merger()(images, self._eval_tensors)
        assert self.surgery is not None
        return self.heads[task](self.surgery(features, task))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self._features is None:
            raise RuntimeError("SurgeryModule.training_step runs in a Trainer fit, which computes the features first.")
        assert self.surgery is not None
        tasks = self.seen_tasks
        missing = [task for task in tasks if task not in batch]
        if missing:
            raise KeyError(f"the training batch has no image positions for task(s) {missing}; got {list(batch)}.")
        for task in tasks:
            if batch[task].dim() != 1 or batch[task].dtype != torch.int64:
                raise ValueError(
                    f"task {task!r}: the training batch holds {tuple(batch[task].shape)} {batch[task].dtype} values, "
                    "not image positions; SurgeryModule.fit_inputs is 'indices', which MultiTaskDataModule reads."
                )
        losses = {}
        for task in tasks:
            merged, individual = self._features[task]
            positions = batch[task]
            losses[task] = F.l1_loss(self.surgery(merged[positions], task), individual[positions])
        loss = torch.stack(list(losses.values())).sum()
        total = sum(batch[task].shape[0] for task in tasks)
        self.log("train/loss", loss, prog_bar=True, batch_size=total)
        self.log_dict({f"train/l1/{task}": value for task, value in losses.items()}, batch_size=total)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._built_merger()
        assert self.surgery is not None
        return torch.optim.Adam(self.surgery.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    # ----------------------------------------------------------------- export
    def surgery_state_dict(self) -> dict[str, Tensor]:
        """The surgery maps as plain tensors (``<task>.down`` ``[rank, width]``, ``<task>.up`` ``[width, rank]``)."""
        self._built_merger()
        assert self.surgery is not None
        return self.surgery.plain_state_dict()
