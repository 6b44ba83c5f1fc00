"""The merging methods by name: each one a preset of :class:`~lit_adamerging.AdaMergingModule`'s method settings.

A preset is a YAML file of this package, ``<name>.yaml``, holding ``learns:`` (whether ``fit``
learns the method from unlabeled images, so that evaluating it needs that fit's checkpoint, or
there is nothing to learn and ``fit`` is refused), a ``model:`` mapping of the module's settings
(for AdaMerging and the data-free baselines ``granularity``, ``init``, ``ties_k`` and
``ties_normalize``) and, for methods that are not coefficient merges, ``module:``, the import
path of their LightningModule (a subclass of :class:`~lit_adamerging.AdaMergingModule`, which is
the default). The same file serves both ways of choosing a method:

* on the command line, ``lit-adamerging fit --config configs/tiny.yaml --method layer_wise`` (how
  ``--method`` combines with ``--config`` and ``--model.*``: see :mod:`lit_adamerging.cli`);
* in Python, ``method_module(name)(zoo, num_classes, **method_settings(name))``, e.g.
  ``AdaMergingModule(zoo, num_classes, **method_settings("layer_wise"))``.

=======================  ================================================================================
name                     method
=======================  ================================================================================
weight_averaging         ``theta_0 + (1/T) sum_k tau_k`` (data-free: ``test`` only)
task_arithmetic          ``theta_0 + 0.3 sum_k tau_k`` (data-free)
ties_merging             TIES-merging: top-20% trim, sign election, disjoint mean, x 0.3 (data-free)
task_wise                task-wise AdaMerging: one learned coefficient per task
task_wise_pp             task-wise AdaMerging++ (over TIES task vectors)
layer_wise               layer-wise AdaMerging: one learned coefficient per task and tensor
layer_wise_pp            layer-wise AdaMerging++ (over TIES task vectors)
fisher_merging           Fisher merging: Fisher-weighted average of the fine-tuned encoders (``test`` only)
regmean                  RegMean: closed-form merge of every linear map from Gram matrices (``test`` only)
task_arithmetic_surgery  Representation Surgery on task arithmetic: a rank-16 map per task on the features
layer_wise_surgery       Representation Surgery on layer-wise AdaMerging (``coefficients_from`` its checkpoint)
=======================  ================================================================================

Example:
    >>> method_names()[:3]
    ('fisher_merging', 'layer_wise', 'layer_wise_pp')
    >>> method_settings("ties_merging")
    {'granularity': 'task', 'init': 0.3, 'ties_k': 0.2, 'ties_normalize': True}
    >>> from lit_adamerging import AdaMergingModule, SyntheticZoo
    >>> module = AdaMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), num_classes={"a": 3, "b": 5},
    ...                           **method_settings("layer_wise_pp"))
    >>> module.hparams.granularity, module.hparams.ties_k
    ('layer', 0.2)
"""

from __future__ import annotations

import importlib
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from lit_adamerging.lightning.module import AdaMergingModule

__all__ = ["method_config", "method_learns", "method_module", "method_names", "method_settings"]

_SUFFIX = ".yaml"
DEFAULT_MODULE = "lit_adamerging.lightning.module.AdaMergingModule"


def method_names() -> tuple[str, ...]:
    """The names of the shipped method presets, sorted."""
    names = (entry.name[: -len(_SUFFIX)] for entry in files(__name__).iterdir() if entry.name.endswith(_SUFFIX))
    return tuple(sorted(names))


def method_config(name: str) -> Path:
    """The preset file of method ``name`` (``--method name`` records it in the run's saved config).

    Raises:
        ValueError: ``name`` is not a shipped method; the message lists the valid names.
    """
    if name not in method_names():
        raise ValueError(f"unknown merging method {name!r}; choose one of: {', '.join(method_names())}.")
    return Path(str(files(__name__).joinpath(name + _SUFFIX)))


def _preset(name: str) -> dict[str, Any]:
    path = method_config(name)
    preset = yaml.safe_load(path.read_text(encoding="utf-8"))
    if (
        not isinstance(preset, dict) or not {"model", "learns"} <= set(preset) <= {"model", "module", "learns"}
        or not isinstance(preset["model"], dict) or not isinstance(preset.get("module", DEFAULT_MODULE), str)
        or not isinstance(preset["learns"], bool)
    ):
        raise ValueError(
            f"method preset {path} must hold 'learns' (true or false), a 'model' mapping of settings to values and "
            "optionally 'module', the import path of its LightningModule; nothing else."
        )
    return preset


def method_settings(name: str) -> dict[str, Any]:
    """The keyword arguments of the method's module (:func:`method_module`) that make it method ``name``.

    Read from the same preset file as ``lit-adamerging --method name``; a fresh dict on every call.

    Raises:
        ValueError: ``name`` is not a shipped method (the message lists the valid names), or its
            file is not a preset (a ``model:`` mapping, optionally ``module:``).
    """
    return dict(_preset(name)["model"])


def method_learns(name: str) -> bool:
    """Whether ``fit`` learns method ``name`` (then evaluating it needs that fit's checkpoint); ``False`` for the
    methods with nothing to learn, which run with ``test`` only.

    Example:
        >>> method_learns("layer_wise"), method_learns("task_arithmetic")
        (True, False)
    """
    return _preset(name)["learns"]


def method_module(name: str) -> type[AdaMergingModule]:
    """The LightningModule class of method ``name``: :class:`~lit_adamerging.AdaMergingModule` or a subclass.

    Example:
        >>> method_module("layer_wise").__name__
        'AdaMergingModule'
    """
    from lit_adamerging.lightning.module import AdaMergingModule

    path = _preset(name).get("module", DEFAULT_MODULE)
    module_name, _, class_name = path.rpartition(".")
    found = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(found, type) and issubclass(found, AdaMergingModule)):
        raise ValueError(f"method preset {name!r} names {path!r}, which is not a subclass of AdaMergingModule.")
    return found
