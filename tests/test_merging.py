"""Tests of the merging core (lit_adamerging.merging) against plain, loop-based references."""

from __future__ import annotations

import collections
import copy
import math
import re

import pytest
import torch
from torch import Tensor

from helpers import TINY_CLIP, TINY_TIMM
from lit_adamerging.merging import (
    MergedEncoder,
    MergingCoefficients,
    StackedTaskVectors,
    TaskVectorError,
    _autograd,
    _kernels,
    entropy,
    group_task_vectors,
    merge,
    stack_task_vectors,
    task_arithmetic,
    ties_merging,
    ties_task_vectors,
    weight_averaging,
)
from lit_adamerging.models import create_encoder

# ----------------------------------------------------------------------------------------------
# Plain references
# ----------------------------------------------------------------------------------------------


def naive_merge(
    pretrained: dict[str, Tensor], finetuned: dict[str, dict[str, Tensor]], keys: list[str], lam: Tensor
) -> dict[str, Tensor]:
    """theta_p = theta0_p + sum_k lam[k, p] * (theta_k,p - theta0_p), a Python loop over tasks."""
    merged = {}
    for p, key in enumerate(keys):
        value = pretrained[key].detach().clone()
        for k, task in enumerate(finetuned):
            value = value + lam[k, p] * (finetuned[task][key] - pretrained[key])
        merged[key] = value
    return merged


def naive_ties(vectors: dict[str, Tensor], k: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """TIES on ``{name: [T, *shape]}`` with Python loops; returns (disjoint vectors, per-entry counts).

    trim: per task, keep the int(n * k) entries of largest magnitude among ALL its entries (every tensor);
    elect: per entry sign(sum over tasks); zero sums take sign(sum of all elected signs);
    disjoint: keep a task's trimmed entry only if its sign equals the elected one.
    """
    names = list(vectors)
    num_tasks = vectors[names[0]].shape[0]
    flat = {name: vectors[name].reshape(num_tasks, -1).double() for name in names}
    trimmed = {name: torch.zeros_like(flat[name]) for name in names}
    for t in range(num_tasks):
        entries = [(abs(flat[name][t, i].item()), name, i) for name in names for i in range(flat[name].shape[1])]
        entries.sort(key=lambda entry: -entry[0])
        for _, name, i in entries[: int(len(entries) * k)]:
            trimmed[name][t, i] = flat[name][t, i]
    signs = {name: [math.copysign(1.0, s) if s != 0 else 0.0 for s in trimmed[name].sum(0).tolist()] for name in names}
    total = sum(sum(values) for values in signs.values())
    majority = (total > 0) - (total < 0)
    disjoint, counts = {}, {}
    for name in names:
        kept = torch.zeros_like(trimmed[name])
        count = torch.zeros(trimmed[name].shape[1], dtype=torch.float64)
        for i, sign in enumerate(signs[name]):
            elected = sign if sign != 0 else majority
            for t in range(num_tasks):
                value = trimmed[name][t, i].item()
                if (value > 0 and elected > 0) or (value < 0 and elected < 0):
                    kept[t, i] = value
                    count[i] += 1
        shape = vectors[name].shape
        disjoint[name] = kept.reshape(shape)
        counts[name] = count.reshape(shape[1:])
    return disjoint, counts


def float_keys(state: dict[str, Tensor]) -> list[str]:
    return [key for key, value in state.items() if value.is_floating_point()]


def buffer_names(encoder: torch.nn.Module) -> set[str]:
    return {name for name, _ in encoder.named_buffers()}


def images(seed: int = 0, n: int = 2) -> Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# 1. stack_task_vectors
# ----------------------------------------------------------------------------------------------


def test_stack_values_and_key_order(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_CLIP, tasks=("c", "a", "b"))
    pretrained = encoder.state_dict()
    stacked = stack_task_vectors(pretrained, finetuned)
    assert list(stacked) == list(pretrained)  # all of the ViT's tensors are float parameters
    for key, value in stacked.items():
        assert value.shape == (3, *pretrained[key].shape)
        assert value.dtype == torch.float32
        for k, task in enumerate(("c", "a", "b")):  # rows follow the order of `finetuned`
            assert torch.equal(value[k], finetuned[task][key] - pretrained[key])
        assert value.abs().sum() > 0


def test_stack_reads_each_state_dict_once_and_keeps_none(make_tiny_zoo, one_at_a_time):
    # A lazily loading mapping: building the task vectors must hold one fine-tuned model at a time.
    encoder, finetuned = make_tiny_zoo(TINY_CLIP, tasks=("a", "b", "c"))
    lazy, loads = one_at_a_time(lambda task: {key: value.clone() for key, value in finetuned[task].items()}, finetuned)
    stacked = stack_task_vectors(encoder.state_dict(), lazy)
    assert loads == ["a", "b", "c"]
    for key, value in stacked.items():
        for k, task in enumerate("abc"):
            assert torch.equal(value[k], finetuned[task][key] - encoder.state_dict()[key])


def test_stacked_blocks_are_shared_by_merged_encoder_not_copied(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_CLIP)
    stacked = stack_task_vectors(encoder.state_dict(), finetuned)
    merged_encoder = MergedEncoder(copy.deepcopy(encoder), stacked)
    views = merged_encoder.stacked_task_vectors()
    assert all(views[key].data_ptr() == stacked[key].data_ptr() for key in stacked)
    assert len(merged_encoder.group_names) < len(stacked)  # same-shape tensors do share blocks
    # so are TIES' disjoint vectors (AdaMerging++)
    ties = ties_task_vectors(stacked, 0.2)
    ties_views = MergedEncoder(copy.deepcopy(encoder), ties).stacked_task_vectors()
    assert all(ties_views[key].data_ptr() == ties[key].data_ptr() for key in ties)
    # task vectors laid out any other way are copied into the groups, with the same values
    cloned = {key: value.clone() for key, value in reversed(stacked.items())}
    copied = MergedEncoder(copy.deepcopy(encoder), cloned).stacked_task_vectors()
    assert all(
        copied[key].data_ptr() != cloned[key].data_ptr() and torch.equal(copied[key], cloned[key]) for key in cloned
    )


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_the_merge_reads_the_stacked_blocks_themselves(make_tiny_zoo, monkeypatch):
    # No copy of the task vectors: the groups handed to the kernels are the blocks stack_task_vectors filled.
    encoder, finetuned = make_tiny_zoo(TINY_TIMM, perturb_buffers=True)
    stacked = stack_task_vectors(encoder.state_dict(), finetuned, buffers=buffer_names(encoder), buffer_policy="merge")
    assert isinstance(stacked, StackedTaskVectors) and len(stacked.blocks) < len(stacked)
    blocks = {members: block for members, block in stacked.blocks}
    for members, block in blocks.items():
        assert all(_storage(stacked[name]) == _storage(block) for name in members)
    names, groups = group_task_vectors(stacked)
    assert [tuple(members) for members in names] == list(blocks)
    for members, group in zip(names, groups):
        block = blocks[tuple(members)]
        assert _storage(group) == _storage(block) and group.storage_offset() == block.storage_offset()
        assert group.shape == block.shape and group.stride() == block.stride()
    read: list[int] = []

    def recording(base: Tensor, group: Tensor, weights: Tensor) -> Tensor:
        read.append(_storage(group))
        return _kernels.merge_group(base, group, weights)

    monkeypatch.setattr(_autograd, "merge_group", recording)
    storages = {_storage(block) for block in blocks.values()}
    merge(encoder.state_dict(), stacked, torch.full((3, len(stacked)), 0.3))
    assert sorted(read) == sorted(storages)
    merged_encoder = MergedEncoder(copy.deepcopy(encoder), stacked)
    assert {_storage(buffer) for buffer in merged_encoder.task_vectors.buffers()} == storages
    read.clear()
    merged_encoder(images())
    assert sorted(read) == sorted(storages)
    # the encoder's own stacked view keeps its buffers as blocks: merging it copies nothing either
    read.clear()
    merge(encoder.state_dict(), merged_encoder.stacked_task_vectors(), torch.full((3, len(stacked)), 0.3))
    assert sorted(read) == sorted(storages)


def test_a_replaced_entry_makes_only_its_group_a_copy():
    block = torch.arange(12.0).reshape(2, 2, 3)
    other = torch.arange(4.0).reshape(1, 2, 2)
    stacked = StackedTaskVectors([(["a", "b"], block), (["c"], other)], order=["c", "a", "b"])
    assert list(stacked) == ["c", "a", "b"]
    assert torch.equal(stacked["a"], block[0]) and torch.equal(stacked["b"], block[1])
    names, groups = group_task_vectors(stacked)
    assert names == [["c"], ["a", "b"]]
    assert _storage(groups[0]) == _storage(other) and _storage(groups[1]) == _storage(block)
    stacked["b"] = block[1].clone()  # same values, other memory
    names, groups = group_task_vectors(stacked)
    assert _storage(groups[0]) == _storage(other) and _storage(groups[1]) != _storage(block)
    assert torch.equal(groups[1], block)
    stacked["b"] = block[0]  # memory of the block, but another row
    assert _storage(group_task_vectors(stacked)[1][1]) != _storage(block)
    # a subset or another order of a block's rows is a copy too
    _, (group,) = group_task_vectors(StackedTaskVectors([(["a", "b"], block)]), [["b", "a"]])
    assert _storage(group) != _storage(block) and torch.equal(group, block.flip(0))


def test_stacked_task_vectors_save_and_copy_as_ordered_dicts(tmp_path):
    stacked = StackedTaskVectors([(["a", "b"], torch.arange(12.0).reshape(2, 2, 3))])
    torch.save(stacked, tmp_path / "stacked.pt")
    for loaded in (torch.load(tmp_path / "stacked.pt", weights_only=True), copy.deepcopy(stacked)):
        assert type(loaded) is collections.OrderedDict and list(loaded) == ["a", "b"]
        assert all(torch.equal(loaded[name], stacked[name]) for name in stacked)


def test_stacked_task_vectors_argument_errors():
    with pytest.raises(ValueError, match=r"shape \(2, 3\) does not hold 3 tensors"):
        StackedTaskVectors([(["a", "b", "c"], torch.zeros(2, 3))])
    with pytest.raises(ValueError, match="'a' is in two blocks"):
        StackedTaskVectors([(["a"], torch.zeros(1, 2)), (["a"], torch.zeros(1, 2))])
    with pytest.raises(ValueError, match="order must name each tensor of the blocks once"):
        StackedTaskVectors([(["a", "b"], torch.zeros(2, 2, 1))], order=["a", "a"])


def test_compiled_kernels_raise_the_recompile_limit_for_their_call_only(monkeypatch):
    # One compilation per group shape: Dynamo's default limit (8) would send later shapes to eager.
    seen: list[int] = []

    def fake_compile(function, **options):
        assert options == {"dynamic": False, "fullgraph": True}

        def run(*args):
            seen.append(torch.compiler.config.recompile_limit)
            return function(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    _kernels.compiled.cache_clear()
    try:
        before = torch.compiler.config.recompile_limit
        group, weights, base = torch.ones(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 4)
        out = _kernels.compiled(_kernels.weighted_sum)(group, weights, base)
        assert torch.equal(out, torch.full((2, 4), 3.0))
        assert seen == [_kernels.MAX_GROUP_SHAPES] and torch.compiler.config.recompile_limit == before
        with pytest.raises(RuntimeError):  # restored after an error too
            _kernels.compiled(_kernels.weighted_sum)(group, weights, torch.zeros(3, 5))
        assert torch.compiler.config.recompile_limit == before
    finally:
        _kernels.compiled.cache_clear()  # no fake compiled function stays cached


def test_stack_buffer_policy_pretrained_excludes_buffers(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_TIMM, perturb_buffers=True)
    pretrained = encoder.state_dict()
    buffers = buffer_names(encoder)
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy="pretrained")
    assert list(stacked) == [name for name, _ in encoder.named_parameters()]
    assert not any(key in buffers for key in stacked)
    for key in stacked:
        for k, task in enumerate(finetuned):
            assert torch.equal(stacked[key][k], finetuned[task][key] - pretrained[key])


def test_stack_buffer_policy_merge_includes_float_buffers_only(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_TIMM, perturb_buffers=True)
    pretrained = encoder.state_dict()
    buffers = buffer_names(encoder)
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy="merge")
    assert list(stacked) == float_keys(pretrained)
    assert "bn1.running_mean" in stacked and "bn1.running_var" in stacked
    assert not any(key.endswith("num_batches_tracked") for key in stacked)
    assert any(pretrained[key].dtype == torch.int64 for key in pretrained)  # there were integer buffers
    for key in ("bn1.running_mean", "bn1.running_var", "conv_stem.weight"):
        for k, task in enumerate(finetuned):
            assert torch.equal(stacked[key][k], finetuned[task][key] - pretrained[key])
        assert stacked[key].abs().sum() > 0


def test_stack_integer_tensors_excluded_without_buffer_names():
    pretrained = {"w": torch.ones(2), "index": torch.arange(3)}
    finetuned = {"a": {"w": torch.full((2,), 3.0), "index": torch.arange(3) + 5}}
    stacked = stack_task_vectors(pretrained, finetuned)
    assert list(stacked) == ["w"]
    assert torch.equal(stacked["w"], torch.full((1, 2), 2.0))


def test_stack_require_equal_names_task_and_buffer(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_TIMM, tasks=("a", "b"))
    pretrained = encoder.state_dict()
    key = "blocks.0.0.bn1.running_var"
    finetuned["b"][key] = finetuned["b"][key] + 0.01
    with pytest.raises(TaskVectorError, match=re.escape(f"task 'b', buffer '{key}' differs")):
        stack_task_vectors(pretrained, finetuned, buffers=buffer_names(encoder), buffer_policy="require_equal")


def test_stack_require_equal_passes_when_float_buffers_equal(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_TIMM, tasks=("a", "b"))
    pretrained = encoder.state_dict()
    for index, task in enumerate(finetuned):  # integer buffers are never compared
        finetuned[task]["bn1.num_batches_tracked"] = torch.tensor(100 + index)
    buffers = buffer_names(encoder)
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy="require_equal")
    reference = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy="pretrained")
    assert list(stacked) == list(reference) == [name for name, _ in encoder.named_parameters()]
    for key in stacked:
        assert torch.equal(stacked[key], reference[key])


def test_stack_bf16_storage(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_CLIP)
    pretrained = encoder.state_dict()
    stacked = stack_task_vectors(pretrained, finetuned, dtype=torch.bfloat16)
    for key, value in stacked.items():
        assert value.dtype == torch.bfloat16
        for k, task in enumerate(finetuned):
            assert torch.equal(value[k], (finetuned[task][key] - pretrained[key]).to(torch.bfloat16))


def _small_state() -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    pretrained = {"layer.weight": torch.zeros(2, 3), "layer.bias": torch.zeros(2)}
    finetuned = {
        task: {key: value + 0.1 * (i + 1) for key, value in pretrained.items()} for i, task in enumerate(("a", "b"))
    }
    return pretrained, finetuned


def _set(state: dict[str, Tensor], key: str, value: Tensor) -> None:
    state[key] = value


@pytest.mark.parametrize(
    ("corrupt", "pattern"),
    [
        (lambda s: s.pop("layer.bias"), r"task 'b'.*lacks keys.*'layer\.bias'"),
        (
            lambda s: _set(s, "extra.weight", torch.zeros(1)),
            r"task 'b'.*keys the pretrained encoder lacks.*'extra\.weight'",
        ),
        (lambda s: _set(s, "layer.bias", torch.zeros(3)), r"task 'b', key 'layer\.bias': shape \(3,\) differs"),
        (
            lambda s: _set(s, "layer.bias", torch.zeros(2, dtype=torch.float64)),
            r"task 'b', key 'layer\.bias': dtype torch\.float64 differs",
        ),
        (lambda s: s["layer.weight"].__setitem__((1, 2), float("nan")), r"task 'b', key 'layer\.weight'.*NaN or Inf"),
        (lambda s: s["layer.weight"].__setitem__((0, 0), float("inf")), r"task 'b', key 'layer\.weight'.*NaN or Inf"),
        (lambda s: s["layer.bias"].__setitem__(0, -float("inf")), r"task 'b', key 'layer\.bias'.*NaN or Inf"),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "inf", "neg-inf"],
)
def test_stack_validation_errors_name_task_and_key(corrupt, pattern):
    pretrained, finetuned = _small_state()
    stack_task_vectors(pretrained, finetuned)  # the uncorrupted input is fine
    corrupt(finetuned["b"])
    with pytest.raises(TaskVectorError, match=pattern):
        stack_task_vectors(pretrained, finetuned)


def test_stack_nan_in_pretrained_names_key():
    pretrained, finetuned = _small_state()
    pretrained["layer.bias"][1] = float("nan")
    with pytest.raises(TaskVectorError, match=r"pretrained key 'layer\.bias'.*NaN or Inf"):
        stack_task_vectors(pretrained, finetuned)


def test_stack_argument_errors():
    pretrained, finetuned = _small_state()
    with pytest.raises(TaskVectorError, match="no fine-tuned state dicts"):
        stack_task_vectors(pretrained, {})
    with pytest.raises(TaskVectorError, match=r"buffer_policy must be one of .*got 'average'"):
        stack_task_vectors(pretrained, finetuned, buffer_policy="average")
    with pytest.raises(TaskVectorError, match=r"floating-point storage dtype, got torch\.int32"):
        stack_task_vectors(pretrained, finetuned, dtype=torch.int32)
    with pytest.raises(TaskVectorError, match=r"buffers names keys .*'bn\.running_mean'"):
        stack_task_vectors(pretrained, finetuned, buffers=["bn.running_mean"])


# ----------------------------------------------------------------------------------------------
# 2. merge / merge_tensor
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY_CLIP, TINY_TIMM])
def test_merge_equals_naive_loop(make_tiny_zoo, name):
    encoder, finetuned = make_tiny_zoo(name, perturb_buffers=True)
    pretrained = encoder.state_dict()
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffer_names(encoder), buffer_policy="merge")
    keys = list(stacked)
    lam = torch.rand(3, len(keys), generator=torch.Generator().manual_seed(1))
    merged = merge(pretrained, stacked, lam)
    expected = naive_merge(pretrained, finetuned, keys, lam)
    assert list(merged) == keys
    for key in keys:
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [TINY_CLIP, TINY_TIMM])
def test_merge_gradient_equals_naive_autograd(make_tiny_zoo, name):
    encoder, finetuned = make_tiny_zoo(name)
    pretrained = encoder.state_dict()
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffer_names(encoder))
    keys = list(stacked)
    generator = torch.Generator().manual_seed(2)
    lam = torch.rand(3, len(keys), generator=generator)
    weights = {key: torch.randn(pretrained[key].shape, generator=generator) for key in keys}

    lam_lib = lam.clone().requires_grad_(True)
    merged = merge(pretrained, stacked, lam_lib)
    sum((merged[key] * weights[key]).sum() for key in keys).backward()

    lam_ref = lam.clone().requires_grad_(True)
    reference = naive_merge(pretrained, finetuned, keys, lam_ref)
    sum((reference[key] * weights[key]).sum() for key in keys).backward()

    assert lam_lib.grad is not None and lam_lib.grad.shape == lam.shape
    torch.testing.assert_close(lam_lib.grad, lam_ref.grad, rtol=1e-5, atol=1e-5)
    # and the closed form: d loss / d lam[k, p] = <tau_k,p, weights_p>
    closed = torch.stack([(stacked[key].double() * weights[key].double()).flatten(1).sum(1) for key in keys], 1)
    torch.testing.assert_close(lam_lib.grad.double(), closed, rtol=1e-5, atol=1e-5)


def test_merge_is_fp32_under_bf16_autocast(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_CLIP)
    pretrained = encoder.state_dict()
    stacked = stack_task_vectors(pretrained, finetuned)
    keys = list(stacked)
    generator = torch.Generator().manual_seed(3)
    lam = torch.rand(3, len(keys), generator=generator)
    weights = {key: torch.randn(pretrained[key].shape, generator=generator) for key in keys}

    lam_plain = lam.clone().requires_grad_(True)
    plain = merge(pretrained, stacked, lam_plain)
    sum((plain[key] * weights[key]).sum() for key in keys).backward()

    lam_autocast = lam.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is active
        under = merge(pretrained, stacked, lam_autocast)
        loss = sum((under[key] * weights[key]).sum() for key in keys)
    loss.backward()

    for key in keys:
        assert under[key].dtype == torch.float32
        torch.testing.assert_close(under[key], plain[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lam_autocast.grad, lam_plain.grad, rtol=1e-5, atol=1e-6)


def test_merge_bf16_storage_equals_fp32_merge_of_rounded_vectors(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_CLIP)
    pretrained = encoder.state_dict()
    stacked16 = stack_task_vectors(pretrained, finetuned, dtype=torch.bfloat16)
    stacked32 = stack_task_vectors(pretrained, finetuned)
    keys = list(stacked16)
    generator = torch.Generator().manual_seed(4)
    lam = torch.rand(3, len(keys), generator=generator).requires_grad_(True)
    weights = {key: torch.randn(pretrained[key].shape, generator=generator) for key in keys}

    merged = merge(pretrained, stacked16, lam)
    sum((merged[key] * weights[key]).sum() for key in keys).backward()

    lam_ref = lam.detach().clone().requires_grad_(True)
    expected = {}
    for p, key in enumerate(keys):
        value = pretrained[key].clone()
        for k in range(len(finetuned)):
            value = value + lam_ref[k, p] * stacked16[key][k].float()
        expected[key] = value
    sum((expected[key] * weights[key]).sum() for key in keys).backward()

    differs_from_fp32 = False
    fp32 = merge(pretrained, stacked32, lam.detach())
    for key in keys:
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6)
        differs_from_fp32 |= not torch.equal(merged[key], fp32[key])
    assert differs_from_fp32  # the rounding is visible, so the comparison above is meaningful
    torch.testing.assert_close(lam.grad, lam_ref.grad, rtol=1e-5, atol=1e-5)


def merge_one(base: Tensor, stacked: Tensor, coefficients: Tensor) -> Tensor:
    """merge() on a single tensor: coefficients [T] -> one column."""
    return merge({"t": base}, {"t": stacked}, coefficients.unsqueeze(1))["t"]


def test_merge_no_gradient_to_base_or_task_vectors():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(4, 3, generator=generator, requires_grad=True)
    stacked = torch.randn(2, 4, 3, generator=generator, requires_grad=True)
    coefficients = torch.tensor([0.25, 0.75], requires_grad=True)
    out = merge_one(base, stacked, coefficients)
    torch.testing.assert_close(out, base + 0.25 * stacked[0] + 0.75 * stacked[1])
    out.pow(2).sum().backward()
    assert base.grad is None and stacked.grad is None
    expected = (2 * out.detach() * stacked.detach()).flatten(1).sum(1)
    torch.testing.assert_close(coefficients.grad, expected)


def test_merge_without_coefficient_grad_builds_no_graph():
    out = merge_one(torch.zeros(3, requires_grad=True), torch.ones(2, 3, requires_grad=True), torch.ones(2))
    assert not out.requires_grad
    assert torch.equal(out, torch.full((3,), 2.0))


def test_merge_of_many_tensors_matches_plain_sums():
    # One autograd node merges every tensor; each result equals the plain sum over tasks. "big"
    # spans several of the CPU path's output slices (2**18 entries each).
    generator = torch.Generator().manual_seed(6)
    shapes = {"a": (4, 3), "b": (5,), "c": (4, 3), "big": (600, 500), "e": (2, 2, 2)}
    vectors = {name: torch.randn(3, *shape, generator=generator) for name, shape in shapes.items()}
    base = {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}
    lam = torch.rand(3, 5, generator=generator, requires_grad=True)
    merged = merge(base, vectors, lam)
    assert list(merged) == list(shapes)
    loss = sum((tensor * (i + 1)).sum() for i, tensor in enumerate(merged.values()))
    loss.backward()
    for i, name in enumerate(shapes):
        expected = base[name].clone()
        for k in range(3):
            expected += lam.detach()[k, i] * vectors[name][k]
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5)
        # d loss / d lam[k, i] = (i + 1) * sum(tau_k[name])
        expected_grad = torch.stack([(i + 1) * vectors[name][k].sum() for k in range(3)])
        torch.testing.assert_close(lam.grad[:, i], expected_grad, rtol=1e-4, atol=1e-3)


def test_merge_shape_errors():
    with pytest.raises(ValueError, match=r"base \(3,\), stacked \(2, 4\)"):
        merge_one(torch.zeros(3), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"stacked \(2, 3\), coefficients \(3, 1\)"):
        merge_one(torch.zeros(3), torch.zeros(2, 3), torch.zeros(3))
    vectors = {"a": torch.zeros(2, 3), "b": torch.zeros(2, 1)}
    base = {"a": torch.zeros(3), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"coefficients must have shape \[T, 2\].*got \(2, 3\)"):
        merge(base, vectors, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"coefficients must have shape \[T, 2\].*got \(2,\)"):
        merge(base, vectors, torch.zeros(2))
    with pytest.raises(ValueError, match=r"coefficients \(3, 2\)"):  # T of the coefficients != T of the vectors
        merge(base, vectors, torch.zeros(3, 2))


# ----------------------------------------------------------------------------------------------
# 3. MergingCoefficients
# ----------------------------------------------------------------------------------------------


def test_coefficients_task_wise_broadcasts_over_tensors():
    coefficients = MergingCoefficients(num_tasks=3, num_tensors=5, granularity="task", init=0.3)
    assert coefficients.raw.shape == (3, 1)
    assert torch.equal(coefficients(), torch.full((3, 5), 0.3))
    with torch.no_grad():
        coefficients.raw.copy_(torch.tensor([[0.1], [0.5], [0.9]]))
    values = coefficients()
    assert values.shape == (3, 5)
    for column in range(5):
        assert torch.equal(values[:, column], torch.tensor([0.1, 0.5, 0.9]))


def test_coefficients_layer_wise_shape_and_init():
    coefficients = MergingCoefficients(num_tasks=2, num_tensors=4, granularity="layer", init=0.7)
    assert coefficients.raw.shape == (2, 4)
    assert torch.equal(coefficients(), torch.full((2, 4), 0.7))
    assert [name for name, _ in coefficients.named_parameters()] == ["raw"]


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_coefficients_clamp_values_and_gradients(granularity):
    if granularity == "task":
        raw = torch.tensor([[-0.5], [0.2], [1.5], [0.8]])
    else:
        raw = torch.tensor([[-0.5, 0.2, 1.5], [0.8, 2.0, -0.1]])
    num_tasks = raw.shape[0]
    coefficients = MergingCoefficients(num_tasks, 3, granularity)
    with torch.no_grad():
        coefficients.raw.copy_(raw)
    values = coefficients()
    assert values.shape == (num_tasks, 3)
    assert torch.equal(values, raw.clamp(0, 1).expand(-1, 3))
    weights = torch.arange(1.0, 1.0 + values.numel()).view(values.shape)
    (values * weights).sum().backward()
    grad = coefficients.raw.grad
    inside = (raw >= 0) & (raw <= 1)
    assert inside.any() and (~inside).any()
    assert torch.all(grad[~inside] == 0)
    assert torch.all(grad[inside] != 0)
    expected = weights.sum(1, keepdim=True) if granularity == "task" else weights
    torch.testing.assert_close(grad, torch.where(inside, expected, 0.0))


def test_coefficients_without_clamp_pass_through():
    coefficients = MergingCoefficients(2, 3, "layer", clamp=False)
    raw = torch.tensor([[-0.5, 0.2, 1.5], [0.8, 2.0, -0.1]])
    with torch.no_grad():
        coefficients.raw.copy_(raw)
    values = coefficients()
    assert torch.equal(values, raw)
    values.sum().backward()
    assert torch.equal(coefficients.raw.grad, torch.ones(2, 3))


def test_coefficients_argument_errors():
    with pytest.raises(ValueError, match=r"granularity must be 'task' or 'layer', got 'model'"):
        MergingCoefficients(2, 3, granularity="model")
    with pytest.raises(ValueError, match="at least one task and one tensor"):
        MergingCoefficients(0, 3)
    with pytest.raises(ValueError, match="at least one task and one tensor"):
        MergingCoefficients(2, 0)


def test_task_wise_equals_layer_wise_with_constant_rows(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_CLIP)
    stacked = stack_task_vectors(encoder.state_dict(), finetuned)
    task_wise = MergedEncoder(copy.deepcopy(encoder), stacked, granularity="task")
    layer_wise = MergedEncoder(copy.deepcopy(encoder), stacked, granularity="layer")
    per_task = torch.tensor([0.2, 0.6, 0.9])
    with torch.no_grad():
        task_wise.coefficients.raw.copy_(per_task[:, None])
        layer_wise.coefficients.raw.copy_(per_task[:, None].expand(-1, len(stacked)))
    merged_task, merged_layer = task_wise.merged_tensors(), layer_wise.merged_tensors()
    for key in stacked:
        torch.testing.assert_close(merged_task[key], merged_layer[key], rtol=0, atol=0)
    x = images()
    features_task, features_layer = task_wise(x), layer_wise(x)
    torch.testing.assert_close(features_task, features_layer, rtol=0, atol=0)
    # the task-wise gradient is the layer-wise gradient summed over tensors
    features_task.square().sum().backward()
    features_layer.square().sum().backward()
    torch.testing.assert_close(
        task_wise.coefficients.raw.grad, layer_wise.coefficients.raw.grad.sum(1, keepdim=True), rtol=1e-4, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# 4. MergedEncoder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "policy"),
    [(TINY_CLIP, "pretrained"), (TINY_TIMM, "pretrained"), (TINY_TIMM, "merge")],
    ids=["clip", "timm", "timm-bn"],
)
def test_merged_forward_equals_loaded_naive_state_dict(make_tiny_zoo, name, policy):
    encoder, finetuned = make_tiny_zoo(name, perturb_buffers=True)
    pretrained = {key: value.clone() for key, value in encoder.state_dict().items()}
    reference = copy.deepcopy(encoder)
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffer_names(encoder), buffer_policy=policy)
    merged_encoder = MergedEncoder(encoder, stacked, granularity="layer").eval()
    lam = torch.rand(3, len(stacked), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        merged_encoder.coefficients.raw.copy_(lam)

    naive = naive_merge(pretrained, finetuned, list(stacked), lam)
    reference.load_state_dict({key: naive.get(key, value) for key, value in pretrained.items()}, strict=True)
    x = images(seed=7)
    with torch.no_grad():
        expected = reference.eval()(x)
    features = merged_encoder(x)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    # the encoder's own weights are untouched, and they give other features
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, pretrained[key])
    with torch.no_grad():
        assert not torch.allclose(encoder(x), features, rtol=1e-3, atol=1e-4)
    # reusing merged tensors computed earlier gives the same result
    torch.testing.assert_close(merged_encoder(x, merged=merged_encoder.merged_tensors()), features, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "policy"), [(TINY_CLIP, "pretrained"), (TINY_TIMM, "merge")], ids=["clip", "timm-bn"])
def test_merged_state_dict_loads_strictly_into_fresh_encoder(make_tiny_zoo, name, policy):
    encoder, finetuned = make_tiny_zoo(name, perturb_buffers=True)
    pretrained = encoder.state_dict()
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffer_names(encoder), buffer_policy=policy)
    merged_encoder = MergedEncoder(encoder, stacked, granularity="layer")
    with torch.no_grad():
        merged_encoder.coefficients.raw.copy_(torch.rand(3, len(stacked), generator=torch.Generator().manual_seed(8)))
    state = merged_encoder.merged_state_dict()
    assert list(state) == list(pretrained)
    for key, value in state.items():
        assert value.dtype == pretrained[key].dtype and not value.requires_grad
    fresh = create_encoder(name)
    fresh.load_state_dict(state, strict=True)
    x = images(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), merged_encoder.eval()(x), rtol=1e-5, atol=1e-6)
    naive = naive_merge(pretrained, finetuned, list(stacked), merged_encoder.coefficients().detach())
    for key, value in naive.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


def test_merged_encoder_state_dict_excludes_task_vectors(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_TIMM)
    encoder_keys = list(encoder.state_dict())
    stacked = stack_task_vectors(encoder.state_dict(), finetuned, buffers=buffer_names(encoder))
    merged_encoder = MergedEncoder(encoder, stacked)
    keys = set(merged_encoder.state_dict())
    assert keys == {f"encoder.{key}" for key in encoder_keys} | {"coefficients.raw"}
    assert merged_encoder.task_vectors.state_dict() == {}
    assert list(merged_encoder.stacked_task_vectors()) == list(stacked)
    # only the coefficients are trainable; the encoder is frozen
    assert [name for name, p in merged_encoder.named_parameters() if p.requires_grad] == ["coefficients.raw"]
    merged_encoder(images()).sum().backward()
    assert merged_encoder.coefficients.raw.grad is not None
    assert all(p.grad is None for p in merged_encoder.encoder.parameters())
    # a checkpoint restores the coefficients into another MergedEncoder
    with torch.no_grad():
        merged_encoder.coefficients.raw.fill_(0.55)
    other = MergedEncoder(copy.deepcopy(encoder), stacked)
    other.load_state_dict(merged_encoder.state_dict(), strict=True)
    assert torch.equal(other.coefficients.raw, torch.full_like(other.coefficients.raw, 0.55))


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_merged_batch_norm_buffers_train_without_gradient(make_tiny_zoo, granularity):
    # batch norm is not differentiable in its running statistics: with buffer_policy="merge" the
    # merged buffers follow the coefficients in the forward but pass no gradient back.
    encoder, finetuned = make_tiny_zoo(TINY_TIMM, tasks=("a", "b"), perturb_buffers=True)
    buffers = buffer_names(encoder)
    stacked = stack_task_vectors(encoder.state_dict(), finetuned, buffers=buffers, buffer_policy="merge")
    merged_encoder = MergedEncoder(encoder, stacked, granularity=granularity).eval()
    features = merged_encoder(images())
    features.square().sum().backward()
    grad = merged_encoder.coefficients.raw.grad
    assert grad is not None and torch.isfinite(grad).all() and (grad != 0).any()
    if granularity == "layer":
        is_buffer = torch.tensor([name in buffers for name in stacked])
        assert is_buffer.any() and (~is_buffer).any()
        assert torch.all(grad[:, is_buffer] == 0)
        assert torch.all(grad[:, ~is_buffer].abs().sum(0) > 0)
    # the gradient equals that of a merge whose buffers are held at their merged values
    coefficients = merged_encoder.coefficients().detach().requires_grad_(True)
    merged = merge(encoder.state_dict(), stacked, coefficients)
    merged = {key: value.detach() if key in buffers else value for key, value in merged.items()}
    torch.func.functional_call(encoder, merged, (images(),)).square().sum().backward()
    expected = coefficients.grad if granularity == "layer" else coefficients.grad.sum(1, keepdim=True)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


def _shares_pretrained_blocks(merged_encoder: MergedEncoder) -> bool:
    """Whether every merged tensor of the encoder is a view of its row in the grouped pretrained blocks."""
    state = merged_encoder.encoder.state_dict(keep_vars=True)
    return all(
        state[name].data_ptr() == merged_encoder.pretrained.get_buffer(str(index))[row].data_ptr()
        for index, names in enumerate(merged_encoder.group_names)
        for row, name in enumerate(names)
    )


@pytest.mark.parametrize(("name", "policy"), [(TINY_CLIP, "pretrained"), (TINY_TIMM, "merge")], ids=["clip", "timm-bn"])
def test_pretrained_weights_are_stored_once_in_grouped_blocks(make_tiny_zoo, name, policy):
    encoder, finetuned = make_tiny_zoo(name, perturb_buffers=True)
    pretrained = {key: value.clone() for key, value in encoder.state_dict().items()}
    stacked = stack_task_vectors(pretrained, finetuned, buffers=buffer_names(encoder), buffer_policy=policy)
    merged_encoder = MergedEncoder(encoder, stacked)
    assert _shares_pretrained_blocks(merged_encoder)
    for key, value in merged_encoder.encoder.state_dict().items():  # same values as before the re-layout
        assert torch.equal(value, pretrained[key])
    x = images(seed=3)
    expected = merged_encoder(x).detach()
    # a cast and a copy re-create the encoder's tensors: they are tied to the new blocks again
    merged_encoder.double()
    assert _shares_pretrained_blocks(merged_encoder)
    torch.testing.assert_close(merged_encoder(x.double()).float(), expected, rtol=1e-4, atol=1e-5)
    copied = copy.deepcopy(merged_encoder.float())
    assert _shares_pretrained_blocks(copied)
    torch.testing.assert_close(copied(x), expected, rtol=1e-4, atol=1e-5)


def test_same_shape_tensors_of_different_dtypes_merge_in_separate_groups():
    encoder = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    encoder[1].double()
    tuned = {t: {k: v + 1.0 for k, v in encoder.state_dict().items()} for t in ("a", "b")}
    stacked = stack_task_vectors(encoder.state_dict(), tuned)
    merged_encoder = MergedEncoder(copy.deepcopy(encoder), stacked, granularity="task", init=0.5)
    assert _shares_pretrained_blocks(merged_encoder)
    merged = merged_encoder.merged_tensors()
    for key, value in encoder.state_dict().items():
        assert merged[key].dtype == value.dtype
        torch.testing.assert_close(merged[key], value + 1.0)


def test_forward_error_leaves_encoder_weights_in_place(make_tiny_zoo):
    encoder, finetuned = make_tiny_zoo(TINY_CLIP)
    merged_encoder = MergedEncoder(encoder, stack_task_vectors(encoder.state_dict(), finetuned))
    before = {key: value for key, value in encoder.state_dict(keep_vars=True).items()}
    with pytest.raises(RuntimeError):
        merged_encoder(torch.zeros(2, 5))  # wrong input shape: the encoder raises mid-forward
    after = encoder.state_dict(keep_vars=True)
    assert all(after[key] is before[key] for key in before)  # the pretrained tensors, not merged ones


def test_merged_encoder_argument_errors():
    encoder = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="no task vectors"):
        MergedEncoder(encoder, {})
    with pytest.raises(ValueError, match=r"name 'head\.weight', which the encoder lacks"):
        MergedEncoder(encoder, {"head.weight": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match=r"'weight' have shape \(1, 3, 2\), expected \[T, 2, 3\]"):
        MergedEncoder(encoder, {"weight": torch.zeros(1, 3, 2)})


# ----------------------------------------------------------------------------------------------
# 5. TIES
# ----------------------------------------------------------------------------------------------


def test_ties_hand_worked_single_tensor():
    # T = 3 tasks, 6 entries, k = 0.5: each task keeps its int(6 * 0.5) = 3 largest-magnitude entries.
    #   task0 [ 4, -1, -3,  0.5,  2,  0.1]  top-3 |.|: 4, 3, 2  -> [4, 0, -3,   0,  2, 0]
    #   task1 [-2,  5,  3, -0.2, -6,  0.3]  top-3 |.|: 6, 5, 3  -> [0, 5,  3,   0, -6, 0]
    #   task2 [ 1, -4,  0.2, 2.5, 0.1, -0.5] top-3 |.|: 4, 2.5, 1 -> [1, -4, 0, 2.5,  0, 0]
    # elect: sums over tasks [5, 1, 0, 2.5, -4, 0] -> signs [+, +, 0, +, -, 0];
    #   zero sums take the majority sign(sum of signs) = sign(1+1+0+1-1+0) = +  -> [+, +, +, +, -, +]
    # disjoint: keep entries whose sign equals the elected one
    #   task0 [4, 0, 0, 0, 0, 0]   (-3 at e2 loses to the majority +, 2 at e4 loses to -)
    #   task1 [0, 5, 3, 0, -6, 0]
    #   task2 [1, 0, 0, 2.5, 0, 0] (-4 at e1 loses)
    # normalize: tasks kept per entry [2, 1, 1, 1, 1, 0 -> 1]
    tv = {"w": torch.tensor([[4, -1, -3, 0.5, 2, 0.1], [-2, 5, 3, -0.2, -6, 0.3], [1, -4, 0.2, 2.5, 0.1, -0.5]])}
    expected = torch.tensor([[4.0, 0, 0, 0, 0, 0], [0, 5, 3, 0, -6, 0], [1, 0, 0, 2.5, 0, 0]])
    assert torch.equal(ties_task_vectors(tv, k=0.5)["w"], expected)
    expected_normalized = torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 5, 3, 0, -6, 0], [0.5, 0, 0, 2.5, 0, 0]])
    assert torch.equal(ties_task_vectors(tv, k=0.5, normalize=True)["w"], expected_normalized)


def test_ties_top_k_is_global_across_tensors():
    # T = 2, tensors "w" [2, 2] and "b" [2]: 6 entries per task, k = 0.5 keeps 3 per task over both tensors.
    #   task0 w [[5, 6], [7, 8]], b [0.1, 0.2]         -> top-3: 8, 7, 6 -> w [[0, 6], [7, 8]], b [0, 0]
    #   task1 w [[0.1, -0.2], [0.3, 0.4]], b [-9, 3]  -> top-3: 9, 3, 0.4 -> w [[0, 0], [0, 0.4]], b [-9, 3]
    #   (a per-tensor top-50% would instead keep task0's b 0.2 and task1's w 0.3, and drop task1's b 3)
    # elect: sums w [[0, 6], [7, 8.4]], b [-9, 3] -> no entry has trimmed values of both signs, nothing dropped.
    # normalize: only w[1, 1] is kept by two tasks -> 8 / 2 = 4 and 0.4 / 2 = 0.2.
    tv = {
        "w": torch.tensor([[[5.0, 6.0], [7.0, 8.0]], [[0.1, -0.2], [0.3, 0.4]]]),
        "b": torch.tensor([[0.1, 0.2], [-9.0, 3.0]]),
    }
    result = ties_task_vectors(tv, k=0.5)
    assert list(result) == ["w", "b"]
    assert torch.equal(result["w"], torch.tensor([[[0.0, 6.0], [7.0, 8.0]], [[0.0, 0.0], [0.0, 0.4]]]))
    assert torch.equal(result["b"], torch.tensor([[0.0, 0.0], [-9.0, 3.0]]))
    normalized = ties_task_vectors(tv, k=0.5, normalize=True)
    assert torch.equal(normalized["w"], torch.tensor([[[0.0, 6.0], [7.0, 4.0]], [[0.0, 0.0], [0.0, 0.2]]]))
    assert torch.equal(normalized["b"], result["b"])


def test_ties_zero_sum_takes_majority_of_signs_over_whole_vector():
    # k = 1 keeps every entry. Entries e0..e3 of the whole vector; "a" holds (e0, e3), "b" holds (e1, e2).
    #   task0 [ 2, -1, -1, 9]   task1 [-2, -1, -1, 1]
    # sums [0, -2, -2, 10] -> signs [0, -, -, +]; majority = sign(0 - 1 - 1 + 1) = -  (a count of signs:
    # the total mass 0 - 2 - 2 + 10 is positive, and tensor "a" alone would vote +), so e0 elects -:
    #   task0 keeps [0, -1, -1, 9], task1 keeps [-2, -1, -1, 1].
    tv = {"a": torch.tensor([[2.0, 9.0], [-2.0, 1.0]]), "b": torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])}
    result = ties_task_vectors(tv, k=1.0)
    assert torch.equal(result["a"], torch.tensor([[0.0, 9.0], [-2.0, 1.0]]))
    assert torch.equal(result["b"], tv["b"])


def test_ties_matches_naive_reference_on_random_vectors():
    generator = torch.Generator().manual_seed(10)
    tv = {
        "w": torch.randn(3, 4, 5, generator=generator),
        "b": torch.randn(3, 7, generator=generator),
        "s": torch.randn(3, 1, generator=generator),
    }
    for k in (0.1, 0.3, 0.75, 1.0):
        disjoint, counts = naive_ties(tv, k)
        result = ties_task_vectors(tv, k=k)
        normalized = ties_task_vectors(tv, k=k, normalize=True)
        for name in tv:
            assert result[name].shape == tv[name].shape and result[name].dtype == tv[name].dtype
            torch.testing.assert_close(result[name].double(), disjoint[name], rtol=0, atol=0)
            torch.testing.assert_close(normalized[name].double(), disjoint[name] / counts[name].clamp(min=1))


def test_ties_keeps_storage_dtype():
    tv = {"w": torch.randn(2, 10, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)}
    result = ties_task_vectors(tv, k=0.5)
    assert result["w"].dtype == torch.bfloat16
    disjoint, _ = naive_ties({"w": tv["w"].float()}, 0.5)
    assert torch.equal(result["w"].double(), disjoint["w"])


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5])
def test_ties_k_out_of_range(k):
    with pytest.raises(ValueError, match=re.escape(f"k must be in (0, 1], got {k}")):
        ties_task_vectors({"w": torch.ones(2, 3)}, k=k)


def test_ties_empty():
    with pytest.raises(ValueError, match="no task vectors"):
        ties_task_vectors({}, k=0.5)


# ----------------------------------------------------------------------------------------------
# 6. Baselines
# ----------------------------------------------------------------------------------------------


def _synthetic_models():
    generator = torch.Generator().manual_seed(12)
    pretrained = {
        "conv.weight": torch.randn(4, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator),
        "bn.running_mean": torch.randn(4, generator=generator),
        "bn.num_batches_tracked": torch.tensor(5),
        "fc.weight": torch.randn(2, 4, generator=generator),
    }
    finetuned = {}
    for index, task in enumerate(("x", "y", "z")):
        finetuned[task] = {
            key: value + torch.randn(value.shape, generator=generator) if value.is_floating_point() else value + index
            for key, value in pretrained.items()
        }
    return pretrained, finetuned, ("bn.running_mean", "bn.num_batches_tracked")


def _check_unmerged(result, pretrained, merged_keys):
    assert list(result) == list(pretrained)
    for key in pretrained:
        if key not in merged_keys:
            assert torch.equal(result[key], pretrained[key]), key
            assert result[key].dtype == pretrained[key].dtype


@pytest.mark.parametrize("policy", ["pretrained", "merge"])
def test_weight_averaging(policy):
    pretrained, finetuned, buffers = _synthetic_models()
    result = weight_averaging(pretrained, finetuned, buffers=buffers, buffer_policy=policy)
    merged_keys = ["conv.weight", "conv.bias", "fc.weight"] + (["bn.running_mean"] if policy == "merge" else [])
    for key in merged_keys:
        average = sum(state[key] for state in finetuned.values()) / len(finetuned)
        torch.testing.assert_close(result[key], average, rtol=1e-5, atol=1e-6)
    _check_unmerged(result, pretrained, merged_keys)


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_task_arithmetic(scale):
    pretrained, finetuned, buffers = _synthetic_models()
    result = task_arithmetic(pretrained, finetuned, scale, buffers=buffers)
    merged_keys = ["conv.weight", "conv.bias", "fc.weight"]
    for key in merged_keys:
        expected = pretrained[key].clone()
        for state in finetuned.values():
            expected = expected + scale * (state[key] - pretrained[key])
        torch.testing.assert_close(result[key], expected, rtol=1e-5, atol=1e-6)
    _check_unmerged(result, pretrained, merged_keys)


def test_task_arithmetic_default_scale_is_0_3():
    pretrained, finetuned, buffers = _synthetic_models()
    default = task_arithmetic(pretrained, finetuned, buffers=buffers)
    explicit = task_arithmetic(pretrained, finetuned, 0.3, buffers=buffers)
    assert all(torch.equal(default[key], explicit[key]) for key in pretrained)


def test_ties_merging():
    pretrained, finetuned, buffers = _synthetic_models()
    result = ties_merging(pretrained, finetuned, scale=0.3, ties_k=0.2, buffers=buffers)
    merged_keys = ["conv.weight", "conv.bias", "fc.weight"]
    vectors = {key: torch.stack([state[key] - pretrained[key] for state in finetuned.values()]) for key in merged_keys}
    disjoint, counts = naive_ties(vectors, 0.2)
    for key in merged_keys:
        expected = pretrained[key].double() + 0.3 * disjoint[key].sum(0) / counts[key].clamp(min=1)
        torch.testing.assert_close(result[key].double(), expected, rtol=1e-5, atol=1e-6)
        assert result[key].dtype == torch.float32
    _check_unmerged(result, pretrained, merged_keys)
    assert any(not torch.equal(result[key], pretrained[key]) for key in merged_keys)


# ----------------------------------------------------------------------------------------------
# 7. entropy
# ----------------------------------------------------------------------------------------------


def test_entropy_equals_definition():
    logits = 3 * torch.randn(6, 9, generator=torch.Generator().manual_seed(13))
    result = entropy(logits)
    assert result.shape == (6,)
    expected = []
    for row in logits.double():
        probabilities = row.exp() / row.exp().sum()
        expected.append(-sum(p * p.log() for p in probabilities))
    torch.testing.assert_close(result.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_entropy_uniform_and_peaked():
    torch.testing.assert_close(entropy(torch.full((2, 10), 4.2)), torch.full((2,), math.log(10)))
    peaked = torch.tensor([[1000.0, 0.0, -1000.0]])
    assert torch.isfinite(entropy(peaked)).all() and entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    half = entropy(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.full((3,), math.log(4)))
