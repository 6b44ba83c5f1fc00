"""The step benchmark end to end on a tiny ViT: the figures it writes and how they relate."""

import json

import pytest

from helpers import TINY_CLIP
from lit_adamerging.benchmarks import step
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


@pytest.mark.parametrize(
    ("argument", "message"), [("tasks", "tasks must be at least 1"), ("steps", "steps must be at least 1")]
)
def test_bench_rejects_empty_runs(argument: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        step.run(model=TINY_CLIP, **{argument: 0})
