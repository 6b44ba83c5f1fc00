"""The fit image stream: DDP slices of one global batch, resumable by step, each pass a permutation."""

from __future__ import annotations

import pytest
import torch

from lit_adamerging.data.sampling import FitStreamSampler, global_batch_size


def steps(sampler: FitStreamSampler) -> list[list[int]]:
    """The sampler's epoch cut into its per-step batches."""
    flat = list(sampler)
    return [flat[i : i + sampler.batch_size] for i in range(0, len(flat), sampler.batch_size)]


@pytest.mark.parametrize(("num_images", "batch_size", "world_size"), [(40, 8, 2), (37, 4, 3), (10, 16, 2), (9, 2, 4)])
def test_ranks_split_the_single_process_global_batch(num_images, batch_size, world_size):
    epoch = 7  # long enough to cross passes
    single = FitStreamSampler(num_images, batch_size * world_size, epoch, lambda: 0, seed=3)
    ranks = [FitStreamSampler(num_images, batch_size, epoch, lambda: 0, 3, world_size, r) for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1
    for step, batch in enumerate(steps(single)):
        slices = [steps(r)[step] for r in ranks]
        assert sum(slices, []) == batch  # the ranks together see exactly the single process's images
        assert len(set(sum(slices, []))) == len(batch)  # and never the same image twice in a step
        assert len({len(s) for s in slices}) == 1


def test_each_pass_is_a_permutation_and_passes_differ():
    sampler = FitStreamSampler(12, 4, steps_per_epoch=6, first_step=lambda: 0, seed=0)
    batches = steps(sampler)
    first, second = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second


def test_a_resumed_stream_continues_where_it_stopped():
    position = {"step": 0}
    sampler = FitStreamSampler(20, 4, steps_per_epoch=5, first_step=lambda: position["step"], seed=1)
    uninterrupted = [sampler.indices(step) for step in range(15)]
    assert steps(sampler) == uninterrupted[:5]
    position["step"] = 7  # resumed mid-epoch 1: the rest of that epoch, then whole epochs
    assert steps(sampler) == uninterrupted[7:10]
    position["step"] = 10
    assert steps(sampler) == uninterrupted[10:15]


def test_the_stream_depends_on_the_seed_only_through_the_permutations():
    a = FitStreamSampler(30, 5, 6, lambda: 0, seed=0)
    b = FitStreamSampler(30, 5, 6, lambda: 0, seed=0)
    c = FitStreamSampler(30, 5, 6, lambda: 0, seed=1)
    assert list(a) == list(b) != list(c)
    assert list(a)[:30] == torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()


def test_global_batch_size_and_too_few_images():
    assert global_batch_size(100, 16, 2) == 32
    assert global_batch_size(10, 16, 1) == 10
    assert global_batch_size(11, 16, 2) == 10  # equal slices per rank
    with pytest.raises(ValueError, match="3 images cannot be split across 4 processes"):
        global_batch_size(3, 16, 4)
