"""The merging methods by name: each one a preset of :class:`~lit_adamerging.AdaMergingModule`'s method settings.

A preset is a YAML file of this package, ``<name>.yaml``, holding a ``model:`` mapping of the
module's ``granularity``, ``init``, ``ties_k`` and ``ties_normalize``. The same file serves both
ways of choosing a method:

* on the command line, ``lit-adamerging fit --config configs/tiny.yaml --method layer_wise`` (how
  ``--method`` combines with ``--config`` and ``--model.*``: see :mod:`lit_adamerging.cli`);
* in Python, ``AdaMergingModule(zoo, num_classes, **method_settings("layer_wise"))``.

==================  ===================================================================
name                method
==================  ===================================================================
weight_averaging    ``theta_0 + (1/T) sum_k tau_k`` (data-free: ``test`` only)
task_arithmetic     ``theta_0 + 0.3 sum_k tau_k`` (data-free)
ties_merging        TIES-merging: top-20% trim, sign election, disjoint mean, x 0.3 (data-free)
task_wise           task-wise AdaMerging: one learned coefficient per task
task_wise_pp        task-wise AdaMerging++ (over TIES task vectors)
layer_wise          layer-wise AdaMerging: one learned coefficient per task and tensor
layer_wise_pp       layer-wise AdaMerging++ (over TIES task vectors)
==================  ===================================================================

Example:
    >>> method_names()
    ('layer_wise', 'layer_wise_pp', 'task_arithmetic', 'task_wise', 'task_wise_pp', 'ties_merging', 'weight_averaging')
    >>> method_settings("ties_merging")
    {'granularity': 'task', 'init': 0.3, 'ties_k': 0.2, 'ties_normalize': True}
    >>> from lit_adamerging import AdaMergingModule, SyntheticZoo
    >>> module = AdaMergingModule(SyntheticZoo("open_clip:test-vit-tiny"), num_classes={"a": 3, "b": 5},
    ...                           **method_settings("layer_wise_pp"))
    >>> module.hparams.granularity, module.hparams.ties_k
    ('layer', 0.2)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

__all__ = ["method_config", "method_names", "method_settings"]

_SUFFIX = ".yaml"


def method_names() -> tuple[str, ...]:
    """The names of the shipped method presets, sorted."""
    names = (entry.name[: -len(_SUFFIX)] for entry in files(__name__).iterdir() if entry.name.endswith(_SUFFIX))
    return tuple(sorted(names))


def method_config(name: str) -> Path:
    """The preset file of method ``name`` (a config fragment ``lit-adamerging --config`` also reads).

    Raises:
        ValueError: ``name`` is not a shipped method; the message lists the valid names.
    """
    if name not in method_names():
        raise ValueError(f"unknown merging method {name!r}; choose one of: {', '.join(method_names())}.")
    return Path(str(files(__name__).joinpath(name + _SUFFIX)))


def method_settings(name: str) -> dict[str, Any]:
    """The keyword arguments of :class:`~lit_adamerging.AdaMergingModule` that make it method ``name``.

    Read from the same preset file as ``lit-adamerging --method name``; a fresh dict on every call.

    Raises:
        ValueError: ``name`` is not a shipped method (the message lists the valid names), or its
            file does not hold a ``model:`` mapping.
    """
    path = method_config(name)
    preset = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(preset, dict) or set(preset) != {"model"} or not isinstance(preset["model"], dict):
        raise ValueError(f"method preset {path} must hold exactly one key, 'model', mapping settings to values.")
    return dict(preset["model"])
