"""TSV-M, Iso-C and Iso-CTS (lit_adamerging.merging.spectral, lightning.spectral) against plain references.

Each reference follows the paper's steps on small random matrices with ``torch.linalg.svd`` in float64:
per-task SVDs truncated, bases concatenated, each concatenation decorrelated by its own SVD
(``X = P S Q^T -> P Q^T``), recombined; Iso: the summed task vector's SVD, the common subspace, each
task's vector projected off it, the spectrum flattened to the mean.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from helpers import TINY_CLIP, TINY_TIMM, build_tiny_zoo
from lit_adamerging import (
    ExportMergedEncoder,
    IsotropicMergingModule,
    MultiTaskDataModule,
    SyntheticTask,
    SyntheticZoo,
    TSVMergingModule,
)
from lit_adamerging.lightning.base import intended_warnings_ignored
from lit_adamerging.merging import (
    TaskVectorError,
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
from lit_adamerging.merging.spectral import iso_split, tsv_rank
from lit_adamerging.methods import create_method, method_of
from lit_adamerging.models import create_encoder

NUM_CLASSES = {"alpha": 5, "beta": 3, "gamma": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """Small decompositions on one thread: LAPACK's threads, waiting on each other on a shared 2-core machine, made
    these tests 40 times slower (docs/spectral_merging.md, Cost)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- plain references
def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, V`` (V's columns the right singular vectors), float64."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u, s, vh.mT


def decorrelated(x: Tensor) -> Tensor:
    """The paper's orthogonalisation: X = P S Q^T -> P Q^T."""
    p, _, q = svd(x)
    return p @ q.mT


def reference_tsv(taus: Tensor, k: int) -> Tensor:
    """TSV-M of one layer: ``taus [T, m, n]``, each task's top ``k``."""
    bases = [svd(tau) for tau in taus]
    u = torch.cat([b[0][:, :k] for b in bases], 1)
    s = torch.cat([b[1][:k] for b in bases])
    v = torch.cat([b[2][:, :k] for b in bases], 1)
    return decorrelated(u) @ torch.diag(s) @ decorrelated(v).mT


def reference_iso(taus: Tensor, common_fraction: float) -> Tensor:
    """Iso-CTS of one layer (Iso-C for ``common_fraction = 1``): ``taus [T, m, n]``."""
    rank, num_tasks = min(taus.shape[1:]), len(taus)
    common = int(common_fraction * rank)
    per_task = round((rank - common) / num_tasks)
    common = rank - num_tasks * per_task
    u, s, v = svd(taus.sum(0))
    us, ss, vs = [u[:, :common]], [s[:common]], [v[:, :common]]
    for tau in taus.double():
        own = svd(tau - us[0] @ us[0].mT @ tau)
        us.append(own[0][:, :per_task])
        ss.append(own[1][:per_task])
        vs.append(own[2][:, :per_task])
    mean = torch.cat(ss).mean()
    return mean * decorrelated(torch.cat(us, 1)) @ decorrelated(torch.cat(vs, 1)).mT


def random_taus(num_tasks: int, rows: int, columns: int, seed: int = 0) -> Tensor:
    return torch.randn(num_tasks, rows, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def nonzero_singular_values(matrix: Tensor) -> Tensor:
    s = torch.linalg.svdvals(matrix.double())
    return s[s > s.max() * 1e-8]


# ------------------------------------------------------------------------------------------- TSV-M
@pytest.mark.parametrize(("num_tasks", "rows", "columns"), [(3, 12, 9), (4, 6, 20), (2, 10, 10)])
def test_tsv_equals_the_papers_steps(num_tasks, rows, columns):
    taus = random_taus(num_tasks, rows, columns)
    k = min(rows, columns) // num_tasks
    expected = reference_tsv(taus, k)
    torch.testing.assert_close(tsv_factors(taus[None]).matrix()[0], expected, rtol=1e-10, atol=1e-10)
    # stored in float32, as the modules store task vectors: the float32 inputs' rounding only
    got = tsv_factors(taus[None].float()).matrix()[0]
    torch.testing.assert_close(got, reference_tsv(taus.float(), k), rtol=1e-5, atol=1e-5)
    # a rank fraction other than 1/T
    torch.testing.assert_close(tsv_factors(taus[None], 0.5).matrix()[0], reference_tsv(taus, min(rows, columns) // 2),
                               rtol=1e-10, atol=1e-10)


def test_tsv_decorrelated_bases_are_orthonormal():
    taus = random_taus(4, 16, 12)
    factors = tsv_factors(taus[None])
    eye = torch.eye(factors.u.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(factors.u[0].mT @ factors.u[0], eye, rtol=0, atol=1e-9)
    torch.testing.assert_close(factors.v[0].mT @ factors.v[0], eye, rtol=0, atol=1e-9)
    # the kept singular values, task by task, largest first
    k = tsv_rank(12, 4)
    torch.testing.assert_close(factors.s[0], torch.cat([svd(tau)[1][:k] for tau in taus]))
    # orthogonalize is the polar factor: P Q^T of the SVD
    x = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(orthogonalize(x), decorrelated(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(orthogonalize(x.mT), decorrelated(x.mT), rtol=1e-10, atol=1e-10)  # wide


def test_tsv_reproduces_the_low_rank_sum_when_the_tasks_subspaces_are_orthogonal():
    generator = torch.Generator().manual_seed(1)
    rows, columns, num_tasks = 14, 12, 3
    k = tsv_rank(12, num_tasks)  # 4: each task exactly rank k, on its own orthogonal directions
    left = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(columns, columns, generator=generator, dtype=torch.float64))[0]
    taus = torch.stack([
        left[:, t * k:(t + 1) * k] @ torch.diag(torch.rand(k, generator=generator, dtype=torch.float64) + 0.5)
        @ right[:, t * k:(t + 1) * k].mT
        for t in range(num_tasks)
    ])
    torch.testing.assert_close(tsv_factors(taus[None]).matrix()[0], taus.sum(0), rtol=1e-10, atol=1e-10)
    # more rank per task than kept (rank 6, 3 kept): each task's rank-3 truncation, summed
    blocks = torch.stack([
        left[:, t * 6:(t + 1) * 6] @ torch.diag(torch.rand(6, generator=generator, dtype=torch.float64) + 0.5)
        @ right[:, t * 6:(t + 1) * 6].mT
        for t in range(2)
    ])
    truncated = sum(svd(b)[0][:, :3] @ torch.diag(svd(b)[1][:3]) @ svd(b)[2][:, :3].mT for b in blocks)
    torch.testing.assert_close(tsv_factors(blocks[None], 0.25).matrix()[0], truncated, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------- Iso-C and Iso-CTS
@pytest.mark.parametrize(("rows", "columns"), [(10, 7), (5, 11)])
def test_iso_c_flattens_the_sums_spectrum_to_its_mean(rows, columns):
    taus = random_taus(4, rows, columns)
    merged = iso_task_vector({"w": taus}, alpha=1.7, common_fraction=1.0)["w"]
    s = nonzero_singular_values(merged)
    mean = torch.linalg.svdvals(taus.sum(0)).mean()
    assert len(s) == min(rows, columns)
    torch.testing.assert_close(s, torch.full_like(s, 1.7 * mean.item()), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged, 1.7 * reference_iso(taus, 1.0), rtol=1e-10, atol=1e-10)
    # the same directions as the sum
    u, _, v = svd(taus.sum(0))
    torch.testing.assert_close(merged, 1.7 * mean * u @ v.mT, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("common_fraction", [0.8, 0.5, 0.0])
@pytest.mark.parametrize(("num_tasks", "rows", "columns"), [(3, 12, 9), (4, 8, 20)])
def test_iso_cts_equals_the_papers_steps(num_tasks, rows, columns, common_fraction):
    taus = random_taus(num_tasks, rows, columns)
    merged = iso_factors(taus[None], common_fraction).matrix()[0]
    torch.testing.assert_close(merged, reference_iso(taus, common_fraction), rtol=1e-10, atol=1e-10)
    s = nonzero_singular_values(merged)
    common, per_task = iso_split(min(rows, columns), num_tasks, common_fraction)
    assert len(s) == common + num_tasks * per_task == min(rows, columns)
    torch.testing.assert_close(s, torch.full_like(s, s[0].item()))


def test_iso_split_and_tsv_rank_follow_the_authors_rounding():
    assert iso_split(768, 8, 0.8) == (616, 19)  # 614 common, 154 / 8 = 19.25 -> 19 each
    assert iso_split(768, 4, 0.8) == (616, 38)  # 154 / 4 = 38.5 -> 38 (ties to even)
    assert iso_split(9, 4, 0.8) == (9, 0)  # a 3x3 depthwise kernel: 2 / 4 rounds to 0, all common: Iso-C
    assert iso_split(10, 4, 0.0) == (2, 2)
    assert all(sum((c, t * p)) == r for r, t in [(6, 4), (7, 3), (64, 8)] for c, p in [iso_split(r, t, 0.3)])
    assert [tsv_rank(768, 8), tsv_rank(9, 4), tsv_rank(9, 16), tsv_rank(9, 2, 1.0)] == [96, 2, 1, 9]


# ------------------------------------------------------------------------------------------- the matrix rule
def test_matrices_are_linear_conv_and_attention_weights():
    clip = create_encoder(TINY_CLIP)
    matrices = spectral_matrices(clip)
    assert matrices == [
        "conv1.weight",
        *(f"transformer.resblocks.{i}.{name}" for i in range(2) for name in
          ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")),
    ]
    # embeddings and the bare output projection are not matrices of a linear module
    assert {"positional_embedding", "class_embedding", "proj"}.isdisjoint(matrices)
    timm = create_encoder(TINY_TIMM)
    convs = [name for name, module in timm.named_modules() if isinstance(module, nn.Conv2d)]
    assert spectral_matrices(timm) == [f"{name}.weight" for name in convs]
    assert "blocks.3.0.conv_dw.weight" in spectral_matrices(timm)  # depthwise [128, 1, 3, 3] -> [128, 9]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert spectral_matrices(separate) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]


def test_other_tensors_take_the_mean_and_convolutions_are_reshaped():
    generator = torch.Generator().manual_seed(3)
    conv = torch.randn(3, 6, 2, 3, 3, generator=generator, dtype=torch.float64)  # [T, out, in, kh, kw]
    bias = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    table = torch.randn(3, 5, 4, generator=generator, dtype=torch.float64)  # 2-D but not named a matrix
    task_vectors = {"conv.weight": conv, "conv.bias": bias, "embedding": table}
    for merged, layer in [
        (tsv_task_vector(task_vectors, 0.5, matrices=["conv.weight"]), reference_tsv(conv.reshape(3, 6, 18), 2)),
        (iso_task_vector(task_vectors, 0.5, matrices=["conv.weight"]), reference_iso(conv.reshape(3, 6, 18), 0.8)),
    ]:
        assert list(merged) == list(task_vectors)
        torch.testing.assert_close(merged["conv.weight"], 0.5 * layer.reshape(6, 2, 3, 3), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(merged["conv.bias"], 0.5 * bias.mean(0))
        torch.testing.assert_close(merged["embedding"], 0.5 * table.mean(0))
    # without names (a plain state dict), every tensor of two or more dimensions is a matrix
    merged = tsv_task_vector(task_vectors)
    torch.testing.assert_close(merged["embedding"], reference_tsv(table, 1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged["conv.bias"], bias.mean(0))


# ------------------------------------------------------------------------------------------- degenerate layers
def test_one_task():
    tau = random_taus(1, 9, 7)
    torch.testing.assert_close(tsv_task_vector({"w": tau}, 0.8)["w"], 0.8 * tau[0], rtol=1e-10, atol=1e-10)
    iso_c = iso_task_vector({"w": tau}, 0.8, 1.0)["w"]
    u, s, v = svd(tau[0])
    torch.testing.assert_close(iso_c, 0.8 * s.mean() * u @ v.mT, rtol=1e-10, atol=1e-10)
    # one task's own directions outside its top 80% are its remaining ones: Iso-CTS is Iso-C
    torch.testing.assert_close(iso_task_vector({"w": tau}, 0.8, 0.8)["w"], iso_c, rtol=1e-9, atol=1e-9)


def test_identical_task_vectors():
    tau = random_taus(1, 12, 9)[0]
    same = tau.expand(3, 12, 9)
    u, s, v = svd(tau)
    # TSV-M: the concatenated bases repeat; their decorrelation is the partial isometry on their span, so the
    # merge is the task vector's rank-k truncation (not T times it, nor arbitrary extra directions)
    torch.testing.assert_close(tsv_factors(same[None]).matrix()[0], u[:, :3] @ torch.diag(s[:3]) @ v[:, :3].mT,
                               rtol=1e-9, atol=1e-9)
    # Iso-CTS: the common directions plus the task's own (the same for every task), flat spectrum
    merged = iso_factors(same[None], 0.8).matrix()[0]
    common, per_task = iso_split(9, 3, 0.8)
    s_sum = 3 * s
    own = svd(tau - u[:, :common] @ u[:, :common].mT @ tau)
    mean = torch.cat([s_sum[:common], own[1][:per_task].repeat(3)]).mean()
    expected = mean * (u[:, :common] @ v[:, :common].mT + own[0][:, :per_task] @ own[2][:, :per_task].mT)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, expected, rtol=1e-9, atol=1e-9)
    assert len(nonzero_singular_values(merged)) == common + per_task


def test_rank_deficient_and_zero_layers():
    generator = torch.Generator().manual_seed(4)
    taus = torch.stack([  # two rank-1 task vectors: TSV keeps 3 components of each, two of them zero
        torch.randn(8, 1, generator=generator, dtype=torch.float64) @ torch.randn(1, 6, generator=generator,
                                                                                   dtype=torch.float64)
        for _ in range(2)
    ])
    merged = tsv_factors(taus[None]).matrix()[0]
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, reference_tsv(taus, 1), rtol=1e-9, atol=1e-9)  # the zero components dropped
    assert len(nonzero_singular_values(merged)) == 2
    # Iso-C of a rank-2 sum: two equal singular values, their mean the sum's nonzero mean (no invented directions)
    iso_c = iso_factors(taus[None], 1.0).matrix()[0]
    torch.testing.assert_close(nonzero_singular_values(iso_c), nonzero_singular_values(taus.sum(0)).mean().expand(2))
    iso_cts = iso_factors(taus[None], 0.8).matrix()[0]
    assert torch.isfinite(iso_cts).all() and len(nonzero_singular_values(iso_cts)) == 2
    # a layer no task changed merges to zero, without NaN
    zeros = torch.zeros(3, 5, 4)
    for method in (lambda: tsv_factors(zeros[None]), lambda: iso_factors(zeros[None], 1.0),
                   lambda: iso_factors(zeros[None], 0.8)):
        assert torch.equal(method().matrix(), torch.zeros(1, 5, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("rank_fraction", [0, -0.1, 1.5, math.nan, True, "half"])
def test_rank_fraction_outside_the_unit_interval_is_refused(rank_fraction):
    with pytest.raises(ValueError, match=r"rank_fraction must be in \(0, 1\]"):
        tsv_task_vector({"w": random_taus(2, 4, 4)}, rank_fraction=rank_fraction)
    with pytest.raises(ValueError, match=r"rank_fraction must be in \(0, 1\]"):
        TSVMergingModule(SyntheticZoo(TINY_CLIP), NUM_CLASSES, rank_fraction=rank_fraction)


@pytest.mark.parametrize("alpha", [0, -1.0, math.nan, math.inf, None])
def test_alpha_must_be_positive(alpha):
    for call in (
        lambda: tsv_task_vector({"w": random_taus(2, 4, 4)}, alpha),
        lambda: iso_task_vector({"w": random_taus(2, 4, 4)}, alpha),
        lambda: TSVMergingModule(SyntheticZoo(TINY_CLIP), NUM_CLASSES, alpha=alpha),
        lambda: IsotropicMergingModule(SyntheticZoo(TINY_CLIP), NUM_CLASSES, alpha=alpha),
    ):
        with pytest.raises(ValueError, match="alpha must be a positive number"):
            call()


def test_other_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"common_fraction must be in \[0, 1\]"):
        IsotropicMergingModule(SyntheticZoo(TINY_CLIP), NUM_CLASSES, common_fraction=1.2)
    task_vectors = {"w": random_taus(2, 4, 4), "b": random_taus(2, 1, 4)[:, 0]}
    with pytest.raises(ValueError, match=r"matrices names tensors without task vectors: \['missing'\]"):
        tsv_task_vector(task_vectors, matrices=["w", "missing"])
    with pytest.raises(ValueError, match=r"matrices names 'b', of shape \(4,\): a matrix needs two or more"):
        iso_task_vector(task_vectors, matrices=["b"])
    with pytest.raises(ValueError, match="expected task vectors stacked as"):
        tsv_factors(random_taus(2, 4, 4))


class ReshapedZoo(SyntheticZoo):
    """A zoo whose task ``beta`` has another architecture: one layer of another shape."""

    def _finetuned(self, encoder: nn.Module, task: str) -> dict[str, Tensor]:
        state = super()._finetuned(encoder, task)
        if task == "beta":
            state["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(128, 64)
        return state


@pytest.mark.parametrize("method", ["tsv_merging", "iso_cts_merging"])
def test_a_zoo_whose_layer_shapes_differ_is_refused_naming_the_task_and_tensor(method):
    module = create_method(method, ReshapedZoo(TINY_CLIP, seed=0), NUM_CLASSES)
    expected = (r"task 'beta', key 'transformer.resblocks.0.mlp.c_fc.weight': shape \(128, 64\) differs from the "
                r"pretrained \(256, 64\).*Merge only models fine-tuned from this pretrained encoder")
    with pytest.raises(TaskVectorError, match=expected):
        module.configure_model()
    loaded = SyntheticZoo(TINY_CLIP, seed=0).load(NUM_CLASSES)
    finetuned = dict(loaded.finetuned)
    finetuned["beta"] = {**finetuned["beta"], "proj": torch.zeros(3, 3)}
    with pytest.raises(TaskVectorError, match=r"task 'beta', key 'proj'"):
        tsv_merging(loaded.encoder.state_dict(), finetuned)


# ------------------------------------------------------------------------------------------- the modules
FUNCTIONS = {
    "tsv_merging": lambda pre, tuned, **kw: tsv_merging(pre, tuned, 1.0, None, **kw),
    "iso_c_merging": lambda pre, tuned, **kw: iso_c_merging(pre, tuned, 1.0, **kw),
    "iso_cts_merging": lambda pre, tuned, **kw: iso_cts_merging(pre, tuned, 1.0, 0.8, **kw),
}
REFERENCES = {
    "tsv_merging": lambda taus: reference_tsv(taus, min(taus.shape[1:]) // len(taus)),
    "iso_c_merging": lambda taus: reference_iso(taus, 1.0),
    "iso_cts_merging": lambda taus: reference_iso(taus, 0.8),
}


@pytest.mark.parametrize("encoder", [TINY_CLIP, TINY_TIMM])
@pytest.mark.parametrize("method", sorted(FUNCTIONS))
def test_module_by_name_equals_the_function_and_the_plain_reference(encoder, method):
    zoo = SyntheticZoo(encoder, seed=0)
    loaded = zoo.load(NUM_CLASSES)
    pretrained = loaded.encoder.state_dict()
    buffers = {name for name, _ in loaded.encoder.named_buffers()}
    finetuned = {task: loaded.finetuned[task] for task in NUM_CLASSES}
    module = create_method(method, zoo, NUM_CLASSES)
    assert method_of(module) == method and not module.LEARNS
    got = module.merged_state_dict()
    matrices = spectral_matrices(loaded.encoder)
    expected = FUNCTIONS[method](pretrained, finetuned, matrices=matrices, buffers=buffers)
    assert list(got) == list(pretrained)
    for key in pretrained:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    # the plain reference, tensor by tensor: each matrix from float32 task vectors, every other tensor their mean
    for key, base in pretrained.items():
        if key in buffers:
            assert torch.equal(got[key], base), key  # buffer_policy "pretrained"
            continue
        taus = torch.stack([finetuned[task][key].float() - base.float() for task in NUM_CLASSES])
        update = REFERENCES[method](taus.reshape(len(taus), base.shape[0], -1)).reshape(base.shape) \
            if key in matrices else taus.mean(0)
        torch.testing.assert_close(got[key], base + update.float(), rtol=1e-5, atol=1e-6, msg=key)


def test_bfloat16_task_vectors_and_merged_buffers():
    zoo = SyntheticZoo(TINY_TIMM, seed=0)
    full = TSVMergingModule(zoo, NUM_CLASSES, buffer_policy="merge").merged_state_dict()
    half = TSVMergingModule(zoo, NUM_CLASSES, buffer_policy="merge", task_vector_dtype="bfloat16")
    merged = half.merged_state_dict()
    assert all(v.dtype == torch.bfloat16 for v in half.merger.stacked_task_vectors().values())
    for key, value in full.items():
        assert value.dtype == merged[key].dtype and torch.isfinite(merged[key].float()).all()
        torch.testing.assert_close(merged[key].float(), value.float(), rtol=2e-2, atol=2e-3, msg=key)
    # buffer_policy "merge": the batch-norm statistics take alpha times the mean of their task vectors
    encoder, finetuned = build_tiny_zoo(TINY_TIMM, perturb_buffers=True)
    buffers = {name for name, _ in encoder.named_buffers()}
    pretrained = encoder.state_dict()
    merged = iso_cts_merging(pretrained, finetuned, 0.5, buffers=buffers, buffer_policy="merge",
                             matrices=spectral_matrices(encoder))
    for key in buffers:
        if pretrained[key].is_floating_point():
            mean = sum(state[key] - pretrained[key] for state in finetuned.values()) / len(finetuned)
            assert not torch.equal(mean, torch.zeros_like(mean))
            torch.testing.assert_close(merged[key], pretrained[key] + 0.5 * mean, msg=key)
        else:
            assert torch.equal(merged[key], pretrained[key])  # integer buffers are never merged


def test_test_run_evaluates_and_exports_the_spectral_merge(tmp_path: Path):
    tasks = {
        "a": SyntheticTask(num_classes=5, num_images=6, image_size=32, seed=1),
        "b": SyntheticTask(num_classes=3, num_images=4, image_size=32, seed=2),
        "c": SyntheticTask(num_classes=4, num_images=4, image_size=32, seed=3),
    }
    data = MultiTaskDataModule(tasks, unseen_tasks=["c"], eval_batch_size=4, cache="none")
    model = TSVMergingModule(SyntheticZoo(TINY_CLIP), num_classes=data.num_classes, unseen_tasks=["c"], alpha=0.9)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         max_epochs=1, callbacks=[ExportMergedEncoder(str(tmp_path / "merged.safetensors"))])
    with intended_warnings_ignored():
        results = trainer.test(model, datamodule=data, verbose=False)
    assert {"test/acc/a", "test/acc/b", "test/acc/c"} <= {key for logged in results for key in logged}
    exported = load_file(tmp_path / "merged.safetensors")
    # the merge of the seen tasks only, as the function computes it
    loaded = SyntheticZoo(TINY_CLIP).load(data.num_classes)
    seen = {task: loaded.finetuned[task] for task in ("a", "b")}
    buffers = {name for name, _ in loaded.encoder.named_buffers()}
    expected = tsv_merging(loaded.encoder.state_dict(), seen, 0.9, matrices=spectral_matrices(loaded.encoder),
                           buffers=buffers)
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=1e-6, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="learns nothing, so there is nothing to fit"):
        trainer.fit(model, datamodule=data)
