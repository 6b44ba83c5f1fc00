"""The step benchmark end to end on a tiny ViT: the figures it writes and how they relate."""

import json
import math

import pytest

from helpers import TINY_CLIP
from lit_adamerging.benchmarks import step
from lit_adamerging.merging import spectral_matrices
from lit_adamerging.models.encoders import create_encoder

ISSUE_KEYS = (  # the keys issue 6 asks --json to hold
    "model", "tasks", "images_per_task", "granularity", "device", "adamerging_step_s", "plain_step_s", "ratio",
    "peak_memory_bytes", "eval_images_per_s",
)


@pytest.mark.parametrize(("granularity", "dtype", "element_size"), [("layer", "float32", 4), ("task", "bfloat16", 2)])
def test_bench_writes_consistent_figures(tmp_path, granularity: str, dtype: str, element_size: int) -> None:
    out = tmp_path / "figures" / "bench.json"
    printed = step.main([
        "--model", TINY_CLIP, "--tasks", "3", "--images-per-task", "2", "--steps", "2", "--granularity", granularity,
        "--task-vector-dtype", dtype, "--json", str(out),
    ])
    figures = json.loads(out.read_text())
    assert figures == json.loads(json.dumps(printed))
    assert set(ISSUE_KEYS) <= set(figures)
    assert (figures["model"], figures["tasks"], figures["granularity"]) == (TINY_CLIP, 3, granularity)

    parameters = sum(parameter.numel() for parameter in create_encoder(TINY_CLIP).parameters())
    assert figures["task_vector_bytes"] == 3 * parameters * element_size  # every parameter, every task
    assert figures["encoder_bytes"] == parameters * 4
    assert figures["ratio"] == pytest.approx(figures["adamerging_step_s"] / figures["plain_step_s"])
    assert figures["merge_share"] == pytest.approx(figures["merge_s"] / figures["adamerging_step_s"])
    assert 0 < figures["plain_peak_memory_bytes"] <= figures["peak_memory_bytes"]
    assert figures["memory_excess_bytes"] == (
        figures["peak_memory_bytes"] - figures["plain_peak_memory_bytes"] - figures["task_vector_bytes"]
        - 2 * figures["encoder_bytes"]
    )
    assert figures["eval_images_per_s"] > 0
    # CUDA graphs are a GPU feature: on the CPU there is no graphed step to compare with an eager one
    assert figures["cuda_graphs"] is False and figures["eager_step_s"] is None and figures["eager_ratio"] is None
    assert figures["first_step_s"] > 0


@pytest.mark.parametrize(("methods", "rank_fraction"), [(["adamerging", "rank_wise"], None), (["rank_wise"], 0.5)])
def test_bench_times_rank_wise_adamerging_beside_adamerging(tmp_path, methods: list[str], rank_fraction) -> None:
    out = tmp_path / "bench.json"
    options = [] if rank_fraction is None else ["--rank-fraction", str(rank_fraction)]
    printed = step.main(["--model", TINY_CLIP, "--tasks", "2", "--images-per-task", "2", "--steps", "2",
                         "--methods", *reversed(methods), *options, "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures == json.loads(json.dumps(printed))
    assert (figures["methods"], figures["rank_fraction"]) == (methods, rank_fraction)  # in the order of METHODS
    assert figures["rank_wise_build_s"] > 0 and figures["rank_wise_first_step_s"] > 0
    assert figures["rank_wise_ratio"] == pytest.approx(figures["rank_wise_step_s"] / figures["plain_step_s"])
    # One gate per task, matrix and kept singular component; the factors u [m, K], s [K], v [n, K] in float32.
    encoder = create_encoder(TINY_CLIP)
    state = encoder.state_dict()
    gates = floats = 0
    for name in spectral_matrices(encoder):
        rows, columns = state[name].shape[0], state[name][0].numel()
        full = min(rows, columns)
        kept = full if rank_fraction is None else max(1, math.floor(rank_fraction * full))
        gates += 2 * kept
        floats += 2 * kept * (rows + columns + 1)
    assert (figures["rank_wise_gates"], figures["rank_wise_component_bytes"]) == (gates, 4 * floats)
    if "adamerging" in methods:
        assert figures["ratio"] == pytest.approx(figures["adamerging_step_s"] / figures["plain_step_s"])
        assert figures["rank_wise_vs_adamerging"] == pytest.approx(
            figures["rank_wise_step_s"] / figures["adamerging_step_s"]
        )
    else:  # AdaMerging not timed: its figures are None, the plain step's are still there
        for key in ("adamerging_step_s", "ratio", "rank_wise_vs_adamerging", "peak_memory_bytes", "merge_s",
                    "eval_images_per_s", "memory_excess_bytes"):
            assert figures[key] is None, key
        assert figures["plain_step_s"] > 0 and figures["plain_peak_memory_bytes"] > 0


def test_bench_times_wemoe_beside_adamerging(tmp_path) -> None:
    out = tmp_path / "bench.json"
    step.main(["--model", TINY_CLIP, "--tasks", "2", "--images-per-task", "2", "--steps", "2",
               "--methods", "wemoe", "adamerging", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["methods"] == ["adamerging", "wemoe"]
    assert figures["wemoe_build_s"] > 0 and figures["wemoe_first_step_s"] > 0 and figures["wemoe_peak_memory_bytes"] > 0
    assert figures["wemoe_ratio"] == pytest.approx(figures["wemoe_step_s"] / figures["plain_step_s"])
    assert figures["wemoe_vs_adamerging"] == pytest.approx(figures["wemoe_step_s"] / figures["adamerging_step_s"])
    # Per MLP a router Linear(d, d) + Linear(d, 2); the task vectors of each MLP's two linear layers, 2 tasks, float32
    encoder = create_encoder(TINY_CLIP)
    routers = mixed = 0
    for block in encoder.transformer.resblocks:
        width = block.mlp.c_fc.in_features
        routers += width * width + width + width * 2 + 2
        mixed += sum(p.numel() for p in block.mlp.parameters())
    assert figures["wemoe_router_parameters"] == routers
    assert figures["wemoe_mixed_task_vector_bytes"] == 2 * 4 * mixed
    assert figures["rank_wise_step_s"] is None and figures["rank_wise_ratio"] is None


@pytest.mark.parametrize(
    ("argument", "value", "message"), [
        ("tasks", 0, "tasks must be at least 1"), ("steps", 0, "steps must be at least 1"),
        ("methods", (), "methods must be one or more of adamerging, rank_wise, wemoe"),
        ("methods", ("adamerging", "ties"), "methods must be one or more of"),
    ]
)
def test_bench_rejects_empty_runs(argument: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        step.run(model=TINY_CLIP, **{argument: value})


@pytest.mark.slow  # launches a DDP and a sharded fit on two processes
def test_sharded_bench_reports_each_process_holding_its_share_of_the_task_vectors(tmp_path) -> None:
    from lit_adamerging.benchmarks import sharded

    out = tmp_path / "sharded.json"
    rows = sharded.main(["--model", TINY_CLIP, "--tasks", "3", "--processes", "2", "--steps", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    by_strategy = {row["strategy"]: row for row in rows}
    encoder = create_encoder(TINY_CLIP)
    whole = 3 * sum(parameter.numel() * 4 for parameter in encoder.parameters())  # 3 tasks, fp32, no float buffers
    assert by_strategy["ddp"]["task_vector_bytes"] == whole  # every DDP process holds all of them
    assert by_strategy["sharded"]["task_vector_bytes_all"] == whole  # the sharded processes' shares sum to it
    assert whole / 2 <= by_strategy["sharded"]["task_vector_bytes"] <= whole / 2 * 1.05
    for row in rows:
        assert row["processes"] == 2 and row["step_s"] > 0 and row["peak_rss_bytes"] >= row["tensor_bytes"] > 0
