"""EMR-Merging: the merge against the paper's equations written out here, the module on the tiny zoo (per-task
weights in forward and in a Trainer's test), the export file and its loader, bad input, the method by name."""

from __future__ import annotations

import copy
import json
import math
import shutil
import struct
from collections.abc import Mapping

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from helpers import REPOSITORY, TINY_CLIP, TINY_CONFIG, load_config, printed_metric, run_cli
from lit_adamerging import EMRMergingModule, ExportMergedEncoder, MultiTaskDataModule, SyntheticTask, SyntheticZoo
from lit_adamerging.merging import (
    EMRFileError,
    EMRMerge,
    TaskVectorError,
    emr_elect,
    emr_merging,
    emr_storage,
    load_emr,
    pack_masks,
    save_emr,
    stack_task_vectors,
    unpack_mask,
)
from lit_adamerging.methods import create_method, method_of

NUM_CLASSES = {"alpha": 5, "beta": 3, "gamma": 4}
SHAPES = {"w": (3, 5), "b": (5,), "conv": (2, 2, 3)}


# ----------------------------------------------------------------------------- the paper, written out
def loop_reference(theta0: Mapping[str, Tensor], finetuned: Mapping[str, Mapping[str, Tensor]], names: list[str],
                   per_tensor_means: bool = False) -> tuple[dict, dict, list[float]]:
    """Elect, mask, rescale entry by entry with Python numbers: ``(unified, {task: masks}, rescalers)``.

    tau_k = theta_k - theta_0; gamma = sgn(sum_k tau_k); eps = max over k with tau_k * gamma > 0 of |tau_k|;
    tau_uni = gamma * eps; M_k = (tau_k * tau_uni > 0); lambda_k = sum |tau_k| / sum |M_k * tau_uni|, both sums over
    every entry of every tensor (or, ``per_tensor_means``, sums over tensors of each tensor's mean).
    """
    tasks = list(finetuned)
    tau = {t: {n: (finetuned[t][n].double() - theta0[n].double()).flatten().tolist() for n in names} for t in tasks}
    unified, masks = {}, {t: {} for t in tasks}
    own, share = dict.fromkeys(tasks, 0.0), dict.fromkeys(tasks, 0.0)
    for n in names:
        entries = len(tau[tasks[0]][n])
        uni = []
        for i in range(entries):
            total = sum(tau[t][n][i] for t in tasks)
            sign = (total > 0) - (total < 0)
            agreeing = [abs(tau[t][n][i]) for t in tasks if tau[t][n][i] * sign > 0]
            uni.append(sign * max(agreeing, default=0.0))
        unified[n] = torch.tensor(uni, dtype=torch.float64).reshape(theta0[n].shape)
        for t in tasks:
            mask = [tau[t][n][i] * uni[i] > 0 for i in range(entries)]
            masks[t][n] = torch.tensor(mask).reshape(theta0[n].shape)
            scale = 1.0 / entries if per_tensor_means else 1.0
            own[t] += scale * sum(abs(v) for v in tau[t][n])
            share[t] += scale * sum(abs(u) for u, m in zip(uni, mask) if m)
    rescalers = [own[t] / share[t] if share[t] > 0 else 1.0 for t in tasks]
    return unified, masks, rescalers


def flat_reference(theta0: Mapping[str, Tensor], finetuned: Mapping[str, Mapping[str, Tensor]],
                   names: list[str]) -> dict[str, dict[str, Tensor]]:
    """Each task's weights theta_0 + lambda_k * M_k * tau_uni, the whole model as one flat vector (plain torch)."""
    tasks = list(finetuned)
    tau = torch.stack([torch.cat([(finetuned[t][n].double() - theta0[n].double()).flatten() for n in names])
                       for t in tasks])
    sign = torch.sign(tau.sum(0))
    unified = sign * (tau.abs() * (tau * sign > 0)).amax(0)
    masks = tau * unified > 0
    rescalers = tau.abs().sum(1) / (masks * unified).abs().sum(1)
    weights = {}
    for k, t in enumerate(tasks):
        flat = rescalers[k] * masks[k] * unified
        pieces = flat.split([theta0[n].numel() for n in names])
        weights[t] = dict(theta0)
        for n, piece in zip(names, pieces):
            weights[t][n] = (theta0[n].double() + piece.reshape(theta0[n].shape)).to(theta0[n].dtype)
    return weights


def random_state(seed: int, tasks: int = 3) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    theta0 = {n: torch.randn(shape, generator=generator) for n, shape in SHAPES.items()}
    theta0["count"] = torch.tensor([7])  # an integer tensor: never merged
    finetuned = {
        f"t{k}": {n: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + k
                  for n, v in theta0.items()}
        for k in range(tasks)
    }
    return theta0, finetuned


def plain_model(reference: EMRMergingModule, weights: Mapping[str, Tensor]) -> torch.nn.Module:
    encoder = copy.deepcopy(reference.merger.encoder)
    encoder.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
    return encoder.eval()


# ----------------------------------------------------------------------------- the merge
def test_merge_follows_the_papers_equations():
    theta0, finetuned = random_state(0)
    names = list(SHAPES)
    unified, masks, rescalers = loop_reference(theta0, finetuned, names)
    merged = emr_merging(theta0, finetuned)
    assert merged.tasks == ("t0", "t1", "t2") and list(merged.unified) == names  # the integer tensor takes no part
    for n in names:
        torch.testing.assert_close(merged.unified[n].double(), unified[n], rtol=0, atol=1e-7)
        tau = torch.stack([finetuned[t][n] - theta0[n] for t in finetuned])
        # the sign is the summed task vectors'; the magnitude the largest among the tasks that agree with it
        assert torch.equal(torch.sign(merged.unified[n]), torch.sign(tau.sum(0)))
        agreeing = tau * torch.sign(tau.sum(0)) > 0
        assert torch.equal(merged.unified[n].abs(), torch.where(agreeing, tau.abs(), 0).amax(0))
        for t in finetuned:
            assert torch.equal(merged.mask(t)[n], masks[t][n])
    torch.testing.assert_close(merged.rescalers.double(), torch.tensor(rescalers, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    assert all(0 < value < 1 for value in rescalers)  # three tasks: the elected magnitudes overshoot each one
    reference = flat_reference(theta0, finetuned, names)
    for k, t in enumerate(finetuned):
        weights = merged.task_state_dict(theta0, t)
        assert list(weights) == list(theta0) and torch.equal(weights["count"], theta0["count"])
        for n in names:
            expected = theta0[n].double() + rescalers[k] * masks[t][n] * unified[n]
            torch.testing.assert_close(weights[n].double(), expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(weights[n], reference[t][n], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(merged.task_vector(k)[n].double(), expected - theta0[n].double(), rtol=1e-6,
                                       atol=1e-6)
    # The same from stacked task vectors.
    stacked = emr_elect(stack_task_vectors(theta0, finetuned), list(finetuned))
    assert torch.equal(stacked.rescalers, merged.rescalers)
    assert all(torch.equal(stacked.packed_masks[n], merged.packed_masks[n]) for n in names)


def test_rescaler_as_the_released_code_sums_it():
    theta0, finetuned = random_state(1)
    _, _, rescalers = loop_reference(theta0, finetuned, list(SHAPES), per_tensor_means=True)
    merged = emr_merging(theta0, finetuned, rescaler_sum="tensor_means")
    torch.testing.assert_close(merged.rescalers.double(), torch.tensor(rescalers, dtype=torch.float64), rtol=1e-6,
                               atol=0)
    assert not torch.allclose(merged.rescalers, emr_merging(theta0, finetuned).rescalers, rtol=1e-4)
    with pytest.raises(ValueError, match="rescaler_sum must be one of"):
        emr_merging(theta0, finetuned, rescaler_sum="layers")


def test_one_task_is_its_finetuned_model():
    theta0, finetuned = random_state(2, tasks=1)
    merged = emr_merging(theta0, finetuned)
    assert merged.rescalers.tolist() == [1.0]
    weights = merged.task_state_dict(theta0, "t0")
    for n in SHAPES:
        tau = finetuned["t0"][n] - theta0[n]
        assert torch.equal(merged.unified[n], tau) and torch.equal(merged.mask(0)[n], tau != 0)
        assert torch.equal(weights[n], theta0[n] + tau)  # exactly theta_0 + tau_k ...
        torch.testing.assert_close(weights[n], finetuned["t0"][n], rtol=0, atol=1e-6)  # ... the model to rounding


def test_identical_task_vectors_give_every_task_that_vector():
    theta0, finetuned = random_state(3, tasks=1)
    same = {t: finetuned["t0"] for t in ("a", "b", "c", "d")}
    merged = emr_merging(theta0, same)
    assert merged.rescalers.tolist() == [1.0] * 4
    for t in same:
        weights = merged.task_state_dict(theta0, t)
        for n in SHAPES:
            assert torch.equal(weights[n], theta0[n] + (finetuned["t0"][n] - theta0[n]))


def test_zeros_and_sign_ties_are_defined():
    # entries: all zero | +1/-1 tie (sum exactly 0) | one task zero, the other positive | opposite, unequal
    tau = torch.tensor([[0.0, 1.0, 0.0, 2.0],
                        [0.0, -1.0, 3.0, -0.5]])
    merged = emr_elect({"v": tau}, ["a", "b"])
    assert merged.unified["v"].tolist() == [0.0, 0.0, 3.0, 2.0]  # sgn(0) = 0: a tie elects nothing
    assert merged.mask("a")["v"].tolist() == [False, False, False, True]
    assert merged.mask("b")["v"].tolist() == [False, False, True, False]
    assert merged.rescalers.tolist() == pytest.approx([3.0 / 2.0, 4.5 / 3.0])
    # A zero task vector, and one that agrees with the unified vector nowhere: nothing to rescale, lambda = 1.
    merged = emr_elect({"v": torch.tensor([[0.0, 0.0], [1.0, -2.0], [3.0, -4.0]])}, ["zero", "small", "big"])
    assert merged.rescalers.tolist() == [1.0, pytest.approx(3.0 / 7.0), 1.0]
    merged = emr_elect({"v": torch.tensor([[-1.0], [3.0]])}, ["outvoted", "big"])
    assert merged.rescalers.tolist() == [1.0, 1.0] and merged.mask("outvoted")["v"].tolist() == [False]
    theta0 = {"v": torch.tensor([5.0])}
    assert merged.task_state_dict(theta0, "outvoted")["v"].tolist() == [5.0]
    assert merged.task_state_dict(theta0, "big")["v"].tolist() == [8.0]


def test_non_floating_tensors_take_no_part():
    theta0, finetuned = random_state(4)
    merged = emr_merging(theta0, finetuned)
    assert "count" not in merged.unified
    assert torch.equal(merged.task_state_dict(theta0, "t2")["count"], theta0["count"])  # not t2's 9
    with pytest.raises(ValueError, match=r"task vectors of 'count' are torch\.int64; EMR-Merging merges floating"):
        emr_elect({"count": torch.tensor([[1], [2]])})
    with pytest.raises(ValueError, match="same T >= 1 tasks"):
        emr_elect({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="2 task names"):
        emr_elect({"a": torch.zeros(3, 3)}, ["x", "y"])


def test_buffers_follow_the_buffer_policy():
    theta0, finetuned = random_state(5)
    buffered = {t: {**state, "b": state["b"] + 1.0} for t, state in finetuned.items()}
    kept = emr_merging(theta0, buffered, buffers={"b"})
    assert "b" not in kept.unified and torch.equal(kept.task_state_dict(theta0, "t0")["b"], theta0["b"])
    merged = emr_merging(theta0, buffered, buffers={"b"}, buffer_policy="merge")
    assert "b" in merged.unified
    with pytest.raises(TaskVectorError, match="buffer 'b' differs"):
        emr_merging(theta0, buffered, buffers={"b"}, buffer_policy="require_equal")


@pytest.mark.parametrize("shape", [(1,), (8,), (9,), (3, 7), (2, 3, 5), ()])
def test_packed_masks_round_trip_as_numpy_packbits(shape):
    generator = torch.Generator().manual_seed(math.prod(shape))
    masks = torch.rand((4, *shape), generator=generator) > 0.5
    packed = pack_masks(masks)
    assert packed.dtype == torch.uint8 and packed.shape == (4, -(-math.prod(shape) // 8))
    for row in range(4):
        assert np.array_equal(packed[row].numpy(), np.packbits(masks[row].flatten().numpy()))
        assert torch.equal(unpack_mask(packed[row], shape), masks[row])
    with pytest.raises(ValueError, match="packed mask of"):
        unpack_mask(packed[0, :0], (9, 9))


def test_storage_counts_bits_and_scalars():
    storage = emr_storage({"w": (768, 768), "b": (768,)}, num_tasks=8)
    entries = 768 * 768 + 768
    assert storage.unified == 4 * entries and storage.rescalers == 32
    assert storage.masks == 8 * (768 * 768 // 8 + 768 // 8)
    assert storage.task_models == 8 * 4 * entries and storage.total == storage.unified + storage.masks + 32
    assert storage.ratio == pytest.approx((4 + 1) / 32, rel=1e-3)  # one vector + 8 bits/entry against 8 vectors
    theta0, finetuned = random_state(6)
    assert emr_merging(theta0, finetuned).storage() == emr_storage(SHAPES, num_tasks=3)


# ----------------------------------------------------------------------------- the module
@pytest.fixture(scope="module")
def zoo_reference() -> tuple[SyntheticZoo, dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    loaded = zoo.load(NUM_CLASSES)
    theta0 = {k: v.detach().clone() for k, v in loaded.encoder.state_dict().items()}
    parameters = {name for name, _ in loaded.encoder.named_parameters()}
    names = [k for k, v in theta0.items() if k in parameters and v.is_floating_point()]
    finetuned = {task: dict(loaded.finetuned[task]) for task in NUM_CLASSES}
    return zoo, flat_reference(theta0, finetuned, names), loaded.heads


@pytest.fixture(scope="module")
def module(zoo_reference) -> EMRMergingModule:
    built = create_method("emr_merging", zoo_reference[0], NUM_CLASSES)
    assert type(built) is EMRMergingModule and method_of(built) == "emr_merging" and not built.LEARNS
    built.configure_model()
    return built.eval()


def test_each_task_is_evaluated_with_its_own_weights(module, zoo_reference):
    _, weights, heads = zoo_reference
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for task in NUM_CLASSES:
            expected = heads[task](plain_model(module, weights[task])(images))
            torch.testing.assert_close(module(images, task), expected, rtol=1e-5, atol=1e-5)
            state = module.task_state_dict(task)
            assert list(state) == list(weights[task])
            for key in state:
                torch.testing.assert_close(state[key], weights[task][key], rtol=1e-5, atol=1e-6, msg=key)
        alpha_with_beta_weights = heads["alpha"](plain_model(module, weights["beta"])(images))
        assert not torch.allclose(module(images, "alpha"), alpha_with_beta_weights, atol=1e-3)


def test_merged_encoder_and_unseen_tasks_are_refused(module, zoo_reference):
    with pytest.raises(ValueError, match="EMR-Merging has no single merged encoder.*task_state_dict"):
        module.merged_state_dict()
    with pytest.raises(KeyError, match=r"task 'delta' is not one of the EMR-merged tasks \['alpha', 'beta', 'gamma'\]"):
        module.task_state_dict("delta")
    with pytest.raises(ValueError, match=r"cannot evaluate the unseen task\(s\) \['gamma'\].*has none"):
        EMRMergingModule(zoo_reference[0], NUM_CLASSES, unseen_tasks=["gamma"])
    with pytest.raises(ValueError, match="rescaler_sum must be one of"):
        EMRMergingModule(zoo_reference[0], NUM_CLASSES, rescaler_sum="layer")
    with pytest.raises(ValueError, match="export path 'emr.pt'.*ending in .safetensors"):
        ExportMergedEncoder("emr.pt").setup(None, module, "test")


class ReshapedZoo(SyntheticZoo):
    """beta's fine-tuned model has one linear layer narrower than the pretrained one."""

    def _finetuned(self, encoder: torch.nn.Module, task: str) -> dict[str, Tensor]:
        state = super()._finetuned(encoder, task)
        if task == "beta":
            key = next(k for k, v in state.items() if v.dim() == 2)
            state[key] = state[key][:, :-1].clone()
        return state


def test_a_zoo_whose_layer_shapes_differ_is_refused():
    module = EMRMergingModule(ReshapedZoo(TINY_CLIP, seed=0), NUM_CLASSES)
    with pytest.raises(TaskVectorError, match=r"task 'beta', key '.*': shape \(\d+, \d+\) differs from the pretrained"):
        module.configure_model()
    theta0, finetuned = random_state(7)
    merged = emr_merging(theta0, finetuned)
    with pytest.raises(ValueError, match=r"pretrained tensor 'w' has shape \(5, 3\) but the EMR merge's has \(3, 5\)"):
        merged.task_state_dict({**theta0, "w": theta0["w"].T}, "t0")
    with pytest.raises(KeyError, match="lacks 'b'"):
        merged.task_state_dict({k: v for k, v in theta0.items() if k != "b"}, "t0")


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[str, Tensor, Tensor]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches.append((outputs["task"], batch[0].clone(), outputs["logits"].clone()))


def test_trainer_test_and_export_round_trip(module, zoo_reference, tmp_path, monkeypatch):
    _, weights, heads = zoo_reference
    tasks = {task: SyntheticTask(num_classes=n, num_images=10, image_size=32, seed=i + 1)
             for i, (task, n) in enumerate(NUM_CLASSES.items())}
    data = MultiTaskDataModule(tasks, batch_size=4, eval_batch_size=4, cache="none")
    computed: list[str] = []
    task_tensors = EMRMerge.task_tensors

    def counted(self, pretrained, task):
        computed.append(task)
        return task_tensors(self, pretrained, task)

    monkeypatch.setattr(EMRMerge, "task_tensors", counted)
    recorder, path = Recorder(), tmp_path / "emr.safetensors"
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[recorder, ExportMergedEncoder(str(path))])
    results = {key: value for loader in trainer.test(module, datamodule=data, verbose=False) for key, value in
               loader.items()}
    assert computed == list(NUM_CLASSES)  # once per task: three batches each, the task's weights made once
    assert [task for task, _, _ in recorder.batches] == [t for t in NUM_CLASSES for _ in range(3)]
    assert set(results) >= {f"test/acc/{t}" for t in NUM_CLASSES}
    with torch.no_grad():
        for task, images, logits in recorder.batches:
            expected = heads[task](plain_model(module, weights[task])(images))
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    # The export: the unified vector, the packed masks and the rescalers; task k's encoder rebuilt from it
    # (and the pretrained weights) gives the evaluated logits exactly.
    monkeypatch.undo()
    loaded = load_emr(path)
    merge = module.emr_merge()
    assert loaded.tasks == tuple(NUM_CLASSES) and torch.equal(loaded.rescalers, merge.rescalers)
    assert all(torch.equal(loaded.unified[n], merge.unified[n]) for n in merge.unified)
    assert all(torch.equal(loaded.packed_masks[n], merge.packed_masks[n]) for n in merge.unified)
    theta0 = zoo_reference[0].load(NUM_CLASSES).encoder.state_dict()
    with torch.no_grad():
        for task, images, logits in recorder.batches:
            rebuilt = plain_model(module, loaded.task_state_dict(theta0, task))
            assert torch.equal(heads[task](rebuilt(images)), logits)
    assert path.stat().st_size < sum(v.numel() * v.element_size() for v in merge.unified.values()) * 1.3


def test_fit_is_refused(module, tmp_path):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, max_epochs=1,
                         default_root_dir=str(tmp_path))
    tasks = {task: SyntheticTask(num_classes=n, num_images=4, image_size=32) for task, n in NUM_CLASSES.items()}
    with pytest.raises(ValueError, match="EMRMergingModule learns nothing"):
        trainer.fit(module, datamodule=MultiTaskDataModule(tasks, batch_size=2, cache="none"))


# ----------------------------------------------------------------------------- the export file
def _rewrite(source, target, edit) -> None:
    """``source``'s safetensors file written to ``target`` after ``edit(tensors, metadata)``."""
    from safetensors import safe_open

    with safe_open(str(source), "pt") as handle:
        metadata, tensors = dict(handle.metadata()), {key: handle.get_tensor(key) for key in list(handle.keys())}
    edit(tensors, metadata)
    save_file(tensors, str(target), metadata=metadata)


def test_bad_export_files_are_named_with_what_is_wrong(tmp_path):
    theta0, finetuned = random_state(8)
    merged = emr_merging(theta0, finetuned)
    good = save_emr(merged, tmp_path / "good.safetensors")
    assert load_emr(good).task_state_dict(theta0, "t1")["w"].equal(merged.task_state_dict(theta0, "t1")["w"])
    with pytest.raises(ValueError, match="ending in .safetensors"):
        save_emr(merged, tmp_path / "emr.pt")

    def set_field(key, value):
        return lambda tensors, metadata: metadata.__setitem__(key, value)

    def set_padding(tensors, metadata):
        tensors["mask.b"][:, -1] |= 1  # b has 5 entries: the last byte's 3 low bits are padding

    def widen(tensors, metadata):
        tensors["mask.w"] = torch.zeros(3, 3, dtype=torch.uint8)

    def drop(tensors, metadata):
        del tensors["unified.conv"]

    def nan(tensors, metadata):
        tensors["rescalers"][1] = float("nan")

    cases = {
        "tasks": (set_field("tasks", "[t0, t1"), "metadata's 'tasks' is missing or not JSON"),
        "duplicate": (set_field("tasks", json.dumps(["t0", "t0", "t1"])), "non-empty list of distinct names"),
        "format": (set_field("format", "something else"), "not an EMR-Merging export"),
        "version": (set_field("version", "9"), "export version '9'"),
        "rescaler_sum": (set_field("rescaler_sum", "layers"), "'rescaler_sum' is 'layers'"),
        "padding": (set_padding, r"'mask\.b' has bits set past its 5 entries"),
        "mask_shape": (widen, r"'mask\.w' must be uint8 \[3, 2\]"),
        "missing": (drop, r"missing \['unified\.conv'\]"),
        "rescalers": (nan, "'rescalers' must be 3 positive finite float32 values"),
    }
    for name, (edit, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        _rewrite(good, bad, edit)
        with pytest.raises(EMRFileError, match=f"{bad}: .*{message}"):
            load_emr(bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(EMRFileError, match=f"{truncated}: not a readable safetensors file"):
        load_emr(truncated)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(EMRFileError, match="header is missing or garbled"):
        load_emr(garbled)
    plain = tmp_path / "encoder.safetensors"
    save_file({"w": theta0["w"]}, str(plain))
    with pytest.raises(EMRFileError, match="not an EMR-Merging export.*ExportMergedEncoder writes one"):
        load_emr(plain)
    with pytest.raises(ValueError, match="is a folder"):
        load_emr(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_emr(tmp_path / "absent.safetensors")


# ----------------------------------------------------------------------------- by name, on the command line
@pytest.mark.slow  # runs the command in another process (about 10 s)
def test_the_command_tests_emr_merging_and_exports_it(tmp_path):
    shutil.copy(TINY_CONFIG, tmp_path / "tiny.yaml")
    result = run_cli(tmp_path, "test", "--config", "tiny.yaml", "--method", "emr_merging")
    assert result.returncode == 0, result.stderr[-4000:]
    output = result.stdout + result.stderr

    config = load_config()
    zoo = SyntheticZoo(**config["model"]["zoo"]["init_args"])
    tasks = {name: SyntheticTask(**spec["init_args"]) for name, spec in config["data"]["tasks"].items()}
    loaded = zoo.load({name: task.num_classes for name, task in tasks.items()})
    theta0 = loaded.encoder.state_dict()
    parameters = {name for name, _ in loaded.encoder.named_parameters()}
    names = [k for k, v in theta0.items() if k in parameters and v.is_floating_point()]
    weights = flat_reference(theta0, {t: dict(loaded.finetuned[t]) for t in tasks}, names)
    exported = load_emr(tmp_path / "runs" / "tiny" / "merged_encoder.safetensors")
    assert exported.tasks == tuple(tasks)
    accuracies = {}
    with torch.no_grad():
        for task, data in tasks.items():
            images, labels = data.test_set().tensors
            encoder = copy.deepcopy(loaded.encoder)
            encoder.load_state_dict(weights[task])
            accuracies[task] = (loaded.heads[task](encoder.eval()(images)).argmax(-1) == labels).float().mean().item()
            rebuilt = copy.deepcopy(loaded.encoder)
            rebuilt.load_state_dict(exported.task_state_dict(theta0, task))
            for key, value in rebuilt.state_dict().items():
                torch.testing.assert_close(value, weights[task][key], rtol=1e-5, atol=1e-6)
    for task, value in accuracies.items():
        assert printed_metric(output, f"test/acc/{task}") == pytest.approx(value, abs=1e-4)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()  # nothing was fitted


@pytest.mark.slow  # builds CLIP ViT-B/32's image encoder (random weights, about 6 s)
def test_the_docs_storage_figures_are_vit_b32s():
    from lit_adamerging.models import create_encoder

    encoder = create_encoder("open_clip:ViT-B-32")
    shapes = {name: tuple(p.shape) for name, p in encoder.named_parameters()}
    assert (len(shapes), sum(math.prod(shape) for shape in shapes.values())) == (152, 87_849_216)
    storage = emr_storage(shapes, num_tasks=8)
    text = (REPOSITORY / "docs" / "emr_merging.md").read_text(encoding="utf-8")
    for value in (storage.unified, storage.masks, storage.total, storage.task_models):
        assert f"{value:,}" in text
