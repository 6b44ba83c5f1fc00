"""Model zoos: where the pretrained encoder, the fine-tuned encoders and the task heads come from.

A :class:`ModelZoo` is a small, picklable description (names and paths); :meth:`ModelZoo.load`
does the heavy work and is called once, when the LightningModule is set up on its device.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_adamerging.models.encoders import create_encoder, feature_dim
from lit_adamerging.models.heads import ClassificationHead

STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@dataclass
class LoadedZoo:
    """A pretrained encoder, the fine-tuned encoders' state dicts and one head per task."""

    encoder: nn.Module
    finetuned: dict[str, dict[str, Tensor]]
    heads: dict[str, ClassificationHead]


class ModelZoo(ABC):
    """Describes the models to merge; subclasses say where they come from."""

    @abstractmethod
    def load(self, num_classes: Mapping[str, int]) -> LoadedZoo:
        """Load the encoder, and for each task in ``num_classes`` its fine-tuned weights and head."""


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pt``/``.pth``/``.bin`` file, never executing code."""
    path = Path(path)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise ValueError(f"{path}: unsupported weights file type {path.suffix!r}; use one of {STATE_DICT_SUFFIXES}.")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; check the path in the zoo configuration.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError subclasses and RuntimeError here
        raise ValueError(
            f"{path}: not a plain state dict of tensors ({error.__class__.__name__}); "
            "files holding pickled Python objects are refused because loading them can run code."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}.")
    return state


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

    def load(self, num_classes: Mapping[str, int]) -> LoadedZoo:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = create_encoder(self.encoder)
        pretrained = encoder.state_dict()
        width = feature_dim(encoder)
        parameters = {name for name, _ in encoder.named_parameters()}
        finetuned: dict[str, dict[str, Tensor]] = {}
        heads: dict[str, ClassificationHead] = {}
        for task, classes in num_classes.items():
            generator = torch.Generator().manual_seed(_task_seed(self.seed, task))
            finetuned[task] = {
                key: self._perturb(value, generator) if key in parameters else value.clone()
                for key, value in pretrained.items()
            }
            weight = torch.randn(classes, width, generator=generator, device="cpu") / width**0.5
            heads[task] = ClassificationHead(weight, torch.zeros(classes, device="cpu"))
        return LoadedZoo(encoder, finetuned, heads)

    def _perturb(self, value: Tensor, generator: torch.Generator) -> Tensor:
        scale = value.float().std() if value.numel() > 1 else value.float().abs()
        noise = torch.randn(value.shape, generator=generator, device="cpu")
        return (value.float() + self.perturbation * scale.clamp(min=1e-3) * noise.to(value.device)).to(value.dtype)


class StateDictZoo(ModelZoo):
    """Encoder weights and heads from state dict files (``.safetensors``, ``.pt``, ``.pth``, ``.bin``).

    Args:
        encoder: ``"open_clip:<model>"`` or ``"timm:<model>"``; its architecture is built, then
            ``pretrained`` is loaded into it.
        pretrained: state dict file of the pretrained encoder.
        finetuned: ``{task: state dict file}`` of the fine-tuned encoders (same keys).
        heads: ``{task: file}`` holding ``weight`` ``[classes, features]`` and optionally ``bias``.
        normalize_features: L2-normalise features before the heads (CLIP zero-shot heads).
    """

    def __init__(
        self,
        encoder: str,
        pretrained: str,
        finetuned: dict[str, str],
        heads: dict[str, str],
        normalize_features: bool = False,
    ) -> None:
        self.encoder = encoder
        self.pretrained = pretrained
        self.finetuned = finetuned
        self.heads = heads
        self.normalize_features = normalize_features

    def load(self, num_classes: Mapping[str, int]) -> LoadedZoo:
        for kind, files in (("finetuned", self.finetuned), ("heads", self.heads)):
            missing = [task for task in num_classes if task not in files]
            if missing:
                raise KeyError(f"StateDictZoo.{kind} has no file for task(s) {missing}; add one per task.")
        encoder = create_encoder(self.encoder)
        state = load_state_dict_file(self.pretrained)
        result = encoder.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{self.pretrained}: does not fit {self.encoder}: missing keys {result.missing_keys[:5]}, "
                f"unexpected keys {result.unexpected_keys[:5]}."
            )
        finetuned = {task: load_state_dict_file(self.finetuned[task]) for task in num_classes}
        heads = {}
        for task in num_classes:
            head_state = load_state_dict_file(self.heads[task])
            if "weight" not in head_state:
                raise KeyError(f"{self.heads[task]}: head file for task {task!r} has no 'weight' tensor.")
            heads[task] = ClassificationHead(head_state["weight"], head_state.get("bias"), self.normalize_features)
        return LoadedZoo(encoder, finetuned, heads)
