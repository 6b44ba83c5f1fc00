"""The Lightning glue: AdaMergingModule, MultiTaskDataModule and the callbacks.

Every numeric check compares against a naive reference written out here: the merge as a plain
loop over tasks and tensors, the merged encoder as a deep copy loaded with those weights, the
entropy and the accuracy computed by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from helpers import TINY_CLIP, TINY_TIMM, cpu_trainer, synthetic_tasks
from lit_adamerging import (
    AdaMergingModule,
    CoefficientLogger,
    ExportMergedEncoder,
    ModelZoo,
    MultiTaskDataModule,
    PerTaskAccuracy,
    StateDictZoo,
    SyntheticTask,
    SyntheticZoo,
    TaskArithmeticModule,
    TaskData,
)
from lit_adamerging.lightning.checkpoint_io import COEFFICIENTS_KEY
from lit_adamerging.merging import task_arithmetic, ties_merging, weight_averaging
from lit_adamerging.methods import create_method
from lit_adamerging.models import LoadedZoo, create_encoder

NUM_CLASSES = {"alpha": 5, "beta": 3}


# ----------------------------------------------------------------------------- helpers


def make_module(
    zoo: ModelZoo | None = None, num_classes: Mapping[str, int] | None = None, **kwargs
) -> AdaMergingModule:
    return AdaMergingModule(
        zoo or SyntheticZoo(TINY_CLIP, seed=0), num_classes=dict(num_classes or NUM_CLASSES), **kwargs
    )




def set_coefficients(module: AdaMergingModule, seed: int = 0) -> Tensor:
    """Random raw coefficients in (0.05, 0.95), a few pushed outside [0, 1] to exercise the clamp."""
    module.configure_model()
    raw = module.merger.coefficients.raw
    generator = torch.Generator().manual_seed(seed)
    values = 0.05 + 0.9 * torch.rand(raw.shape, generator=generator)
    if values.shape[1] > 3:
        values[0, 1] = 1.4
        values[-1, 2] = -0.3
    with torch.no_grad():
        raw.copy_(values)
    return values.clone()


class Reference:
    """The zoo loaded on its own, and merges computed with a plain Python loop."""

    def __init__(self, zoo: ModelZoo, num_classes: Mapping[str, int]) -> None:
        loaded = zoo.load(dict(num_classes))
        self.tasks = list(num_classes)
        self.encoder = loaded.encoder.eval()
        self.theta0 = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        self.finetuned = loaded.finetuned
        self.heads = loaded.heads
        parameters = {name for name, _ in self.encoder.named_parameters()}
        # Merged tensors, in encoder order: the floating-point parameters (buffers stay pretrained).
        self.names = [k for k, v in self.theta0.items() if k in parameters and v.is_floating_point()]

    def merge(self, coefficients: Tensor) -> dict[str, Tensor]:
        """theta0 + sum_k lam[k, p] * (theta_k - theta0), ``coefficients`` is [tasks, 1 or P]."""
        merged = dict(self.theta0)
        for p, name in enumerate(self.names):
            total = self.theta0[name]
            for k, task in enumerate(self.tasks):
                lam = coefficients[k, p if coefficients.shape[1] > 1 else 0]
                total = total + lam * (self.finetuned[task][name] - self.theta0[name])
            merged[name] = total
        return merged

    def merged_encoder(self, coefficients: Tensor) -> nn.Module:
        encoder = copy.deepcopy(self.encoder)
        encoder.load_state_dict({k: v.detach() for k, v in self.merge(coefficients).items()})
        return encoder.eval()

    def logits(self, coefficients: Tensor, images: Tensor, task: str) -> Tensor:
        with torch.no_grad():
            return self.heads[task](self.merged_encoder(coefficients)(images))


def naive_entropy(logits: Tensor) -> Tensor:
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p)).sum(dim=-1)


# ----------------------------------------------------------------------------- 1. training_step
def test_training_step_loss_and_gradient_match_naive_reference():
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    module = make_module(zoo, granularity="layer", clamp=True)
    raw = set_coefficients(module, seed=3)
    reference = Reference(zoo, NUM_CLASSES)
    assert module.merger.tensor_names == reference.names
    assert module.merger.coefficients.raw.shape == (2, len(reference.names))

    generator = torch.Generator().manual_seed(7)
    batch = {"alpha": torch.randn(5, 3, 32, 32, generator=generator),
             "beta": torch.randn(3, 3, 32, 32, generator=generator)}

    calls = []
    hook = module.merger.encoder.register_forward_hook(lambda mod, args, out: calls.append(args[0]))
    try:
        loss = module.training_step(batch, 0)
    finally:
        hook.remove()
    # One encoder forward, on all tasks' images concatenated in task order.
    assert len(calls) == 1
    assert torch.equal(calls[0], torch.cat([batch["alpha"], batch["beta"]]))

    # Naive loss: load the plainly merged weights into a copy, sum over tasks of the mean entropy.
    clamped = raw.clamp(0.0, 1.0)
    encoder = reference.merged_encoder(clamped)
    with torch.no_grad():
        expected = sum(naive_entropy(reference.heads[t](encoder(batch[t]))).mean() for t in reference.tasks)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)

    # Naive gradient: autograd through the plain loop merge.
    loss.backward()
    leaf = raw.clone().requires_grad_(True)
    merged = reference.merge(leaf.clamp(0.0, 1.0))
    naive_loss = 0.0
    for task in reference.tasks:
        features = torch.func.functional_call(reference.encoder, merged, (batch[task],))
        naive_loss = naive_loss + naive_entropy(reference.heads[task](features)).mean()
    naive_loss.backward()
    grad = module.merger.coefficients.raw.grad
    assert grad is not None and grad.shape == leaf.grad.shape
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-4, atol=1e-6)  # |grad| ~ 1e-3
    # Coefficients clamped away get no gradient; those inside do.
    assert grad[0, 1] == 0 and grad[-1, 2] == 0
    assert grad.abs().sum() > 0
    # Nothing but the coefficients learns.
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable == [COEFFICIENTS_KEY]


def test_training_step_task_granularity_gradient():
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    module = make_module(zoo, granularity="task", clamp=False, init=0.2)
    module.configure_model()
    assert module.merger.coefficients.raw.shape == (2, 1)
    reference = Reference(zoo, NUM_CLASSES)
    generator = torch.Generator().manual_seed(1)
    batch = {t: torch.randn(4, 3, 32, 32, generator=generator) for t in NUM_CLASSES}
    module.training_step(batch, 0).backward()
    leaf = torch.full((2, 1), 0.2, requires_grad=True)
    merged = reference.merge(leaf)
    naive = sum(
        naive_entropy(reference.heads[t](torch.func.functional_call(reference.encoder, merged, (batch[t],)))).mean()
        for t in reference.tasks
    )
    naive.backward()
    torch.testing.assert_close(module.merger.coefficients.raw.grad, leaf.grad, rtol=1e-4, atol=1e-6)


def test_training_step_missing_task_in_batch():
    module = make_module()
    module.configure_model()
    with pytest.raises(KeyError, match="beta"):
        module.training_step({"alpha": torch.randn(2, 3, 32, 32)}, 0)


class RecordingModule(AdaMergingModule):
    """Records what reaches training_step and whether the frozen parts are in eval mode."""

    def training_step(self, batch, batch_idx):
        self.seen = getattr(self, "seen", [])
        self.seen.append(({k: (type(v), tuple(v.shape)) for k, v in batch.items()},
                          self.merger.encoder.training, any(h.training for h in self.heads.values())))
        return super().training_step(batch, batch_idx)


# ----------------------------------------------------------------------------- 2. data
def test_fit_batches_are_label_free_and_eval_loaders_in_task_order(tmp_path):
    tasks = synthetic_tasks({"alpha": 12, "beta": 8})
    data = MultiTaskDataModule(tasks, batch_size=4, eval_batch_size=5)
    assert data.num_classes == NUM_CLASSES
    data.setup("fit")
    loaders = data.train_dataloader()
    assert list(loaders) == ["alpha", "beta"]
    for task, loader in loaders.items():
        seen = list(loader)
        assert len(seen) == 3  # every task's epoch is as long as the longest task's pass (alpha: 12 / 4)
        for item in seen:
            assert isinstance(item, Tensor)  # images only: no (images, labels) pair
            assert item.shape == (4, 3, 32, 32)
        # A pass over a task is a permutation of its test images (beta's second pass starts at step 3).
        images = tasks[task].test_set().tensors[0]
        got = torch.cat(seen[: len(images) // 4])
        assert got.shape == images.shape
        order = torch.cdist(got.flatten(1), images.flatten(1)).argmin(1)
        assert sorted(order.tolist()) == list(range(len(images)))
        assert torch.equal(got, images[order])

    for loaders in (data.val_dataloader(), data.test_dataloader()):
        assert len(loaders) == 2
        for loader, task in zip(loaders, ["alpha", "beta"]):
            images, labels = tasks[task].test_set().tensors
            batches = list(loader)
            assert all(len(b) == 2 for b in batches)
            assert torch.equal(torch.cat([b[0] for b in batches]), images)
            assert torch.equal(torch.cat([b[1] for b in batches]), labels)

    # What the Trainer hands to training_step: {task: images tensor}, one entry per task; the
    # frozen encoder and heads stay in eval mode while fitting.
    module = RecordingModule(SyntheticZoo(TINY_CLIP, seed=0), num_classes=data.num_classes)
    cpu_trainer(tmp_path, max_steps=3).fit(module, datamodule=data)
    assert len(module.seen) == 3
    for shapes, encoder_training, heads_training in module.seen:
        assert shapes == {"alpha": (Tensor, (4, 3, 32, 32)), "beta": (Tensor, (4, 3, 32, 32))}
        assert not encoder_training and not heads_training


def test_image_tasks_read_with_the_models_preprocessing(tmp_path):
    from PIL import Image

    from lit_adamerging import ImageFolderTask, Preprocess

    for task, classes in NUM_CLASSES.items():
        for label in range(classes):
            folder = tmp_path / task / "test" / f"c{label}"
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 24), (40 * label, 100, 200)).save(folder / "0.png")
    tasks = {task: ImageFolderTask(root=str(tmp_path / task)) for task in NUM_CLASSES}  # no preprocess given
    data = MultiTaskDataModule(tasks, batch_size=2, cache="none")
    with pytest.raises(ValueError, match=r"has no eval preprocessing"):
        data.setup("fit")  # no Trainer, no model to ask
    module = RecordingModule(SyntheticZoo(TINY_CLIP, seed=0), num_classes=data.num_classes)
    cpu_trainer(tmp_path / "run", max_steps=1).fit(module, datamodule=data)
    assert module.seen[0][0] == {task: (Tensor, (2, 3, 32, 32)) for task in NUM_CLASSES}  # test-vit-tiny: 32 px
    expected = ImageFolderTask(root=str(tmp_path / "beta"), preprocess=Preprocess(image_size=32)).test_set()
    got = data.test_dataloader()[1].dataset
    for index in range(len(expected)):
        assert torch.equal(got[index][0], expected[index][0]) and got[index][1] == expected[index][1]


def test_datamodule_errors():
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskDataModule({})
    with pytest.raises(ValueError, match="positive"):
        MultiTaskDataModule(synthetic_tasks(), batch_size=0)


# ----------------------------------------------------------------------------- 3. accuracy
def naive_accuracy(reference: Reference, coefficients: Tensor, task: TaskData, name: str, top_k: int = 1) -> float:
    images, labels = task.test_set().tensors
    logits = reference.logits(coefficients, images, name)
    top = logits.topk(top_k, dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).float().mean().item()


@pytest.mark.parametrize("top_k", [1, 2])
def test_per_task_accuracy_matches_naive(tmp_path, top_k):
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    tasks = synthetic_tasks({"alpha": 23, "beta": 17})
    module = make_module(zoo)
    raw = set_coefficients(module, seed=top_k)
    data = MultiTaskDataModule(tasks, batch_size=4, eval_batch_size=6)  # several batches, a partial last one
    trainer = cpu_trainer(tmp_path, callbacks=[PerTaskAccuracy(top_k=top_k)])
    results = trainer.test(module, datamodule=data, verbose=False)

    reference = Reference(zoo, NUM_CLASSES)
    expected = {t: naive_accuracy(reference, raw.clamp(0, 1), tasks[t], t, top_k) for t in tasks}
    metrics = trainer.callback_metrics
    for index, (task, value) in enumerate(expected.items()):
        assert metrics[f"test/acc/{task}"].item() == pytest.approx(value, abs=1e-6)
        # each task's accuracy is reported under its own dataloader only
        assert results[index][f"test/acc/{task}"] == pytest.approx(value, abs=1e-6)
        assert all(f"test/acc/{task}" not in other for i, other in enumerate(results) if i != index)
    assert metrics["test/acc/avg"].item() == pytest.approx(sum(expected.values()) / len(expected), abs=1e-6)
    # Only the configured callback computes accuracy (the module adds its own only when none is given).
    assert sum(isinstance(c, PerTaskAccuracy) for c in trainer.callbacks) == 1
    # Evaluation leaves no cached merged tensors behind.
    assert module._eval_tensors is None


class ShiftedLabels(TaskData):
    """A task whose labels reach num_classes (one past the head)."""

    def __init__(self, num_classes: int) -> None:
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def test_set(self, preprocess=None) -> Dataset:
        labels = torch.arange(6) % self._num_classes + 1
        return TensorDataset(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), labels)


def test_label_outside_head_raises_naming_task(tmp_path):
    tasks = {"alpha": synthetic_tasks()["alpha"], "beta": ShiftedLabels(3)}
    data = MultiTaskDataModule(tasks, eval_batch_size=4)
    module = make_module(num_classes=data.num_classes)
    with pytest.raises(ValueError, match=r"task 'beta': label 3 is outside the head's 3 classes"):
        cpu_trainer(tmp_path).test(module, datamodule=data, verbose=False)


def test_evaluation_matches_loaders_to_heads_by_task_name(tmp_path):
    # Two tasks with the same class count, so another task's head would score the images without
    # any error; num_classes lists them in the other order than the data module.
    tasks = {"alpha": SyntheticTask(num_classes=4, num_images=40, image_size=32, seed=1),
             "beta": SyntheticTask(num_classes=4, num_images=40, image_size=32, seed=2)}
    data = MultiTaskDataModule(tasks, eval_batch_size=16)
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    reversed_classes = {"beta": 4, "alpha": 4}
    module = make_module(zoo, num_classes=reversed_classes)
    raw = set_coefficients(module, seed=3)  # rows in the module's order: beta, alpha
    trainer = cpu_trainer(tmp_path)
    trainer.test(module, datamodule=data, verbose=False)

    reference = Reference(zoo, reversed_classes)
    coefficients = raw.clamp(0, 1)
    right = {t: naive_accuracy(reference, coefficients, tasks[t], t) for t in tasks}
    images = {t: tasks[t].test_set().tensors for t in tasks}
    swapped = {t: (reference.logits(coefficients, images[t][0], other).argmax(-1) == images[t][1]).float().mean().item()
               for t, other in (("alpha", "beta"), ("beta", "alpha"))}
    assert right != pytest.approx(swapped, abs=1e-6)  # the heads tell the tasks apart: the check below can fail
    for task, value in right.items():
        assert trainer.callback_metrics[f"test/acc/{task}"].item() == pytest.approx(value, abs=1e-6)

    # Other tasks, or other class counts, than the data's are refused, naming the task.
    with pytest.raises(ValueError, match=r"task 'alpha' is in the data but not in the model's num_classes"):
        cpu_trainer(tmp_path).test(make_module(zoo, num_classes={"beta": 4}), datamodule=data, verbose=False)
    with pytest.raises(ValueError, match=r"task 'beta' has 3 classes in the model's num_classes but 4 in the data"):
        cpu_trainer(tmp_path).test(
            make_module(zoo, num_classes={"alpha": 4, "beta": 3}), datamodule=data, verbose=False
        )


def test_per_task_accuracy_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        PerTaskAccuracy(top_k=0)


# ----------------------------------------------------------------------------- 4. errors
def write_state_dict_zoo(tmp_path, head_shapes: Mapping[str, tuple[int, int]], tasks=("alpha", "beta")) -> StateDictZoo:
    """A StateDictZoo over safetensors files: the tiny ViT, perturbed copies and heads of the given shapes."""
    torch.manual_seed(0)
    encoder = create_encoder(TINY_CLIP)
    pretrained = {k: v.clone().contiguous() for k, v in encoder.state_dict().items()}
    save_file(pretrained, str(tmp_path / "pretrained.safetensors"))
    finetuned, heads = {}, {}
    for index, task in enumerate(tasks):
        state = {k: (v + 0.01 * (index + 1) * torch.randn_like(v)).contiguous() for k, v in pretrained.items()}
        save_file(state, str(tmp_path / f"{task}.safetensors"))
        finetuned[task] = str(tmp_path / f"{task}.safetensors")
    for task, shape in head_shapes.items():
        heads[task] = str(tmp_path / f"head_{task}.safetensors")
        save_file({"weight": torch.randn(shape), "bias": torch.zeros(shape[0])}, heads[task])
    return StateDictZoo(TINY_CLIP, str(tmp_path / "pretrained.safetensors"), finetuned, heads)


def test_state_dict_zoo_module_matches_reference(tmp_path):
    zoo = write_state_dict_zoo(tmp_path, {"alpha": (5, 32), "beta": (3, 32)})
    module = make_module(zoo, granularity="task", init=0.4)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = Reference(zoo, NUM_CLASSES)
    coefficients = torch.full((2, 1), 0.4)
    for task in NUM_CLASSES:
        with torch.no_grad():
            got = module(images, task)
        torch.testing.assert_close(got, reference.logits(coefficients, images, task), rtol=1e-5, atol=1e-5)


def test_head_class_count_mismatch_names_task(tmp_path):
    zoo = write_state_dict_zoo(tmp_path, {"alpha": (5, 32), "beta": (4, 32)})
    module = make_module(zoo)
    with pytest.raises(ValueError, match=r"task 'beta': its head has 4 classes but its dataset has 3"):
        module.configure_model()


def test_head_feature_width_mismatch_names_task(tmp_path):
    zoo = write_state_dict_zoo(tmp_path, {"alpha": (5, 16), "beta": (3, 32)})
    with pytest.raises(ValueError, match=r"task 'alpha': its head takes 16 features but the encoder returns 32"):
        make_module(zoo).configure_model()


def test_missing_task_in_state_dict_zoo(tmp_path):
    zoo = write_state_dict_zoo(tmp_path, {"alpha": (5, 32)}, tasks=("alpha",))
    with pytest.raises(ValueError, match=r"no file for task\(s\) \['beta'\]"):
        make_module(zoo).configure_model()


class ForgetfulZoo(ModelZoo):
    """A zoo that silently drops one task's head (a buggy custom zoo)."""

    def __init__(self, drop: str) -> None:
        self.drop = drop

    def load(self, num_classes, merged_tasks=None):
        loaded = SyntheticZoo(TINY_CLIP, seed=0).load(num_classes, merged_tasks)
        heads = {t: h for t, h in loaded.heads.items() if t != self.drop}
        return LoadedZoo(loaded.encoder, loaded.finetuned, heads)


def test_missing_task_in_custom_zoo():
    with pytest.raises(KeyError, match="'alpha'"):
        make_module(ForgetfulZoo("alpha")).configure_model()


class ReversedLazyZoo(ModelZoo):
    """SyntheticZoo's models handed over lazily in the reverse task order, recording each load."""

    def __init__(self, one_at_a_time) -> None:
        self.one_at_a_time = one_at_a_time
        self.loads: list[str] = []

    def load(self, num_classes, merged_tasks=None):
        loaded = SyntheticZoo(TINY_CLIP, seed=0).load(num_classes, merged_tasks)
        lazy, self.loads = self.one_at_a_time(loaded.finetuned.__getitem__, reversed(list(loaded.finetuned)))
        return LoadedZoo(loaded.encoder, lazy, loaded.heads)


def test_module_reads_each_fine_tuned_model_once_in_task_order(one_at_a_time):
    zoo = ReversedLazyZoo(one_at_a_time)
    module = make_module(zoo)
    module.configure_model()
    assert zoo.loads == list(NUM_CLASSES)  # the coefficients' row order, not the zoo's
    reference = SyntheticZoo(TINY_CLIP, seed=0).load(NUM_CLASSES)
    theta0 = reference.encoder.state_dict()
    stacked = module.merger.stacked_task_vectors()
    for k, task in enumerate(NUM_CLASSES):
        tuned = reference.finetuned[task]
        for key, value in stacked.items():
            assert torch.equal(value[k], tuned[key] - theta0[key])


def test_num_classes_none_is_a_clear_error(tmp_path):
    module = AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes=None)
    with pytest.raises(ValueError, match="num_classes"):
        module.configure_model()
    with pytest.raises(ValueError, match="num_classes"):
        cpu_trainer(tmp_path, max_steps=1).fit(module, datamodule=MultiTaskDataModule(synthetic_tasks()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "tensor"}, "granularity must be 'task' or 'layer'"),
        ({"task_vector_dtype": "float64"}, "task_vector_dtype"),
        ({"task_vector_dtype": "int8"}, "task_vector_dtype"),
        ({"ties_k": 0.0}, r"ties_k must be in \(0, 1\]"),
        ({"ties_k": 20}, r"ties_k must be in \(0, 1\]"),
        ({"ties_k": -0.1}, r"ties_k must be in \(0, 1\]"),
        ({"ties_normalize": True}, "ties_normalize needs ties_k"),
        ({"lr": 0.0}, "lr must be positive"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(**kwargs)


def test_ties_k_one_is_accepted():
    make_module(ties_k=1.0)


# ----------------------------------------------------------------------------- 5. checkpoints
def test_checkpoint_is_small_coefficients_only_and_reloads(tmp_path):
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    data = MultiTaskDataModule(synthetic_tasks(), batch_size=4)
    module = make_module(zoo, lr=0.05)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = cpu_trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(module, datamodule=data)
    trained = module.merger.coefficients.raw.detach().clone()
    assert not torch.allclose(trained, torch.full_like(trained, 0.3))  # it did learn something

    path = tmp_path / "ckpt" / "last.ckpt"
    assert path.stat().st_size < 1_000_000
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert list(state["state_dict"]) == [COEFFICIENTS_KEY]
    torch.testing.assert_close(state["state_dict"][COEFFICIENTS_KEY], trained, rtol=0, atol=0)
    assert state["global_step"] == 4
    assert state["hyper_parameters"]["num_classes"] == NUM_CLASSES
    # The zoo is a Python object: the checkpoint keeps the arguments it was built with, never the object.
    assert state["hyper_parameters"]["zoo"] == {
        "class_path": "lit_adamerging.models.zoo.SyntheticZoo",
        "init_args": {"encoder": TINY_CLIP, "seed": 0, "perturbation": 0.05},
    }

    loaded = AdaMergingModule.load_from_checkpoint(path, zoo=zoo, weights_only=True)
    torch.testing.assert_close(loaded.coefficients(), trained.clamp(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(loaded.merger.coefficients.raw.detach(), trained, rtol=0, atol=0)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, "beta"), module(images, "beta"), rtol=0, atol=0)

    # Loaded before the model is built, the coefficients wait for configure_model.
    lazy = make_module(zoo)
    lazy.load_state_dict(state["state_dict"])
    assert lazy.merger is None
    lazy.configure_model()
    torch.testing.assert_close(lazy.merger.coefficients.raw.detach(), trained, rtol=0, atol=0)

    # The checkpoint's settings decide: overriding one that changes the result is refused, naming it.
    with pytest.raises(ValueError, match=r"(?s)other settings.*model.granularity: checkpoint 'layer', yours 'task'"):
        AdaMergingModule.load_from_checkpoint(path, zoo=zoo, granularity="task", weights_only=True)
    # The coefficients must fit the model: layer-wise coefficients into a task-wise module.
    unbuilt = make_module(zoo, granularity="task")
    unbuilt.load_state_dict(state["state_dict"])
    with pytest.raises(ValueError, match=r"shape \(2, 32\) but this model needs \(2, 1\)"):
        unbuilt.configure_model()
    built = make_module(zoo, num_classes={"alpha": 5}, granularity="layer")
    built.configure_model()
    with pytest.raises(ValueError, match=r"shape \(2, 32\) but this model needs \(1, 32\)"):
        built.load_state_dict(state["state_dict"])
    # Through a Trainer, a checkpoint made for other tasks is refused before its coefficients are used.
    with pytest.raises(ValueError, match=r"model.num_classes.beta: checkpoint 3, yours '<not set>'"):
        cpu_trainer(tmp_path / "t").test(built, datamodule=MultiTaskDataModule({"alpha": synthetic_tasks()["alpha"]}),
                                          ckpt_path=str(path), verbose=False, weights_only=True)
    with pytest.raises(KeyError, match=COEFFICIENTS_KEY):
        built.load_state_dict({"something.else": torch.zeros(1)})


def test_python_checkpoint_needs_the_zoo_and_its_settings(tmp_path):
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    module = make_module(zoo)
    set_coefficients(module)
    trainer = cpu_trainer(tmp_path)
    trainer.strategy.connect(module)
    path = tmp_path / "python.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(TypeError, match=r"needs zoo=<a ModelZoo>.*quoted here as data: .*\"seed\": 0"):
        AdaMergingModule.load_from_checkpoint(path)
    # Another zoo than the one the coefficients were learned with is refused, from Python as through the Trainer.
    with pytest.raises(ValueError, match=r"model.zoo.init_args.seed: checkpoint 0, yours 1"):
        AdaMergingModule.load_from_checkpoint(path, zoo=SyntheticZoo(TINY_CLIP, seed=1))
    with pytest.raises(ValueError, match=r"model.zoo.init_args.seed: checkpoint 0, yours 1"):
        cpu_trainer(tmp_path).test(make_module(SyntheticZoo(TINY_CLIP, seed=1)),
                                   datamodule=MultiTaskDataModule(synthetic_tasks()), ckpt_path=str(path),
                                   verbose=False)
    # A module made with another method is refused by the Trainer, listing each difference.
    other = make_module(zoo, granularity="task", ties_k=0.2)
    with pytest.raises(ValueError, match=r"(?s)model.granularity: checkpoint 'layer', yours 'task'.*"
                                         r"model.ties_k: checkpoint None, yours 0.2"):
        cpu_trainer(tmp_path).test(other, datamodule=MultiTaskDataModule(synthetic_tasks()), ckpt_path=str(path),
                                    verbose=False)
    # The optimiser's settings do not change what the coefficients mean: another lr loads them.
    again = AdaMergingModule.load_from_checkpoint(path, zoo=zoo, lr=0.5)
    torch.testing.assert_close(again.coefficients(), module.coefficients(), rtol=0, atol=0)


def test_resume_matches_straight_fit(tmp_path):
    # One batch per task holds the whole task, so every step sees the same images whatever the
    # shuffle order (the entropy mean does not depend on it): the data stream is identical with
    # and without resuming, and the runs must agree. Lightning does not checkpoint the global RNG
    # state, so with mini-batches the shuffling after resuming would differ from a straight run.
    zoo = SyntheticZoo(TINY_CLIP, seed=0)

    def data():
        return MultiTaskDataModule(synthetic_tasks({"alpha": 8, "beta": 8}), batch_size=8)

    def optimizer_state(trainer):
        state = trainer.optimizers[0].state_dict()["state"][0]
        return {k: torch.as_tensor(v).clone() for k, v in state.items()}

    pl.seed_everything(0)
    straight = make_module(zoo, lr=0.02)
    straight_trainer = cpu_trainer(tmp_path / "a", max_steps=10)
    straight_trainer.fit(straight, datamodule=data())

    pl.seed_everything(0)
    first = make_module(zoo, lr=0.02)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first_trainer = cpu_trainer(tmp_path / "b", max_steps=5, enable_checkpointing=True, callbacks=[checkpoint])
    first_trainer.fit(first, datamodule=data())
    saved = first.merger.coefficients.raw.detach().clone()
    saved_optimizer = optimizer_state(first_trainer)

    pl.seed_everything(123)  # a different RNG state: nothing may depend on it
    second = make_module(zoo, lr=0.02)
    restored = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            restored["step"] = trainer.global_step
            restored["raw"] = pl_module.merger.coefficients.raw.detach().clone()
            restored["optimizer"] = optimizer_state(trainer)

    second_trainer = cpu_trainer(tmp_path / "c", max_steps=10, enable_checkpointing=True,
                                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2"), Probe()])
    second_trainer.fit(second, datamodule=data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), weights_only=True)

    assert restored["step"] == 5
    torch.testing.assert_close(restored["raw"], saved, rtol=0, atol=0)
    for key, value in saved_optimizer.items():
        torch.testing.assert_close(restored["optimizer"][key], value, rtol=0, atol=0)
    assert second_trainer.global_step == straight_trainer.global_step == 10
    assert int(optimizer_state(second_trainer)["step"]) == 10
    assert not torch.allclose(second.merger.coefficients.raw, saved)
    torch.testing.assert_close(second.merger.coefficients.raw, straight.merger.coefficients.raw, rtol=1e-5, atol=1e-6)
    for key, value in optimizer_state(straight_trainer).items():
        torch.testing.assert_close(optimizer_state(second_trainer)[key], value, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- 6. baselines
@pytest.mark.parametrize("encoder", [TINY_CLIP, TINY_TIMM])
def test_data_free_methods_equal_merging_functions(encoder):
    zoo = SyntheticZoo(encoder, seed=0)
    num_classes = {"alpha": 5, "beta": 3, "gamma": 4}
    loaded = zoo.load(num_classes)
    pretrained = loaded.encoder.state_dict()
    finetuned = loaded.finetuned
    buffers = {name for name, _ in loaded.encoder.named_buffers()}

    def merged(method: str):
        module = create_method(method, zoo, num_classes)
        assert type(module) is TaskArithmeticModule and not module.LEARNS
        module.configure_model()
        return module.merger.merged_state_dict()

    cases = [
        (merged("task_arithmetic"), task_arithmetic(pretrained, finetuned, 0.3, buffers=buffers)),
        (merged("weight_averaging"), weight_averaging(pretrained, finetuned, buffers=buffers)),
        (merged("ties_merging"), ties_merging(pretrained, finetuned, scale=0.3, ties_k=0.2, buffers=buffers)),
    ]
    for got, expected in cases:
        assert list(got) == list(pretrained)
        for key in pretrained:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    # Buffers (batch-norm statistics) stay pretrained; weight averaging is 1/3 of the summed task vectors.
    for key in buffers:
        assert torch.equal(cases[0][0][key], pretrained[key])
    key = next(k for k in pretrained if k not in buffers and pretrained[k].is_floating_point())
    plain = pretrained[key] + sum(finetuned[t][key] - pretrained[key] for t in num_classes) / 3
    torch.testing.assert_close(cases[1][0][key], plain, rtol=1e-6, atol=1e-6)


def test_adamerging_plus_plus_and_bf16_task_vectors_through_the_module():
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    reference = Reference(zoo, NUM_CLASSES)
    taus = {t: {k: reference.finetuned[t][k] - reference.theta0[k] for k in reference.names} for t in NUM_CLASSES}

    # AdaMerging++ starts from TIES' trimmed, sign-elected task vectors, not normalised.
    module = make_module(zoo, granularity="task", init=0.3, ties_k=0.2)
    module.configure_model()
    stacked = module.merger.stacked_task_vectors()
    kept = sum(int((v != 0).sum()) for v in stacked.values())
    total = sum(v.numel() for v in stacked.values())
    assert 0 < kept <= 0.2 * total + len(NUM_CLASSES)
    for k, task in enumerate(NUM_CLASSES):
        for name in reference.names:
            entry = stacked[name][k]
            nonzero = entry != 0
            # Kept entries are the task's own values, with the elected (summed) sign.
            assert torch.equal(entry[nonzero], taus[task][name][nonzero])
            assert (torch.sign(entry[nonzero]) == torch.sign(stacked[name].sum(0)[nonzero])).all()
    merged = module.merger.merged_state_dict()
    for name in reference.names:
        expected = reference.theta0[name] + 0.3 * sum(stacked[name][k] for k in range(len(NUM_CLASSES)))
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)

    # bfloat16 storage: the merge uses the rounded task vectors, in fp32.
    module = make_module(zoo, granularity="task", init=0.3, task_vector_dtype="bfloat16")
    module.configure_model()
    stacked = module.merger.stacked_task_vectors()
    assert all(v.dtype == torch.bfloat16 for v in stacked.values())
    merged = module.merger.merged_state_dict()
    for name in reference.names:
        expected = reference.theta0[name] + sum(0.3 * taus[t][name].to(torch.bfloat16).float() for t in NUM_CLASSES)
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 7. callbacks
def test_export_merged_encoder_loads_strictly_and_gives_same_logits(tmp_path):
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    path = tmp_path / "export" / "merged.safetensors"
    module = make_module(zoo, lr=0.05)
    cpu_trainer(tmp_path, max_steps=3, callbacks=[ExportMergedEncoder(str(path))]).fit(
        module, datamodule=MultiTaskDataModule(synthetic_tasks(), batch_size=4)
    )
    assert path.is_file()
    state = load_file(str(path))
    fresh = create_encoder(TINY_CLIP)
    assert type(fresh) is type(module.merger.encoder)
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state, strict=True)
    fresh.eval()

    # Against the plain merge of the trained coefficients.
    reference = Reference(zoo, NUM_CLASSES)
    expected = reference.merge(module.merger.coefficients.raw.detach().clamp(0, 1))
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)

    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for task in NUM_CLASSES:
            torch.testing.assert_close(module.heads[task](fresh(images)), module(images, task), rtol=1e-5, atol=1e-5)


class InfiniteImages(TaskData):
    """A task whose images hold +inf: the merged encoder's features for them, and so its entropy, are not finite."""

    @property
    def num_classes(self) -> int:
        return 3

    def test_set(self, preprocess=None) -> Dataset:
        return TensorDataset(torch.full((8, 3, 32, 32), float("inf")), torch.zeros(8, dtype=torch.long))


def test_non_finite_loss_stops_the_fit_naming_the_task_and_saves_nothing(tmp_path):
    tasks = {"alpha": synthetic_tasks()["alpha"], "beta": InfiniteImages()}
    checkpoints = tmp_path / "ckpt"
    export = tmp_path / "merged.safetensors"
    module = RecordingModule(SyntheticZoo(TINY_CLIP, seed=0), num_classes=NUM_CLASSES)
    trainer = cpu_trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[
        ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=1, save_last=True), ExportMergedEncoder(str(export))])
    not_finite = r"training step 1: the loss is not finite: the entropy of task\(s\) \['beta'\]"
    with pytest.raises(FloatingPointError, match=not_finite):
        trainer.fit(module, datamodule=MultiTaskDataModule(tasks, batch_size=4))
    assert len(module.seen) == 1  # stopped before a second step
    assert not list(checkpoints.glob("*.ckpt")) and not export.exists()


def test_export_refuses_a_non_finite_merged_encoder(tmp_path):
    module = make_module()
    set_coefficients(module)
    with torch.no_grad():
        module.merger.coefficients.raw[1, 4] = float("nan")
    export = tmp_path / "merged.safetensors"
    with pytest.raises(FloatingPointError, match=r"NaN or infinite values in 1 tensor\(s\).*not exported"):
        cpu_trainer(tmp_path, callbacks=[ExportMergedEncoder(str(export))]).test(
            module, datamodule=MultiTaskDataModule(synthetic_tasks()), verbose=False)
    assert not export.exists() and not list(tmp_path.glob(".merged*"))


def test_export_path_that_cannot_be_written_fails_before_training(tmp_path):
    (tmp_path / "some_file.txt").write_text("not a folder")
    cases = {
        str(tmp_path / "some_file.txt" / "deeper" / "merged.safetensors"): "some_file.txt is a file, not a folder",
        str(tmp_path / "folder.pt"): "is a folder",
    }
    (tmp_path / "folder.pt").mkdir()
    for path, message in cases.items():
        module = RecordingModule(SyntheticZoo(TINY_CLIP, seed=0), num_classes=NUM_CLASSES)
        with pytest.raises(ValueError, match=message):
            cpu_trainer(tmp_path, max_steps=2, callbacks=[ExportMergedEncoder(path)]).fit(
                module, datamodule=MultiTaskDataModule(synthetic_tasks(), batch_size=4))
        assert not hasattr(module, "seen")  # no training step ran


def test_export_rejects_unknown_suffix():
    with pytest.raises(ValueError, match="safetensors"):
        ExportMergedEncoder("merged.bin")


def test_coefficient_logger_writes_scalars_and_heatmap(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            raw = pl_module.merger.coefficients.raw.detach()
            expected[trainer.global_step] = raw.clamp(0, 1).mean(dim=1).tolist()

    module = make_module(lr=0.05)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    # log_every_n_steps=1: Lightning writes the step metrics every step (train/loss at 5 steps).
    trainer = cpu_trainer(tmp_path, max_steps=5, logger=logger, log_every_n_steps=1,
                           callbacks=[CoefficientLogger(every_n_steps=2), Probe()])
    trainer.fit(module, datamodule=MultiTaskDataModule(synthetic_tasks(), batch_size=4))  # 3 batches an epoch
    logger.experiment.flush()

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"coefficients/alpha", "coefficients/beta", "train/loss"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == 5
    # One heatmap per training epoch (2 epochs), a PNG image.
    assert "coefficients/heatmap" in tags["images"]
    heatmaps = events.Images("coefficients/heatmap")
    assert [image.step for image in heatmaps] == [3, 5]
    assert heatmaps[-1].encoded_image_string.startswith(b"\x89PNG")
    # Every 2 optimizer steps, the mean coefficient of each task after that step, and nothing else.
    for index, task in enumerate(NUM_CLASSES):
        scalars = events.Scalars(f"coefficients/{task}")
        assert [s.step for s in scalars] == [2, 4]
        for s in scalars:
            assert s.value == pytest.approx(expected[s.step][index], abs=1e-6)
    assert expected[2] != pytest.approx(expected[4], abs=1e-6)


def test_coefficient_logger_rejects_bad_interval():
    with pytest.raises(ValueError, match="every_n_steps"):
        CoefficientLogger(every_n_steps=0)


def test_ddp_syncs_only_the_coefficients(tmp_path):
    # Every process rebuilds the frozen weights from the zoo, so DDP must not broadcast them.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    module = make_module(SyntheticZoo(TINY_CLIP, seed=0))
    module.configure_model()
    names = {name for name, _ in [*module.named_parameters(), *module.named_buffers()]}
    assert set(module._ddp_params_and_buffers_to_ignore) == names - {COEFFICIENTS_KEY}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(module)
        assert wrapped.parameters_to_ignore == names - {COEFFICIENTS_KEY}
        # the only tensor DDP reduces gradients for is the coefficients
        assert [p for p in wrapped.parameters() if p.requires_grad] == [module.merger.coefficients.raw]
    finally:
        dist.destroy_process_group()
