"""Data-free merging baselines of the paper's tables, on plain state dicts.

Each returns a merged state dict with the pretrained model's keys: weight averaging
(``theta_0 + mean_k tau_k``), task arithmetic (``theta_0 + 0.3 sum_k tau_k``) and TIES-merging
(``theta_0 + 0.3 * disjoint_mean(trimmed, sign-elected tau)``). The same results come out of
:class:`~lit_adamerging.AdaMergingModule` with fixed task-wise coefficients (see ``configs/``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from lit_adamerging.merging.merge import merge
from lit_adamerging.merging.task_vectors import BufferPolicy, stack_task_vectors
from lit_adamerging.merging.ties import ties_task_vectors


@torch.no_grad()
def merge_with_scale(
    pretrained: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor],
    scale: float,
) -> dict[str, Tensor]:
    """``theta_0 + scale * sum_k tau_k`` for every stacked tensor; other entries stay pretrained."""
    num_tasks = next(iter(task_vectors.values())).shape[0]
    coefficients = torch.full((num_tasks, len(task_vectors)), float(scale))
    merged = merge(pretrained, task_vectors, coefficients)
    return {key: merged.get(key, value) for key, value in pretrained.items()}


def weight_averaging(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    *,
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
) -> dict[str, Tensor]:
    """The average of the fine-tuned models, ``theta_0 + (1/T) sum_k tau_k``."""
    task_vectors = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy=buffer_policy)
    return merge_with_scale(pretrained, task_vectors, 1.0 / len(finetuned))


def task_arithmetic(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    scale: float = 0.3,
    *,
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
) -> dict[str, Tensor]:
    """Task arithmetic (Ilharco et al., 2023): ``theta_0 + scale * sum_k tau_k``."""
    task_vectors = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy=buffer_policy)
    return merge_with_scale(pretrained, task_vectors, scale)


def ties_merging(
    pretrained: Mapping[str, Tensor],
    finetuned: Mapping[str, Mapping[str, Tensor]],
    scale: float = 0.3,
    ties_k: float = 0.2,
    *,
    buffers: Collection[str] = (),
    buffer_policy: BufferPolicy = "pretrained",
) -> dict[str, Tensor]:
    """TIES-merging: ``theta_0 + scale * disjoint_mean(ties(tau))`` with top-``ties_k`` trimming; the module
    is :class:`~lit_adamerging.TaskArithmeticModule` with ``ties_k`` and ``ties_normalize=True``."""
    task_vectors = stack_task_vectors(pretrained, finetuned, buffers=buffers, buffer_policy=buffer_policy)
    return merge_with_scale(pretrained, ties_task_vectors(task_vectors, ties_k, normalize=True), scale)
