"""The merging methods by name: one name per method, on the command line, in Python and in the benchmark.

Each method is a preset shipped in this package, ``<name>.yaml``: a plain LightningCLI config
fragment choosing a merging module and its settings (``model: {class_path, init_args}``). So
``lit-adamerging fit --config tiny --method layer_wise_adamerging`` is that
``--config`` given by name, with LightningCLI's own rules (what comes later on the command line
wins), and in Python :func:`create_method` builds the same module.

=============================  ==========================================================================
name                           method
=============================  ==========================================================================
weight_averaging               ``theta_0 + (1/T) sum_k tau_k`` (nothing to learn: ``test`` only)
task_arithmetic                ``theta_0 + 0.3 sum_k tau_k`` (``test`` only)
ties_merging                   TIES-merging: top-20% trim, sign election, disjoint mean, x 0.3 (``test`` only)
task_wise_adamerging           task-wise AdaMerging: one learned coefficient per task
task_wise_adamerging_pp        task-wise AdaMerging++ (over TIES task vectors)
layer_wise_adamerging          layer-wise AdaMerging: one learned coefficient per task and tensor
layer_wise_adamerging_pp       layer-wise AdaMerging++ (over TIES task vectors)
rank_wise_adamerging           rank-wise AdaMerging (AdaRank): a learned gate per singular component
rank_wise_adamerging_tsv       rank-wise AdaMerging over TSV-M's decorrelated components
wemoe                          WEMoE: each MLP a mixture of the task vectors, weighted per sample by a learned router
fisher_merging                 Fisher-weighted average of the fine-tuned encoders (``test`` only)
regmean                        RegMean: closed-form merge of every linear map from Gram matrices (``test`` only)
tsv_merging                    TSV-M: each task's top 1/T singular components per layer, decorrelated (``test`` only)
iso_c_merging                  Iso-C: the summed task vector's spectrum flattened to its mean (``test`` only)
iso_cts_merging                Iso-CTS: common and task-specific singular directions, flat spectrum (``test`` only)
task_arithmetic_surgery        Representation Surgery on task arithmetic: a rank-16 map per task
layer_wise_adamerging_surgery  Representation Surgery on layer-wise AdaMerging (``coefficients_from`` its fit)
emr_merging                    EMR-Merging: unified task vector, a bit mask and a rescaler per task (``test`` only)
=============================  ==========================================================================

``lit-adamerging methods`` prints this list (:func:`describe_methods`).

Example:
    >>> method_names()[:3]
    ('emr_merging', 'fisher_merging', 'iso_c_merging')
    >>> method_class("ties_merging").__name__, method_settings("ties_merging")
    ('TaskArithmeticModule', {'scale': 0.3, 'ties_k': 0.2, 'ties_normalize': True})
    >>> from lit_adamerging import SyntheticZoo
    >>> module = create_method("layer_wise_adamerging_pp", SyntheticZoo("open_clip:test-vit-tiny"), {"a": 3, "b": 5})
    >>> type(module).__name__, module.hparams.granularity, module.hparams.ties_k, method_of(module)
    ('AdaMergingModule', 'layer', 0.2, 'layer_wise_adamerging_pp')
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from lit_adamerging.lightning.base import MergingModule
    from lit_adamerging.models.zoo import ModelZoo

__all__ = [
    "create_method",
    "describe_methods",
    "method_class",
    "method_config",
    "method_defaults",
    "method_names",
    "method_of",
    "method_settings",
]

_SUFFIX = ".yaml"


def method_names() -> tuple[str, ...]:
    """The names of the shipped methods, sorted."""
    names = (entry.name[: -len(_SUFFIX)] for entry in files(__name__).iterdir() if entry.name.endswith(_SUFFIX))
    return tuple(sorted(names))


def method_config(name: str) -> Path:
    """The preset file of method ``name``: the config fragment ``--method name`` stands for.

    Raises:
        ValueError: ``name`` is not a shipped method; the message lists the valid names.
    """
    if name not in method_names():
        raise ValueError(f"unknown merging method {name!r}; choose one of: {', '.join(method_names())}.")
    return Path(str(files(__name__).joinpath(name + _SUFFIX)))


def _preset(name: str) -> tuple[str, dict[str, Any], str]:
    """``(class_path, init_args, description)`` of method ``name``'s preset."""
    path = method_config(name)
    text = path.read_text(encoding="utf-8")
    preset = yaml.safe_load(text)
    model = preset.get("model") if isinstance(preset, dict) else None
    if (
        set(preset or {}) != {"model"} or not isinstance(model, dict) or set(model) != {"class_path", "init_args"}
        or not isinstance(model["class_path"], str) or not isinstance(model["init_args"], dict)
    ):
        raise ValueError(f"method preset {path} must hold exactly model: {{class_path: ..., init_args: {{...}}}}.")
    comment = []
    for line in text.splitlines():
        if not line.startswith("# ") or line.startswith("#  "):
            break
        comment.append(line[2:])
    return model["class_path"], dict(model["init_args"]), " ".join(comment)


def method_class(name: str) -> type[MergingModule]:
    """The LightningModule class of method ``name`` (a :class:`~lit_adamerging.lightning.base.MergingModule`)."""
    from lit_adamerging.lightning.base import MergingModule

    path = _preset(name)[0]
    module_name, _, class_name = path.rpartition(".")
    found = None
    if path.startswith("lit_adamerging."):
        found = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(found, type) and issubclass(found, MergingModule)):
        raise ValueError(f"method preset {name!r} names {path!r}, not one of lit_adamerging's merging modules.")
    return found


def method_settings(name: str) -> dict[str, Any]:
    """The keyword arguments of :func:`method_class` that make it method ``name`` (a fresh dict on every call)."""
    return _preset(name)[1]


def create_method(
    name: str,
    zoo: ModelZoo,
    num_classes: Mapping[str, int] | None = None,
    unseen_tasks: Sequence[str] = (),
    **overrides: Any,
) -> MergingModule:
    """Method ``name``'s module: :func:`method_class` with :func:`method_settings`, then ``overrides``.

    Example: ``create_method("layer_wise_adamerging", zoo, data.num_classes, data.unseen_tasks, lr=0.01)``.
    """
    settings = {**method_settings(name), **overrides}
    return method_class(name)(zoo, dict(num_classes) if num_classes is not None else None, unseen_tasks, **settings)


def method_defaults(name: str) -> dict[str, Any]:
    """Every setting of method ``name``'s class that has a default, as the method sets it: the class's defaults,
    then the preset's settings over them."""
    parameters = inspect.signature(method_class(name)).parameters.items()
    defaults = {key: parameter.default for key, parameter in parameters if parameter.default is not parameter.empty}
    return {**defaults, **method_settings(name)}


def method_of(module: Any) -> str | None:
    """The name of the method ``module`` is: its class, and each setting that defines the method (the class's
    checkpoint settings beyond the zoo and tasks) as :func:`method_defaults` gives it; else ``None``."""
    from lit_adamerging.lightning.base import MergingModule

    hparams = getattr(module, "hparams", {})
    for name in method_names():
        cls = method_class(name)
        if type(module) is not cls:
            continue
        expected = method_defaults(name)
        keys = [key for key in cls.CHECKPOINT_SETTINGS if key not in MergingModule.CHECKPOINT_SETTINGS]
        if all(key in hparams and key in expected and hparams[key] == expected[key] for key in keys):
            return name
    return None


def describe_methods() -> str:
    """One line per method: its name, its class and what it is (what ``lit-adamerging methods`` prints)."""
    presets = {name: _preset(name) for name in method_names()}
    width = max(map(len, presets))
    class_width = max(len(class_path.rpartition(".")[2]) for class_path, _, _ in presets.values())
    lines = []
    for name, (class_path, _, description) in presets.items():
        summary = description.split(". ")[0].split(": ")[0].rstrip(".")  # the method's name and source
        lines.append(f"{name:<{width}}  {class_path.rpartition('.')[2]:<{class_width}}  {summary}")
    return "\n".join(lines)
