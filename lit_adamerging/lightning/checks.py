"""The checks a checkpoint passes before its learned state is used: made by the same class, with the same settings.

A merging module's checkpoint holds learned state (coefficients, surgery maps) whose meaning depends
on the module class, the zoo (its class and arguments), the tasks and their order, the unseen tasks
and the method's settings. :func:`check_checkpoint_settings` compares what a checkpoint stores with
the module that is to use it and lists every difference; :func:`quoted_zoo` describes a stored zoo
as data for error messages (never as code to paste).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SETTINGS_BEFORE_STORED",
    "USER_ONLY_ZOO_ARGS",
    "check_checkpoint_class",
    "check_checkpoint_settings",
    "checkpoint_settings_differences",
    "class_path",
    "named_class",
    "quoted_zoo",
    "same_class",
]

# What a checkpoint that does not store a setting was made with: checkpoints from before unseen tasks
# existed merged every task.
SETTINGS_BEFORE_STORED = {"unseen_tasks": []}
# Zoo arguments that never change the result and that a checkpoint must never set (loading pickles,
# where cached heads are read): they always come from the user.
USER_ONLY_ZOO_ARGS = ("allow_pickle", "head_cache_dir")


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of ``cls``, as a config's ``class_path`` names it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: list(value) if isinstance(value, tuple) else value}


def named_class(path: str) -> type | None:
    """The class ``path`` names, found without running code outside lit_adamerging; ``None`` if not."""
    module_name, _, name = path.rpartition(".")
    if module_name == "lit_adamerging" or module_name.startswith("lit_adamerging."):
        try:
            found = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            return None
    else:
        module = sys.modules.get(module_name)  # never imported on a checkpoint's word
        found = None if module is None else inspect.getattr_static(module, name, None)
    return found if isinstance(found, type) else None


def same_class(stored: Any, current: Any) -> bool:
    """Whether two class paths name one class (``lit_adamerging.SyntheticZoo`` is
    ``lit_adamerging.models.zoo.SyntheticZoo``)."""
    if not isinstance(stored, str) or not isinstance(current, str):
        return False
    if stored == current:
        return True
    cls = named_class(current)
    return cls is not None and named_class(stored) is cls


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
    stored: Mapping[str, Any], current: Mapping[str, Any], settings: Sequence[str]
) -> list[str]:
    """One line per setting of ``settings`` (a module class's ``CHECKPOINT_SETTINGS``) where a checkpoint's
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
        if key == "zoo" and same_class(before.get("model.zoo.class_path"), after.get("model.zoo.class_path")):
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
    stored: Mapping[str, Any], current: Mapping[str, Any], source: str, settings: Sequence[str]
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
            "<ModuleClass>.load_from_checkpoint(path, zoo=...) without overriding them."
        )


def quoted_zoo(zoo: Any) -> str | None:
    """A checkpoint's stored zoo configuration quoted as JSON data (never as code to run); ``None`` if it has none."""
    if not isinstance(zoo, Mapping) or "class_path" not in zoo:
        return None
    init_args = zoo.get("init_args")
    if isinstance(init_args, Mapping):
        zoo = {**zoo, "init_args": {key: value for key, value in init_args.items() if key not in USER_ONLY_ZOO_ARGS}}
    text = json.dumps(zoo, default=repr, sort_keys=False)
    return text if len(text) <= 2000 else text[:2000] + " ... (cut)"




def check_checkpoint_class(stored: Mapping[str, Any], cls: type, source: str) -> None:
    """Raise a ``ValueError`` naming both classes if the checkpoint was written by another module class than ``cls``.

    ``stored`` is the checkpoint's ``hyper_parameters``; one that records no class (written before
    classes were recorded) is not checked.
    """
    stored_class = stored.get("_class_path")
    if stored_class is None or same_class(stored_class, class_path(cls)):
        return
    raise ValueError(
        f"the checkpoint {source} was written by {stored_class!r}, not by {class_path(cls)!r}: its learned state "
        "means something else there. Load it with the class that wrote it (the method it was fitted with), or ask "
        "for the checkpoint's settings: `lit-adamerging ... --settings_from_checkpoint=true`."
    )


def load_learned_module(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, hint: str) -> None:
    """Load ``state`` into ``module`` (a method's learned submodule: surgery maps, routers) after checking that it has
    the module's keys and shapes and only finite values; each error names ``what`` (e.g. "router") and, for keys and
    shapes, says ``hint`` (what the learned state depends on)."""
    ours = module.state_dict()
    if set(state) != set(ours):
        raise ValueError(
            f"the checkpoint's {what} tensors {sorted(state)[:5]} do not match this model's {sorted(ours)[:5]} "
            f"({hint}); it was saved for other tasks, models or settings."
        )
    for key, value in state.items():
        if value.shape != ours[key].shape:
            raise ValueError(
                f"the checkpoint's {what} tensor {key!r} has shape {tuple(value.shape)} but this model needs "
                f"{tuple(ours[key].shape)} ({hint}); it was saved for other tasks, models or settings."
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the checkpoint's {what} tensor {key!r} holds NaN or infinite values; load one from a "
                             "run that did not diverge.")
    module.load_state_dict(state)
