"""The notebooks: the quickstart is executed (small setting, real data); the paper guide is checked, not run."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPOSITORY
from lit_adamerging.benchmarks.mini import METHODS as BENCHMARK_ROWS
from lit_adamerging.cli import shipped_configs
from lit_adamerging.data.offline import DATA_ENV
from lit_adamerging.methods import method_names

NOTEBOOKS = REPOSITORY / "notebooks"
NUMBERS = dict(enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split()
))


@pytest.mark.slow  # runs the notebook in a kernel (about 45 s)
def test_quickstart_runs_and_shows_the_results(offline_datasets, monkeypatch):
    # the kernel inherits the variable, so the notebook's find_data_root reads the tests' trees (no download)
    monkeypatch.setenv(DATA_ENV, str(offline_datasets("mnist", "fashion_mnist")))
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    resources = {"metadata": {"path": str(NOTEBOOKS)}}
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources=resources).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "| method | mnist | fashion_mnist | avg | seconds |" in text  # the benchmark's table
    assert "mean coefficient per task" in text
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 2  # per-task accuracies and the coefficient heatmap


def test_paper_guide_is_valid_python_and_names_existing_configs_and_methods():
    notebook = nbformat.read(NOTEBOOKS / "paper_reproduction.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # shipped unexecuted
    for cell in notebook.cells:
        if cell.cell_type == "code":
            ast.parse(cell.source)
    text = "\n".join(cell.source for cell in notebook.cells)
    # configs by name (--config paper/vit_b32, "--config", "paper/data"), or the files the guide writes itself
    configs = set(re.findall(r'--config"?,? "?([\w/.]+)', text))
    written = set(re.findall(r'Path\("([\w.]+)"\)\.write_text', text))
    assert len(configs - written) >= 4
    assert sorted(configs - written - set(shipped_configs())) == []
    assert not re.search(r"configs/[\w/]+\.yaml", text)  # a path that only a source checkout has
    (looped,) = re.findall(r"for method in \[([^\]]+)\]", text)  # the baselines, run with "--method", method
    methods = set(re.findall(r'"(\w+)"', looped)) | set(re.findall(r'"--method", "(\w+)"', text))
    methods |= set(re.findall(r"--method (\w+)", text))
    methods |= set(re.findall(r'(?:create_method|method_settings)\("(\w+)"', text))
    assert len(methods) >= 5
    assert sorted(methods - set(method_names())) == []


def notebook_text(name: str) -> str:
    return "\n".join(cell.source for cell in nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells)


def missing_in_environment(notebook: nbformat.NotebookNode) -> list[str]:
    """What the notebook's code imports, calls and runs that this environment lacks, found without running it:
    every imported module and name, the arguments of each call of an imported name (against its signature),
    and the executables given to subprocess.run."""
    problems, namespace = [], {}
    trees = [ast.parse(cell.source) for cell in notebook.cells if cell.cell_type == "code"]
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
                top = alias.asname or alias.name.partition(".")[0]
                namespace[top] = importlib.import_module(alias.name if alias.asname else top)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    problems.append(f"from {node.module} import {alias.name}: no such name")
                namespace[alias.asname or alias.name] = getattr(module, alias.name, None)

    def resolve(node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            return namespace.get(node.id)
        if isinstance(node, ast.Attribute) and (owner := resolve(node.value)) is not None:
            if not hasattr(owner, node.attr):
                problems.append(f"{ast.unparse(node)}: {owner!r} has no {node.attr!r}")
            return getattr(owner, node.attr, None)
        return None

    for call in (node for tree in trees for node in ast.walk(tree) if isinstance(node, ast.Call)):
        function = resolve(call.func)
        if function is None:
            continue
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):  # some builtins have none
            continue
        starred = any(isinstance(arg, ast.Starred) for arg in call.args)
        positional = [] if starred else [None] * len(call.args)
        keywords = {keyword.arg: None for keyword in call.keywords if keyword.arg is not None}
        try:
            signature.bind_partial(*positional, **keywords)
        except TypeError as error:
            problems.append(f"{ast.unparse(call.func)}({', '.join(keywords)}): {error}")
        if function is subprocess.run and call.args:
            command = call.args[0]
            if isinstance(command, ast.List) and command.elts and isinstance(command.elts[0], ast.Constant):
                name = command.elts[0].value
                if not (shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))):
                    problems.append(f"subprocess.run: no executable {name!r} installed")
    return problems


@pytest.mark.parametrize("name", ["paper_reproduction", "quickstart"])
def test_notebook_calls_what_the_environment_has(name):
    # the paper guide is never run here: its downloads (huggingface_hub.snapshot_download), configs and
    # commands are checked against what is installed instead
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert missing_in_environment(notebook) == []


def test_paper_guide_downloads_through_the_python_api():
    text = notebook_text("paper_reproduction")
    assert "from huggingface_hub import snapshot_download" in text
    assert "huggingface-cli" not in text  # not installed by current huggingface_hub (its command is `hf`)


def test_quickstart_counts_the_benchmark_rows_and_the_methods():
    text = notebook_text("quickstart")
    assert f"all {NUMBERS[len(BENCHMARK_ROWS)]} rows" in text
    assert f"the {NUMBERS[len(method_names())]} methods" in text
    assert set(BENCHMARK_ROWS) == {*method_names(), "pretrained", "individual"}
