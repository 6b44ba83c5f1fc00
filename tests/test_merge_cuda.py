"""The GPU merge (grouped, compiled kernels reading low-precision task vectors as stored) against float64.

Skipped without CUDA; run on a GPU machine with ``python -m pytest -q tests/test_merge_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from lit_adamerging.merging import MergedEncoder, stack_task_vectors
from lit_adamerging.merging.merge import row_dots, weighted_sum
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
    encoder = create_encoder("open_clip:test-vit-tiny").cuda()
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
