"""Representation Surgery: the maps, the cached features, training, checkpoints, export, DDP and bad input.

References are written plainly here: the merged encoder as ``theta_0 + 0.3 * sum_k tau_k`` loaded
into a copy of the encoder, each task's individual encoder as the zoo's fine-tuned state dict loaded
into another copy, the surgery as ``z - relu(z @ down.T) @ up.T`` and its training as the released
code's loop (one Adam step per task batch, ``L1Loss`` with its mean).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from helpers import TINY_CLIP, TINY_TIMM
from lit_adamerging import (
    AdaMergingModule,
    ExportMergedEncoder,
    ModelZoo,
    MultiTaskDataModule,
    StateDictZoo,
    SyntheticTask,
    SyntheticZoo,
    TaskArithmeticModule,
)
from lit_adamerging.lightning.base import intended_warnings_ignored
from lit_adamerging.lightning.callbacks import surgery_path
from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY, read_adamerging_checkpoint
from lit_adamerging.lightning.surgery import SurgeryModule
from lit_adamerging.merging.surgery import FeatureSurgery, SurgeryModules
from lit_adamerging.models.encoders import feature_dim
from lit_adamerging.models.zoo import LoadedZoo

TASK_ARITHMETIC = 0.3


def make_tasks(unseen: bool = False) -> dict[str, SyntheticTask]:
    tasks = {"alpha": SyntheticTask(num_classes=5, num_images=40, image_size=32, seed=1)}
    if unseen:
        tasks["delta"] = SyntheticTask(num_classes=4, num_images=30, image_size=32, seed=4)
    tasks["beta"] = SyntheticTask(num_classes=3, num_images=24, image_size=32, seed=2)
    return tasks


def make_zoo() -> SyntheticZoo:
    return SyntheticZoo(TINY_CLIP, seed=0, perturbation=0.2)


def make_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=str(tmp_path))
    return pl.Trainer(**{**options, **kwargs})


class Recorder(pl.Callback):
    """Records each step's image positions, and at the first step the cached features and the untrained maps."""

    def __init__(self) -> None:
        self.positions: list[dict[str, Tensor]] = []
        self.losses: list[float] = []
        self.features: dict[str, tuple[Tensor, Tensor]] = {}
        self.initial: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.positions:
            self.features = {task: (m.clone(), i.clone()) for task, (m, i) in pl_module._features.items()}
            self.initial = copy.deepcopy(pl_module.surgery.state_dict())
        self.positions.append({task: positions.clone() for task, positions in batch.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(tmp_path: Path, steps: int, tasks: Mapping[str, SyntheticTask] | None = None, zoo: ModelZoo | None = None,
        batch_size: int = 8, callbacks: list | None = None, **kwargs) -> tuple[SurgeryModule, MultiTaskDataModule,
                                                                           pl.Trainer, Recorder]:
    pl.seed_everything(0)
    tasks = make_tasks() if tasks is None else tasks
    unseen = [name for name in tasks if name == "delta"]
    data = MultiTaskDataModule(dict(tasks), unseen_tasks=unseen, batch_size=batch_size, eval_batch_size=7,
                               cache="none")
    if kwargs.get("merge", "") is None:
        del kwargs["merge"]
    module = SurgeryModule(zoo or make_zoo(), num_classes=data.num_classes, unseen_tasks=data.unseen_tasks, **kwargs)
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[recorder, *(callbacks or [])])
    with intended_warnings_ignored():
        trainer.fit(module, datamodule=data)
    return module, data, trainer, recorder


def accuracies_of(module: AdaMergingModule, data: MultiTaskDataModule, tmp_path: Path, **kwargs) -> dict[str, float]:
    trainer = make_trainer(tmp_path)
    with intended_warnings_ignored():
        trainer.test(module, datamodule=data, verbose=False, **kwargs)
    return {key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("test/acc/")}


def reference_encoders(zoo: ModelZoo, tasks: Mapping[str, SyntheticTask], seen: list[str]) -> tuple[nn.Module, dict]:
    """Copies of the pretrained encoder holding theta_0 + 0.3 * sum_k tau_k (parameters; buffers pretrained), and
    ``{task: encoder}`` holding each seen task's fine-tuned state dict from the zoo, buffers included."""
    loaded = zoo.load({name: task.num_classes for name, task in tasks.items()}, merged_tasks=seen)
    theta0 = loaded.encoder.state_dict()
    parameters = {name for name, _ in loaded.encoder.named_parameters()}
    merged = dict(theta0)
    individual = {}
    for task in seen:
        tuned = loaded.finetuned[task]
        for name in parameters:
            merged[name] = merged[name] + TASK_ARITHMETIC * (tuned[name] - theta0[name])
        individual[task] = copy.deepcopy(loaded.encoder)
        individual[task].load_state_dict(tuned)
        individual[task].eval()
    encoder = copy.deepcopy(loaded.encoder)
    encoder.load_state_dict(merged)
    return encoder.eval(), individual


def all_images(task: SyntheticTask) -> Tensor:
    return task.test_set().tensors[0]


# ----------------------------------------------------------------------------- the maps (pure torch)
def test_surgery_map_is_the_identity_at_zero_and_the_papers_formula_after():
    torch.manual_seed(0)
    surgery = FeatureSurgery(width=12, rank=4)
    features = torch.randn(5, 12)
    assert surgery.width == 12 and surgery.rank == 4
    assert torch.equal(surgery(features), features)  # up starts at zero
    assert surgery.down.weight.abs().sum() > 0 and surgery.down.bias is None and surgery.up.bias is None
    with torch.no_grad():
        surgery.up.weight.normal_()
    down, up = surgery.down.weight.detach(), surgery.up.weight.detach()
    expected = features - torch.clamp(features @ down.T, min=0) @ up.T
    torch.testing.assert_close(surgery(features), expected)
    with pytest.raises(ValueError, match="positive"):
        FeatureSurgery(width=12, rank=0)


def test_surgery_modules_plain_state_dict_round_trip_and_unknown_task_passes_through():
    torch.manual_seed(0)
    modules = SurgeryModules(["a", "b"], width=6, rank=3)
    with torch.no_grad():
        for parameter in modules.parameters():
            parameter.normal_()
    features = torch.randn(4, 6)
    assert torch.equal(modules(features, "unseen"), features)
    plain = modules.plain_state_dict()
    assert {key: tuple(value.shape) for key, value in plain.items()} == {
        "a.down": (3, 6), "a.up": (6, 3), "b.down": (3, 6), "b.up": (6, 3)}
    again = SurgeryModules.from_plain_state_dict(plain)
    assert (again.tasks, again.width, again.rank) == (["a", "b"], 6, 3)
    for task in ("a", "b"):
        assert torch.equal(again(features, task), modules(features, task))
    with pytest.raises(ValueError, match=r"x\.npz: key 'a\.middle' is not '<task>\.down'"):
        SurgeryModules.from_plain_state_dict({**plain, "a.middle": plain["a.up"]}, "x.npz")
    with pytest.raises(ValueError, match=r"task 'a' has only \['down'\]"):
        SurgeryModules.from_plain_state_dict({"a.down": plain["a.down"]})
    with pytest.raises(ValueError, match=r"expected \[rank, width\] and \[width, rank\]"):
        SurgeryModules.from_plain_state_dict({"a.down": plain["a.down"], "a.up": plain["a.down"]})
    with pytest.raises(ValueError, match="holds no surgery tensors"):
        SurgeryModules.from_plain_state_dict({})


# ----------------------------------------------------------------------------- the module
def test_untrained_surgery_gives_the_merged_encoders_logits_and_accuracies(tmp_path):
    tasks = make_tasks()
    data = MultiTaskDataModule(tasks, eval_batch_size=7, cache="none")
    surgery = SurgeryModule(make_zoo(), num_classes=data.num_classes)
    plain = AdaMergingModule(make_zoo(), num_classes=data.num_classes, granularity="task", init=TASK_ARITHMETIC)
    assert accuracies_of(surgery, data, tmp_path / "s") == accuracies_of(plain, data, tmp_path / "p")
    reference, _ = reference_encoders(make_zoo(), tasks, ["alpha", "beta"])
    surgery.on_test_start()
    with torch.no_grad():
        for name, task in tasks.items():
            images = all_images(task)
            expected = surgery.heads[name](reference(images))
            torch.testing.assert_close(surgery(images, name), expected, rtol=1e-5, atol=1e-5)
    surgery.on_test_end()


def timm_state_dict_zoo(tmp_path: Path, make_tiny_zoo, tasks: Mapping[str, SyntheticTask]) -> StateDictZoo:
    """A batch-norm encoder whose fine-tuned copies have their own running statistics, as files."""
    encoder, finetuned = make_tiny_zoo(TINY_TIMM, tasks=list(tasks), perturb_buffers=True)
    torch.save(encoder.state_dict(), tmp_path / "pretrained.pt")
    files, heads = {}, {}
    generator = torch.Generator().manual_seed(0)
    for name, task in tasks.items():
        files[name] = str(tmp_path / f"{name}.pt")
        torch.save(finetuned[name], files[name])
        heads[name] = str(tmp_path / f"{name}.head.pt")
        torch.save({"weight": torch.randn(task.num_classes, feature_dim(encoder), generator=generator)}, heads[name])
    return StateDictZoo(TINY_TIMM, str(tmp_path / "pretrained.pt"), files, heads)


@pytest.mark.parametrize("setting", ["task_arithmetic", "ties", "batch_norm"])
def test_cached_features_equal_a_fresh_computation(tmp_path, make_tiny_zoo, setting):
    tasks = make_tasks()
    zoo = timm_state_dict_zoo(tmp_path, make_tiny_zoo, tasks) if setting == "batch_norm" else make_zoo()
    module, _, _, recorder = fit(tmp_path, steps=1, zoo=zoo, merge="ties_merging" if setting == "ties" else None)
    merged_encoder, individual_encoders = reference_encoders(zoo, tasks, ["alpha", "beta"])
    if setting == "ties":  # the merge is TIES-merging's: the plain reference is that method's own merged encoder
        plain = TaskArithmeticModule(zoo, num_classes=module.num_classes, scale=0.3, ties_k=0.2, ties_normalize=True)
        merged_encoder.load_state_dict(plain.merged_state_dict())
    with torch.no_grad():
        for name, task in tasks.items():
            merged, individual = recorder.features[name]
            images = all_images(task)
            torch.testing.assert_close(merged, merged_encoder(images), rtol=1e-5, atol=1e-5)
            # The individual model is the fine-tuned one itself, not theta_0 + (TIES-trimmed) tau with
            # the pretrained batch-norm statistics.
            expected = individual_encoders[name](images)
            torch.testing.assert_close(individual, expected, rtol=1e-5, atol=1e-5)
            if setting != "task_arithmetic":
                vectors = module.merger.stacked_task_vectors()
                row = module.seen_tasks.index(name)
                theta = {key: value + vectors[key][row] if key in vectors else value
                         for key, value in module.merger.encoder.state_dict().items()}
                shortcut = copy.deepcopy(module.merger.encoder)
                shortcut.load_state_dict(theta)
                assert not torch.allclose(shortcut(images), expected, atol=1e-3)


def test_features_are_computed_once_per_image_and_steps_run_no_encoder(tmp_path):
    counted = {"calls": 0, "images": 0}

    class Counting(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            pl_module.configure_model()

            def count(module, inputs, output):
                counted["calls"] += 1
                counted["images"] += inputs[0].shape[0]

            pl_module.merger.encoder.register_forward_hook(count)

    # 12 steps of 8 images per task: more than a pass over either task's images.
    module, _, _, recorder = fit(tmp_path, steps=12, callbacks=[Counting()])
    assert len(recorder.positions) == 12
    # One merged and one individual forward per image, in batches of eval_batch_size 7; nothing in the steps.
    assert counted["images"] == 2 * (40 + 24)
    assert counted["calls"] == 2 * (-(-40 // 7) + -(-24 // 7))
    assert module._features is None  # dropped when the fit ends


def test_only_the_surgery_maps_are_trained_and_synchronised_under_ddp():
    module = SurgeryModule(make_zoo(), num_classes={"alpha": 5, "beta": 3})
    module.configure_model()
    maps = {f"surgery.maps.{task}.{part}.weight" for task in ("alpha", "beta") for part in ("down", "up")}
    assert {name for name, p in module.named_parameters() if p.requires_grad} == maps
    names = {name for name, _ in [*module.named_parameters(), *module.named_buffers()]}
    assert set(module._ddp_params_and_buffers_to_ignore) == names - maps
    optimiser = module.configure_optimizers()
    assert optimiser.defaults["lr"] == 1e-3 and optimiser.defaults["betas"] == (0.9, 0.999)
    assert {id(p) for group in optimiser.param_groups for p in group["params"]} == {
        id(p) for name, p in module.named_parameters() if name in maps}


def test_training_matches_the_released_codes_loop_and_the_loss_goes_down(tmp_path):
    steps = 15
    module, _, _, recorder = fit(tmp_path, steps=steps, lr=1e-2)
    # The first loss: the surgery is the identity, so it is the merged-to-individual L1 of the first batch.
    first = sum((recorder.features[t][0][p] - recorder.features[t][1][p]).abs().mean()
                for t, p in recorder.positions[0].items())
    assert recorder.losses[0] == pytest.approx(float(first), rel=1e-6)

    # The released code: one Adam over every map, a step per task batch, L1Loss (mean), zero_grad in between.
    plain = nn.ModuleDict({task: FeatureSurgery(32, 16) for task in ("alpha", "beta")})
    plain.load_state_dict({key.removeprefix("maps."): value for key, value in recorder.initial.items()})
    optimiser = torch.optim.Adam(plain.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    for batch in recorder.positions:
        for task, positions in batch.items():
            merged, individual = recorder.features[task]
            loss = nn.L1Loss()(plain[task](merged[positions]), individual[positions])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    for task in ("alpha", "beta"):
        for part in ("down", "up"):
            torch.testing.assert_close(module.surgery.maps[task].get_submodule(part).weight,
                                       plain[task].get_submodule(part).weight, rtol=1e-5, atol=1e-6)

    # Over every image of each task, the surgered features are closer to the individual ones than before.
    with torch.no_grad():
        for task, (merged, individual) in recorder.features.items():
            before = (merged - individual).abs().mean()
            after = (module.surgery(merged, task) - individual).abs().mean()
            assert after < 0.8 * before, (task, before, after)
    assert sum(recorder.losses[-3:]) < 0.8 * sum(recorder.losses[:3])
    # The merge itself stayed frozen.
    assert torch.equal(module.coefficients(), torch.full_like(module.coefficients(), TASK_ARITHMETIC))


def test_checkpoint_holds_maps_and_coefficients_only_and_tests_the_same(tmp_path):
    module, data, trainer, _ = fit(tmp_path, steps=6, lr=1e-2)
    path = tmp_path / "surgery.ckpt"
    trainer.save_checkpoint(path)
    stored = torch.load(path, weights_only=True)
    maps = {f"surgery.maps.{task}.{part}.weight" for task in ("alpha", "beta") for part in ("down", "up")}
    assert set(stored["state_dict"]) == {COEFFICIENTS_KEY} | maps  # no encoder, task vector or head
    assert stored["hyper_parameters"]["rank"] == 16
    read_adamerging_checkpoint(path)  # an AdaMerging reader accepts it

    fitted = accuracies_of(module, data, tmp_path / "a")
    fresh = SurgeryModule(make_zoo(), num_classes=data.num_classes)
    assert accuracies_of(fresh, data, tmp_path / "b", ckpt_path=str(path)) == fitted
    loaded = SurgeryModule.load_from_checkpoint(path, zoo=make_zoo())
    assert accuracies_of(loaded, data, tmp_path / "c") == fitted
    # The maps learned (up left zero) and the checkpoint carried them.
    assert all(module.surgery.maps[task].up.weight.abs().sum() > 0 for task in ("alpha", "beta"))
    for key, value in module.surgery.state_dict().items():
        assert torch.equal(loaded.surgery.state_dict()[key], value)
        assert torch.equal(fresh.surgery.state_dict()[key], value)

    with pytest.raises(ValueError, match=r"model\.rank: checkpoint 16, yours 8"):
        SurgeryModule.load_from_checkpoint(path, zoo=make_zoo(), rank=8)
    with pytest.raises(ValueError, match=r"model\.rank: checkpoint 16, yours 8"):
        accuracies_of(SurgeryModule(make_zoo(), num_classes=data.num_classes, rank=8), data, tmp_path / "e",
                        ckpt_path=str(path))
    # An AdaMerging checkpoint is another class's: it is given as coefficients_from, not loaded.
    adamerging = AdaMergingModule(make_zoo(), num_classes=data.num_classes, granularity="task")
    adamerging.configure_model()
    plain_trainer = make_trainer(tmp_path / "f")
    plain_trainer.strategy.connect(adamerging)
    plain_trainer.save_checkpoint(tmp_path / "adamerging.ckpt")
    with pytest.raises(ValueError, match=r"adamerging.ckpt was written by '.*AdaMergingModule', not by '.*Surgery"):
        SurgeryModule.load_from_checkpoint(tmp_path / "adamerging.ckpt", zoo=make_zoo())
    with pytest.raises(KeyError, match=r"no surgery maps.*coefficients go in coefficients_from"):
        fresh.load_state_dict({COEFFICIENTS_KEY: stored["state_dict"][COEFFICIENTS_KEY]})


def fit_adamerging(tmp_path: Path) -> tuple[AdaMergingModule, Path]:
    pl.seed_everything(0)
    data = MultiTaskDataModule(make_tasks(), batch_size=8, cache="none")
    module = AdaMergingModule(make_zoo(), num_classes=data.num_classes, granularity="layer", lr=5e-2)
    trainer = make_trainer(tmp_path, max_steps=4)
    with intended_warnings_ignored():
        trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "adamerging.ckpt")
    return module, tmp_path / "adamerging.ckpt"


def test_coefficients_from_an_adamerging_fit_are_used_and_other_settings_refused(tmp_path):
    adamerging, path = fit_adamerging(tmp_path / "ada")
    learned = adamerging.coefficients()
    assert not torch.allclose(learned, torch.full_like(learned, 0.3))
    module, data, _, recorder = fit(tmp_path / "s", steps=1, merge="layer_wise_adamerging",
                                    coefficients_from=str(path))
    assert torch.equal(module.coefficients(), learned)
    # The fit's merged features come from the learned coefficients.
    encoder = copy.deepcopy(adamerging.merger.encoder)
    encoder.load_state_dict(adamerging.merged_state_dict())
    with torch.no_grad():
        for name, task in make_tasks().items():
            torch.testing.assert_close(recorder.features[name][0], encoder(all_images(task)), rtol=1e-5, atol=1e-5)
    # Untrained, the surgery evaluates exactly as the AdaMerging model.
    untrained = SurgeryModule(make_zoo(), num_classes=data.num_classes, merge="layer_wise_adamerging",
                              coefficients_from=str(path))
    assert accuracies_of(untrained, data, tmp_path / "u") == accuracies_of(adamerging, data, tmp_path / "a")

    other = SurgeryModule(make_zoo(), num_classes=data.num_classes, merge="task_wise_adamerging",
                          coefficients_from=str(path))
    with pytest.raises(ValueError, match=r"(?s)coefficients_from=.*adamerging\.ckpt.*other settings.*"
                                         r"model\.granularity: checkpoint 'layer', yours 'task'"):
        other.coefficients()
    missing = SurgeryModule(make_zoo(), num_classes=data.num_classes, merge="layer_wise_adamerging",
                            coefficients_from=str(tmp_path / "none.ckpt"))
    with pytest.raises(ValueError, match=r"model\.coefficients_from: .*none\.ckpt is not an AdaMerging checkpoint"):
        missing.coefficients()


def test_unseen_tasks_get_no_surgery_and_no_fine_tuned_model_is_read(tmp_path):
    reads: list[str] = []

    class Recording(SyntheticZoo):
        def _finetuned(self, encoder, task):
            reads.append(task)
            return super()._finetuned(encoder, task)

    zoo = Recording(TINY_CLIP, seed=0, perturbation=0.2)
    tasks = make_tasks(unseen=True)
    module, data, _, recorder = fit(tmp_path, steps=4, tasks=tasks, zoo=zoo, lr=1e-2)
    assert module.surgery.tasks == ["alpha", "beta"] and set(recorder.features) == {"alpha", "beta"}
    assert "delta" not in reads and all(set(batch) == {"alpha", "beta"} for batch in recorder.positions)
    ours = accuracies_of(module, data, tmp_path / "s")
    plain = AdaMergingModule(make_zoo(), num_classes=data.num_classes, unseen_tasks=["delta"], granularity="task")
    merged = accuracies_of(plain, data, tmp_path / "p")
    assert ours["test/acc/delta"] == merged["test/acc/delta"]  # the merged features, no surgery


def test_export_writes_the_merged_encoder_and_the_maps_that_reproduce_the_logits(tmp_path):
    export = ExportMergedEncoder(str(tmp_path / "out" / "merged.safetensors"))
    surgery_file = surgery_path(export.path)
    assert surgery_file == str(tmp_path / "out" / "merged.surgery.safetensors")
    module, _, _, _ = fit(tmp_path, steps=4, lr=1e-2, callbacks=[export])
    tasks = make_tasks()
    encoder, _ = reference_encoders(make_zoo(), tasks, ["alpha", "beta"])
    encoder.load_state_dict(load_file(str(tmp_path / "out" / "merged.safetensors")), strict=True)
    maps = SurgeryModules.from_plain_state_dict(load_file(surgery_file), surgery_file)
    assert maps.tasks == ["alpha", "beta"] and (maps.width, maps.rank) == (32, 16)
    module.on_test_start()
    with torch.no_grad():
        for name, task in tasks.items():
            images = all_images(task)
            logits = module.heads[name](maps(encoder(images), name))
            torch.testing.assert_close(logits, module(images, name), rtol=1e-5, atol=1e-5)
    module.on_test_end()


# ----------------------------------------------------------------------------- bad input
class WithoutBeta(ModelZoo):
    """A zoo that has no fine-tuned model for task beta."""

    def load(self, num_classes, merged_tasks=None) -> LoadedZoo:
        loaded = make_zoo().load(num_classes, merged_tasks)
        return LoadedZoo(loaded.encoder, {"alpha": loaded.finetuned["alpha"]}, loaded.heads)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        SurgeryModule(make_zoo(), num_classes={"a": 2}, rank=0)
    with pytest.raises(ValueError, match=r"merge='layer_wise_adamerging' is learned: give coefficients_from.*"
                                         r"--method layer_wise_adamerging"):
        SurgeryModule(make_zoo(), num_classes={"a": 2}, merge="layer_wise_adamerging")
    with pytest.raises(ValueError, match=r"merge='task_arithmetic' learns nothing, so coefficients_from='x.ckpt'"):
        SurgeryModule(make_zoo(), num_classes={"a": 2}, coefficients_from="x.ckpt")
    with pytest.raises(ValueError, match=r"merge='regmean' is a RegMeanModule; surgery composes"):
        SurgeryModule(make_zoo(), num_classes={"a": 2}, merge="regmean")
    with pytest.raises(ValueError, match=r"unknown merging method 'magic'"):
        SurgeryModule(make_zoo(), num_classes={"a": 2}, merge="magic")
    surgery = SurgeryModule(WithoutBeta(), num_classes={"alpha": 5, "beta": 3})
    with pytest.raises(KeyError, match=r"no fine-tuned weights for the merged task 'beta'.*make the task unseen"):
        surgery.configure_model()

    # Plain dataloaders instead of a MultiTaskDataModule: the module cannot read the tasks' images.
    module = SurgeryModule(make_zoo(), num_classes={"alpha": 5, "beta": 3})
    loaders = {name: DataLoader(torch.arange(8), batch_size=4) for name in ("alpha", "beta")}
    with pytest.raises(TypeError, match="fit it with a MultiTaskDataModule"), intended_warnings_ignored():
        make_trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=loaders)


# ----------------------------------------------------------------------------- DDP
# A standalone script (run in a fresh interpreter): its first line names the tiny model.
DDP_SCRIPT = f"TINY_CLIP = {TINY_CLIP!r}\n" + textwrap.dedent('''
    import sys
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy
    from lit_adamerging import MultiTaskDataModule, SyntheticTask, SyntheticZoo
    from lit_adamerging.lightning.base import intended_warnings_ignored
    from lit_adamerging.lightning.surgery import SurgeryModule

    devices, batch_size, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

    class Save(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.features = {task: [t.clone() for t in pair] for task, pair in pl_module._features.items()}

        def on_train_end(self, trainer, pl_module):
            torch.save({"maps": pl_module.surgery_state_dict(), "features": self.features},
                       f"{name}.rank{trainer.global_rank}.pt")

    pl.seed_everything(0)
    tasks = {"alpha": SyntheticTask(num_classes=5, num_images=40, image_size=32, seed=1),
             "beta": SyntheticTask(num_classes=3, num_images=24, image_size=32, seed=2)}
    data = MultiTaskDataModule(tasks, batch_size=batch_size, eval_batch_size=7, cache="none")
    module = SurgeryModule(SyntheticZoo(TINY_CLIP, seed=0, perturbation=0.2),
                           num_classes=data.num_classes, lr=1e-2)
    strategy = DDPStrategy(find_unused_parameters=False) if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=6, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Save()])
    with intended_warnings_ignored():
        trainer.fit(module, datamodule=data)
''')


@pytest.mark.slow  # DDP on two processes
def test_ddp_on_two_processes_trains_the_same_maps_as_one_process(tmp_path):
    # The same tasks, zoo, seed and steps as fit(); each process takes half of the 8 images per task and step.
    script = tmp_path / "surgery_ddp.py"
    script.write_text(DDP_SCRIPT)
    run = subprocess.run([sys.executable, str(script), "2", "4", "double"], cwd=tmp_path,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    module, _, _, recorder = fit(tmp_path / "single", steps=6, batch_size=8, lr=1e-2)
    single = module.surgery_state_dict()
    ranks = [torch.load(tmp_path / f"double.rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(value.abs().sum() > 0 for value in single.values())  # up left zero: the maps learned
    for key, value in single.items():
        assert torch.equal(ranks[0]["maps"][key], ranks[1]["maps"][key])  # DDP keeps the processes in step
        torch.testing.assert_close(ranks[0]["maps"][key], value, rtol=0, atol=1e-6)
    # Every process holds every image's features, each computed by one of them.
    for rank in ranks:
        for task, (merged, individual) in recorder.features.items():
            torch.testing.assert_close(rank["features"][task][0], merged, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rank["features"][task][1], individual, rtol=1e-5, atol=1e-6)
