"""The GPU merge (grouped, compiled kernels reading low-precision task vectors as stored) against float64.

Skipped without CUDA; run on a GPU machine with ``python -m pytest -q tests/test_merge_cuda.py``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

from helpers import TINY_CLIP, TINY_TIMM
from lit_adamerging.merging import MergedEncoder, stack_task_vectors
from lit_adamerging.merging._kernels import row_dots, weighted_sum
from lit_adamerging.models import create_encoder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_group_kernels_match_plain_loops_on_cpu(storage):
    # The functions the GPU path compiles, run eagerly: the same arithmetic.
    generator = torch.Generator().manual_seed(0)
    group = torch.randn(3, 4, 5, generator=generator).to(storage)
    weights = torch.rand(3, 4, generator=generator)
    base = torch.randn(3, 5, generator=generator)
    grads = torch.randn(3, 5, generator=generator)
    expected_sum = torch.stack([base[g] + sum(weights[g, k] * group[g, k].float() for k in range(4)) for g in range(3)])
    expected_dots = torch.tensor([[float(group[g, k].float() @ grads[g]) for k in range(4)] for g in range(3)])
    torch.testing.assert_close(weighted_sum(group, weights, base), expected_sum)
    torch.testing.assert_close(row_dots(group, grads), expected_dots)


@cuda
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_cuda_merge_and_gradient_match_float64_reference(storage, granularity):
    torch.manual_seed(0)
    encoder = create_encoder(TINY_CLIP).cuda()
    pretrained = encoder.state_dict()
    tuned = {
        task: {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v for k, v in pretrained.items()}
        for task in ("a", "b", "c")
    }
    stacked = stack_task_vectors(pretrained, tuned, dtype=storage)
    merger = MergedEncoder(encoder, stacked, granularity=granularity, init=0.3).cuda()
    with torch.no_grad():
        merger.coefficients.raw.uniform_(0.05, 0.95)  # distinct values per task (and tensor)
    merged = merger.merged_tensors()
    grads = {name: torch.randn_like(tensor) for name, tensor in merged.items()}
    torch.autograd.backward([merged[n] for n in grads], [grads[n] for n in grads])

    coefficients = merger.coefficients().detach().double()
    expected_grad = torch.zeros_like(coefficients)
    for column, name in enumerate(merger.tensor_names):
        tau = stacked[name].double()  # the task vectors as stored
        reference = pretrained[name].double() + torch.einsum("k,k...->...", coefficients[:, column], tau)
        torch.testing.assert_close(merged[name].double(), reference, rtol=0, atol=1e-5)
        expected_grad[:, column] = (tau * grads[name].double()).flatten(1).sum(1)
    if granularity == "task":
        expected_grad = expected_grad.sum(1, keepdim=True)
    torch.testing.assert_close(merger.coefficients.raw.grad.double(), expected_grad, rtol=1e-4, atol=1e-4)


def _pair_of_mergers(name: str, storage: torch.dtype, granularity: str) -> tuple[MergedEncoder, MergedEncoder]:
    """The same MergedEncoder twice on the GPU: CUDA graphs on, and off (eager)."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = create_encoder(name)
    pretrained = encoder.state_dict()
    buffers = {key for key, _ in encoder.named_buffers()}
    tuned = {
        task: {
            k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in pretrained.items()
        }
        for task in ("a", "b", "c")
    }
    stacked = stack_task_vectors(pretrained, tuned, buffers=buffers, buffer_policy="merge", dtype=storage)
    graphed = MergedEncoder(encoder, stacked, granularity=granularity, init=0.3)
    eager = copy.deepcopy(graphed)
    eager.cuda_graphs = False
    return graphed.cuda(), eager.cuda()


@cuda
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize(
    ("name", "storage", "granularity"),
    [
        (TINY_CLIP, torch.float32, "layer"),
        (TINY_CLIP, torch.bfloat16, "task"),
        (TINY_CLIP, torch.bfloat16, "layer"),
        (TINY_TIMM, torch.float32, "layer"),  # batch norm, merged buffers
    ],
)
def test_cuda_graph_steps_match_eager_steps(name, storage, granularity, autocast):
    graphed, eager = _pair_of_mergers(name, storage, granularity)
    generator = torch.Generator(device="cuda").manual_seed(1)
    addresses = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compare_steps(graphed, eager, generator, autocast, addresses)
    (graph,) = graphed._graphs.captured.values()
    if graph is None:  # the encoder could not be captured: it said so and ran eagerly (still exact, above)
        print(f"{name} {storage} {granularity} {autocast}: not captured: {[str(w.message) for w in caught]}")
        assert any("could not be captured" in str(w.message) for w in caught)
    else:
        assert len(addresses) == 1  # captured once, then replayed
    assert not eager._graphs.captured


def _compare_steps(graphed, eager, generator, autocast, addresses):
    for _ in range(3):  # new images and new coefficients every step, as in training
        raw = torch.rand(graphed.coefficients.raw.shape, device="cuda", generator=generator)
        images = torch.randn(6, 3, 32, 32, device="cuda", generator=generator)
        results = []
        for merger in (graphed, eager):
            with torch.no_grad():
                merger.coefficients.raw.copy_(raw)
            merger.coefficients.raw.grad = None
            with torch.autocast("cuda", dtype=autocast or torch.float32, enabled=autocast is not None):
                features = merger(images)
            weights = torch.linspace(-1, 1, features.numel(), device="cuda").view_as(features)
            (features.float() * weights).sum().backward()
            results.append((features.detach().float().clone(), merger.coefficients.raw.grad.clone()))
            if merger is graphed:
                addresses.add(features.data_ptr())
        (graph_features, graph_grad), (eager_features, eager_grad) = results
        tolerance = 1e-5 if autocast is None else 2e-2
        torch.testing.assert_close(
            graph_features, eager_features, rtol=tolerance, atol=tolerance * eager_features.abs().max()
        )
        torch.testing.assert_close(graph_grad, eager_grad, rtol=tolerance, atol=tolerance * eager_grad.abs().max())


class _Synchronising(torch.nn.Module):
    """An encoder that reads a value back to the host mid-forward: no CUDA graph can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return y * 2 if y.abs().max().item() > 1e9 else y


@cuda
def test_encoder_that_cannot_be_captured_runs_eagerly_after_a_warning():
    encoder = _Synchronising()
    tuned = {t: {k: v + 0.1 * (i + 1) for k, v in encoder.state_dict().items()} for i, t in enumerate(("a", "b"))}
    stacked = stack_task_vectors(encoder.state_dict(), tuned)
    graphed = MergedEncoder(encoder, stacked, init=0.3).cuda()
    eager = copy.deepcopy(graphed)
    eager.cuda_graphs = False
    x = torch.randn(5, 4, device="cuda")
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph"):
        graphed(x).sum().backward()
    for _ in range(2):  # later steps: eager, no new attempt, no warning, exact
        graphed.coefficients.raw.grad = eager.coefficients.raw.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            features = graphed(x)
        features.pow(2).sum().backward()
        eager(x).pow(2).sum().backward()
        torch.testing.assert_close(graphed.coefficients.raw.grad, eager.coefficients.raw.grad)
    assert list(graphed._graphs.captured.values()) == [None]


@cuda
def test_cuda_graph_second_forward_before_backward_stays_exact():
    graphed, eager = _pair_of_mergers(TINY_CLIP, torch.float32, "layer")
    generator = torch.Generator(device="cuda").manual_seed(2)
    first, second = (torch.randn(4, 3, 32, 32, device="cuda", generator=generator) for _ in range(2))
    graphed(first).sum().backward()  # captured
    grads = []
    for merger in (graphed, eager):
        merger.coefficients.raw.grad = None
        second_capture = (
            pytest.warns(UserWarning, match="before the first one's backward") if merger is graphed
            else contextlib.nullcontext()
        )
        with second_capture:
            loss = merger(first).pow(2).sum() + merger(second).sum()
        loss.backward()
        grads.append(merger.coefficients.raw.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    graphed.coefficients.raw.grad = None
    graphed(second).sum().backward()  # the graph is used again once the backward ran
    assert graphed._graphs.awaiting_backward == set()


@cuda
def test_moving_the_encoder_drops_its_graphs_and_keeps_one_copy_of_the_weights():
    graphed, _ = _pair_of_mergers(TINY_CLIP, torch.float32, "task")
    graphed(torch.randn(2, 3, 32, 32, device="cuda")).sum().backward()
    assert graphed._graphs.captured
    graphed.cpu()
    assert not graphed._graphs.captured
    block = graphed.pretrained.get_buffer("0")
    name = graphed.group_names[0][0]
    assert graphed.encoder.state_dict(keep_vars=True)[name].data_ptr() == block[0].data_ptr()


@cuda
def test_gpu_fit_with_graphs_takes_the_eager_fit_steps():
    import lightning.pytorch as pl

    from lit_adamerging import AdaMergingModule, MultiTaskDataModule, SyntheticTask, SyntheticZoo

    class Gradients(pl.Callback):
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.seen.append(pl_module.merger.coefficients.raw.grad.detach().cpu().clone())

    runs = []
    for graphs in (True, False):
        data = MultiTaskDataModule(
            {"a": SyntheticTask(num_classes=5), "b": SyntheticTask(num_classes=3, seed=1)}, batch_size=4, cache="memory"
        )
        module = AdaMergingModule(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes)
        module.configure_model()
        module.merger.cuda_graphs = graphs
        gradients = Gradients()
        trainer = pl.Trainer(
            max_steps=3, accelerator="gpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[gradients],
        )
        trainer.fit(module, data)
        raw = module.merger.coefficients.raw.detach().cpu()
        runs.append((gradients.seen, raw, list(module.merger._graphs.captured.values())))
    (graph_grads, graph_raw, graphs_made), (eager_grads, eager_raw, eager_graphs) = runs
    assert len(graphs_made) == 1 and graphs_made[0] is not None and eager_graphs == []  # captured inside the Trainer
    assert len(graph_grads) == len(eager_grads) == 3
    # The first step starts from the same coefficients: the same gradient. Adam turns a near-zero gradient
    # into a full step of either sign, so later steps start from coefficients up to 2 * lr apart.
    torch.testing.assert_close(graph_grads[0], eager_grads[0], rtol=1e-5, atol=1e-5 * eager_grads[0].abs().max())
    for graph_grad, eager_grad in zip(graph_grads[1:], eager_grads[1:]):
        torch.testing.assert_close(graph_grad, eager_grad, rtol=5e-2, atol=5e-2 * eager_grad.abs().max())
    assert (graph_raw - eager_raw).abs().max() <= 3 * 2 * 1e-3 + 1e-6
