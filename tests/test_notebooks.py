"""The notebooks: the quickstart is executed (small setting, real data); the paper guide is checked, not run."""

from __future__ import annotations

import ast
import re

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPOSITORY
from lit_adamerging.data.offline import DATA_ENV
from lit_adamerging.methods import method_names

NOTEBOOKS = REPOSITORY / "notebooks"


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
    configs = set(re.findall(r"configs/[\w/]+\.yaml", text))
    assert len(configs) >= 4
    assert [path for path in configs if not (REPOSITORY / path).is_file()] == []
    (looped,) = re.findall(r"for method in \[([^\]]+)\]", text)  # the baselines, run with "--method", method
    methods = set(re.findall(r'"(\w+)"', looped)) | set(re.findall(r'"--method", "(\w+)"', text))
    methods |= set(re.findall(r"`--method (\w+)`", text)) | set(re.findall(r'method_settings\("(\w+)"\)', text))
    assert len(methods) >= 5
    assert sorted(methods - set(method_names())) == []
