"""The merging core: pure torch, no Lightning. Read it in this order:

1. :mod:`~lit_adamerging.merging.task_vectors` - validate and stack ``theta_k - theta_0``;
2. :mod:`~lit_adamerging.merging.ties` - TIES trim / elect / disjoint (AdaMerging++);
3. :mod:`~lit_adamerging.merging.merge` - the fused merge, the coefficients, the merged forward;
4. :mod:`~lit_adamerging.merging.objective` - the entropy AdaMerging minimises;
5. :mod:`~lit_adamerging.merging.baselines` - weight averaging, task arithmetic, TIES-merging.
"""

from lit_adamerging.merging.baselines import task_arithmetic, ties_merging, weight_averaging
from lit_adamerging.merging.merge import (
    Granularity,
    MergedEncoder,
    MergingCoefficients,
    group_names,
    group_task_vectors,
    merge,
    merge_groups,
)
from lit_adamerging.merging.objective import entropy
from lit_adamerging.merging.task_vectors import (
    BUFFER_POLICIES,
    BufferPolicy,
    TaskVectorError,
    check_compatible,
    stack_task_vectors,
)
from lit_adamerging.merging.ties import ties_task_vectors

__all__ = [
    "BUFFER_POLICIES",
    "BufferPolicy",
    "Granularity",
    "MergedEncoder",
    "MergingCoefficients",
    "TaskVectorError",
    "check_compatible",
    "entropy",
    "group_names",
    "group_task_vectors",
    "merge",
    "merge_groups",
    "stack_task_vectors",
    "task_arithmetic",
    "ties_merging",
    "ties_task_vectors",
    "weight_averaging",
]
