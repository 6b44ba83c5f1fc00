"""The merging core: pure torch, no Lightning. Read it in this order:

1. :mod:`~lit_adamerging.merging.task_vectors` - validate and stack ``theta_k - theta_0``, grouped by shape;
2. :mod:`~lit_adamerging.merging.ties` - TIES trim / elect / disjoint (AdaMerging++);
3. :mod:`~lit_adamerging.merging.merge` - the fused merge, the coefficients, the merged forward (private
   parts: ``_kernels`` the per-group arithmetic, ``_autograd`` the autograd node, ``_graphs`` CUDA graphs);
4. :mod:`~lit_adamerging.merging.objective` - the entropy AdaMerging minimises;
5. :mod:`~lit_adamerging.merging.baselines` - weight averaging, task arithmetic, TIES-merging;
6. :mod:`~lit_adamerging.merging.fisher`, :mod:`~lit_adamerging.merging.regmean` - Fisher merging and
   RegMean, from statistics of unlabeled images;
7. :mod:`~lit_adamerging.merging.surgery` - Representation Surgery's per-task maps on the merged features;
8. :mod:`~lit_adamerging.merging.spectral` - TSV-M and isotropic merging (Iso-C, Iso-CTS): each layer's task
   vectors as matrices, merged through their singular vectors.
9. :mod:`~lit_adamerging.merging.emr` - EMR-Merging: a unified task vector, a bit mask and a rescaler per task,
   its export file and the loader that rebuilds a task's weights.
10. :mod:`~lit_adamerging.merging.rank_wise` - rank-wise merging: each matrix's task vectors as singular
    components, one gate per component (what rank-wise AdaMerging learns).
11. :mod:`~lit_adamerging.merging.wemoe` - WEMoE: MLPs as weight-ensembling mixtures routed per sample, the
    per-sample product, its export file and loader.
12. :mod:`~lit_adamerging.merging.sharded` - the merge with its weights split across processes (FSDP2's layout):
    each process holds its rows of every task vector.
"""

from lit_adamerging.merging.baselines import task_arithmetic, ties_merging, weight_averaging
from lit_adamerging.merging.emr import (
    RESCALER_SUMS,
    EMRFileError,
    EMRMerge,
    EMRStorage,
    RescalerSum,
    emr_elect,
    emr_merging,
    emr_storage,
    load_emr,
    pack_masks,
    save_emr,
    unpack_mask,
)
from lit_adamerging.merging.fisher import FisherWeightedAverage, fisher_merge, fisher_sums
from lit_adamerging.merging.merge import Granularity, MergedEncoder, MergingCoefficients, merge, merge_groups
from lit_adamerging.merging.objective import entropy
from lit_adamerging.merging.rank_wise import (
    RankComponents,
    rank_components,
    rank_wise_merging,
    rank_wise_task_vector,
)
from lit_adamerging.merging.regmean import GramRecorder, RegMeanAverage, regmean_layers, regmean_merge
from lit_adamerging.merging.sharded import ShardedMergedEncoder, agreed, shard_rows, sharded_rows, take_rows
from lit_adamerging.merging.spectral import (
    SpectralFactors,
    iso_c_merging,
    iso_cts_merging,
    iso_factors,
    iso_task_vector,
    orthogonalize,
    spectral_matrices,
    tsv_factors,
    tsv_merging,
    tsv_task_vector,
)
from lit_adamerging.merging.surgery import SURGERY_RANK, FeatureSurgery, SurgeryModules
from lit_adamerging.merging.task_vectors import (
    BUFFER_POLICIES,
    BufferPolicy,
    StackedTaskVectors,
    TaskVectorError,
    check_compatible,
    group_names,
    group_task_vectors,
    stack_task_vectors,
)
from lit_adamerging.merging.ties import ties_task_vectors
from lit_adamerging.merging.wemoe import (
    Router,
    WeightEnsemblingMixture,
    WEMoEEncoder,
    WEMoEFileError,
    find_mlp_modules,
    load_wemoe,
    mixed_layers,
    per_sample_delta,
    save_wemoe,
)

__all__ = [
    "BUFFER_POLICIES",
    "BufferPolicy",
    "EMRFileError",
    "EMRMerge",
    "EMRStorage",
    "FeatureSurgery",
    "FisherWeightedAverage",
    "Granularity",
    "GramRecorder",
    "MergedEncoder",
    "ShardedMergedEncoder",
    "MergingCoefficients",
    "RESCALER_SUMS",
    "RankComponents",
    "RegMeanAverage",
    "RescalerSum",
    "Router",
    "SURGERY_RANK",
    "SpectralFactors",
    "StackedTaskVectors",
    "SurgeryModules",
    "TaskVectorError",
    "WEMoEEncoder",
    "WEMoEFileError",
    "WeightEnsemblingMixture",
    "agreed",
    "check_compatible",
    "emr_elect",
    "emr_merging",
    "emr_storage",
    "entropy",
    "find_mlp_modules",
    "fisher_merge",
    "fisher_sums",
    "group_names",
    "group_task_vectors",
    "iso_c_merging",
    "iso_cts_merging",
    "iso_factors",
    "iso_task_vector",
    "load_emr",
    "load_wemoe",
    "merge",
    "merge_groups",
    "mixed_layers",
    "orthogonalize",
    "pack_masks",
    "per_sample_delta",
    "rank_components",
    "rank_wise_merging",
    "rank_wise_task_vector",
    "regmean_layers",
    "regmean_merge",
    "save_emr",
    "save_wemoe",
    "shard_rows",
    "sharded_rows",
    "spectral_matrices",
    "stack_task_vectors",
    "take_rows",
    "task_arithmetic",
    "ties_merging",
    "ties_task_vectors",
    "tsv_factors",
    "tsv_merging",
    "tsv_task_vector",
    "unpack_mask",
    "weight_averaging",
]
