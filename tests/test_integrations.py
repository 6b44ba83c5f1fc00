"""Lightning integrations through the real command: DDP fit, resume after SIGKILL, mixed precision, CSVLogger.

The runs use configs/tiny.yaml (three synthetic tasks of 64/48/32 images, 20 steps) in a
temporary directory; a small callback module written beside them saves what each process learned
(coefficients or gate logits; and, for the crash test, kills the process).
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from helpers import KILL_AT_PROBE, TINY_CLIP, TINY_CONFIG, run_cli
from lit_adamerging import AdaMergingModule, MultiTaskDataModule, SyntheticTask, SyntheticZoo

TRAINER_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "trainer"

PROBES = '''
import os
import signal

import lightning.pytorch as pl
import torch


class SaveLearned(pl.Callback):
    """Save what the method learns (its checkpoint's LEARNED_STATE: AdaMerging's raw coefficients, rank-wise
    AdaMerging's gate logits, WEMoE's routers), flattened into one tensor, when the fit starts and ends."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _save(self, trainer, pl_module, suffix: str) -> None:
        learned = [value.detach().cpu().flatten() for key, value in pl_module.state_dict().items()
                   if key.startswith(pl_module.LEARNED_STATE)]
        torch.save(torch.cat(learned), f"{self.prefix}{suffix}.rank{trainer.global_rank}.pt")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, ".start")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "")

''' + KILL_AT_PROBE


def callbacks_config(path: Path, *callbacks: dict) -> Path:
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": list(callbacks)}}))
    return path


def save_learned(prefix: str) -> dict:
    return {"class_path": "probes.SaveLearned", "init_args": {"prefix": prefix}}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "probes.py").write_text(PROBES)  # importable: `python -m` puts the cwd on sys.path
    return tmp_path


QUIET = ["--trainer.logger=false", "--trainer.check_val_every_n_epoch=100", "--trainer.enable_model_summary=false"]


# The methods whose fit is checked under DDP and after a kill: what they learn is layer-wise AdaMerging's raw
# coefficients, rank-wise AdaMerging's gate logits (one per task, matrix and singular component), WEMoE's routers.
LEARNING_METHODS = ("layer_wise_adamerging", "rank_wise_adamerging", "wemoe")


@pytest.mark.slow  # runs the command, once on two DDP processes
@pytest.mark.parametrize("method", LEARNING_METHODS)
def test_ddp_fit_on_two_processes_matches_one_process_with_the_same_global_batch(workdir, method):
    single = callbacks_config(workdir / "single.yaml", save_learned("single"))
    double = callbacks_config(workdir / "double.yaml", save_learned("double"))
    fit = ["fit", "--config", str(TINY_CONFIG), "--method", method]
    one = run_cli(workdir, *fit, "--config", str(single), *QUIET, "--data.batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(workdir, *fit, "--config", str(TRAINER_PRESETS / "ddp.yaml"),
                  "--config", str(double), *QUIET, "--trainer.accelerator=cpu", "--trainer.devices=2",
                  "--data.batch_size=4")
    assert two.returncode == 0, two.stderr[-3000:]
    reference = torch.load(workdir / "single.rank0.pt", weights_only=True)
    rank0 = torch.load(workdir / "double.rank0.pt", weights_only=True)
    rank1 = torch.load(workdir / "double.rank1.pt", weights_only=True)
    assert torch.equal(rank0, rank1)  # what is learned stays identical across processes
    assert not torch.allclose(reference, torch.load(workdir / "single.start.rank0.pt", weights_only=True))  # learned
    # Same images per step, gradients averaged over the processes: equal up to float rounding.
    torch.testing.assert_close(rank0, reference, rtol=0, atol=1e-5)


@pytest.mark.slow  # runs the command three times, killing one
@pytest.mark.parametrize("method", LEARNING_METHODS)
def test_a_fit_killed_mid_run_and_resumed_ends_where_an_uninterrupted_fit_ends(workdir, method):
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": "ckpt", "every_n_train_steps": 5, "save_last": True}}
    kill = {"class_path": "probes.KillAt", "init_args": {"step": 13}}
    killed = callbacks_config(workdir / "killed.yaml", checkpoint, kill)
    resumed = callbacks_config(workdir / "resumed.yaml", checkpoint, save_learned("resumed"))
    whole = callbacks_config(workdir / "whole.yaml", save_learned("whole"))

    fit = ["fit", "--config", str(TINY_CONFIG), "--method", method]
    crash = run_cli(workdir, *fit, "--config", str(killed), *QUIET)
    assert crash.returncode == -9  # SIGKILL at step 13: steps 11-13 are lost
    state = torch.load(workdir / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 10  # mid-epoch: an epoch is 8 steps (64 images / 8)
    again = run_cli(workdir, *fit, "--config", str(resumed), *QUIET, "--ckpt_path", "ckpt/last.ckpt")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "not resumable" not in again.stderr
    uninterrupted = run_cli(workdir, *fit, "--config", str(whole), *QUIET)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert torch.equal(torch.load(workdir / "resumed.rank0.pt", weights_only=True),
                       torch.load(workdir / "whole.rank0.pt", weights_only=True))


@pytest.mark.slow  # runs the command in another process
def test_csv_logger_gets_scalars_per_task_and_no_figure(workdir):
    logger = {"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "logs", "name": "csv", "version": 0}},
                          "callbacks": [{"class_path": "lit_adamerging.CoefficientLogger",
                                         "init_args": {"every_n_steps": 5}}]}}
    (workdir / "csv.yaml").write_text(yaml.safe_dump(logger))
    fit = run_cli(
        workdir, "fit", "--config", str(TINY_CONFIG), "--config", "csv.yaml", "--trainer.enable_checkpointing=false"
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    with open(workdir / "logs" / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    for task in ("alpha", "beta", "gamma"):
        assert {f"coefficients/{task}", f"train/entropy/{task}", f"val/acc/{task}"} <= columns
    steps = sorted({int(row["step"]) for row in rows if row["coefficients/alpha"]})
    assert steps == [5, 10, 15, 20]  # every 5 optimizer steps
    accuracies = [float(row["val/acc/avg"]) for row in rows if row.get("val/acc/avg")]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)
    assert not list(workdir.rglob("events.out.tfevents*"))  # the heatmap goes to TensorBoard loggers only


class PrecisionProbe(AdaMergingModule):
    """Records, at each step, whether autocast was on and the dtypes of the merged weights and features."""

    def training_step(self, batch, batch_idx):
        merged = self.merger.merged_tensors()
        images = next(iter(batch.values()))
        self.seen = getattr(self, "seen", [])
        self.seen.append((torch.is_autocast_enabled("cpu"), {t.dtype for t in merged.values()},
                          self.merger(images).dtype))
        return super().training_step(batch, batch_idx)


def fit_coefficients(tmp_path: Path, precision: str) -> tuple[torch.Tensor, list]:
    pl.seed_everything(0)
    tasks = {name: SyntheticTask(num_classes=c, num_images=32, image_size=32, seed=i)
             for i, (name, c) in enumerate({"alpha": 5, "beta": 3}.items())}
    data = MultiTaskDataModule(tasks, batch_size=8, cache="none")
    zoo = SyntheticZoo(TINY_CLIP, seed=0, perturbation=0.2)
    module = PrecisionProbe(zoo, num_classes=data.num_classes, lr=1e-2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=5, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return module.coefficients(), module.seen


# On CPU, Lightning's "16-mixed" autocasts to bfloat16 as well (fp16 autocast is a GPU feature there).
@pytest.mark.parametrize(("precision", "low"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.bfloat16)])
def test_mixed_precision_keeps_the_merge_in_fp32(tmp_path, precision, low):
    reference, seen32 = fit_coefficients(tmp_path, "32-true")
    mixed, seen = fit_coefficients(tmp_path, precision)
    assert len(seen) == 5
    for autocast, merged_dtypes, feature_dtype in seen:
        assert autocast and merged_dtypes == {torch.float32} and feature_dtype == low
    assert all(not autocast and features == torch.float32 for autocast, _, features in seen32)
    assert not torch.allclose(reference, torch.full_like(reference, 0.3))
    # The encoder runs in low precision: the path differs slightly, the coefficients barely. Adam
    # moves every coefficient by about lr per step whatever its gradient's size, so one coefficient
    # whose gradient is near zero may step differently: a loose bound on the largest difference, a
    # tight one on the mean.
    movement = (reference - 0.3).abs()
    difference = (mixed - reference).abs()
    assert difference.mean() < 0.01 * movement.mean()
    assert difference.max() < 0.1 * movement.max()
