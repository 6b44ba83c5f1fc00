"""What every merging method shares, as a LightningModule base: the zoo, the heads, the tasks, evaluation, checkpoints.

The methods are siblings on :class:`MergingModule`, each taking only the arguments that mean
something for it:

* :class:`~lit_adamerging.TaskArithmeticModule`: data-free merges (weight averaging, task
  arithmetic, TIES-merging); nothing to fit;
* :class:`~lit_adamerging.AdaMergingModule`: coefficients learned by entropy on unlabeled images
  (task-wise, layer-wise, ++);
* :class:`~lit_adamerging.RankWiseAdaMergingModule`: a gate per singular component of each task
  vector's matrices, learned by the same entropy (AdaRank's idea);
* :class:`~lit_adamerging.FisherMergingModule`, :class:`~lit_adamerging.RegMeanModule`: merges
  computed from statistics of unlabeled images; nothing to fit;
* :class:`~lit_adamerging.TSVMergingModule`, :class:`~lit_adamerging.IsotropicMergingModule`: spectral
  merges of each layer's task vectors (TSV-M, Iso-C, Iso-CTS); nothing to fit;
* :class:`~lit_adamerging.SurgeryModule`: a correction on the features of a merge it composes.
* :class:`~lit_adamerging.EMRMergingModule`: EMR-Merging, each task evaluated with weights of its own
  (:meth:`MergingModule.task_evaluation_tensors`); nothing to fit.

A method builds its :class:`~lit_adamerging.merging.MergedEncoder` (:meth:`MergingModule.build_merger`)
and says what tensors evaluation runs with (:meth:`MergingModule.evaluation_tensors`); the base
does the rest.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import warnings
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from lit_adamerging.data.contract import DescribesTasks, FitInputs
from lit_adamerging.data.datamodule import checked_unseen_tasks
from lit_adamerging.data.tasks import check_task_name
from lit_adamerging.io import save_safetensors_stream
from lit_adamerging.lightning.callbacks import PerTaskAccuracy, save_finite_state_dicts
from lit_adamerging.lightning.checkpoint_io import SafeCheckpointIO, fetch_checkpoint, load_checkpoint, source_name
from lit_adamerging.lightning.checks import (
    check_checkpoint_class,
    check_checkpoint_settings,
    class_path,
    quoted_zoo,
)
from lit_adamerging.lightning.sharded import ShardedMergingStrategy, is_sharded
from lit_adamerging.merging import (
    BufferPolicy,
    Granularity,
    MergedEncoder,
    ShardedMergedEncoder,
    agreed,
    sharded_rows,
    stack_task_vectors,
    take_rows,
    ties_task_vectors,
)
from lit_adamerging.models.encoders import feature_dim
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.zoo import LazyStateDicts, LoadedZoo, ModelZoo, finetuned_rows

StorageDtype = Literal["float32", "bfloat16", "float16"]


class LoadedKeys(NamedTuple):
    """What ``load_state_dict`` returns, as ``nn.Module``'s: keys missing from and unexpected in the state dict."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def check_storage_dtype(task_vector_dtype: str) -> None:
    """Refuse a task-vector storage dtype other than float32, bfloat16 or float16."""
    if task_vector_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"task_vector_dtype must be float32, bfloat16 or float16, got {task_vector_dtype!r}.")


def check_ties(ties_k: float | None, ties_normalize: bool) -> None:
    """Refuse a TIES fraction outside (0, 1], and normalisation without one."""
    if ties_k is not None and not 0.0 < ties_k <= 1.0:
        raise ValueError(f"ties_k must be in (0, 1] (a fraction, 0.2 for the paper's 20%), got {ties_k}.")
    if ties_normalize and ties_k is None:
        raise ValueError("ties_normalize needs ties_k: set ties_k (e.g. 0.2) to use TIES.")


def check_strategy(module: MergingModule, strategy: Any) -> None:
    """Refuse a strategy the module cannot run under: :class:`~lit_adamerging.ShardedMergingStrategy` with a method
    that does not shard, and Lightning's own sharding strategies (they know nothing of the task vectors, which the
    module keeps in buffers, and write checkpoints this library does not read)."""
    name = type(module).__name__
    if isinstance(strategy, ShardedMergingStrategy):
        if not module.SHARDS:
            raise ValueError(
                f"{name} cannot run under ShardedMergingStrategy: its merge needs every task vector whole on each "
                "process. The methods that shard are task arithmetic / TIES-merging (TaskArithmeticModule), "
                "AdaMerging and AdaMerging++ (AdaMergingModule), TSV-M (TSVMergingModule) and Iso-C / Iso-CTS "
                "(IsotropicMergingModule); run this one with trainer/ddp or on one device."
            )
        return
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"{type(strategy).__name__} does not shard a merge: it splits parameters, and {name}'s task vectors are "
            "buffers it builds itself; its checkpoints are in a distributed format this library does not read. To "
            "split the pretrained weights and task vectors across processes use lit_adamerging.ShardedMergingStrategy "
            "(--config trainer/sharded); to replicate them use DDP (--config trainer/ddp)."
        )


# Lightning's warnings about what the merging modules do on purpose: the frozen encoder and heads
# run in eval mode during training (see MergingModule.train), and PerTaskAccuracy logs accuracies
# that torchmetrics' compute() has already gathered across processes (syncing the logged value
# again, as the second one asks, would average identical numbers).
INTENDED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"It is recommended to use `self.log\('(val|test)/acc/.*sync_dist=True",
)


@contextlib.contextmanager
def intended_warnings_ignored() -> Iterator[None]:
    """Inside the block only, hide Lightning's warnings about what the merging modules do on purpose.

    They are :data:`INTENDED_WARNINGS`. The ``lit-adamerging`` command runs in this block; a script
    may wrap its own Trainer calls the same way (``with intended_warnings_ignored(): trainer.fit(model,
    datamodule=data)``). Other warnings are shown as before, and the process's warning filters are
    restored when the block ends.
    """
    with warnings.catch_warnings():
        for message in INTENDED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


class MergingModule(pl.LightningModule):
    """The base of the merging methods: one encoder merged from a zoo's models, one frozen head per task.

    The encoder, task vectors and heads are loaded from ``zoo`` in :meth:`configure_model` (once,
    on the right process), so constructing a module is cheap. Evaluation merges once
    (:meth:`evaluation_tensors`) and runs each task's loaders through its head, matched by task
    name (:class:`~lit_adamerging.PerTaskAccuracy` reports them). Unseen tasks are evaluated, never
    merged: the zoo is asked for their heads only.

    A checkpoint holds only what a method learned (:attr:`LEARNED_STATE`) and its settings; it is
    read as :mod:`~lit_adamerging.lightning.checkpoint_io` says and refused if another class or
    other settings (:attr:`CHECKPOINT_SETTINGS`) wrote it. A method that learns nothing
    (:attr:`LEARNS` false) refuses ``fit`` and checkpoints.

    Args:
        zoo: where the pretrained encoder, the fine-tuned encoders and the heads come from.
        num_classes: ``{task: number of classes}`` in task order (the CLI links it from the data).
        unseen_tasks: tasks of ``num_classes`` to evaluate without merging them (the CLI links it
            from ``data.unseen_tasks``; from Python pass ``datamodule.unseen_tasks``).
    """

    # Whether ``fit`` learns something (then evaluating needs that fit, or its checkpoint).
    LEARNS: ClassVar[bool] = False
    # The settings a checkpoint's learned state only makes sense with (a method adds its own).
    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = ("zoo", "num_classes", "unseen_tasks")
    # Prefixes of the state dict keys a method learns: all a checkpoint keeps.
    LEARNED_STATE: ClassVar[tuple[str, ...]] = ()
    # What the fit's loaders yield (the data module reads it, see lit_adamerging.data.contract).
    fit_inputs: ClassVar[FitInputs] = "images"
    # Whether the method runs under ShardedMergingStrategy (its merge built from each process's rows).
    SHARDS: ClassVar[bool] = False

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        unseen_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__()
        for task in num_classes or {}:
            check_task_name(task)
        unseen_tasks = checked_unseen_tasks(
            unseen_tasks, None if num_classes is None else list(num_classes), "the model's tasks (num_classes)"
        )
        self.save_hyperparameters()  # the method's own arguments too (Lightning reads the subclasses' frames)
        self.hparams["unseen_tasks"] = list(unseen_tasks)  # in task order: a checkpoint compares it as a list
        self.hparams.setdefault("_class_path", class_path(type(self)))  # LightningCLI records the one it was given
        if isinstance(self.hparams.get("zoo"), ModelZoo):
            # Outside the CLI the zoo is a Python object; a checkpoint keeps only plain data: the class and
            # arguments it was built with (compared when a checkpoint is loaded), never the object.
            configuration = zoo.configuration()
            if configuration is None:
                del self.hparams["zoo"]
            else:
                self.hparams["zoo"] = configuration
        self.zoo = zoo
        self.num_classes = dict(num_classes) if num_classes is not None else None
        self.unseen_tasks: list[str] = list(unseen_tasks)
        self.merger: MergedEncoder | None = None
        self.heads = nn.ModuleDict()
        self._eval_tensors: dict[str, Tensor] | None = None
        self._loader_tasks: list[str] | None = None  # the evaluation loaders' tasks, in loader order
        self._pending_learned: dict[str, Tensor] | None = None  # see load_state_dict

    # ----------------------------------------------------------------- tasks
    @property
    def task_names(self) -> list[str]:
        if not self.num_classes:
            raise ValueError(
                f"{type(self).__name__} has no tasks: pass num_classes={{task: classes}} "
                "(the CLI links it from the data module's tasks)."
            )
        return list(self.num_classes)

    @property
    def seen_tasks(self) -> list[str]:
        """The merged tasks, in task order."""
        return [task for task in self.task_names if task not in self.unseen_tasks]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The learning methods' step; a method that learns nothing refuses ``fit`` (in :meth:`setup`, before this)."""
        raise NotImplementedError(f"{type(self).__name__} learns nothing; it has no training step.")

    def configure_optimizers(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} learns nothing; it has no optimizer.")

    def setup(self, stage: str) -> None:
        """Refuse ``fit`` of a method that learns nothing; read checkpoints safely; match the data's tasks by name.

        The Trainer's checkpoint reader becomes a :class:`SafeCheckpointIO` (before the Trainer
        reads any ``ckpt_path``): the file is read once, as plain data, within the size limits.
        The evaluation loaders come in the data module's task order.
        """
        if stage == "fit" and not self.LEARNS:
            raise ValueError(
                f"{type(self).__name__} learns nothing, so there is nothing to fit: its merge is computed when "
                "evaluation starts. Run `lit-adamerging test` (trainer.test(model, datamodule=data)) instead."
            )
        strategy = self.trainer.strategy
        check_strategy(self, strategy)
        if not isinstance(strategy.checkpoint_io, SafeCheckpointIO):
            strategy.checkpoint_io = SafeCheckpointIO(strategy.checkpoint_io)
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, DescribesTasks):  # plain dataloaders: matched by position
            self._loader_tasks = None
            return
        data_classes = datamodule.num_classes
        ours = dict(self.num_classes or {})
        problems = [
            f"task {task!r} is in the data but not in the model's num_classes"
            for task in data_classes if task not in ours
        ]
        problems += [
            f"task {task!r} is in the model's num_classes but not in the data"
            for task in ours if task not in data_classes
        ]
        problems += [
            f"task {task!r} has {ours[task]} classes in the model's num_classes but {data_classes[task]} in the data"
            for task in data_classes if task in ours and ours[task] != data_classes[task]
        ]
        if problems:
            raise ValueError(
                "the model's num_classes and the data module's tasks differ: " + "; ".join(problems)
                + ". Pass num_classes=datamodule.num_classes (the CLI links it)."
            )
        data_unseen = datamodule.unseen_tasks
        if set(data_unseen) != set(self.unseen_tasks):
            raise ValueError(
                f"the model's unseen_tasks {self.unseen_tasks} and the data module's {list(data_unseen)} differ. "
                "Pass unseen_tasks=datamodule.unseen_tasks (the CLI links it)."
            )
        self._loader_tasks = list(data_classes)

    @property
    def evaluates_in_step(self) -> bool:
        """Sharded (:class:`~lit_adamerging.ShardedMergingStrategy`), every process must run as many evaluation
        batches: each forward gathers weights from all (the data module reads it, see
        :class:`~lit_adamerging.data.contract.EvaluatesInStep`)."""
        return is_sharded(self._attached_trainer())

    def eval_preprocess(self) -> Preprocess | None:
        """The encoder's eval preprocessing (from the zoo, no weights loaded); the data module reads images with it."""
        return self.zoo.preprocess()

    # ----------------------------------------------------------------- building
    @abstractmethod
    def build_merger(self, encoder: nn.Module, loaded: LoadedZoo) -> MergedEncoder:
        """The method's merged encoder over ``encoder`` (the pretrained one, in eval mode) and the zoo's models."""

    def configure_model(self) -> None:
        if self.merger is not None:
            return
        loaded = self._load_zoo(self.seen_tasks)
        self._check_heads(loaded)
        self.heads = nn.ModuleDict({task: loaded.heads[task].requires_grad_(False).eval() for task in self.task_names})
        self.merger = self.build_merger(loaded.encoder.eval(), loaded)
        if self._pending_learned is not None:  # a state dict loaded before the model was built
            pending, self._pending_learned = self._pending_learned, None
            self.load_learned_state(pending)
        # Under DDP every process builds the same frozen weights from the zoo: only what trains needs
        # syncing, so DDP neither broadcasts the (large) task vectors nor the encoder.
        self._ddp_params_and_buffers_to_ignore = [
            *(name for name, parameter in self.named_parameters() if not parameter.requires_grad),
            *(name for name, _ in self.named_buffers()),
        ]

    def task_vectors(
        self,
        encoder: nn.Module,
        loaded: LoadedZoo,
        *,
        buffer_policy: BufferPolicy = "pretrained",
        dtype: str = "float32",
        ties_k: float | None = None,
        ties_normalize: bool = False,
    ) -> dict[str, Tensor]:
        """The seen tasks' task vectors, stacked in task order (:func:`~lit_adamerging.merging.stack_task_vectors`),
        each fine-tuned model read once; TIES-trimmed first when ``ties_k`` is given.

        Under :class:`~lit_adamerging.ShardedMergingStrategy`, this process's rows of them
        (:func:`~lit_adamerging.merging.sharded_rows`), each fine-tuned file read for those rows only.
        """
        buffers = {name for name, _ in encoder.named_buffers()}
        pretrained = encoder.state_dict()
        mesh = self.sharding_mesh()
        rows = {} if mesh is None else sharded_rows(encoder, pretrained, mesh.size(), mesh.get_local_rank())
        finetuned = LazyStateDicts(
            {task: functools.partial(finetuned_rows, loaded.finetuned, task, rows) for task in self.seen_tasks}
        )
        def stack() -> dict[str, Tensor]:
            return stack_task_vectors(
                take_rows(pretrained, rows), finetuned, buffers=buffers, buffer_policy=buffer_policy,
                dtype=getattr(torch, dtype),
            )

        # Sharded, a process may fail alone (a bad value in its rows): all stop then, none waits for it.
        stacked = stack() if mesh is None else agreed(mesh.get_group(), stack)
        if ties_k is not None:
            group = None if mesh is None else mesh.get_group()
            whole = [name for name in stacked if name not in rows]
            stacked = ties_task_vectors(stacked, ties_k, normalize=ties_normalize, group=group, whole=whole)
        return stacked

    def sharding_mesh(self) -> Any:
        """The device mesh the weights are split on under :class:`~lit_adamerging.ShardedMergingStrategy`, else
        ``None``."""
        return self.device_mesh["data_parallel"] if is_sharded(self._attached_trainer()) else None

    def merged_encoder(
        self,
        encoder: nn.Module,
        task_vectors: Mapping[str, Tensor],
        granularity: Granularity = "layer",
        init: float = 0.3,
        clamp: bool = True,
        cuda_graphs: bool = True,
    ) -> MergedEncoder | ShardedMergedEncoder:
        """The merged encoder with learnable coefficients over ``task_vectors``: a
        :class:`~lit_adamerging.merging.MergedEncoder`, or under :class:`~lit_adamerging.ShardedMergingStrategy` a
        :class:`~lit_adamerging.merging.ShardedMergedEncoder` over this process's rows (without CUDA graphs: FSDP2's
        collectives run in each forward)."""
        mesh = self.sharding_mesh()
        if mesh is not None:
            return ShardedMergedEncoder(encoder, task_vectors, mesh, granularity, init, clamp)
        return MergedEncoder(encoder, task_vectors, granularity, init, clamp, cuda_graphs=cuda_graphs)

    def fixed_merger(
        self, encoder: nn.Module, task_vectors: Mapping[str, Tensor], scale: float
    ) -> MergedEncoder | ShardedMergedEncoder:
        """``encoder`` with ``task_vectors`` at one frozen coefficient ``scale`` per task (nothing learns them): what
        a method builds when its merge is not learned coefficients."""
        merger = self.merged_encoder(encoder, task_vectors, "task", scale, clamp=False, cuda_graphs=False)
        merger.coefficients.requires_grad_(False)
        return merger

    def _load_zoo(self, seen: list[str]) -> LoadedZoo:
        """The zoo's models, told which tasks are merged; a zoo whose ``load`` predates ``merged_tasks`` is asked as
        before when every task is merged."""
        if not self.unseen_tasks:
            return self.zoo.load(self.num_classes)
        parameters = inspect.signature(self.zoo.load).parameters
        if "merged_tasks" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            raise TypeError(
                f"{type(self.zoo).__name__}.load(num_classes) cannot be told which tasks are merged, so it cannot "
                f"leave out the fine-tuned weights of the unseen task(s) {self.unseen_tasks}. Give it the parameter "
                "of ModelZoo.load: load(self, num_classes, merged_tasks=None), reading fine-tuned weights only for "
                "the tasks in merged_tasks."
            )
        return self.zoo.load(self.num_classes, merged_tasks=seen)

    def _check_heads(self, loaded: LoadedZoo) -> None:
        try:
            width: int | None = feature_dim(loaded.encoder)
        except ValueError:  # an encoder from a custom zoo may not say; the first forward will tell
            width = None
        seen = self.seen_tasks
        for task in self.task_names:
            if task not in loaded.heads:
                raise KeyError(f"the zoo {type(self.zoo).__name__} returned no head for task {task!r}.")
            if task in seen and task not in loaded.finetuned:
                raise KeyError(
                    f"the zoo {type(self.zoo).__name__} returned no fine-tuned weights for the merged task {task!r}; "
                    "give them in the zoo, or make the task unseen (data.unseen_tasks: evaluated with the merged "
                    "encoder, never merged)."
                )
            head = loaded.heads[task]
            if head.num_classes != self.num_classes[task]:
                raise ValueError(
                    f"task {task!r}: its head has {head.num_classes} classes but its dataset has "
                    f"{self.num_classes[task]}; the head and the data must describe the same classes."
                )
            if width is not None and head.weight.shape[1] != width:
                raise ValueError(
                    f"task {task!r}: its head takes {head.weight.shape[1]} features but the encoder returns {width}."
                )

    def _attached_trainer(self) -> pl.Trainer | None:
        """The Trainer this module runs in, ``None`` outside one (``load_from_checkpoint``, plain Python)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _built_merger(self) -> MergedEncoder:
        if self.merger is None:
            self.configure_model()
        assert self.merger is not None
        return self.merger

    def train(self, mode: bool = True) -> MergingModule:
        """Only the learned state trains: encoder and heads stay in eval mode (no dropout, fixed batch-norm)."""
        super().train(mode)
        if self.merger is not None:
            self.merger.eval()
            self.heads.eval()
        return self

    # ----------------------------------------------------------------- evaluation
    @abstractmethod
    def evaluation_tensors(self) -> dict[str, Tensor]:
        """The merged tensors evaluation runs with, by the encoder's names (computed once per evaluation); sharded,
        this process's rows of them."""

    def coefficient_merge(self) -> dict[str, Tensor]:
        """The merger's tensors merged with its current coefficients, detached (what a coefficient method evaluates)."""
        with torch.no_grad():
            return {name: value.detach() for name, value in self._built_merger().merged_tensors().items()}

    def task_evaluation_tensors(self, task: str) -> Mapping[str, Tensor] | None:
        """The tensors ``task``'s images are encoded with: by default the merge :meth:`evaluation_tensors` gave when
        evaluation started, the same for every task (``None`` outside an evaluation: the merger merges its current
        coefficients). A method whose tasks run with weights of their own (EMR-Merging) overrides it."""
        return self._eval_tensors

    def forward(self, images: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head on ``images`` with the merged encoder (:meth:`task_evaluation_tensors`)."""
        features = self._built_merger()(images, self.task_evaluation_tensors(task))
        return self.heads[task](features)

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged encoder as a plain state dict with the encoder's keys (what :meth:`export` writes).

        Sharded (:class:`~lit_adamerging.ShardedMergingStrategy`), every process must call it: each tensor is
        gathered from all, and each gets the whole encoder (:meth:`export` streams it instead).
        """
        if isinstance(self._built_merger(), ShardedMergedEncoder):
            return {name: tensor.clone() for name, tensor in self._merged_full_tensors(self.evaluation_tensors())}
        merged = self.evaluation_tensors()
        return {
            name: (merged[name] if name in merged else tensor).detach().clone().contiguous()
            for name, tensor in self._built_merger().encoder.state_dict().items()
        }

    def _merged_full_tensors(self, merged: Mapping[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
        """Sharded: ``merged`` (this process's rows) written into the encoder, then its tensors whole, one at a
        time (every process iterates, each tensor gathered from all)."""
        merger = self._built_merger()
        assert isinstance(merger, ShardedMergedEncoder)
        merger.write(merged)
        return merger.full_tensors()

    def on_after_backward(self) -> None:
        """Sharded: the coefficients' gradient from the encoder's (see
        :meth:`~lit_adamerging.merging.ShardedMergedEncoder.reduce_coefficient_gradients`)."""
        if isinstance(self.merger, ShardedMergedEncoder) and self.merger.coefficients.raw.requires_grad:
            self.merger.reduce_coefficient_gradients()

    # ----------------------------------------------------------------- export
    # The file kinds export() writes (ExportMergedEncoder refuses another path before the run starts).
    EXPORT_SUFFIXES: ClassVar[tuple[str, ...]] = (".safetensors", ".pt", ".pth")

    def export_description(self) -> str:
        """What :meth:`export` writes, in words (for messages)."""
        return "the merged encoder as a plain state dict"

    def export_paths(self, path: str) -> dict[str, str]:
        """``{file: what it holds}`` for every file :meth:`export` to ``path`` writes."""
        return {path: "the merged encoder's export path"}

    def export(self, path: str) -> None:
        """Write the merged model to ``path`` (:class:`~lit_adamerging.ExportMergedEncoder` calls it on the first
        process): here the merged encoder as a plain state dict, atomically, refused if it holds NaN or infinite
        values.

        Sharded, every process calls it: the encoder's tensors are gathered one at a time and the first process
        writes each as it comes (a ``.safetensors`` file, never whole in one process's memory).
        """
        merger = self._built_merger()
        if not isinstance(merger, ShardedMergedEncoder):
            save_finite_state_dicts({path: ("the merged encoder", self.merged_state_dict())})
            return
        if not path.endswith(".safetensors"):
            raise ValueError(f"export path {path!r}: a sharded run writes the merged encoder as .safetensors only.")
        merged = self.evaluation_tensors()
        bad = sorted(name for name, tensor in merged.items() if not bool(tensor.isfinite().all()))
        anywhere = torch.tensor([float(bool(bad))], device=next(iter(merged.values())).device)
        torch.distributed.all_reduce(anywhere, group=merger.group)
        if anywhere.item():
            raise FloatingPointError(
                f"the merged encoder holds NaN or infinite values (on process {merger.rank}: {bad[:5]}); it was not "
                f"exported to {path}. Check the coefficients, the fine-tuned weights and the training loss."
            )
        save_safetensors_stream(
            path if self.global_rank == 0 else None, merger.layout(), self._merged_full_tensors(merged)
        )

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> dict[str, Any]:
        images, labels = batch
        task = (self._loader_tasks or self.task_names)[dataloader_idx]
        return {"task": task, "logits": self(images, task), "labels": labels}

    def on_validation_start(self) -> None:
        self._eval_tensors = self.evaluation_tensors()

    def on_validation_end(self) -> None:
        self._eval_tensors = None

    def on_test_start(self) -> None:
        self._eval_tensors = self.evaluation_tensors()

    def on_test_end(self) -> None:
        self._eval_tensors = None

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluation_step(batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluation_step(batch, dataloader_idx)

    def configure_callbacks(self) -> list[pl.Callback]:
        if any(isinstance(callback, PerTaskAccuracy) for callback in self.trainer.callbacks):
            return []
        return [PerTaskAccuracy()]

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the learned state only: the frozen weights are rebuilt from the zoo."""
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if key.startswith(self.LEARNED_STATE)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of a method that learns nothing, of another class or made with other settings."""
        reader = self._attached_trainer().strategy.checkpoint_io if self._attached_trainer() else None
        source = reader.last_source if isinstance(reader, SafeCheckpointIO) and reader.last_source else "being loaded"
        if not self.LEARNS:
            raise ValueError(
                f"{type(self).__name__} learns nothing, so it has no checkpoint to load ({source}); run test without "
                "--ckpt_path / ckpt_path."
            )
        stored = dict(checkpoint.get("hyper_parameters", {}))
        if isinstance(stored.get("zoo"), ModelZoo):  # load_from_checkpoint's zoo=, written over the stored one
            stored["zoo"] = stored["zoo"].configuration()
        check_checkpoint_class(stored, type(self), source)
        check_checkpoint_settings(stored, self.hparams, source, self.CHECKPOINT_SETTINGS)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load the learned state (the keys under :attr:`LEARNED_STATE`; others are ignored), before or after the
        model is built.

        Before (``load_from_checkpoint``), it is kept and applied in :meth:`configure_model`, where its shapes
        are checked against the zoo (:meth:`load_learned_state`). A method that learns nothing has none.
        """
        if not self.LEARNS:
            raise ValueError(f"{type(self).__name__} learns nothing, so it has no state to load.")
        learned = {
            key: value.detach().clone() for key, value in state_dict.items() if key.startswith(self.LEARNED_STATE)
        }
        self.check_learned_keys(learned, list(state_dict))
        if self.merger is None:
            self._pending_learned = learned
        else:
            self.load_learned_state(learned)
        return LoadedKeys([], [])

    def check_learned_keys(self, learned: Mapping[str, Tensor], keys: list[str]) -> None:
        """Raise ``KeyError`` when a state dict (whose ``keys`` are given) lacks the learned state: not a checkpoint
        of this method."""
        if not learned:
            raise KeyError(
                f"the state dict has no {' or '.join(f'{prefix!r}' for prefix in self.LEARNED_STATE)} keys; it is not "
                f"a checkpoint of {type(self).__name__} (keys: {keys[:5]})."
            )

    def load_learned_state(self, learned: Mapping[str, Tensor]) -> None:
        """Copy the learned state (by its state dict keys) into the built model, after checking that it fits."""
        raise NotImplementedError(f"{type(self).__name__} has no learned state to load.")

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> MergingModule:
        """The module with a checkpoint's settings and learned state, its frozen weights from ``zoo=``.

        ``zoo`` is required: a checkpoint never chooses which files are read nor whether pickles
        may be loaded, even when it stores the zoo's configuration. Without it, the error quotes
        that configuration as data to check. The other settings come from the checkpoint; one of
        :attr:`CHECKPOINT_SETTINGS` passed here that differs from the checkpoint's is an error, and
        so is a zoo built with other arguments than the stored ones (``allow_pickle`` and
        ``head_cache_dir`` aside) and a checkpoint another class wrote.

        The file is read once (``checkpoint_path`` may be a URL), checked as
        :func:`~lit_adamerging.lightning.checkpoint_io.load_checkpoint` says, and those bytes are
        what Lightning loads, always with ``weights_only=True``.
        """
        if weights_only is False:
            raise ValueError(
                "weights_only=False is refused: a merging checkpoint holds plain data only, and is always read with "
                "weights_only=True."
            )
        name, data = source_name(checkpoint_path), fetch_checkpoint(checkpoint_path)
        stored = load_checkpoint(data, name).get("hyper_parameters", {})
        check_checkpoint_class(stored, cls, name)
        zoo = kwargs.get("zoo")
        if not isinstance(zoo, ModelZoo):
            described = quoted_zoo(stored.get("zoo"))
            hint = (
                f"It stores this zoo configuration, quoted here as data: {described}. Check that these are the files "
                "you mean, then build that zoo yourself and pass it (allow_pickle=True only for pickled files you "
                "trust)." if described else "Pass the ModelZoo the coefficients were learned with."
            )
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint({name!r}) needs zoo=<a ModelZoo>: a checkpoint holds the "
                f"learned state and settings, never which model files to read. {hint}"
            )
        given = {key: value for key, value in kwargs.items() if key != "zoo"}
        if zoo.configuration() is not None:
            given["zoo"] = zoo.configuration()
        check_checkpoint_settings(stored, given, name, cls.CHECKPOINT_SETTINGS)
        return super().load_from_checkpoint(  # type: ignore[return-value]
            io.BytesIO(data), map_location=map_location, hparams_file=hparams_file, strict=strict,
            weights_only=True, **kwargs,
        )
