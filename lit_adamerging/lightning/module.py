"""The AdaMerging LightningModule: thin Lightning glue around :class:`MergedEncoder`."""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lit_adamerging.data.datamodule import checked_unseen_tasks
from lit_adamerging.data.tasks import check_task_name
from lit_adamerging.lightning.callbacks import PerTaskAccuracy
from lit_adamerging.lightning.checkpoint_io import (
    COEFFICIENTS_KEY,
    SafeCheckpointIO,
    fetch_checkpoint,
    load_checkpoint,
    source_name,
)
from lit_adamerging.merging import (
    BufferPolicy,
    Granularity,
    MergedEncoder,
    entropy,
    stack_task_vectors,
    ties_task_vectors,
)
from lit_adamerging.models.encoders import feature_dim
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.zoo import LazyStateDicts, LoadedZoo, ModelZoo

StorageDtype = Literal["float32", "bfloat16", "float16"]

# The settings a checkpoint's coefficients only make sense with: the zoo (its class and init args),
# the tasks, which of them are unseen (the coefficients' rows are the seen tasks) and the method.
# The optimiser's (lr, betas) do not change what the coefficients mean.
CHECKPOINT_SETTINGS = (
    "zoo", "num_classes", "unseen_tasks", "granularity", "init", "clamp", "ties_k", "ties_normalize",
    "buffer_policy", "task_vector_dtype",
)
# What a checkpoint that does not store a setting was made with: checkpoints from before unseen tasks
# existed merged every task.
SETTINGS_BEFORE_STORED = {"unseen_tasks": []}
# Zoo arguments that never change the result and that a checkpoint must never set (loading pickles,
# where cached heads are read): they always come from the user.
USER_ONLY_ZOO_ARGS = ("allow_pickle", "head_cache_dir")

# Lightning's warnings about what AdaMerging does on purpose: the frozen encoder and heads run in
# eval mode during training (see AdaMergingModule.train), and PerTaskAccuracy logs accuracies that
# torchmetrics' compute() has already gathered across processes (syncing the logged value again, as
# the second one asks, would average identical numbers).
INTENDED_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"It is recommended to use `self.log\('(val|test)/acc/.*sync_dist=True",
)


@contextlib.contextmanager
def intended_warnings_ignored() -> Iterator[None]:
    """Inside the block only, hide Lightning's warnings about what AdaMerging does on purpose.

    They are :data:`INTENDED_WARNINGS`. The ``lit-adamerging`` command runs in this block; a script
    may wrap its own Trainer calls the same way (``with intended_warnings_ignored(): trainer.fit(model,
    datamodule=data)``). Other warnings are shown as before, and the process's warning filters are
    restored when the block ends.
    """
    with warnings.catch_warnings():
        for message in INTENDED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: list(value) if isinstance(value, tuple) else value}


def _zoo_class(class_path: str) -> type | None:
    """The class a zoo's ``class_path`` names, found without running code outside lit_adamerging; ``None`` if not."""
    module_name, _, name = class_path.rpartition(".")
    if module_name == "lit_adamerging" or module_name.startswith("lit_adamerging."):
        try:
            found = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            return None
    else:
        module = sys.modules.get(module_name)  # never imported on a checkpoint's word
        found = None if module is None else inspect.getattr_static(module, name, None)
    return found if isinstance(found, type) else None


def _same_zoo_class(stored: Any, current: Any) -> bool:
    """Whether two zoo class paths name one class (``lit_adamerging.SyntheticZoo`` is
    ``lit_adamerging.models.zoo.SyntheticZoo``)."""
    if not isinstance(stored, str) or not isinstance(current, str):
        return False
    if stored == current:
        return True
    cls = _zoo_class(current)
    return cls is not None and _zoo_class(stored) is cls


def _same_value(stored: Any, current: Any) -> bool:
    """Equal, or two strings naming the same file: the same existing file (``runs/a.pt`` and its absolute path),
    or a relative path in the checkpoint that the given path ends with (a checkpoint does not record the folder
    its run started in)."""
    if stored == current:
        return True
    if not (isinstance(stored, str) and isinstance(current, str) and stored and current):
        return False
    first, second = Path(stored).expanduser(), Path(current).expanduser()
    if first.exists() and second.exists():
        return os.path.samefile(first, second)
    relative = [part for part in first.parts if part != "."]
    return not first.is_absolute() and ".." not in relative and list(second.parts[-len(relative):]) == relative


def checkpoint_settings_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], settings: Sequence[str] = CHECKPOINT_SETTINGS
) -> list[str]:
    """One line per setting of ``settings`` (default :data:`CHECKPOINT_SETTINGS`) where a checkpoint's
    hyperparameters and the current ones differ.

    A setting missing on either side is not compared (a checkpoint made before zoos recorded their
    arguments stores no zoo), except those of :data:`SETTINGS_BEFORE_STORED`, which a checkpoint
    that lacks them was made with. Nested values are compared key by key, a key on one side only
    being a difference (unless the other side leaves it at ``None``: a zoo argument added since the
    checkpoint was made, at its default), and the tasks' order too. Two zoo class paths naming the
    same class are the same, and so are two paths naming the same existing file. The zoo's
    :data:`USER_ONLY_ZOO_ARGS` are never compared.
    """
    ignored = {f"model.zoo.init_args.{name}" for name in USER_ONLY_ZOO_ARGS}
    missing = "<not set>"
    lines = []
    for key in settings:
        if key not in current or (key not in stored and key not in SETTINGS_BEFORE_STORED):
            continue
        stored_value = stored[key] if key in stored else SETTINGS_BEFORE_STORED[key]
        before, after = _flatten(stored_value, f"model.{key}"), _flatten(current[key], f"model.{key}")
        if key == "zoo" and _same_zoo_class(before.get("model.zoo.class_path"), after.get("model.zoo.class_path")):
            after["model.zoo.class_path"] = before["model.zoo.class_path"]
        for name in [*before, *(name for name in after if name not in before)]:
            in_checkpoint, given = before.get(name, missing), after.get(name, missing)
            if name in ignored or (None in (in_checkpoint, given) and missing in (in_checkpoint, given)):
                continue
            if not _same_value(in_checkpoint, given):
                lines.append(f"  {name}: checkpoint {in_checkpoint!r}, yours {given!r}")
        if key == "num_classes" and isinstance(stored[key], Mapping) and isinstance(current[key], Mapping):
            if set(stored[key]) == set(current[key]) and list(stored[key]) != list(current[key]):
                lines.append(
                    f"  model.num_classes (task order): checkpoint {list(stored[key])}, yours {list(current[key])}"
                )
    return lines


def check_checkpoint_settings(
    stored: Mapping[str, Any], current: Mapping[str, Any], source: str, settings: Sequence[str] = CHECKPOINT_SETTINGS
) -> None:
    """Raise a ``ValueError`` listing every setting of ``settings`` where ``stored`` and ``current`` differ."""
    lines = checkpoint_settings_differences(stored, current, settings)
    if lines:
        raise ValueError(
            f"the checkpoint {source} was made with other settings than the ones given now, and these change what "
            "its coefficients mean:\n" + "\n".join(lines) + "\n"
            "Give the settings the checkpoint was made with (the tasks come from data.tasks, in the same order, and "
            "the unseen ones from data.unseen_tasks), or "
            "ask for the checkpoint's settings explicitly: `lit-adamerging ... --settings_from_checkpoint=true` "
            "(zoo and method; allow_pickle and head_cache_dir still come from your config), or from Python "
            "AdaMergingModule.load_from_checkpoint(path, zoo=...) without overriding them."
        )


def _stored_zoo(zoo: Any) -> str | None:
    """A checkpoint's stored zoo configuration quoted as JSON data (never as code to run); ``None`` if it has none."""
    if not isinstance(zoo, Mapping) or "class_path" not in zoo:
        return None
    init_args = zoo.get("init_args")
    if isinstance(init_args, Mapping):
        zoo = {**zoo, "init_args": {key: value for key, value in init_args.items() if key not in USER_ONLY_ZOO_ARGS}}
    text = json.dumps(zoo, default=repr, sort_keys=False)
    return text if len(text) <= 2000 else text[:2000] + " ... (cut)"


class AdaMergingModule(pl.LightningModule):
    """Learns merging coefficients by minimising the entropy of every task head on unlabeled images.

    The encoder, task vectors and heads are loaded from ``zoo`` in :meth:`configure_model` (once,
    on the right process), so constructing the module is cheap. A checkpoint holds only the
    coefficients and the hyperparameters: the frozen weights are rebuilt from the zoo.

    A checkpoint is data, never configuration: loading one (``trainer.fit/test(..., ckpt_path=)``,
    :meth:`load_from_checkpoint`) stops with an error listing every setting of
    :data:`CHECKPOINT_SETTINGS` (zoo, tasks and their order, method) where it differs from this
    module's, and :meth:`load_from_checkpoint` needs the zoo from the caller.

    Evaluation matches loaders to heads by task name: under a :class:`MultiTaskDataModule` its
    tasks may come in another order than ``num_classes``, but must be the same tasks with the same
    class counts, and the same unseen tasks.

    Unseen tasks are evaluated, never merged: the zoo is asked for their heads only (no fine-tuned
    weights read), the coefficients have one row per seen task (:attr:`seen_tasks`, in task order),
    the loss sums the seen tasks' entropies only, and the evaluation reports each task's accuracy
    with the seen and unseen averages (:class:`PerTaskAccuracy`). With the same seed and seen
    tasks, the learned coefficients are the same with or without unseen tasks.

    The data-free baselines are the same module, evaluated without fitting: task arithmetic is
    ``granularity="task", init=0.3``; weight averaging is ``init=None`` (``1/T``); TIES-merging
    adds ``ties_k=0.2, ties_normalize=True``. AdaMerging++ is AdaMerging with ``ties_k=0.2``.
    Each method by name: ``**method_settings(name)`` (:mod:`lit_adamerging.methods`).

    Lightning warns at the start of ``fit`` that modules are in eval mode: that is intended (see
    :meth:`train`); :func:`intended_warnings_ignored` hides it.

    Args:
        zoo: where the pretrained encoder, the fine-tuned encoders and the heads come from.
        num_classes: ``{task: number of classes}`` in task order (the CLI links it from the data).
        unseen_tasks: tasks of ``num_classes`` to evaluate without merging them (the CLI links it
            from ``data.unseen_tasks``; from Python pass ``datamodule.unseen_tasks``).
        granularity: ``"task"`` (one coefficient per task) or ``"layer"`` (one per task and tensor).
        init: initial coefficient; ``None`` means ``1 / number of tasks``.
        clamp: clamp coefficients to ``[0, 1]`` in the forward (the paper's default).
        ties_k: if set, TIES trim/elect/disjoint the task vectors first, keeping this fraction.
        ties_normalize: divide TIES vectors by the number of tasks keeping each entry (TIES-merging).
        buffer_policy: what to do with floating-point buffers (see :data:`BufferPolicy`).
        task_vector_dtype: storage dtype of the stacked task vectors (the merge runs in fp32).
        lr: Adam learning rate.
        betas: Adam betas.
        cuda_graphs: on CUDA, capture each training step's merge and encoder (forward and backward)
            as CUDA graphs once and replay them (see :class:`MergedEncoder`); same results, fewer
            host calls. An encoder that cannot be captured falls back to eager after a warning.
    """

    # The settings a checkpoint of this class is checked against (a subclass adds its own).
    CHECKPOINT_SETTINGS: ClassVar[tuple[str, ...]] = CHECKPOINT_SETTINGS

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
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}.")
        if task_vector_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"task_vector_dtype must be float32, bfloat16 or float16, got {task_vector_dtype!r}.")
        if ties_k is not None and not 0.0 < ties_k <= 1.0:
            raise ValueError(f"ties_k must be in (0, 1] (a fraction, 0.2 for the paper's 20%), got {ties_k}.")
        if ties_normalize and ties_k is None:
            raise ValueError("ties_normalize needs ties_k: set ties_k (e.g. 0.2) to use TIES.")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        for task in num_classes or {}:
            check_task_name(task)
        unseen_tasks = checked_unseen_tasks(
            unseen_tasks, None if num_classes is None else list(num_classes), "the model's tasks (num_classes)"
        )
        self.save_hyperparameters()
        # A subclass's LightningCLI instantiation records only its own signature's arguments: the
        # settings it fixes for this class are recorded too.
        fixed = dict(
            granularity=granularity, init=init, clamp=clamp, ties_k=ties_k, ties_normalize=ties_normalize,
            buffer_policy=buffer_policy, task_vector_dtype=task_vector_dtype, lr=lr, betas=betas,
            cuda_graphs=cuda_graphs,
        )
        self.hparams.update({key: value for key, value in fixed.items() if key not in self.hparams})
        self.hparams["unseen_tasks"] = list(unseen_tasks)  # in task order: a checkpoint compares it as a list
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
        self._pending_coefficients: Tensor | None = None
        self._eval_tensors: dict[str, Tensor] | None = None
        self._loader_tasks: list[str] | None = None  # the evaluation loaders' tasks, in loader order
        self._last_entropies: tuple[int, Tensor] | None = None  # (step, entropy per task), checked one step later

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> AdaMergingModule:
        """The module with a checkpoint's settings and coefficients, its frozen weights from ``zoo=``.

        ``zoo`` is required: a checkpoint never chooses which files are read nor whether pickles
        may be loaded, even when it stores the zoo's configuration (every checkpoint since zoos
        record their arguments does). Without it, the error quotes that configuration as data to
        check. The other settings come from the checkpoint; a setting of :data:`CHECKPOINT_SETTINGS`
        passed here that differs from the checkpoint's is an error, and so is a zoo built with other
        arguments than the stored ones (``allow_pickle`` and ``head_cache_dir`` aside).

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
        zoo = kwargs.get("zoo")
        if not isinstance(zoo, ModelZoo):
            described = _stored_zoo(stored.get("zoo"))
            hint = (
                f"It stores this zoo configuration, quoted here as data: {described}. Check that these are the files "
                "you mean, then build that zoo yourself and pass it (allow_pickle=True only for pickled files you "
                "trust)." if described else "Pass the ModelZoo the coefficients were learned with."
            )
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint({name!r}) needs zoo=<a ModelZoo>: a checkpoint holds the "
                f"coefficients and settings, never which model files to read. {hint}"
            )
        given = {key: value for key, value in kwargs.items() if key != "zoo"}
        if zoo.configuration() is not None:
            given["zoo"] = zoo.configuration()
        check_checkpoint_settings(stored, given, name, cls.CHECKPOINT_SETTINGS)
        return super().load_from_checkpoint(  # type: ignore[return-value]
            io.BytesIO(data), map_location=map_location, hparams_file=hparams_file, strict=strict,
            weights_only=True, **kwargs,
        )

    @property
    def task_names(self) -> list[str]:
        if not self.num_classes:
            raise ValueError(
                "AdaMergingModule has no tasks: pass num_classes={task: classes} "
                "(the CLI links it from the data module's tasks)."
            )
        return list(self.num_classes)

    @property
    def seen_tasks(self) -> list[str]:
        """The merged tasks, in task order: the rows of :meth:`coefficients`, the terms of the loss."""
        return [task for task in self.task_names if task not in self.unseen_tasks]

    def setup(self, stage: str) -> None:
        """Read checkpoints safely and match the data module's tasks to this model's by name.

        The Trainer's checkpoint reader becomes a :class:`SafeCheckpointIO` (before the Trainer
        reads any ``ckpt_path``): the file is read once, as plain data, within the size limits.
        The evaluation loaders come in the data module's task order.
        """
        if self._trainer is not None:
            strategy = self._trainer.strategy
            if not isinstance(strategy.checkpoint_io, SafeCheckpointIO):
                strategy.checkpoint_io = SafeCheckpointIO(strategy.checkpoint_io)
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if not isinstance(data_classes, Mapping):
            self._loader_tasks = None
            return
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
        data_unseen = getattr(datamodule, "unseen_tasks", None)
        if data_unseen is not None and set(data_unseen) != set(self.unseen_tasks):
            raise ValueError(
                f"the model's unseen_tasks {self.unseen_tasks} and the data module's {list(data_unseen)} differ. "
                "Pass unseen_tasks=datamodule.unseen_tasks (the CLI links it)."
            )
        self._loader_tasks = list(data_classes)

    def eval_preprocess(self) -> Preprocess | None:
        """The encoder's eval preprocessing (from the zoo, no weights loaded); the data module reads images with it."""
        return self.zoo.preprocess()

    # ----------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.merger is not None:
            return
        tasks, seen = self.task_names, self.seen_tasks
        loaded = self._load_zoo(seen)
        try:
            width: int | None = feature_dim(loaded.encoder)
        except ValueError:  # an encoder from a custom zoo may not say; the first forward will tell
            width = None
        for task in tasks:
            if task not in loaded.heads or (task in seen and task not in loaded.finetuned):
                raise KeyError(f"the zoo returned no head or fine-tuned weights for task {task!r}.")
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
        encoder = loaded.encoder.eval()
        buffers = {name for name, _ in encoder.named_buffers()}
        # In the coefficients' task order, still loaded one at a time if the zoo loads lazily.
        finetuned = LazyStateDicts({task: functools.partial(loaded.finetuned.__getitem__, task) for task in seen})
        task_vectors = stack_task_vectors(
            encoder.state_dict(),
            finetuned,
            buffers=buffers,
            buffer_policy=self.hparams.buffer_policy,
            dtype=getattr(torch, self.hparams.task_vector_dtype),
        )
        del finetuned, loaded.finetuned
        if self.hparams.ties_k is not None:
            task_vectors = ties_task_vectors(task_vectors, self.hparams.ties_k, normalize=self.hparams.ties_normalize)
        init = 1.0 / len(seen) if self.hparams.init is None else self.hparams.init
        self.merger = MergedEncoder(
            encoder, task_vectors, self.hparams.granularity, init, self.hparams.clamp,
            cuda_graphs=self.hparams.cuda_graphs,
        )
        self.heads = nn.ModuleDict({task: loaded.heads[task].requires_grad_(False).eval() for task in tasks})
        # Under DDP every process builds the same frozen weights from the zoo: only the coefficients
        # need syncing, so DDP neither broadcasts the (large) task vectors nor the encoder.
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in [*self.named_parameters(), *self.named_buffers()] if name != COEFFICIENTS_KEY
        ]
        if self._pending_coefficients is not None:
            self._set_coefficients(self._pending_coefficients)
            self._pending_coefficients = None

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

    def _built_merger(self) -> MergedEncoder:
        if self.merger is None:
            self.configure_model()
        assert self.merger is not None
        return self.merger

    def train(self, mode: bool = True) -> AdaMergingModule:
        """Only the coefficients learn: encoder and heads stay in eval mode (no dropout, fixed batch-norm)."""
        super().train(mode)
        if self.merger is not None:
            self.merger.eval()
            self.heads.eval()
        return self

    # ----------------------------------------------------------------- coefficients
    def coefficients(self) -> Tensor:
        """The coefficients in use, ``[tasks, merged tensors]`` (clamped if ``clamp``)."""
        return self._built_merger().coefficients().detach()

    def _set_coefficients(self, raw: Tensor) -> None:
        assert self.merger is not None
        target = self.merger.coefficients.raw
        if raw.shape != target.shape:
            raise ValueError(
                f"the checkpoint's coefficients have shape {tuple(raw.shape)} but this model needs "
                f"{tuple(target.shape)} ({len(self.seen_tasks)} merged tasks, granularity "
                f"{self.hparams.granularity!r}); it was saved for other tasks, models or settings."
            )
        if not bool(torch.isfinite(raw).all()):
            raise ValueError(
                "the coefficients being loaded hold NaN or infinite values; they describe no merge (clamping would "
                "turn +inf into 1 silently). Load coefficients from a run that did not diverge."
            )
        with torch.no_grad():
            target.copy_(raw)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_last_entropies()  # never save coefficients a non-finite loss has updated
        checkpoint["state_dict"] = {COEFFICIENTS_KEY: checkpoint["state_dict"][COEFFICIENTS_KEY]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made with other settings (see :func:`check_checkpoint_settings`)."""
        stored = dict(checkpoint.get("hyper_parameters", {}))
        if isinstance(stored.get("zoo"), ModelZoo):  # load_from_checkpoint's zoo=, written over the stored one
            stored["zoo"] = stored["zoo"].configuration()
        reader = self._trainer.strategy.checkpoint_io if self._trainer is not None else None
        source = reader.last_source if isinstance(reader, SafeCheckpointIO) and reader.last_source else "being loaded"
        check_checkpoint_settings(stored, self.hparams, source, self.CHECKPOINT_SETTINGS)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load the coefficients (the only learned state); other keys are ignored.

        Works before the model is built (``load_from_checkpoint``): the coefficients are applied in
        :meth:`configure_model`, where their shape is checked against the zoo.
        """
        if COEFFICIENTS_KEY not in state_dict:
            raise KeyError(
                f"the state dict has no {COEFFICIENTS_KEY!r}; it is not an AdaMergingModule checkpoint "
                f"(keys: {list(state_dict)[:5]})."
            )
        raw = state_dict[COEFFICIENTS_KEY].detach().clone()
        if self.merger is None:
            self._pending_coefficients = raw
        else:
            self._set_coefficients(raw)
        return nn.modules.module._IncompatibleKeys([], [])

    # ----------------------------------------------------------------- steps
    def forward(self, images: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head on ``images`` with the merged encoder."""
        features = self._built_merger()(images, self._eval_tensors)
        return self.heads[task](features)

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
        features = self._built_merger()(torch.cat([batch[task] for task in tasks]))
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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self._built_merger().coefficients.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas)
        )

    def on_train_end(self) -> None:
        self._check_last_entropies()

    def evaluation_tensors(self) -> dict[str, Tensor]:
        """The merged tensors evaluation runs with, by name (the coefficients' merge; other methods override it)."""
        with torch.no_grad():
            return {name: value.detach() for name, value in self._built_merger().merged_tensors().items()}

    def merged_state_dict(self) -> dict[str, Tensor]:
        """The merged encoder as a plain state dict with the encoder's keys (:class:`ExportMergedEncoder` writes it)."""
        merged = self.evaluation_tensors()
        return {
            name: (merged[name] if name in merged else tensor).detach().clone().contiguous()
            for name, tensor in self._built_merger().encoder.state_dict().items()
        }

    def _merge_for_evaluation(self) -> None:
        self._check_last_entropies()
        self._eval_tensors = self.evaluation_tensors()

    def _end_evaluation(self) -> None:
        self._eval_tensors = None

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> dict[str, Any]:
        images, labels = batch
        task = (self._loader_tasks or self.task_names)[dataloader_idx]
        return {"task": task, "logits": self(images, task), "labels": labels}

    def on_validation_start(self) -> None:
        self._merge_for_evaluation()

    def on_validation_end(self) -> None:
        self._end_evaluation()

    def on_test_start(self) -> None:
        self._merge_for_evaluation()

    def on_test_end(self) -> None:
        self._end_evaluation()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluation_step(batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluation_step(batch, dataloader_idx)

    def configure_callbacks(self) -> list[pl.Callback]:
        if any(isinstance(callback, PerTaskAccuracy) for callback in self.trainer.callbacks):
            return []
        return [PerTaskAccuracy()]
