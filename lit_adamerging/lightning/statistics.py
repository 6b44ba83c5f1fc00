"""Fisher merging and RegMean as LightningModules: merges computed from statistics of unlabeled images.

Neither learns anything by gradient descent. When evaluation starts (``trainer.test`` or
``trainer.validate``; ``lit-adamerging test --method fisher_merging``), each merged (seen) task's
fine-tuned encoder reads that task's unlabeled images once (the data module's split, the test split
by default, through :meth:`~lit_adamerging.MultiTaskDataModule.unlabeled_batches`), the statistics
are summed across processes, the merge is computed once per module and evaluation runs with it like
any other method's (:class:`~lit_adamerging.PerTaskAccuracy`, unseen tasks with their heads on the
merged encoder, :class:`~lit_adamerging.ExportMergedEncoder` writing it). ``fit`` is refused.

The fine-tuned encoder of task ``k`` is ``theta_0 + tau_k`` for every tensor with a task vector (the
zoo's fine-tuned weights up to float32 rounding: the task vectors are stored in float32) and the
pretrained tensor otherwise: with ``buffer_policy="pretrained"`` (the default) the pass runs with the
pretrained buffers, with ``"merge"`` with each model's own, which are then averaged.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torch.func import functional_call

from lit_adamerging.data.contract import UnlabeledImages
from lit_adamerging.lightning.base import MergingModule
from lit_adamerging.merging import BufferPolicy, MergedEncoder
from lit_adamerging.merging.fisher import FISHER_FLOOR, FISHER_IMAGES, FisherWeightedAverage, fisher_sums
from lit_adamerging.merging.regmean import REGMEAN_ALPHA, REGMEAN_IMAGES, GramRecorder, RegMeanAverage, regmean_layers
from lit_adamerging.models.zoo import LoadedZoo, ModelZoo


class StatisticsMergingModule(MergingModule):
    """What Fisher merging and RegMean share: a merge computed once from each seen task's images, then evaluated.

    Subclasses implement :meth:`merge_from_statistics`. The settings that change the merged
    weights are listed in the class attribute :attr:`CHECKPOINT_SETTINGS` (nothing is fitted, so
    no checkpoint is written; loading one is refused).

    Args:
        zoo: the pretrained encoder, the fine-tuned encoders and the heads.
        num_classes: ``{task: number of classes}`` in task order (the CLI links it from the data).
        unseen_tasks: tasks evaluated with the merged encoder only, never read for statistics.
        num_images: images per seen task the statistics are computed on, a seeded random subset of
            the task's split (all of it when the split is smaller); ``None``: every image.
        seed: seed of the subset (and of Fisher's sampled labels); the same on every process.
        buffer_policy: floating-point buffers: ``"pretrained"`` keeps them, ``"merge"`` averages them
            (``"require_equal"`` checks that the fine-tuned ones equal the pretrained ones).
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (
        *MergingModule.CHECKPOINT_SETTINGS, "num_images", "seed", "buffer_policy",
    )

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        num_images: int | None = 256,
        seed: int = 0,
        buffer_policy: BufferPolicy = "pretrained",
    ) -> None:
        if num_images is not None and num_images < 1:
            raise ValueError(f"num_images must be positive or None (every image), got {num_images}.")
        super().__init__(zoo, num_classes, unseen_tasks)
        self._merged: dict[str, Tensor] | None = None
        self.images_read: dict[str, int] = {}  # per seen task, images this process ran statistics on

    def build_merger(self, encoder: torch.nn.Module, loaded: LoadedZoo) -> MergedEncoder:
        """The encoder with the exact (float32, untrimmed) task vectors; the merge itself comes from the statistics."""
        task_vectors = self.task_vectors(encoder, loaded, buffer_policy=self.hparams.buffer_policy)
        return self.fixed_merger(encoder, task_vectors, 1.0 / len(self.seen_tasks))

    # ----------------------------------------------------------------- the merge
    def evaluation_tensors(self) -> dict[str, Tensor]:
        """The merged tensors, computed from the statistics the first time (every process must call it then)."""
        if self._merged is None:
            with torch.inference_mode(False), torch.no_grad():
                self._merged = self._compute_merge()
        return self._merged

    def _compute_merge(self) -> dict[str, Tensor]:
        merger = self._built_merger()
        theta0 = merger.encoder.state_dict()
        task_vectors = merger.stacked_task_vectors()
        merged = {  # plain average for what the method does not merge itself: theta_0 + mean_k tau_k
            name: (theta0[name].float() + stacked.float().mean(dim=0)).to(theta0[name].dtype)
            for name, stacked in task_vectors.items()
        }
        merged.update(self.merge_from_statistics(theta0, task_vectors))
        return {name: merged[name] for name in task_vectors}

    def merge_from_statistics(
        self, theta0: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The tensors the method merges from its statistics, by name (the rest are averaged)."""
        raise NotImplementedError

    def finetuned_tensors(
        self, row: int, theta0: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Seen task ``row``'s fine-tuned tensors, ``theta_0 + tau_row`` for every tensor with a task vector."""
        return {
            name: (theta0[name].float() + stacked[row].float()).to(theta0[name].dtype)
            for name, stacked in task_vectors.items()
        }

    def task_batches(self, task: str) -> Iterator[tuple[Tensor, Tensor]]:
        """``(positions, images)`` of ``task``'s chosen images (:attr:`num_images` of them), this process's share.

        One pass over the data module's :meth:`~lit_adamerging.MultiTaskDataModule.unlabeled_batches`.
        """
        datamodule = self.datamodule()
        chosen = self.chosen_images(task, datamodule.num_images(task)).to(self.device)
        read = 0
        for positions, images in datamodule.unlabeled_batches(task, self.device):
            keep = chosen[positions]
            if bool(keep.any()):
                read += int(keep.sum())
                yield positions[keep], images[keep]
        self.images_read[task] = read

    def datamodule(self) -> UnlabeledImages:
        """The Trainer's data module; it must read unlabeled images (:class:`~lit_adamerging.MultiTaskDataModule`)."""
        trainer = self._attached_trainer()
        datamodule = trainer.datamodule if trainer is not None else None
        if not isinstance(datamodule, UnlabeledImages):
            raise ValueError(
                f"{type(self).__name__} computes its merge from each task's unlabeled images, read through the "
                "data module: evaluate it with a MultiTaskDataModule (trainer.test(model, datamodule=data))."
            )
        return datamodule

    def chosen_images(self, task: str, total: int) -> Tensor:
        """Which of ``task``'s ``total`` images the statistics use (bool ``[total]``), the same on every process."""
        chosen = torch.zeros(total, dtype=torch.bool)
        if self.hparams.num_images is None or self.hparams.num_images >= total:
            chosen[:] = True
        else:
            order = torch.randperm(total, generator=self.task_generator(task, "images"))
            chosen[order[: self.hparams.num_images]] = True
        return chosen

    def task_generator(self, task: str, purpose: str) -> torch.Generator:
        """A CPU generator seeded from :attr:`seed`, the task's name and ``purpose``: the same on every process."""
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + zlib.crc32(f"{purpose}:{task}".encode()))

    def sum_across_processes(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` summed over the processes (unchanged on one); the same result on every process."""
        strategy = self.trainer.strategy
        return {name: strategy.reduce(value, reduce_op="sum") for name, value in tensors.items()}

    def checked_count(self, task: str, count: Tensor) -> int:
        """The number of images a task's statistics came from, summed over the processes; an error if none."""
        total = int(self.sum_across_processes({"count": count})["count"])
        if total == 0:
            raise ValueError(
                f"task {task!r} has no unlabeled images to compute {type(self).__name__}'s statistics on: its split "
                "is empty. Give the task images (its test split, or the split the data module reads), or make it "
                "unseen (data.unseen_tasks) so that it is evaluated without being merged."
            )
        return total


class FisherMergingModule(StatisticsMergingModule):
    """Fisher merging (Matena & Raffel, 2022) of the seen tasks' fine-tuned encoders.

    Each seen task's diagonal Fisher (:func:`~lit_adamerging.merging.fisher.fisher_sums`: exact
    per-example gradients of ``log p(y|x)``, the fine-tuned encoder with that task's head, ``y``
    sampled from the model's own prediction with a seeded per-image uniform, so the same on any
    number of processes) on ``num_images`` of its unlabeled images, then the Fisher-weighted
    average of the encoders' parameters (:class:`~lit_adamerging.merging.fisher.FisherWeightedAverage`).
    Buffers have no Fisher: they follow ``buffer_policy`` (kept pretrained, or averaged).

    Defaults are FusionBench's for CLIP (``config/method/fisher_merging/clip_fisher_merging.yaml``):
    256 images per task, ``minimal_fisher_weight`` 1e-6 added to every entry,
    ``normalize_fisher_weight`` true.

    Args:
        zoo, num_classes, unseen_tasks, num_images, seed, buffer_policy: see :class:`StatisticsMergingModule`.
        floor: added to every Fisher entry (FusionBench's ``minimal_fisher_weight``).
        normalize: weight each model by the inverse L2 norm of its whole Fisher.
        chunk_size: images whose per-example gradients are held at once (memory: that many copies
            of the encoder's parameters).
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (*StatisticsMergingModule.CHECKPOINT_SETTINGS, "floor",
                                                      "normalize")

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        num_images: int | None = FISHER_IMAGES,
        floor: float = FISHER_FLOOR,
        normalize: bool = True,
        chunk_size: int = 16,
        seed: int = 0,
        buffer_policy: BufferPolicy = "pretrained",
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        if not floor >= 0.0:
            raise ValueError(f"floor must be 0 or more, got {floor}.")
        super().__init__(zoo, num_classes, unseen_tasks, num_images, seed, buffer_policy)

    def merge_from_statistics(
        self, theta0: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        encoder = self._built_merger().encoder
        parameters = {name for name, _ in encoder.named_parameters()}
        average = FisherWeightedAverage(self.hparams.floor, self.hparams.normalize)
        for row, task in enumerate(self.seen_tasks):
            tensors = self.finetuned_tensors(row, theta0, task_vectors)
            params = {name: value for name, value in tensors.items() if name in parameters}
            fixed = {name: value for name, value in tensors.items() if name not in parameters}
            uniforms = torch.rand(
                self.datamodule().num_images(task), generator=self.task_generator(task, "labels")
            ).to(self.device)
            sums = {name: torch.zeros_like(value, dtype=torch.float32) for name, value in params.items()}
            count = torch.zeros((), dtype=torch.float32, device=self.device)
            for positions, images in self.task_batches(task):
                batch_sums, _ = fisher_sums(
                    encoder, self.heads[task], params, images, uniforms[positions], fixed=fixed,
                    chunk_size=self.hparams.chunk_size,
                )
                for name, value in batch_sums.items():
                    sums[name] += value
                count += images.shape[0]
            total = self.checked_count(task, count)
            sums = self.sum_across_processes(sums)
            average.add(params, {name: value / total for name, value in sums.items()})
            del sums, tensors, params, fixed
        return {name: value.to(theta0[name].dtype) for name, value in average.result().items()}


class RegMeanModule(StatisticsMergingModule):
    """RegMean (Jin et al., 2023) of the seen tasks' fine-tuned encoders.

    Each seen task's fine-tuned encoder runs once over ``num_images`` of its unlabeled images while
    :class:`~lit_adamerging.merging.regmean.GramRecorder` sums the inputs' Gram matrices of every
    merged layer (``nn.Linear``, ``nn.Conv2d`` per group, self-attention's packed in-projection and
    its out-projection; :func:`~lit_adamerging.merging.regmean.regmean_layers`); the merged weight
    of each is the closed-form solution of the summed regressions with per-row mean Grams whose
    off-diagonal entries are scaled by ``alpha``
    (:class:`~lit_adamerging.merging.regmean.RegMeanAverage`). Biases, norms, embeddings, layers
    no image reaches and (under ``buffer_policy="merge"``) buffers are averaged.

    Defaults are FusionBench's for CLIP (``config/method/regmean/clip_regmean.yaml``): 256 images per
    task, ``reduce_non_diagonal_ratio`` 0.95 (0.6 in its versions before August 2025).

    Args:
        zoo, num_classes, unseen_tasks, num_images, seed, buffer_policy: see :class:`StatisticsMergingModule`.
        alpha: off-diagonal scale of the Grams, in ``[0, 1]`` (1: the plain regression).
        modules: names of the encoder's modules to merge with RegMean; ``None``: every supported one.
            A module that is none of the supported types is an error.
    """

    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = (*StatisticsMergingModule.CHECKPOINT_SETTINGS, "alpha",
                                                      "modules")

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
        num_images: int | None = REGMEAN_IMAGES,
        alpha: float = REGMEAN_ALPHA,
        modules: list[str] | None = None,
        seed: int = 0,
        buffer_policy: BufferPolicy = "pretrained",
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        if isinstance(modules, str):
            raise ValueError(f"modules must be a list of module names, got the string {modules!r}; write [{modules}].")
        super().__init__(zoo, num_classes, unseen_tasks, num_images, seed, buffer_policy)

    def merge_from_statistics(
        self, theta0: Mapping[str, Tensor], task_vectors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        encoder = self._built_merger().encoder
        layers = {
            name: kind for name, kind in regmean_layers(encoder, self.hparams.modules).items() if name in task_vectors
        }
        average = RegMeanAverage(self.hparams.alpha)
        for row, task in enumerate(self.seen_tasks):
            tensors = self.finetuned_tensors(row, theta0, task_vectors)
            count = torch.zeros((), dtype=torch.float64, device=self.device)
            with GramRecorder(encoder, layers) as recorder:
                for _, images in self.task_batches(task):
                    functional_call(encoder, tensors, (images,))
                    count += images.shape[0]
            self.checked_count(task, count)
            # Every process sums the same layers in the same order (a layer no image reached here is zero).
            grams = self.sum_across_processes({
                name: recorder.grams[name] if name in recorder.grams else self._empty_gram(encoder, name, kind)
                for name, kind in layers.items()
            })
            rows = self.sum_across_processes(
                {name: recorder.rows.get(name, torch.zeros((), dtype=torch.float64, device=self.device))
                 for name in layers}
            )
            average.add(tensors, {name: grams[name] / rows[name] for name in layers if float(rows[name]) > 0})
            del tensors, grams, rows, recorder
        return average.result()

    def _empty_gram(self, encoder: torch.nn.Module, name: str, kind: str) -> Tensor:
        """A zero Gram of ``name``'s shape, for a process that no image of it reached."""
        weight = encoder.get_parameter(name)
        owner = encoder.get_submodule(name.rpartition(".")[0]) if "." in name else encoder
        groups = owner.groups if kind == "conv2d" else 1
        width = weight[0].numel() if kind == "conv2d" else weight.shape[1]
        return torch.zeros(groups, width, width, dtype=torch.float64, device=self.device)

