"""Rank-wise AdaMerging: the gated merge against plain references, training, checkpoints, bad input."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from helpers import TINY_CLIP, cpu_trainer, synthetic_tasks
from lit_adamerging import (
    ExportMergedEncoder,
    MultiTaskDataModule,
    RankWiseAdaMergingModule,
    SyntheticZoo,
)
from lit_adamerging.lightning.rank_wise import GATES_KEY
from lit_adamerging.merging import (
    rank_components,
    rank_wise_merging,
    spectral_matrices,
    stack_task_vectors,
    tsv_merging,
)
from lit_adamerging.methods import create_method

NUM_CLASSES = {"alpha": 5, "beta": 3}


# ----------------------------------------------------------------------------- plain references
def naive_svd(task_vector: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One task's matrix (a convolution flattened) as float64 ``U, s, V^T``, by torch.linalg.svd."""
    return torch.linalg.svd(task_vector.reshape(task_vector.shape[0], -1).double(), full_matrices=False)


def naive_merge(theta0, task_vectors, matrices, gates, scale, keep=None):
    """theta0 + scale * (sum_k U_k diag(g_k s_k) V_k^T | sum_k tau_k), one layer and one task at a time.

    ``gates[name]`` is ``[T, K]``; ``keep`` (if given) keeps each task's top ``keep`` components only.
    """
    merged = {}
    for name, stacked in task_vectors.items():
        if name in matrices:
            total = torch.zeros(stacked.shape[1], stacked[0].numel() // stacked.shape[1], dtype=torch.float64)
            for k in range(stacked.shape[0]):
                u, s, vh = naive_svd(stacked[k])
                rank = len(s) if keep is None else keep
                total = total + (u[:, :rank] * (gates[name][k, :rank].double() * s[:rank])) @ vh[:rank]
            update = total.reshape(stacked.shape[1:])
        else:
            update = stacked.double().sum(0)
        merged[name] = theta0[name].double() + scale * update
    return merged


def task_arithmetic(theta0, task_vectors, scale):
    return {name: theta0[name].double() + scale * stacked.double().sum(0) for name, stacked in task_vectors.items()}


def small_model() -> tuple[nn.Module, dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """A linear layer, a convolution and a bias-free linear layer; three fine-tuned copies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(12, 5), nn.Linear(5, 4, bias=False))
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    finetuned = {
        task: {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in theta0.items()}
        for task in ("a", "b", "c")
    }
    return model, theta0, finetuned


def setup_small():
    model, theta0, finetuned = small_model()
    task_vectors = stack_task_vectors(theta0, finetuned)
    matrices = spectral_matrices(model)
    return theta0, task_vectors, matrices


def per_name(components, flat: Tensor) -> dict[str, Tensor]:
    """A flat gate vector as ``{matrix name: [T, K]}``."""
    out = {}
    for names, block in zip(components.names, components.split(flat)):
        for name, gates in zip(names, block.unbind(0)):
            out[name] = gates
    return out


def close(merged, reference, atol=1e-5):
    assert set(merged) >= set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=1e-5, atol=atol, msg=name)


# ----------------------------------------------------------------------------- the merge
def test_every_gate_at_one_is_the_sum_of_the_kept_components():
    theta0, task_vectors, matrices = setup_small()
    assert matrices == ["0.weight", "2.weight", "3.weight"]
    full = rank_components(task_vectors, matrices)
    ones = torch.ones(full.num_gates)
    merged = rank_wise_merging(theta0, task_vectors, full, ones, scale=1.0)
    close(merged, task_arithmetic(theta0, task_vectors, 1.0))  # all components kept: task arithmetic at 1
    # Each task's top component only (rank_fraction small): theta_0 + the sum of the kept components.
    top = rank_components(task_vectors, matrices, rank_fraction=0.01)
    assert top.gate_shapes == [torch.Size([1, 3, 1])] * 3
    gates = {name: torch.ones(3, 5) for name in matrices}
    reference = naive_merge(theta0, task_vectors, matrices, gates, 0.7, keep=1)
    close(rank_wise_merging(theta0, task_vectors, top, torch.ones(top.num_gates), scale=0.7), reference)


@pytest.mark.parametrize("c", [0.0, 0.35, 1.0])
def test_gates_all_at_c_are_task_arithmetic_at_c(c):
    theta0, task_vectors, matrices = setup_small()
    components = rank_components(task_vectors, matrices)
    merged = rank_wise_merging(theta0, task_vectors, components, torch.full((components.num_gates,), c), scale=1.0)
    reference = task_arithmetic(theta0, task_vectors, c)
    close({name: merged[name] for name in matrices}, {name: reference[name] for name in matrices})
    # The other tensors (biases) keep task arithmetic at the scale; with scale c and gates at 1, all is at c.
    close({name: merged[name] for name in ("0.bias", "2.bias")}, task_arithmetic(
        {k: theta0[k] for k in ("0.bias", "2.bias")}, {k: task_vectors[k] for k in ("0.bias", "2.bias")}, 1.0))
    at_scale = rank_wise_merging(theta0, task_vectors, components, torch.ones(components.num_gates), scale=c)
    close(at_scale, reference)


@pytest.mark.parametrize("rank_fraction", [None, 0.5])
def test_tsv_base_with_every_gate_at_one_is_tsv_merging(rank_fraction):
    model, theta0, finetuned = small_model()
    task_vectors = stack_task_vectors(theta0, finetuned)
    matrices = spectral_matrices(model)
    components = rank_components(task_vectors, matrices, rank_fraction, base="tsv")
    merged = rank_wise_merging(theta0, task_vectors, components, torch.ones(components.num_gates), scale=0.8)
    reference = tsv_merging(theta0, finetuned, 0.8, rank_fraction, matrices=matrices)
    close(merged, {name: value.double() for name, value in reference.items()})
    # a gate at 0 drops that decorrelated component: the merge moves by exactly its term
    gates = torch.ones(components.num_gates)
    gates[0] = 0.0
    dropped = rank_wise_merging(theta0, task_vectors, components, gates, scale=0.8)
    name = components.names[0][0]
    u, s, v = components.u[0][0, :, 0], components.s[0][0, 0, 0], components.v[0][0, :, 0]
    term = (0.8 * s * torch.outer(u, v)).reshape(theta0[name].shape)
    torch.testing.assert_close(merged[name] - dropped[name], term, rtol=1e-4, atol=1e-6)


def test_random_gates_match_the_naive_reconstruction():
    theta0, task_vectors, matrices = setup_small()
    components = rank_components(task_vectors, matrices)
    gates = torch.rand(components.num_gates, generator=torch.Generator().manual_seed(3))
    merged = rank_wise_merging(theta0, task_vectors, components, gates, scale=0.3)
    close(merged, naive_merge(theta0, task_vectors, matrices, per_name(components, gates), 0.3))


def test_gate_gradients_match_autograd_through_a_naive_reconstruction():
    model, theta0, finetuned = small_model()
    task_vectors = stack_task_vectors(theta0, finetuned)
    matrices = spectral_matrices(model)
    components = rank_components(task_vectors, matrices)
    start = torch.rand(components.num_gates, generator=torch.Generator().manual_seed(4))
    images = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(5))

    def loss_of(state: dict[str, Tensor]) -> Tensor:
        out = torch.func.functional_call(model, state, (images,))
        return torch.log_softmax(out, -1).exp().pow(2).sum()

    fused = start.clone().requires_grad_(True)
    loss_of({k: v.float() for k, v in rank_wise_merging(theta0, task_vectors, components, fused, 0.3).items()}) \
        .backward()

    reference_gates = {name: gates.clone().double().requires_grad_(True)
                       for name, gates in per_name(components, start).items()}
    reference = naive_merge(theta0, task_vectors, matrices, reference_gates, 0.3)
    double_model = model.double()
    out = torch.func.functional_call(double_model, reference, (images.double(),))
    torch.log_softmax(out, -1).exp().pow(2).sum().backward()
    model.float()
    expected = torch.cat([reference_gates[name].grad.flatten() for names in components.names for name in names])
    # the fused layout is [B, T, K] per chunk: a chunk of one layer is [1, T, K], the reference's order
    assert all(len(names) == 1 for names in components.names)
    torch.testing.assert_close(fused.grad.double(), expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the module




def test_module_merge_at_start_is_task_arithmetic_and_matches_the_functional_core():
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    module = RankWiseAdaMergingModule(zoo, NUM_CLASSES)
    merged = module.merged_state_dict()
    loaded = zoo.load(NUM_CLASSES)
    theta0 = loaded.encoder.state_dict()
    parameters = {name for name, _ in loaded.encoder.named_parameters()}
    task_vectors = stack_task_vectors(
        theta0, {task: {k: v for k, v in loaded.finetuned[task].items() if k in parameters} for task in NUM_CLASSES}
    )
    # init 0.1 with straight-through: every gate is 1, so the merge is task arithmetic at 0.3
    reference = task_arithmetic(theta0, task_vectors, 0.3)
    close(merged, reference, atol=1e-4)
    assert set(module.components.matrices) == set(spectral_matrices(loaded.encoder))


def test_module_over_tsv_components_starts_as_tsv_merging():
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    rank_wise = create_method("rank_wise_adamerging_tsv", zoo, NUM_CLASSES).merged_state_dict()
    reference = create_method("tsv_merging", zoo, NUM_CLASSES).merged_state_dict()
    close(rank_wise, {name: value.double() for name, value in reference.items()}, atol=1e-4)


def test_loss_falls_only_gates_train_and_checkpoint_holds_gates(tmp_path):
    zoo = SyntheticZoo(TINY_CLIP, seed=0)
    data = MultiTaskDataModule(synthetic_tasks(), batch_size=4)
    module = RankWiseAdaMergingModule(zoo, NUM_CLASSES, straight_through=False, init=2.0, temperature=1.0, lr=0.5)
    module.configure_model()
    trainable = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
    assert trainable == [GATES_KEY]
    before = {name: value.detach().clone() for name, value in module.merger.encoder.state_dict().items()}
    data.setup("fit")
    images = {task: torch.cat([batch for _, batch in data.unlabeled_batches(task)]) for task in NUM_CLASSES}

    def loss() -> float:  # the summed mean entropy of the heads, computed plainly
        with torch.no_grad():
            merged = module.merged_tensors()
            total = 0.0
            for task, batch in images.items():
                probabilities = module.heads[task](module.merger(batch, merged)).softmax(-1)
                total += float(-(probabilities * probabilities.log()).sum(-1).mean())
            return total

    start = loss()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = cpu_trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(module, datamodule=data)
    assert loss() < start
    for name, value in module.merger.encoder.state_dict().items():  # the encoder is untouched
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    trained = module.gates.raw.detach().clone()
    assert not torch.allclose(trained, torch.full_like(trained, 2.0))

    path = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(path, weights_only=True, map_location="cpu")
    assert list(state["state_dict"]) == [GATES_KEY]
    assert path.stat().st_size < 200_000
    loaded = RankWiseAdaMergingModule.load_from_checkpoint(path, zoo=zoo, weights_only=True)
    torch.testing.assert_close(loaded.gates.raw.detach(), trained, rtol=0, atol=0)
    probe = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe, "beta"), module(probe, "beta"), rtol=0, atol=0)
    lazy = RankWiseAdaMergingModule(zoo, NUM_CLASSES, straight_through=False, init=2.0, temperature=1.0)
    lazy.load_state_dict(state["state_dict"])
    assert lazy.merger is None
    lazy.configure_model()
    torch.testing.assert_close(lazy.gates.raw.detach(), trained, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"(?s)other settings.*model.straight_through: checkpoint False, yours True"):
        RankWiseAdaMergingModule.load_from_checkpoint(path, zoo=zoo, straight_through=True, weights_only=True)
    smaller = RankWiseAdaMergingModule(zoo, {"alpha": 5}, straight_through=False, init=2.0, temperature=1.0)
    smaller.configure_model()
    with pytest.raises(ValueError, match="the checkpoint's gates have shape"):
        smaller.load_state_dict(state["state_dict"])
    with pytest.raises(KeyError, match=GATES_KEY):
        smaller.load_state_dict({"merger.coefficients.raw": torch.zeros(1)})


def test_straight_through_reads_out_hard_gates_with_sigmoid_gradients():
    module = RankWiseAdaMergingModule(SyntheticZoo(TINY_CLIP, seed=0), NUM_CLASSES, temperature=2.0)
    module.configure_model()
    with torch.no_grad():
        module.gates.raw.copy_(torch.linspace(-3, 3, module.gates.raw.numel()))
    values = module.gate_values()
    assert set(values.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(values, (module.gates.raw > 0).float())
    weights = torch.randn(values.shape, generator=torch.Generator().manual_seed(0))
    (module.gates() * weights).sum().backward()
    sigmoid = torch.sigmoid(module.gates.raw.detach() / 2.0)
    torch.testing.assert_close(module.gates.raw.grad, weights * sigmoid * (1 - sigmoid) / 2.0)


def test_a_non_finite_loss_is_reported_naming_the_task():
    module = RankWiseAdaMergingModule(SyntheticZoo(TINY_CLIP, seed=0), NUM_CLASSES)
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda *args, **kwargs: None
    images = {"alpha": torch.zeros(2, 3, 32, 32), "beta": torch.full((2, 3, 32, 32), float("nan"))}
    module.training_step(images, 0)
    with pytest.raises(FloatingPointError, match=r"entropy of task\(s\) \['beta'\]"):
        module.evaluation_tensors()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"init": float("nan")}, "init must be a finite number"),
    ({"init": "high"}, "init must be a finite number"),
    ({"temperature": 0.0}, "temperature must be a positive number"),
    ({"rank_fraction": 1.5}, "rank_fraction must be in"),
    ({"scale": float("inf")}, "scale must be a finite number"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"base": "iso_cts"}, "base must be one of task_arithmetic, tsv"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankWiseAdaMergingModule(SyntheticZoo(TINY_CLIP, seed=0), NUM_CLASSES, **kwargs)


def test_a_layer_without_a_matrix_shape_is_named():
    theta0, task_vectors, _ = setup_small()
    with pytest.raises(ValueError, match=r"cannot split '2\.bias' into singular components: its shape \(5,\)"):
        rank_components(task_vectors, ["2.weight", "2.bias"])
    empty = {"w": torch.zeros(2, 0, 3)}
    with pytest.raises(ValueError, match=r"cannot split 'w'.*shape \(0, 3\)"):
        rank_components(empty, ["w"])
    with pytest.raises(ValueError, match="no matrices to split"):
        rank_components({"b": task_vectors["2.bias"]})
    components = rank_components(task_vectors, ["2.weight"])
    with pytest.raises(ValueError, match=f"a flat vector of {components.num_gates} gates"):
        rank_wise_merging(theta0, task_vectors, components, torch.ones(3))


def test_resume_is_exact_and_export_writes_the_hard_merge(tmp_path):
    zoo = SyntheticZoo(TINY_CLIP, seed=0)

    def fit(steps: int, folder, ckpt_path=None, callbacks=()) -> RankWiseAdaMergingModule:
        module = RankWiseAdaMergingModule(zoo, NUM_CLASSES, lr=0.05)
        checkpoint = ModelCheckpoint(dirpath=folder, save_last=True)
        trainer = cpu_trainer(folder, max_steps=steps, enable_checkpointing=True, callbacks=[checkpoint, *callbacks])
        trainer.fit(module, datamodule=MultiTaskDataModule(synthetic_tasks(), batch_size=4), ckpt_path=ckpt_path)
        return module

    export = ExportMergedEncoder(str(tmp_path / "merged.safetensors"))
    straight = fit(4, tmp_path / "straight", callbacks=[export])
    fit(2, tmp_path / "first")
    resumed = fit(4, tmp_path / "second", ckpt_path=str(tmp_path / "first" / "last.ckpt"))
    torch.testing.assert_close(resumed.gates.raw.detach(), straight.gates.raw.detach(), rtol=0, atol=0)
    assert not torch.allclose(straight.gates.raw.detach(), torch.full_like(straight.gates.raw, 0.1))  # it learned

    # the export is theta_0 + 0.3 * the components whose logit is above 0, by the plain reference
    gates = (straight.gates.raw.detach() > 0).float()
    written = safetensors.torch.load_file(str(tmp_path / "merged.safetensors"))
    loaded = zoo.load(NUM_CLASSES)
    theta0 = loaded.encoder.state_dict()
    matrices = straight.components.matrices
    task_vectors = straight.merger.stacked_task_vectors()
    reference = naive_merge(theta0, task_vectors, matrices, per_name(straight.components, gates), 0.3)
    close(written, reference, atol=1e-4)
    assert set(written) == set(theta0)
