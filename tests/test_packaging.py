"""The wheel alone: built from the sources, installed into a fresh virtual environment, run outside the checkout.

The new environment gets the wheel without its dependencies; those are taken from the environment
running the tests through a plain path line in a ``.pth`` file, which puts that site-packages on
``sys.path`` without processing the ``.pth`` files inside it (so this checkout's editable install,
if there is one, stays out). Select with ``-m packaging``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from helpers import REPOSITORY, TINY_CLIP, TINY_CLIP_MODEL
from lit_adamerging.methods import method_names

BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "lit_adamerging")

pytestmark = [pytest.mark.packaging, pytest.mark.slow]  # builds a wheel and a virtual environment (about 15 s)

RUN = f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  limit_val_batches: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: out
model:
  zoo:
    class_path: lit_adamerging.SyntheticZoo
    init_args: {{encoder: "{TINY_CLIP}", seed: 0}}
data:
  batch_size: 2
  eval_batch_size: 8
  tasks:
    alpha:
      class_path: lit_adamerging.SyntheticTask
      init_args: {{num_classes: 3, num_images: 8, image_size: 32, seed: 1}}
    beta:
      class_path: lit_adamerging.SyntheticTask
      init_args: {{num_classes: 4, num_images: 8, image_size: 32, seed: 2}}
"""


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """The wheel of a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPOSITORY / name).is_dir():
            shutil.copytree(REPOSITORY / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPOSITORY / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w",
               str(tmp_path / "dist")]
    run(command, tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("lit_adamerging-*.whl")
    return wheel


def test_wheel_installs_alone_and_runs_methods_by_name_outside_the_checkout(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONWARNINGS"] = "ignore"
    wheel = build_wheel(tmp_path, env)
    files = set(zipfile.ZipFile(wheel).namelist())
    methods = {f"lit_adamerging/methods/{name}.yaml" for name in method_names()}
    tiny_clip_config = f"lit_adamerging/models/open_clip_configs/{TINY_CLIP_MODEL}.json"
    assert methods | {"lit_adamerging/py.typed", tiny_clip_config} <= files
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in files)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        tmp_path, env)
    site_packages = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env)
    Path(site_packages.stdout.strip(), "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    work = tmp_path / "work"  # outside the checkout; the command's own folder is venv/bin
    work.mkdir()
    (work / "run.yaml").write_text(RUN)
    probe = ("import json, sys, lit_adamerging, lit_adamerging.methods; print(json.dumps({'files': "
             "[lit_adamerging.__file__, lit_adamerging.methods.__file__], 'path': sys.path, "
             "'editable': [m for m in sys.modules if 'editable' in m]}))")
    seen = json.loads(run([str(python), "-c", probe], work, env).stdout)
    assert all(Path(path).is_relative_to(venv) for path in seen["files"]), seen
    assert str(REPOSITORY) not in seen["path"] and seen["editable"] == [], seen

    script = str(venv / "bin" / "lit-adamerging")
    run([script, "fit", "--config", "run.yaml", "--method", "layer_wise_adamerging"], work, env)
    fitted = yaml.safe_load((work / "out" / "config.yaml").read_text())["model"]
    assert fitted["class_path"] == "lit_adamerging.AdaMergingModule"
    assert (fitted["init_args"]["granularity"], fitted["init_args"]["init"]) == ("layer", 0.3)
    tested = run([script, "test", "--config", "run.yaml", "--method", "task_arithmetic"], work, env)
    assert "test/acc/avg" in tested.stdout
    model = yaml.safe_load((work / "out" / "config.yaml").read_text())["model"]
    assert model["class_path"] == "lit_adamerging.TaskArithmeticModule" and model["init_args"]["scale"] == 0.3

    # The README's commands on the shipped tiny config, in the README's order, from an empty folder.
    empty = tmp_path / "empty"
    empty.mkdir()
    shell_env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    commands = readme_tiny_commands()
    assert len(commands) >= 12, commands
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=empty, env=shell_env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    # The README's Python snippet writes nothing into the folder it runs in.
    snippet = tmp_path / "snippet"
    snippet.mkdir()
    (tmp_path / "snippet.py").write_text(readme_python_snippet())
    run([str(python), str(tmp_path / "snippet.py")], snippet, env)
    assert list(snippet.iterdir()) == []
    version = run([script, "--version"], empty, env).stdout.strip()
    assert version == f"lit-adamerging {metadata.version('lit_adamerging')}"


def readme_tiny_commands() -> list[str]:
    """The README's shell commands that run on the shipped tiny config (and the copies between them), in order:
    lines of code blocks and inline code, read line by line."""
    spans = []
    for line in (REPOSITORY / "README.md").read_text().splitlines():
        spans += [line] if line.startswith("lit-adamerging ") else re.findall(r"`([^`]+)`", line)
    spans = [span.split("  #")[0].strip() for span in spans]
    return [span for span in spans if (span.startswith("lit-adamerging ") and "--config tiny" in span)
            or span.startswith("cp runs/tiny/") or span in ("lit-adamerging methods", "lit-adamerging configs")]


def readme_python_snippet() -> str:
    """The README's first Python code block (its Python API example)."""
    return re.search(r"```python\n(.*?)```", (REPOSITORY / "README.md").read_text(), flags=re.DOTALL).group(1)
