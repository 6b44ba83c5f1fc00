"""The ``lit-adamerging`` command on configs/tiny.yaml, run as a subprocess in a temporary directory.

The config's output paths are relative (``runs/tiny/...``), so every run writes under its cwd,
a tmp_path. Accuracies printed by ``test`` are checked against a naive evaluation of the merged
model written out here.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_adamerging import SyntheticTask, SyntheticZoo
from lit_adamerging.models import create_encoder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
COEFFICIENTS_KEY = "merger.coefficients.raw"


def run_cli(cwd: Path, *args: str, script: bool = False) -> subprocess.CompletedProcess:
    executable = shutil.which("lit-adamerging", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    command = [executable] if script and executable else [sys.executable, "-m", "lit_adamerging.cli"]
    env = dict(os.environ, COLUMNS="200", PYTHONWARNINGS="ignore")
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def printed_metric(output: str, name: str) -> float:
    """The first value printed for ``name`` in Lightning's results table (plain or rich)."""
    match = re.search(re.escape(name) + r"[\s│|]+([0-9.]+)", output)
    assert match, f"{name} not printed:\n{output}"
    return float(match.group(1))


def naive_accuracies(config: dict, coefficients: torch.Tensor) -> dict[str, float]:
    """Accuracy of every task's head with theta0 + sum_k lam[k, p] tau[k, p], merged with a plain loop.

    ``coefficients`` is ``[tasks, 1]`` (task-wise) or ``[tasks, merged tensors]``, already clamped.
    """
    tasks = {name: SyntheticTask(**spec["init_args"]) for name, spec in config["data"]["tasks"].items()}
    num_classes = {name: task.num_classes for name, task in tasks.items()}
    loaded = SyntheticZoo(**config["model"]["zoo"]["init_args"]).load(num_classes)
    theta0 = loaded.encoder.state_dict()
    parameters = {name for name, _ in loaded.encoder.named_parameters()}
    names = [k for k in theta0 if k in parameters]
    merged = dict(theta0)
    for p, name in enumerate(names):
        total = theta0[name].clone()
        for k, task in enumerate(tasks):
            lam = coefficients[k, p if coefficients.shape[1] > 1 else 0]
            total += lam * (loaded.finetuned[task][name] - theta0[name])
        merged[name] = total
    encoder = copy.deepcopy(loaded.encoder)
    encoder.load_state_dict(merged)
    encoder.eval()
    accuracies = {}
    with torch.no_grad():
        for name, task in tasks.items():
            images, labels = task.test_set().tensors
            predictions = loaded.heads[name](encoder(images)).argmax(dim=-1)
            accuracies[name] = (predictions == labels).float().mean().item()
    return accuracies


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """configs/tiny.yaml copied into a fresh directory and fitted there."""
    workdir = tmp_path_factory.mktemp("cli")
    shutil.copy(CONFIG, workdir / "tiny.yaml")
    result = run_cli(workdir, "fit", "--config", "tiny.yaml")
    return workdir, result


def test_fit_writes_small_checkpoint_events_and_export(fitted):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, result = fitted
    assert result.returncode == 0, result.stderr[-4000:]
    run = workdir / "runs" / "tiny"

    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    assert checkpoint.stat().st_size < 1_000_000
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    assert list(state["state_dict"]) == [COEFFICIENTS_KEY]
    assert state["global_step"] == 20
    raw = state["state_dict"][COEFFICIENTS_KEY]
    assert raw.shape == (3, 32)  # 3 tasks, layer-wise over the tiny ViT's 32 tensors
    assert not torch.allclose(raw, torch.full_like(raw, 0.3))

    (version,) = (run / "tensorboard").iterdir()
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "val/acc/avg"} | {f"coefficients/{t}" for t in ("alpha", "beta", "gamma")}
    expected |= {f"val/acc/{t}" for t in ("alpha", "beta", "gamma")}
    assert expected <= scalars
    assert [s.step for s in events.Scalars("coefficients/alpha")] == [5, 10, 15, 20]
    final = raw.clamp(0, 1).mean(dim=1)
    assert events.Scalars("coefficients/gamma")[-1].value == pytest.approx(final[2].item(), abs=1e-6)
    assert "coefficients/heatmap" in events.Tags()["images"]

    # The exported merged encoder loads strictly into a fresh open_clip image tower.
    exported = load_file(str(run / "merged_encoder.safetensors"))
    encoder = create_encoder("open_clip:test-vit-tiny")
    encoder.load_state_dict(exported, strict=True)


def test_test_from_checkpoint_prints_naive_accuracies(fitted):
    workdir, fit_result = fitted
    assert fit_result.returncode == 0, fit_result.stderr[-4000:]
    checkpoint = workdir / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    result = run_cli(workdir, "test", "--config", "tiny.yaml", "--ckpt_path", str(checkpoint.relative_to(workdir)))
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert "test/acc/avg" in output

    raw = torch.load(checkpoint, weights_only=True)["state_dict"][COEFFICIENTS_KEY]
    expected = naive_accuracies(load_config(), raw.clamp(0, 1))
    for task, value in expected.items():
        assert printed_metric(output, f"test/acc/{task}") == pytest.approx(value, abs=1e-4)
    assert printed_metric(output, "test/acc/avg") == pytest.approx(sum(expected.values()) / 3, abs=1e-4)


def test_task_arithmetic_baseline_without_checkpoint(tmp_path):
    shutil.copy(CONFIG, tmp_path / "tiny.yaml")
    result = run_cli(tmp_path, "test", "--config", "tiny.yaml", "--model.granularity", "task")
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    expected = naive_accuracies(load_config(), torch.full((3, 1), 0.3))
    for task, value in expected.items():
        assert printed_metric(output, f"test/acc/{task}") == pytest.approx(value, abs=1e-4)
    assert printed_metric(output, "test/acc/avg") == pytest.approx(sum(expected.values()) / 3, abs=1e-4)
    assert (tmp_path / "runs" / "tiny" / "merged_encoder.safetensors").is_file()
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()  # nothing was fitted


def test_print_config_shows_zoo_and_tasks(tmp_path):
    shutil.copy(CONFIG, tmp_path / "tiny.yaml")
    result = run_cli(tmp_path, "fit", "--config", "tiny.yaml", "--print_config", script=True)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["zoo"]["class_path"] == "lit_adamerging.SyntheticZoo"
    assert printed["model"]["zoo"]["init_args"]["encoder"] == "open_clip:test-vit-tiny"
    assert list(printed["data"]["tasks"]) == ["alpha", "beta", "gamma"]
    assert printed["data"]["tasks"]["beta"]["init_args"]["num_classes"] == 10
    assert printed["model"]["granularity"] == "layer"
    assert not (tmp_path / "runs").exists()  # printing the config runs nothing


def test_bad_granularity_in_config_fails_readably(tmp_path):
    config = load_config()
    config["model"]["granularity"] = "bogus"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(tmp_path, "fit", "--config", "bad.yaml")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "model.granularity" in result.stderr and "bogus" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_ties_k_fails_with_the_modules_message(tmp_path):
    shutil.copy(CONFIG, tmp_path / "tiny.yaml")
    result = run_cli(tmp_path, "fit", "--config", "tiny.yaml", "--model.ties_k", "1.5")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: ties_k must be in (0, 1]"), result.stderr[-2000:]


def test_a_task_given_twice_in_a_config_is_refused(tmp_path):
    (tmp_path / "twice.yaml").write_text(
        "data:\n"
        "  tasks:\n"
        "    alpha: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 5}}\n"
        "    beta: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 10}}\n"
        "    alpha: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 3}}\n"
    )
    result = run_cli(tmp_path, "fit", "--config", str(CONFIG), "--config", "twice.yaml")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "key 'alpha' is given twice in the same mapping (lines 3 and 5)" in result.stderr
    assert not (tmp_path / "runs").exists()


ODD_SIZED_TASKS = """
data:
  eval_batch_size: 4
  tasks:
    alpha: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 5, num_images: 33, seed: 1}}
    beta: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 10, num_images: 23, seed: 2}}
    gamma: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 3, num_images: 11, seed: 3}}
"""


def test_ddp_evaluation_counts_every_image_once(tmp_path):
    # Odd test-set sizes: a padding sampler would count one image twice on 2 processes.
    (tmp_path / "odd.yaml").write_text(ODD_SIZED_TASKS)
    common = ["test", "--config", str(CONFIG), "--config", "odd.yaml", "--trainer.logger=false", "--trainer.callbacks=null"]
    single = run_cli(tmp_path, *common)
    double = run_cli(tmp_path, *common, "--trainer.strategy=ddp", "--trainer.devices=2")
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-2000:]
    assert "sync_dist=True" not in double.stderr  # accuracies are gathered by torchmetrics, not re-averaged
    for task in ("alpha", "beta", "gamma", "avg"):
        assert printed_metric(double.stdout, f"test/acc/{task}") == printed_metric(single.stdout, f"test/acc/{task}")
