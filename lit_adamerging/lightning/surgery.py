"""Representation Surgery on a merged encoder, as a LightningModule (see :mod:`lit_adamerging.merging.surgery`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from lit_adamerging.data.contract import UnlabeledImages
from lit_adamerging.lightning.adamerging import AdaMergingModule, set_coefficients
from lit_adamerging.lightning.base import MergingModule
from lit_adamerging.lightning.callbacks import save_finite_state_dicts, surgery_path
from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY, read_adamerging_checkpoint
from lit_adamerging.lightning.checks import (
    check_checkpoint_class,
    checkpoint_settings_differences,
    load_learned_module,
)
from lit_adamerging.lightning.data_free import TaskArithmeticModule
from lit_adamerging.merging import MergedEncoder, check_compatible
from lit_adamerging.merging.surgery import SURGERY_RANK, SurgeryModules
from lit_adamerging.methods import method_class, method_defaults
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo

SURGERY_PREFIX = "surgery."


class SurgeryModule(MergingModule):
    """Trains one Representation Surgery map per merged task on the frozen encoder of a merge it composes.

    The merge is a method by name (``merge``): a data-free one (``"task_arithmetic"``, the default;
    ``"ties_merging"``, ``"weight_averaging"``) built from its preset's settings, or a learned
    AdaMerging one (``"layer_wise_adamerging"``, ...) whose coefficients come from that fit's
    checkpoint (``coefficients_from``: its class, zoo, tasks and settings are checked against the
    preset's). Task ``k``'s surgery (:class:`~lit_adamerging.merging.surgery.FeatureSurgery`, rank
    ``rank``) sits between the encoder and task ``k``'s frozen head. It is trained on the unlabeled
    images of task ``k`` (the data module's split, the test split by default) to minimise the L1
    distance between the surgered merged features and the features of task ``k``'s own fine-tuned
    encoder, the tasks' mean distances summed; Adam, lr ``1e-3``, betas ``(0.9, 0.999)`` (the
    paper's released code).

    The encoder stays frozen, so when a fit starts each task's merged and individual features are
    computed once per image (one forward each, no backward; under DDP each process computes its
    share and every process then holds all of them) and the steps only look them up: the fit's
    loaders yield image positions (``fit_inputs = "indices"``, the same seeded stream AdaMerging's
    images follow). The individual encoder is the zoo's fine-tuned model itself (its state dict run
    through the pretrained encoder's architecture), not ``theta_0 + tau_k``, which differs from it
    under TIES trimming, with bf16/fp16 task vectors and in buffers the merge keeps pretrained.

    Unseen tasks have no fine-tuned model to learn from: no surgery, their heads read the merged
    features. A checkpoint holds the surgery maps and the merge's coefficients with the
    hyperparameters, never encoder weights. :class:`ExportMergedEncoder` writes the merged encoder
    and, beside it, the surgery maps (:meth:`surgery_state_dict`).

    Args:
        zoo: the pretrained encoder, the fine-tuned encoders (one per merged task: surgery learns from
            them) and the heads.
        num_classes: ``{task: number of classes}`` in task order (the CLI links it from the data).
        unseen_tasks: tasks evaluated with the merged encoder only (the CLI links it from the data).
        merge: the method whose merged encoder the surgery corrects (see :mod:`lit_adamerging.methods`):
            a data-free merge, or an AdaMerging method with ``coefficients_from``.
        coefficients_from: the checkpoint of the ``merge`` method's fit (``lit-adamerging fit`` writes
            it), read without running code; required for a learned merge, refused for a data-free
            one. A surgery checkpoint being loaded (``ckpt_path``, :meth:`load_from_checkpoint`)
            brings its own coefficients and takes precedence.
        rank: rank of each surgery map (the paper's 16).
        lr: Adam learning rate of the surgery maps.
        betas: Adam betas.
    """

    LEARNS: ClassVar[bool] = True
    fit_inputs: ClassVar[Literal["indices"]] = "indices"
    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (*MergingModule.CHECKPOINT_SETTINGS, "merge", "rank")
    LEARNED_STATE: ClassVar[tuple[str, ...]] = (COEFFICIENTS_KEY, SURGERY_PREFIX)

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        merge: str = "task_arithmetic",
        coefficients_from: str | None = None,
        rank: int = SURGERY_RANK,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be a positive integer (the paper's 16), got {rank}.")
        merge_class = method_class(merge)  # an unknown name lists the valid ones
        if merge_class not in (TaskArithmeticModule, AdaMergingModule):
            raise ValueError(
                f"merge={merge!r} is a {merge_class.__name__}; surgery composes a data-free merge (task_arithmetic, "
                "ties_merging, weight_averaging) or an AdaMerging one (task_wise_adamerging, layer_wise_adamerging, "
                "their _pp) with its coefficients_from."
            )
        if merge_class is AdaMergingModule and coefficients_from is None:
            raise ValueError(
                f"merge={merge!r} is learned: give coefficients_from, the checkpoint of its fit "
                f"(lit-adamerging fit --method {merge} writes runs/.../checkpoints/last.ckpt)."
            )
        if merge_class is TaskArithmeticModule and coefficients_from is not None:
            raise ValueError(
                f"merge={merge!r} learns nothing, so coefficients_from={coefficients_from!r} would be ignored; give "
                "the AdaMerging method that checkpoint was fitted with as merge (e.g. layer_wise_adamerging)."
            )
        super().__init__(zoo, num_classes, unseen_tasks)
        self.surgery: SurgeryModules | None = None
        self._individual: Mapping[str, dict[str, Tensor]] | None = None
        self._coefficients_set = False  # by a checkpoint, or from coefficients_from on first use
        self._features: dict[str, tuple[Tensor, Tensor]] | None = None  # task: (merged, individual), by image

    # ----------------------------------------------------------------- building
    def build_merger(self, encoder: torch.nn.Module, loaded: LoadedZoo) -> MergedEncoder:
        # Kept to compute the individual features when a fit starts (a lazy mapping: read again then).
        self._individual = loaded.finetuned
        settings = method_defaults(self.hparams.merge)
        task_vectors = self.task_vectors(
            encoder, loaded, buffer_policy=settings["buffer_policy"], dtype=settings["task_vector_dtype"],
            ties_k=settings["ties_k"], ties_normalize=settings["ties_normalize"],
        )
        if method_class(self.hparams.merge) is TaskArithmeticModule:
            scale = 1.0 / len(self.seen_tasks) if settings["scale"] is None else settings["scale"]
            merger = self.fixed_merger(encoder, task_vectors, scale)
            self._coefficients_set = True
        else:  # the learned coefficients' layout, read from coefficients_from below and frozen
            init = 1.0 / len(self.seen_tasks) if settings["init"] is None else settings["init"]
            merger = MergedEncoder(
                encoder, task_vectors, settings["granularity"], init, settings["clamp"], cuda_graphs=False
            )
            merger.coefficients.requires_grad_(False)
        width = self.heads[self.seen_tasks[0]].weight.shape[1]
        self.surgery = SurgeryModules(self.seen_tasks, width, self.hparams.rank)
        return merger

    def coefficients(self) -> Tensor:
        """The composed merge's coefficients (frozen), ``[merged tasks, 1 or merged tensors]``."""
        self._coefficients()
        return self._built_merger().coefficients().detach()

    def _coefficients(self) -> None:
        """Apply ``coefficients_from`` on first use, unless a checkpoint brought the coefficients."""
        merger = self._built_merger()
        if not self._coefficients_set:
            self._coefficients_set = True
            raw = self._learned_coefficients(self.hparams.coefficients_from)
            set_coefficients(merger, raw, len(self.seen_tasks), merger.coefficients.granularity)

    def _learned_coefficients(self, path: str) -> Tensor:
        """The coefficients of the AdaMerging checkpoint ``path``, after checking it was made for this merge."""
        try:
            checkpoint = read_adamerging_checkpoint(path)
            stored = checkpoint.get("hyper_parameters", {})
            check_checkpoint_class(stored, AdaMergingModule, path)
        except ValueError as error:
            raise ValueError(
                f"model.coefficients_from: {error} It takes the checkpoint of the AdaMerging fit of merge="
                f"{self.hparams.merge!r} (lit-adamerging fit --method {self.hparams.merge} writes "
                "runs/.../checkpoints/last.ckpt)."
            ) from None
        expected = method_defaults(self.hparams.merge)
        expected.update({key: self.hparams[key] for key in MergingModule.CHECKPOINT_SETTINGS if key in self.hparams})
        lines = checkpoint_settings_differences(stored, expected, AdaMergingModule.CHECKPOINT_SETTINGS)
        if lines:
            raise ValueError(
                f"coefficients_from={path!r} was learned with other settings than merge={self.hparams.merge!r} on "
                "this zoo and these tasks, so its coefficients would not mean the same merge:\n" + "\n".join(lines)
                + "\nGive the checkpoint of a fit of that method on the same zoo and tasks (in the same order, with "
                "the same unseen tasks), or the method it was fitted with as merge."
            )
        return checkpoint["state_dict"][COEFFICIENTS_KEY]

    def check_learned_keys(self, learned: Mapping[str, Tensor], keys: list[str]) -> None:
        if COEFFICIENTS_KEY not in learned or not any(key.startswith(SURGERY_PREFIX) for key in learned):
            raise KeyError(
                f"the state dict has no surgery maps ({SURGERY_PREFIX}*) or no coefficients ({COEFFICIENTS_KEY!r}; "
                f"keys: {keys[:5]}): it is not a SurgeryModule checkpoint. An AdaMerging checkpoint's "
                "coefficients go in coefficients_from."
            )

    def load_learned_state(self, learned: Mapping[str, Tensor]) -> None:
        """Load the merge's coefficients and the surgery maps (a checkpoint's coefficients replace
        ``coefficients_from``)."""
        merger = self._built_merger()
        self._coefficients_set = True
        set_coefficients(merger, learned[COEFFICIENTS_KEY], len(self.seen_tasks), merger.coefficients.granularity)
        assert self.surgery is not None
        surgery = {key[len(SURGERY_PREFIX):]: value for key, value in learned.items() if key.startswith(SURGERY_PREFIX)}
        hint = f"one map per merged task, rank {self.hparams.rank}, the encoder's feature width"
        load_learned_module(self.surgery, surgery, "surgery", hint)

    # ----------------------------------------------------------------- features
    def on_train_start(self) -> None:
        """Compute every merged task's merged and individual features once (after any checkpoint was restored)."""
        self._features = self._compute_features()

    def on_train_end(self) -> None:
        self._features = None

    def evaluation_tensors(self) -> dict[str, Tensor]:
        """The composed merge's tensors (its coefficients frozen)."""
        self._coefficients()
        return self.coefficient_merge()

    @torch.no_grad()
    def _compute_features(self) -> dict[str, tuple[Tensor, Tensor]]:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, UnlabeledImages):
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

    def export_description(self) -> str:
        return "the merged encoder and, beside it, the surgery maps"

    def export_paths(self, path: str) -> dict[str, str]:
        """The merged encoder's ``path`` and the surgery maps' :func:`~lit_adamerging.lightning.callbacks.surgery_path`
        beside it (read them back with :meth:`~lit_adamerging.merging.surgery.SurgeryModules.from_plain_state_dict`)."""
        return {**super().export_paths(path), surgery_path(path): "the surgery maps' export path"}

    def export(self, path: str) -> None:
        """Write the merged encoder to ``path`` and the surgery maps beside it, both or neither."""
        save_finite_state_dicts({
            path: ("the merged encoder", self.merged_state_dict()),
            surgery_path(path): ("the surgery maps", self.surgery_state_dict()),
        })
