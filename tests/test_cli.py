"""The ``lit-adamerging`` command on configs/tiny.yaml, run as a subprocess in a temporary directory.

The config's output paths are relative (``runs/tiny/...``), so every run writes under its cwd,
a tmp_path. Accuracies printed by ``test`` are checked against a naive evaluation of the merged
model (``naive_accuracies`` in helpers.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_CLIP, TINY_CONFIG, load_config, naive_accuracies, printed_metric, run_cli
from lit_adamerging.models import create_encoder

# every test runs the command in another process (about 7 s each, DDP on two processes 20 s)
pytestmark = pytest.mark.slow

COEFFICIENTS_KEY = "merger.coefficients.raw"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """configs/tiny.yaml copied into a fresh directory and fitted there."""
    workdir = tmp_path_factory.mktemp("cli")
    shutil.copy(TINY_CONFIG, workdir / "tiny.yaml")
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
    encoder = create_encoder(TINY_CLIP)
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
    shutil.copy(TINY_CONFIG, tmp_path / "tiny.yaml")
    result = run_cli(tmp_path, "test", "--config", "tiny.yaml", "--method", "task_arithmetic")
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr
    expected = naive_accuracies(load_config(), torch.full((3, 1), 0.3))
    for task, value in expected.items():
        assert printed_metric(output, f"test/acc/{task}") == pytest.approx(value, abs=1e-4)
    assert printed_metric(output, "test/acc/avg") == pytest.approx(sum(expected.values()) / 3, abs=1e-4)
    assert (tmp_path / "runs" / "tiny" / "merged_encoder.safetensors").is_file()
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()  # nothing was fitted


def test_print_config_shows_zoo_and_tasks(tmp_path):
    shutil.copy(TINY_CONFIG, tmp_path / "tiny.yaml")
    result = run_cli(tmp_path, "fit", "--config", "tiny.yaml", "--print_config", script=True)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["class_path"] == "lit_adamerging.AdaMergingModule"
    model = printed["model"]["init_args"]
    assert model["zoo"]["class_path"] == "lit_adamerging.SyntheticZoo"
    assert model["zoo"]["init_args"]["encoder"] == TINY_CLIP
    assert list(printed["data"]["tasks"]) == ["alpha", "beta", "gamma"]
    assert printed["data"]["tasks"]["beta"]["init_args"]["num_classes"] == 10
    assert model["granularity"] == "layer"
    assert not (tmp_path / "runs").exists()  # printing the config runs nothing


def test_bad_granularity_in_config_fails_readably(tmp_path):
    config = load_config()
    config["model"]["granularity"] = "bogus"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(tmp_path, "fit", "--config", "bad.yaml")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "granularity" in result.stderr and "bogus" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_ties_k_fails_with_the_modules_message_and_no_traceback(tmp_path):
    shutil.copy(TINY_CONFIG, tmp_path / "tiny.yaml")
    result = run_cli(tmp_path, "fit", "--config", "tiny.yaml", "--model.ties_k", "1.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "lit-adamerging: error: ties_k must be in (0, 1]" in result.stderr, result.stderr[-2000:]
    # Asked for, the traceback is shown.
    debug = run_cli(tmp_path, "fit", "--config", "tiny.yaml", "--model.ties_k", "1.5",
                    env={"LIT_ADAMERGING_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_mistyped_checkpoint_path_is_one_message_and_exit_code_2(tmp_path):
    result = run_cli(tmp_path, "test", "--config", "tiny", "--ckpt_path", "runs/tiny/checkpoints/lats.ckpt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()
    assert message[-2].startswith("lit-adamerging: error: runs/tiny/checkpoints/lats.ckpt is not an AdaMerging "
                                  "checkpoint: no such file.")
    assert message[-1] == "(the traceback: set LIT_ADAMERGING_DEBUG=1)"


def test_a_run_prints_its_results_once_and_no_dependency_notice(tmp_path):
    result = run_cli(tmp_path, "test", "--config", "tiny", "--method", "task_arithmetic",
                     env={"PYTHONWARNINGS": "default"})  # every warning shown once, as for a user
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    for notice in ("Tip:", "litlogger", "No pretrained weights loaded", "LeafSpec", "args parameter is intended",
                   "Warning", "warn"):
        assert notice not in output, notice
    assert [line.split()[0] for line in result.stdout.splitlines() if line.startswith("test/acc/")] == [
        "test/acc/alpha", "test/acc/beta", "test/acc/gamma", "test/acc/avg"
    ]


def test_a_task_given_twice_in_a_config_is_refused(tmp_path):
    (tmp_path / "twice.yaml").write_text(
        "data:\n"
        "  tasks:\n"
        "    alpha: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 5}}\n"
        "    beta: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 10}}\n"
        "    alpha: {class_path: lit_adamerging.SyntheticTask, init_args: {num_classes: 3}}\n"
    )
    result = run_cli(tmp_path, "fit", "--config", str(TINY_CONFIG), "--config", "twice.yaml")
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
    common = [
        "test", "--config", str(TINY_CONFIG), "--config", "odd.yaml", "--method", "task_arithmetic",
        "--trainer.logger=false", "--trainer.callbacks=null",
    ]
    single = run_cli(tmp_path, *common)
    double = run_cli(tmp_path, *common, "--trainer.strategy=ddp", "--trainer.devices=2")
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-2000:]
    assert "sync_dist=True" not in double.stderr  # accuracies are gathered by torchmetrics, not re-averaged
    for task in ("alpha", "beta", "gamma", "avg"):
        assert printed_metric(double.stdout, f"test/acc/{task}") == printed_metric(single.stdout, f"test/acc/{task}")
