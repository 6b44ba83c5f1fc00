"""TIES-merging (Yadav et al., 2023) applied to stacked task vectors: trim, elect sign, disjoint.

- trim: in each task vector (all its tensors together) keep the ``k`` fraction of entries with the
  largest magnitude, zero the rest;
- elect: per entry, the sign of the sum over tasks of the trimmed values (the sign with the larger
  total mass); entries where that sum is zero take the sign that wins over the whole vector;
- disjoint: each task keeps only its trimmed entries whose sign agrees with the elected one.

AdaMerging++ learns coefficients over the per-task disjoint vectors; TIES-merging itself sums
them divided by the number of tasks that keep each entry (``normalize=True``) and scales by 0.3.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from lit_adamerging.merging.sharded import summed_across
from lit_adamerging.merging.task_vectors import empty_stacked


def _magnitude_thresholds(stacked: Mapping[str, Tensor], k: float) -> Tensor:
    """Per task, the smallest magnitude that is still among the top ``k`` fraction of its entries."""
    num_tasks = next(iter(stacked.values())).shape[0]
    thresholds = torch.empty(num_tasks, device=next(iter(stacked.values())).device)
    for task in range(num_tasks):
        magnitudes = torch.cat([tv[task].reshape(-1).abs().float() for tv in stacked.values()])
        keep = int(magnitudes.numel() * k)
        if keep >= magnitudes.numel():
            thresholds[task] = 0.0
        elif keep == 0:
            thresholds[task] = float("inf")
        else:
            thresholds[task] = magnitudes.kthvalue(magnitudes.numel() - keep + 1).values
    return thresholds


def _split_magnitude_thresholds(stacked: Mapping[str, Tensor], k: float, group: dist.ProcessGroup) -> Tensor:
    """:func:`_magnitude_thresholds` of task vectors whose entries are split across the processes of ``group``.

    The threshold is the ``keep``-th largest magnitude over all processes' entries, found exactly without
    gathering them: the bit patterns of non-negative floats sort as the floats do, so a bisection over
    float32 bit patterns, counting on each process the entries at or above the candidate and summing the
    counts across processes, ends on that very value (31 steps, one all-reduce of ``T`` counts each).
    """
    first = next(iter(stacked.values()))
    num_tasks, device = first.shape[0], first.device
    sizes = torch.tensor([sum(tv[0].numel() for tv in stacked.values())], dtype=torch.int64, device=device)
    total = int(summed_across(sizes, group).item())
    keep = int(total * k)
    if keep >= total:
        return torch.zeros(num_tasks, device=device)
    if keep == 0:
        return torch.full((num_tasks,), float("inf"), device=device)
    low = torch.zeros(num_tasks, dtype=torch.int64, device=device)  # count(>= low) >= keep holds throughout
    high = torch.full((num_tasks,), 0x7F800000 + 1, dtype=torch.int64, device=device)  # count(>= high) < keep
    while bool((high - low > 1).any()):
        middle = (low + high) // 2
        candidates = middle.to(torch.int32).view(torch.float32)
        counts = torch.zeros(num_tasks, dtype=torch.int64, device=device)
        for tv in stacked.values():
            magnitudes = tv.reshape(num_tasks, tv[0].numel()).abs().float()
            counts += (magnitudes >= candidates.unsqueeze(1)).sum(1)
        enough = summed_across(counts, group) >= keep
        low = torch.where(enough, middle, low)
        high = torch.where(enough, high, middle)
    return low.to(torch.int32).view(torch.float32)


def ties_task_vectors(
    stacked: Mapping[str, Tensor],
    k: float = 0.2,
    normalize: bool = False,
    *,
    group: dist.ProcessGroup | None = None,
    whole: Collection[str] = (),
) -> dict[str, Tensor]:
    """Trim, elect and disjoint the stacked task vectors; returns tensors of the same shapes.

    Args:
        stacked: ``{name: Tensor[T, *shape]}`` from :func:`stack_task_vectors`.
        k: fraction of each task vector's entries to keep (TIES' top-k%, default 20%).
        normalize: divide every entry by the number of tasks that keep it, so the sum over tasks of
            the result is TIES-merging's disjoint mean.
        group: when the task vectors' entries are split across the processes of this group (each process
            holding some rows of every tensor, :mod:`~lit_adamerging.merging.sharded`), the trim threshold and
            the sign that wins over the whole vector are computed over all processes' entries (the result
            is each process's rows of the undivided result).
        whole: with ``group``, the tensors every process holds whole rather than some rows of (counted once).

    Example:
        >>> tv = {"w": torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, 4.0, 0.1, 1.0]])}
        >>> ties_task_vectors(tv, k=0.5)["w"]
        tensor([[3., 0., 0., 2.],
                [0., 4., 0., 0.]])
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"the TIES keep fraction k must be in (0, 1], got {k}.")
    if not stacked:
        raise ValueError("no task vectors to merge.")
    # Split across processes, each entry is counted by the one process holding it (a whole tensor by the first).
    counted = stacked if group is None or dist.get_rank(group) == 0 else {
        name: tv for name, tv in stacked.items() if name not in set(whole)
    }
    thresholds = _magnitude_thresholds(stacked, k) if group is None else _split_magnitude_thresholds(counted, k, group)

    def trimmed(tv: Tensor) -> Tensor:  # recomputed per tensor: no full fp32 copy of the vectors is kept
        keep = tv.abs().float() >= thresholds.view((-1,) + (1,) * (tv.dim() - 1))
        return torch.where(keep, tv.float(), torch.zeros((), device=tv.device))

    elected = {name: torch.sign(trimmed(tv).sum(0)) for name, tv in stacked.items()}
    # Counted in float64: exact for any encoder (float32 counts stop being exact past 2^24 entries).
    total = torch.zeros((), dtype=torch.float64, device=next(iter(stacked.values())).device)
    for name in counted:
        total += elected[name].sum(dtype=torch.float64)
    if group is not None:
        total = summed_across(total, group)
    majority = torch.sign(total).to(torch.float32)
    num_tasks = next(iter(stacked.values())).shape[0]
    result = empty_stacked({name: tv[0] for name, tv in stacked.items()}, num_tasks)  # in each tensor's dtype
    for name, tv in stacked.items():
        signs = torch.where(elected[name] == 0, majority, elected[name])
        values = trimmed(tv)
        agrees = torch.where(signs > 0, values > 0, values < 0)
        selected = torch.where(agrees, values, torch.zeros((), device=tv.device))
        if normalize:
            selected = selected / agrees.sum(0).clamp(min=1)
        result[name].copy_(selected)
    return result
