"""Which unlabeled images each fit step sees: a seeded stream of global batches, split across processes.

The images of fit step ``g`` are a pure function of the seed, the task's size, the global batch
size and ``g``: pass ``p`` over a task's images is ``torch.randperm(n, generator=seed + p)``, and
step ``g`` takes the next ``global_batch`` images of it. A process of rank ``r`` out of ``W`` takes
the ``r``-th of ``W`` equal slices of that global batch. Hence

- ``W`` processes with ``batch_size`` images each see exactly the images that one process with
  ``W * batch_size`` sees (so DDP reproduces a single-device run with the same global batch), and
  the ranks never share an image within a step;
- a run resumed at step ``g`` draws what an uninterrupted run draws from step ``g`` on.

Evaluation (and the passes of :meth:`~lit_adamerging.MultiTaskDataModule.unlabeled_batches`) splits a
task's images across processes with :class:`EvalShardSampler`: every image to exactly one process, none
repeated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


def global_batch_size(num_images: int, batch_size: int, world_size: int) -> int:
    """Images per step over all processes: ``batch_size * world_size``, or all the images
    (rounded down to a multiple of ``world_size``) when the task has fewer."""
    if num_images < world_size:
        raise ValueError(f"{num_images} images cannot be split across {world_size} processes.")
    return min(batch_size * world_size, num_images - num_images % world_size)


def steps_per_pass(num_images: int, batch_size: int, world_size: int) -> int:
    """Steps that one pass over a task's images lasts (a partial last global batch is skipped)."""
    return num_images // global_batch_size(num_images, batch_size, world_size)


class FitStreamSampler(DistributedSampler):
    """Indices of the fit images, step by step, for one task and one process.

    A :class:`~torch.utils.data.DistributedSampler` so that Lightning leaves it in place under DDP
    (it would otherwise replace it with one that pads and reshuffles per rank).

    Args:
        num_images: size of the task's image set.
        batch_size: images per step on this process (the DataLoader's batch size must match).
        steps_per_epoch: length of one Lightning epoch in steps (the same for every task, so no loader cycles).
        first_step: called at each ``iter()``; returns the global step to start from (the fit
            progress, which a resumed run restores).
        seed: base seed of the permutations.
        world_size: number of processes.
        rank: this process.

    Example:
        >>> one = FitStreamSampler(10, 4, steps_per_epoch=2, first_step=lambda: 0, seed=0)
        >>> halves = [FitStreamSampler(10, 2, 2, lambda: 0, 0, world_size=2, rank=r) for r in (0, 1)]
        >>> a, b = list(halves[0]), list(halves[1])
        >>> list(one)[:4] == a[:2] + b[:2]
        True
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        steps_per_epoch: int,
        first_step: Callable[[], int],
        seed: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        self.num_images = num_images
        self.global_batch = global_batch_size(num_images, batch_size, world_size)
        self.batch_size = self.global_batch // world_size
        self.steps_per_pass = steps_per_pass(num_images, batch_size, world_size)
        self.steps_per_epoch = steps_per_epoch
        self.first_step = first_step
        self.seed = seed
        self.num_replicas = world_size
        self.rank = rank
        self.epoch = 0
        self._permutation: tuple[int, torch.Tensor] | None = None

    def _pass(self, index: int) -> torch.Tensor:
        if self._permutation is None or self._permutation[0] != index:
            generator = torch.Generator().manual_seed(self.seed + index)
            self._permutation = (index, torch.randperm(self.num_images, generator=generator))
        return self._permutation[1]

    def indices(self, step: int) -> list[int]:
        """This process's images at global step ``step``."""
        pass_index, position = divmod(step, self.steps_per_pass)
        start = position * self.global_batch + self.rank * self.batch_size
        return self._pass(pass_index)[start : start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[int]:
        first = self.first_step()
        # A resumed run starts mid-epoch: the rest of that epoch, then whole epochs.
        end = (first // self.steps_per_epoch + 1) * self.steps_per_epoch
        for step in range(first, end):
            yield from self.indices(step)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.batch_size


class EvalShardSampler(DistributedSampler):
    """This process's share of ``num_images`` images, in order, without padding: ``rank, rank + W, rank + 2W, ...``.

    Every image goes to exactly one of the ``W = world_size`` processes, so the ranks' counts differ by at most
    one (torch's :class:`~torch.utils.data.DistributedSampler` would repeat images to even them out, and an
    evaluation would count those twice). A :class:`~torch.utils.data.DistributedSampler`, so that Lightning
    leaves it in place under DDP.

    Example:
        >>> [list(EvalShardSampler(5, world_size=2, rank=r)) for r in (0, 1)]
        [[0, 2, 4], [1, 3]]
    """

    def __init__(self, num_images: int, world_size: int, rank: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes' ranks (0 to {world_size - 1}).")
        if 0 < num_images < world_size:
            raise ValueError(f"{num_images} images cannot be split across {world_size} processes: one would get none.")
        self.num_images = num_images
        self.num_replicas = world_size
        self.rank = rank
        self.shuffle = False
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_images, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_images, self.num_replicas))


class EvalShardBatches(DistributedSampler):
    """This process's share of ``num_images`` images (as :class:`EvalShardSampler`: ``rank, rank + W, ...``), in
    batches of at most ``batch_size``: as many batches on every process.

    A sharded model (:class:`~lit_adamerging.ShardedMergingStrategy`) gathers weights from every process in
    each forward, so every process must run the same number of them. The count is the one the process with
    the most images needs; each process splits its images into that many batches of nearly equal size.
    It yields lists of indices (a DataLoader with ``batch_size=None`` reads each as one batch). A
    :class:`~torch.utils.data.DistributedSampler` (without its dataset), so that Lightning leaves it in place.

    Example:
        >>> [list(EvalShardBatches(9, world_size=2, rank=r, batch_size=4)) for r in (0, 1)]
        [[[0, 2, 4], [6, 8]], [[1, 3], [5, 7]]]
    """

    def __init__(self, num_images: int, world_size: int, rank: int, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        own = torch.tensor(list(EvalShardSampler(num_images, world_size, rank)), dtype=torch.long)
        most, fewest = -(-num_images // world_size), num_images // world_size
        count = -(-most // batch_size)
        if fewest < count:  # decided from the counts alone, so every process raises it, none waits for the others
            raise ValueError(
                f"{num_images} images on {world_size} processes with batches of at most {batch_size}: a process with "
                f"{fewest} images cannot run the {count} batches every process must run. Use a batch size of 2 or more."
            )
        self.batches = [batch.tolist() for batch in own.tensor_split(count)]
        self.num_replicas = world_size
        self.rank = rank
        self.shuffle = False
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
