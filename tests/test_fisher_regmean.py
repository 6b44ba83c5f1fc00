"""Fisher merging and RegMean: the pure-torch cores against naive references, and the LightningModules.

Cores: the Fisher's per-example squared gradients equal a loop with one backward per example and
the same sampled labels; the Fisher merge equals its elementwise formula (the plain average when
the Fishers are equal); RegMean on a linear layer, a convolution (normal, grouped, depthwise,
padded) and self-attention equals the least-squares solution of the stacked regressions written
with torch.linalg.lstsq on unfolded patches / the attention output recomputed by hand; alpha
shrinks as specified. Modules: ``trainer.test`` evaluates and exports exactly the merge the cores
give on the zoo's fine-tuned weights and the tasks' images; every seen task is read once, unseen
tasks never; two processes give the merge of one; bad input is named.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset, TensorDataset

from helpers import TINY_CLIP, TINY_CONFIG
from lit_adamerging import ExportMergedEncoder, MultiTaskDataModule, SyntheticTask, SyntheticZoo, TaskData
from lit_adamerging.cli import AdaMergingCLI
from lit_adamerging.lightning.base import intended_warnings_ignored
from lit_adamerging.lightning.statistics import FisherMergingModule, RegMeanModule
from lit_adamerging.merging.fisher import fisher_merge, fisher_sums, sample_labels
from lit_adamerging.merging.regmean import GramRecorder, regmean_layers, regmean_merge, shrink_off_diagonal
from lit_adamerging.models import create_encoder


# ----------------------------------------------------------------------------- naive references
def naive_label(logits: Tensor, uniform: float) -> int:
    """The first class whose cumulative probability exceeds ``uniform`` (the last one if none does)."""
    total = 0.0
    probabilities = torch.softmax(logits.double(), dim=-1).tolist()
    for label, probability in enumerate(probabilities):
        total += probability
        if total > uniform:
            return label
    return len(probabilities) - 1


def naive_fisher_sums(encoder, head, params, images, uniforms, fixed=None):
    """One forward and one backward per image: sum of squared gradients of log p(sampled label | image)."""
    sums = {name: torch.zeros_like(value) for name, value in params.items()}
    labels = []
    for image, uniform in zip(images, uniforms.tolist()):
        leaves = {name: value.detach().clone().requires_grad_(True) for name, value in params.items()}
        logits = head(functional_call(encoder, {**leaves, **(fixed or {})}, (image[None],)))[0]
        label = naive_label(logits.detach(), uniform)
        labels.append(label)
        log_probability = torch.log_softmax(logits, dim=-1)[label]
        gradients = torch.autograd.grad(log_probability, list(leaves.values()), allow_unused=True)
        for name, gradient in zip(leaves, gradients):
            if gradient is not None:
                sums[name] += gradient**2
    return sums, labels


def naive_fisher_merge(models, fishers, floor, normalize):
    """theta* = sum_k c_k (F_k + floor) theta_k / sum_k c_k (F_k + floor), c_k = 1 / (||F_k|| + floor) or 1."""
    scales = []
    for fisher in fishers:
        squared = sum(float((value.double() ** 2).sum()) for value in fisher.values())
        scales.append(1.0 / (math.sqrt(squared) + floor) if normalize else 1.0)
    merged = {}
    for name in fishers[0]:
        numerator = sum(c * (f[name] + floor) * m[name] for c, f, m in zip(scales, fishers, models))
        denominator = sum(c * (f[name] + floor) for c, f in zip(scales, fishers))
        merged[name] = numerator / denominator
    return merged


def lstsq_merge(inputs: list[Tensor], weights: list[Tensor]) -> Tensor:
    """argmin_W sum_k ||X_k W^T - X_k W_k^T||^2 / rows_k: lstsq on the stacked, row-count-scaled regressions."""
    x = torch.cat([xk.double() / math.sqrt(xk.shape[0]) for xk in inputs])
    y = torch.cat([xk.double() @ wk.double().T / math.sqrt(xk.shape[0]) for xk, wk in zip(inputs, weights)])
    return torch.linalg.lstsq(x, y).solution.T


def recorded_grams(module: nn.Module, weight_sets: list[dict[str, Tensor]], inputs: list, names=None):
    """Per-row mean Grams of each model ``k`` (``module`` run with ``weight_sets[k]`` on ``inputs[k]``)."""
    layers = regmean_layers(module, names)
    grams = []
    for weights, x in zip(weight_sets, inputs):
        with GramRecorder(module, layers) as recorder, torch.no_grad():
            functional_call(module, weights, x if isinstance(x, tuple) else (x,))
        grams.append({name: recorder.grams[name] / recorder.rows[name] for name in layers})
    return grams


def perturbed(module: nn.Module, count: int, seed: int = 0) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {name: value.detach() + 0.3 * torch.randn(value.shape, generator=generator) for name, value in
         module.named_parameters()}
        for _ in range(count)
    ]


# ----------------------------------------------------------------------------- Fisher core
class SmallNet(nn.Module):
    """A conv, batch norm (running statistics: buffers, not differentiated) and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize("which", ["small", "vit"])
def test_fisher_sums_equal_a_per_example_loop_with_the_same_sampled_labels(which):
    torch.manual_seed(0)
    if which == "small":
        encoder, images = SmallNet().eval(), torch.randn(7, 3, 6, 6)
        fixed = {"norm.running_mean": torch.randn(4) * 0.1, "norm.running_var": torch.rand(4) + 0.5}
    else:
        encoder, images, fixed = create_encoder(TINY_CLIP).eval(), torch.randn(5, 3, 32, 32), None
    width = encoder(images[:1]).shape[-1]
    head = nn.Linear(width, 6).eval()
    params = {name: value.detach() + 0.01 * torch.randn_like(value) for name, value in encoder.named_parameters()}
    uniforms = torch.rand(images.shape[0])
    sums, labels = fisher_sums(encoder, head, params, images, uniforms, fixed=fixed, chunk_size=3)
    expected, expected_labels = naive_fisher_sums(encoder, head, params, images, uniforms, fixed)
    assert labels.tolist() == expected_labels
    assert set(sums) == set(expected)
    for name in expected:
        torch.testing.assert_close(sums[name], expected[name], rtol=1e-4, atol=1e-9, msg=name)
    assert any(float(value.abs().sum()) > 0 for value in sums.values())


def test_sampled_labels_follow_the_predictive_distribution():
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0])
    uniforms = torch.rand(40_000, generator=torch.Generator().manual_seed(1))
    labels = sample_labels(logits.expand(40_000, 4), uniforms)
    frequencies = torch.bincount(labels, minlength=4).double() / 40_000
    torch.testing.assert_close(frequencies, torch.softmax(logits.double(), 0), atol=0.01, rtol=0)
    assert [naive_label(logits, u) for u in uniforms[:200].tolist()] == labels[:200].tolist()
    # A uniform at or above the rounded cumulative sum still gives a class (the last).
    assert sample_labels(torch.zeros(3), torch.tensor(0.99999999)).item() == 2


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("floor", [1e-6, 0.5])
def test_fisher_merge_equals_the_elementwise_formula(normalize, floor):
    generator = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (4,)}
    models = [{name: torch.randn(shape, generator=generator) for name, shape in shapes.items()} for _ in range(3)]
    fishers = [
        {name: torch.rand(shape, generator=generator) ** 3 * (k + 1) for name, shape in shapes.items()}
        for k in range(3)
    ]
    fishers[1]["b"][0] = 0.0  # an entry only the floor weighs
    merged = fisher_merge(models, fishers, floor=floor, normalize=normalize)
    expected = naive_fisher_merge(models, fishers, floor, normalize)
    for name in shapes:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-7)


def test_fisher_merge_with_equal_fishers_is_the_plain_average():
    generator = torch.Generator().manual_seed(2)
    models = [{"w": torch.randn(5, 2, generator=generator)} for _ in range(4)]
    fisher = {"w": torch.rand(5, 2, generator=generator)}
    merged = fisher_merge(models, [fisher] * 4)
    torch.testing.assert_close(merged["w"], torch.stack([m["w"] for m in models]).mean(0), rtol=1e-6, atol=1e-6)


def test_fisher_merge_bad_input_is_named():
    with pytest.raises(ValueError, match="2 models but 1 Fishers"):
        fisher_merge([{"w": torch.ones(1)}] * 2, [{"w": torch.ones(1)}])
    with pytest.raises(ValueError, match="other tensors"):
        fisher_merge([{"w": torch.ones(1), "v": torch.ones(1)}] * 2, [{"w": torch.ones(1)}, {"v": torch.ones(1)}])
    with pytest.raises(ValueError, match="negative, NaN or infinite"):
        fisher_merge([{"w": torch.ones(1)}], [{"w": torch.tensor([float("nan")])}])
    with pytest.raises(ValueError, match="Fisher 0 in every model"):
        fisher_merge([{"w": torch.ones(2)}] * 2, [{"w": torch.tensor([1.0, 0.0])}] * 2, floor=0.0)


# ----------------------------------------------------------------------------- RegMean core
def test_regmean_on_a_linear_layer_is_the_least_squares_solution_of_the_stacked_regressions():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    weights = perturbed(layer, 3)
    # Different row counts: per-row mean Grams weigh every model the same (rows scaled by 1/sqrt(rows_k)).
    inputs = [torch.randn(rows, 5) @ torch.randn(5, 5) for rows in (20, 35, 50)]
    merged = regmean_merge(weights, recorded_grams(layer, weights, inputs), alpha=1.0)
    assert set(merged) == {"weight"}  # the bias is the caller's: averaged
    expected = lstsq_merge(inputs, [w["weight"] for w in weights])
    torch.testing.assert_close(merged["weight"].double(), expected, rtol=1e-5, atol=1e-6)
    # With equal row counts this is the paper's plain stacking of the regressions.
    same = [x[:20] for x in inputs]
    merged = regmean_merge(weights, recorded_grams(layer, weights, same), alpha=1.0)
    stacked = torch.linalg.lstsq(
        torch.cat(same).double(), torch.cat([x.double() @ w["weight"].double().T for x, w in zip(same, weights)])
    ).solution.T
    torch.testing.assert_close(merged["weight"].double(), stacked, rtol=1e-5, atol=1e-6)


def unfolded(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``[n * positions, in_channels * kh * kw]`` patches, padded by hand as the layer pads."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        if conv.padding == "same":
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            pad = [total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2]
        elif conv.padding == "valid":
            pad = [0, 0, 0, 0]
        else:
            pad = [conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]]
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4),  # depthwise
        nn.Conv2d(3, 5, (2, 3), stride=(1, 2)),
    ],
    ids=["normal", "grouped-reflect", "depthwise-same", "rectangular"],
)
def test_regmean_conv2d_equals_the_unfold_regression_per_group(conv):
    torch.manual_seed(1)
    weights = perturbed(conv, 3)
    inputs = [torch.randn(n, conv.in_channels, 9, 9) for n in (3, 4, 5)]
    grams = recorded_grams(conv, weights, inputs)
    assert grams[0]["weight"].shape == (conv.groups, conv.weight[0].numel(), conv.weight[0].numel())
    merged = regmean_merge(weights, grams, alpha=1.0)["weight"]
    assert merged.shape == conv.weight.shape
    per_group, width = conv.out_channels // conv.groups, conv.weight[0].numel()
    with torch.no_grad():
        out = functional_call(conv, weights[0], (inputs[0],)).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    for g in range(conv.groups):
        patches = [unfolded(conv, x)[:, g * width:(g + 1) * width] for x in inputs]
        tuned = [w["weight"][g * per_group:(g + 1) * per_group].reshape(per_group, -1) for w in weights]
        # The by-hand patches reproduce the convolution's output channels of this group.
        bias = weights[0]["bias"][g * per_group:(g + 1) * per_group]
        torch.testing.assert_close(
            patches[0] @ tuned[0].T + bias, out[:, g * per_group:(g + 1) * per_group], rtol=1e-4, atol=1e-5
        )
        expected = lstsq_merge(patches, tuned)
        got = merged[g * per_group:(g + 1) * per_group].reshape(per_group, -1)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "conv",
    [
        *(nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=mode) for mode in ("reflect", "circular", "replicate")),
        nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(1, 2), padding_mode="reflect"),  # uneven 'same'
        nn.Conv2d(3, 4, 3, padding="valid", padding_mode="circular"),
    ],
    ids=["reflect", "circular", "replicate", "same-reflect", "valid-circular"],
)
def test_conv_padding_modes_record_the_grams_of_the_padded_patches(conv):
    # The layer's padding, read from its public ``padding``: the patches reproduce its output.
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(3))
    with GramRecorder(conv, regmean_layers(conv)) as recorder, torch.no_grad():
        out = conv(x).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    patches = unfolded(conv, x)
    with torch.no_grad():
        torch.testing.assert_close(patches @ conv.weight.reshape(conv.out_channels, -1).T + conv.bias, out)
    assert float(recorder.rows["weight"]) == patches.shape[0]
    torch.testing.assert_close(recorder.grams["weight"][0], patches.double().T @ patches.double(), rtol=1e-5, atol=1e-4)


def test_a_conv_padding_string_the_layer_does_not_know_is_refused():
    conv = nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")
    conv.padding = "full"
    with GramRecorder(conv, regmean_layers(conv)), pytest.raises(ValueError, match="padding 'full' is neither"):
        conv(torch.randn(1, 3, 5, 5))


def attention_by_hand(weights: dict[str, Tensor], x: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """(input of out_proj, output) of self-attention on ``x [L, N, E]``, written out."""
    length, batch, embed = x.shape
    qkv = x @ weights["in_proj_weight"].T + weights["in_proj_bias"]
    q, k, v = qkv.split(embed, dim=-1)

    def split(t: Tensor) -> Tensor:  # [N * heads, L, head_dim]
        return t.reshape(length, batch * heads, embed // heads).transpose(0, 1)

    scores = split(q) @ split(k).transpose(1, 2) / math.sqrt(embed // heads)
    context = (torch.softmax(scores, dim=-1) @ split(v)).transpose(0, 1).reshape(length, batch, embed)
    return context, context @ weights["out_proj.weight"].T + weights["out_proj.bias"]


@pytest.mark.parametrize("batch_first", [True, False])
def test_regmean_self_attention_in_projection_and_out_projection_equal_their_regressions(batch_first):
    torch.manual_seed(2)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    weights = perturbed(attention, 3)
    inputs = [torch.randn(6, n, 8) for n in (2, 3, 4)]  # [L, N, E]
    given = [x.transpose(0, 1) if batch_first else x for x in inputs]
    grams = recorded_grams(attention, weights, [(x, x, x) for x in given])
    assert set(grams[0]) == {"in_proj_weight", "out_proj.weight"}
    merged = regmean_merge(weights, grams, alpha=1.0)
    rows = [x.reshape(-1, 8) for x in inputs]
    torch.testing.assert_close(
        merged["in_proj_weight"].double(), lstsq_merge(rows, [w["in_proj_weight"] for w in weights]),
        rtol=1e-4, atol=1e-5,
    )
    contexts = []
    for w, x, call in zip(weights, inputs, given):
        context, output = attention_by_hand(w, x, heads=2)
        with torch.no_grad():
            module_output = functional_call(attention, w, (call, call, call), {"need_weights": False})[0]
        if batch_first:
            module_output = module_output.transpose(0, 1)
        torch.testing.assert_close(output, module_output, rtol=1e-4, atol=1e-5)  # the by-hand attention is right
        contexts.append(context.reshape(-1, 8))
    torch.testing.assert_close(
        merged["out_proj.weight"].double(), lstsq_merge(contexts, [w["out_proj.weight"] for w in weights]),
        rtol=1e-4, atol=1e-5,
    )


def test_alpha_scales_the_off_diagonal_entries():
    generator = torch.Generator().manual_seed(3)
    gram = torch.randn(2, 4, 4, generator=generator)
    shrunk = shrink_off_diagonal(gram, 0.3)
    for g in range(2):
        for i in range(4):
            for j in range(4):
                assert shrunk[g, i, j].item() == pytest.approx(gram[g, i, j].item() * (1.0 if i == j else 0.3))
    layer = nn.Linear(4, 2)
    weights = perturbed(layer, 3)
    grams = recorded_grams(layer, weights, [torch.randn(n, 4, generator=generator) for n in (10, 12, 14)])
    for alpha in (0.0, 0.6):
        merged = regmean_merge(weights, grams, alpha=alpha)["weight"].double()
        total = sum(shrink_off_diagonal(g["weight"][0].double(), alpha) for g in grams)
        rhs = sum(shrink_off_diagonal(g["weight"][0].double(), alpha) @ w["weight"].double().T
                  for g, w in zip(grams, weights))
        torch.testing.assert_close(merged, (torch.linalg.inv(total) @ rhs).T, rtol=1e-6, atol=1e-8)
    # alpha = 0: every input feature's column is the average of the models' columns weighted by that feature's energy.
    merged = regmean_merge(weights, grams, alpha=0.0)["weight"].double()
    energy = torch.stack([g["weight"][0].diagonal().double() for g in grams])  # [models, in]
    columns = torch.stack([w["weight"].double() for w in weights])  # [models, out, in]
    torch.testing.assert_close(merged, (energy[:, None, :] * columns).sum(0) / energy.sum(0), rtol=1e-6, atol=1e-8)


def test_an_input_feature_no_row_reaches_is_averaged():
    layer = nn.Linear(3, 2)
    weights = perturbed(layer, 2)
    inputs = [torch.randn(8, 3) * torch.tensor([1.0, 0.0, 1.0]) for _ in range(2)]
    merged = regmean_merge(weights, recorded_grams(layer, weights, inputs), alpha=1.0)["weight"]
    torch.testing.assert_close(merged[:, 1], (weights[0]["weight"][:, 1] + weights[1]["weight"][:, 1]) / 2)
    expected = lstsq_merge([x[:, [0, 2]] for x in inputs], [w["weight"][:, [0, 2]] for w in weights])
    torch.testing.assert_close(merged[:, [0, 2]].double(), expected, rtol=1e-5, atol=1e-6)


def test_regmean_layers_of_the_tiny_vit_and_what_it_cannot_merge():
    encoder = create_encoder(TINY_CLIP)
    layers = regmean_layers(encoder)
    assert layers == {
        "conv1.weight": "conv2d",
        **{
            f"transformer.resblocks.{i}.{name}": kind
            for i in range(2)
            for name, kind in (("attn.in_proj_weight", "attention_in"), ("attn.out_proj.weight", "attention_out"),
                               ("mlp.c_fc.weight", "linear"), ("mlp.c_proj.weight", "linear"))
        },
    }
    assert regmean_layers(encoder, ["transformer.resblocks.0.attn.out_proj"]) == {
        "transformer.resblocks.0.attn.out_proj.weight": "attention_out"
    }
    with pytest.raises(ValueError, match=r"'ln_pre' of type LayerNorm: it supports nn\.Linear, nn\.Conv2d"):
        regmean_layers(encoder, ["ln_pre"])
    with pytest.raises(ValueError, match="no module 'blocks.9'"):
        regmean_layers(encoder, ["blocks.9"])
    with pytest.raises(ValueError, match="a list of module names"):
        regmean_layers(encoder, "conv1")

    class PaddingConv(nn.Conv2d):  # pads in its own forward: its input is not what the weight sees
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    with pytest.raises(ValueError, match="type PaddingConv"):
        regmean_layers(nn.Sequential(PaddingConv(3, 3, 3)), ["0"])
    assert regmean_layers(nn.Sequential(PaddingConv(3, 3, 3))) == {}  # found automatically: averaged


def test_cross_attention_is_refused_naming_the_module():
    attention = nn.MultiheadAttention(4, 1)
    query, memory = torch.randn(3, 2, 4), torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match=r"attention '' \(MultiheadAttention\).*cross-attention"):
        with GramRecorder(attention, regmean_layers(attention)), torch.no_grad():
            attention(query, memory, memory)
    assert not attention._forward_hooks  # the hooks are gone after the error


def test_gram_recorder_removes_its_hooks_and_sums_in_float64():
    layer = nn.Linear(3, 2)
    with GramRecorder(layer, regmean_layers(layer)) as recorder, torch.no_grad():
        assert layer._forward_hooks
        layer(torch.ones(4, 3))
        layer(torch.ones(2, 5, 3))
    assert not layer._forward_hooks
    assert recorder.grams["weight"].dtype == torch.float64
    assert float(recorder.rows["weight"]) == 14
    torch.testing.assert_close(recorder.grams["weight"][0], torch.full((3, 3), 14.0, dtype=torch.float64))


# ----------------------------------------------------------------------------- the modules
class CountingDataModule(MultiTaskDataModule):
    """Records every image each ``unlabeled_batches`` pass yields, per task."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.passes: dict[str, list[int]] = {}

    def unlabeled_batches(self, task, device="cpu"):
        self.passes.setdefault(task, [])
        for positions, images in super().unlabeled_batches(task, device):
            self.passes[task].extend(positions.tolist())
            yield positions, images


def tiny_tasks() -> dict[str, SyntheticTask]:
    return {
        "a": SyntheticTask(num_classes=5, num_images=12, image_size=32, seed=1),
        "b": SyntheticTask(num_classes=3, num_images=8, image_size=32, seed=2),
        "c": SyntheticTask(num_classes=4, num_images=6, image_size=32, seed=3),
    }


def run_test(module_class, tmp_path: Path, unseen=("c",), **settings):
    tasks = tiny_tasks()
    data = CountingDataModule(tasks, unseen_tasks=list(unseen), eval_batch_size=5, cache="none")
    model = module_class(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes, unseen_tasks=list(unseen), **settings)
    export = tmp_path / "merged.safetensors"
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ExportMergedEncoder(str(export))],
    )
    with intended_warnings_ignored():
        results = trainer.test(model, datamodule=data, verbose=False)
    return model, data, trainer, results, load_file(export)


def reference(seen: list[str], merge_tensors) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The merged encoder ``merge_tensors(loaded, theta0)`` gives (other tensors: theta0 + mean tau), its accuracies."""
    tasks = tiny_tasks()
    loaded = SyntheticZoo(TINY_CLIP).load({name: task.num_classes for name, task in tasks.items()})
    theta0 = loaded.encoder.state_dict()
    finetuned = [loaded.finetuned[task] for task in seen]
    merged = {name: sum(state[name] for state in finetuned) / len(finetuned) for name in theta0}
    merged.update(merge_tensors(loaded, finetuned))
    encoder = copy.deepcopy(loaded.encoder).eval()
    encoder.load_state_dict(merged)
    accuracies = {}
    with torch.no_grad():
        for name, task in tasks.items():
            images, labels = task.test_set().tensors
            accuracies[name] = (loaded.heads[name](encoder(images)).argmax(-1) == labels).float().mean().item()
    return merged, accuracies


def assert_matches(results, exported, merged, accuracies):
    for name, value in merged.items():
        torch.testing.assert_close(exported[name], value.float(), rtol=1e-4, atol=1e-6, msg=name)
    assert set(exported) == set(merged)
    logged = {key: value for loader in results for key, value in loader.items()}
    for name, value in accuracies.items():
        assert logged[f"test/acc/{name}"] == pytest.approx(value, abs=1e-6)


def test_fisher_module_tests_and_exports_the_core_merge(tmp_path):
    model, data, _, results, exported = run_test(FisherMergingModule, tmp_path, num_images=None, chunk_size=7)
    seen = ["a", "b"]

    def fisher(loaded, finetuned):
        fishers = []
        parameters = {name for name, _ in loaded.encoder.named_parameters()}
        for task, state in zip(seen, finetuned):
            images = tiny_tasks()[task].test_set().tensors[0]
            uniforms = torch.rand(images.shape[0], generator=model.task_generator(task, "labels"))
            params = {name: state[name] for name in parameters}
            sums, _ = fisher_sums(loaded.encoder.eval(), loaded.heads[task], params, images, uniforms)
            fishers.append({name: value / images.shape[0] for name, value in sums.items()})
        return fisher_merge([{n: s[n] for n in parameters} for s in finetuned], fishers)

    merged, accuracies = reference(seen, fisher)
    assert_matches(results, exported, merged, accuracies)
    assert data.passes == {"a": list(range(12)), "b": list(range(8))}  # one pass each; the unseen task never read


def test_regmean_module_tests_and_exports_the_core_merge_on_a_subset(tmp_path):
    model, data, _, results, exported = run_test(RegMeanModule, tmp_path, num_images=7, alpha=0.8)
    seen = ["a", "b"]
    chosen = {task: model.chosen_images(task, tiny_tasks()[task].num_images) for task in seen}
    assert [int(mask.sum()) for mask in chosen.values()] == [7, 7]
    assert model.images_read == {"a": 7, "b": 7}

    def regmean(loaded, finetuned):
        encoder = loaded.encoder.eval()
        inputs = [tiny_tasks()[task].test_set().tensors[0][chosen[task]] for task in seen]
        grams = recorded_grams(encoder, finetuned, inputs)
        return regmean_merge(finetuned, grams, alpha=0.8)

    merged, accuracies = reference(seen, regmean)
    assert_matches(results, exported, merged, accuracies)
    assert data.passes == {"a": list(range(12)), "b": list(range(8))}


def test_statistics_are_computed_once_per_module_across_evaluations(tmp_path):
    model, data, trainer, results, _ = run_test(RegMeanModule, tmp_path, num_images=4)
    first = model.evaluation_tensors()
    with intended_warnings_ignored():
        again = trainer.validate(model, datamodule=data, verbose=False)
    assert data.passes == {"a": list(range(12)), "b": list(range(8))}  # not read again
    assert model.evaluation_tensors() is first
    assert again[0]["val/acc/a"] == results[0]["test/acc/a"]


def test_chosen_images_are_a_seeded_subset():
    model = RegMeanModule(SyntheticZoo(TINY_CLIP), num_classes={"a": 2, "b": 2}, num_images=5, seed=3)
    first = model.chosen_images("a", 12)
    assert first.dtype == torch.bool and int(first.sum()) == 5
    assert torch.equal(first, model.chosen_images("a", 12))
    assert not torch.equal(first, model.chosen_images("b", 12))  # each task its own draw
    assert not torch.equal(first, RegMeanModule(SyntheticZoo(TINY_CLIP), {"a": 2, "b": 2}, num_images=5,
                                                seed=4).chosen_images("a", 12))
    assert bool(model.chosen_images("a", 4).all())  # fewer images than asked for: all of them


def test_fit_is_refused_saying_to_run_test():
    data = MultiTaskDataModule(tiny_tasks(), cache="none")
    for module_class in (FisherMergingModule, RegMeanModule):
        model = module_class(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes)
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                             enable_checkpointing=False)
        with pytest.raises(ValueError, match=f"{module_class.__name__} learns nothing, so there is nothing to fit"):
            trainer.fit(model, datamodule=data)


def quiet_trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


class EmptyTask(TaskData):
    @property
    def num_classes(self) -> int:
        return 2

    def test_set(self, preprocess=None) -> Dataset:
        return TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))


class NoImagesFor(MultiTaskDataModule):
    """A data module that reads no unlabeled images of ``empty`` (its statistics split is empty)."""

    def __init__(self, *args, empty: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.empty = empty

    def unlabeled_batches(self, task, device="cpu"):
        if task != self.empty:
            yield from super().unlabeled_batches(task, device)


def test_a_task_without_unlabeled_images_is_named():
    tasks = {"a": SyntheticTask(num_classes=2, num_images=4, image_size=32), "empty": EmptyTask()}
    data = MultiTaskDataModule(tasks, cache="none")
    model = FisherMergingModule(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes)
    with pytest.raises(ValueError, match="task 'empty'.*empty"):
        quiet_trainer().test(model, datamodule=data, verbose=False)
    for module_class in (FisherMergingModule, RegMeanModule):
        data = NoImagesFor(tiny_tasks(), empty="b", cache="none")
        model = module_class(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes, num_images=2)
        trainer = quiet_trainer()
        with pytest.raises(ValueError, match="task 'b' has no unlabeled images.*unseen"):
            trainer.test(model, datamodule=data, verbose=False)


def test_regmean_module_names_a_layer_it_cannot_merge():
    data = MultiTaskDataModule(tiny_tasks(), cache="none")
    model = RegMeanModule(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes, modules=["conv1", "ln_post"])
    with pytest.raises(ValueError, match="'ln_post' of type LayerNorm"):
        quiet_trainer().test(model, datamodule=data, verbose=False)


def test_settings_are_checked():
    zoo = SyntheticZoo(TINY_CLIP)
    with pytest.raises(ValueError, match="alpha must be in"):
        RegMeanModule(zoo, {"a": 2}, alpha=1.5)
    with pytest.raises(ValueError, match="num_images must be positive"):
        FisherMergingModule(zoo, {"a": 2}, num_images=0)
    with pytest.raises(ValueError, match="chunk_size"):
        FisherMergingModule(zoo, {"a": 2}, chunk_size=0)
    assert {"num_images", "alpha", "modules", "seed"} <= set(RegMeanModule.CHECKPOINT_SETTINGS)
    assert {"num_images", "floor", "normalize", "seed"} <= set(FisherMergingModule.CHECKPOINT_SETTINGS)


@pytest.mark.parametrize(
    ("module_class", "method", "setting"),
    [(FisherMergingModule, "fisher_merging", "--model.floor=0.001"), (RegMeanModule, "regmean", "--model.alpha=0.6")],
)
def test_the_command_runs_them_with_their_settings(tmp_path, monkeypatch, module_class, method, setting):
    monkeypatch.chdir(tmp_path)
    with intended_warnings_ignored():
        cli = AdaMergingCLI(
            args=["test", "--config", str(TINY_CONFIG), "--method", method, "--model.num_images=16", setting]
        )
    model = cli.model
    assert type(model) is module_class and model.hparams.num_images == 16
    assert model.hparams[setting.split(".")[1].split("=")[0]] == float(setting.split("=")[1])
    assert model.images_read == {"alpha": 16, "beta": 16, "gamma": 16}
    exported = load_file(tmp_path / "runs/tiny/merged_encoder.safetensors")
    for name, value in model.merged_state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has nothing to learn: it runs with `lit-adamerging test`"), \
            intended_warnings_ignored():
        AdaMergingCLI(args=["fit", "--config", str(TINY_CONFIG), "--method", method])


# A standalone script (run in a fresh interpreter): its first line names the tiny model.
DDP_SCRIPT = f"TINY_CLIP = {TINY_CLIP!r}\n" + textwrap.dedent(
    """
    import sys, torch, lightning.pytorch as pl
    from lit_adamerging import MultiTaskDataModule, SyntheticTask, SyntheticZoo
    from lit_adamerging.lightning.statistics import FisherMergingModule, RegMeanModule


    def run(devices, out):
        tasks = {
            "a": SyntheticTask(num_classes=5, num_images=13, image_size=32, seed=1),
            "b": SyntheticTask(num_classes=3, num_images=9, image_size=32, seed=2),
            "c": SyntheticTask(num_classes=4, num_images=6, image_size=32, seed=3),
        }
        merged = {}
        for cls in (FisherMergingModule, RegMeanModule):
            data = MultiTaskDataModule(tasks, unseen_tasks=["c"], eval_batch_size=4, cache="none")
            model = cls(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes, unseen_tasks=["c"],
                        num_images=11)
            trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                                 logger=False, enable_progress_bar=False, enable_model_summary=False)
            results = trainer.test(model, datamodule=data, verbose=False)
            read = torch.tensor([model.images_read["a"], model.images_read["b"]])
            merged[cls.__name__] = {"state": model.merged_state_dict(), "results": results, "read": read}
        torch.save(merged, f"{out}.{trainer.global_rank}.pt")


    if __name__ == "__main__":
        run(int(sys.argv[1]), sys.argv[2])
    """
)


@pytest.mark.slow  # DDP on two processes
def test_two_processes_give_the_merge_of_one(tmp_path):
    script = tmp_path / "statistics_ddp.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), "2", str(tmp_path / "two")], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    namespace: dict = {}
    exec(compile(DDP_SCRIPT, str(script), "exec"), namespace)  # the same code in this process, on one device
    with intended_warnings_ignored():
        namespace["run"](1, str(tmp_path / "one"))
    one = torch.load(tmp_path / "one.0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"two.{rank}.pt", weights_only=True) for rank in (0, 1)]
    for method, single in one.items():
        for rank in ranks:  # every process holds the same merge, the one a single process computes
            for name, value in single["state"].items():
                torch.testing.assert_close(rank[method]["state"][name], value, rtol=1e-5, atol=1e-7, msg=name)
            assert rank[method]["results"] == single["results"]
        # Each image read by exactly one process: the shares add up to the single process's count.
        assert torch.equal(ranks[0][method]["read"] + ranks[1][method]["read"], single["read"])
        assert single["read"].tolist() == [11, 9]
