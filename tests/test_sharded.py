"""The merge split across processes (ShardedMergedEncoder, ShardedMergingStrategy) against the merge on one process.

Core tests run 1, 2 and 4 gloo processes (torch.multiprocessing) on a small encoder that has what the
split must cope with: a tensor with fewer rows than processes (some hold none of it), a 0-dim parameter
(held whole), batch-norm buffers merged with the coefficients (held whole). Each process writes what it
computed to a file; the test compares them with the plain one-process merge. The command tests run
``lit-adamerging`` with ``--config trainer/sharded`` on 2 and 4 CPU processes against a run on one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn

from helpers import KILL_AT_PROBE, TINY_CLIP, TINY_CONFIG, run_cli
from lit_adamerging.merging import (
    ShardedMergedEncoder,
    agreed,
    shard_rows,
    sharded_rows,
    stack_task_vectors,
    ties_task_vectors,
    tsv_task_vector,
)

TASKS = 3


class Small(nn.Module):
    """Linear(5, 6) - BatchNorm1d(6) - Linear(6, 2) times a 0-dim gain: the last layer's 2 rows split on 4
    processes leave two with none, the gain cannot be split at all."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 6))
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.norm(self.blocks(x)))) * self.gain


def small_zoo() -> tuple[nn.Module, dict[str, dict[str, Tensor]]]:
    """A seeded Small (eval mode, random batch-norm statistics) and TASKS perturbed copies, buffers too."""
    generator = torch.Generator().manual_seed(0)
    encoder = Small()
    with torch.no_grad():
        for value in encoder.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    finetuned = {
        f"t{k}": {name: value + 0.2 * torch.randn(value.shape, generator=generator) if value.is_floating_point()
                  else value.clone() for name, value in encoder.state_dict().items()}
        for k in range(TASKS)
    }
    return encoder.eval(), finetuned


def images() -> Tensor:
    return torch.randn(8, 5, generator=torch.Generator().manual_seed(1))


def _worker(rank: int, world_size: int, out: str) -> None:
    # A file store: the TCP store's libuv server thread was seen to abort process 0 at exit (see lit_adamerging.cli).
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))
        encoder, finetuned = small_zoo()
        buffers = {name for name, _ in encoder.named_buffers()}
        stacked = stack_task_vectors(encoder.state_dict(), finetuned, buffers=buffers, buffer_policy="merge")
        rows = sharded_rows(encoder, stacked, world_size, rank)
        local = {name: value[:, slice(*rows[name])] if name in rows else value for name, value in stacked.items()}
        whole = [name for name in stacked if name not in rows]
        results: dict[str, Tensor] = {}
        ties = ties_task_vectors(local, 0.3, normalize=True, group=mesh.get_group(), whole=whole)
        results["ties"] = torch.cat([value.flatten() for value in ties.values()])
        merger = ShardedMergedEncoder(encoder, local, mesh, "layer", init=0.3)
        with torch.no_grad():
            merger.coefficients.raw.add_(torch.linspace(-0.1, 0.2, merger.coefficients.raw.numel()).view_as(
                merger.coefficients.raw))
        results["bytes"] = torch.tensor(merger.task_vector_bytes())
        x = images()[rank::world_size]  # every process its share of one global batch
        features = merger(x)
        (features.pow(2).mean() * 2).backward()  # mean over this share; FSDP2 averages over the processes
        merger.reduce_coefficient_gradients()
        results["grad"] = merger.coefficients.raw.grad.clone()
        results["encoder_grads_cleared"] = torch.tensor(all(p.grad is None for p in encoder.parameters()))
        results["merged"] = torch.cat([tensor.flatten().float() for _, tensor in merger.full_tensors()])
        with torch.no_grad():  # evaluation: merged rows given, written once
            results["features"] = merger(x, merger.merged_tensors())
        matrices = [name for name in merger.tensor_names if local[name].dim() >= 3]
        spectral = merger.apply_merge(lambda tv, m: tsv_task_vector(tv, 1.0, None, matrices=m), matrices)
        results["tsv"] = torch.cat([spectral[name].flatten() for name in merger.tensor_names])
        def fails_on_the_last() -> int:
            if rank == world_size - 1:
                raise ValueError("bad rows")
            return rank

        try:
            agreed(mesh.get_group(), fails_on_the_last)
        except ValueError as error:
            results["agreed"] = str(error)
        torch.save(results, f"{out}.rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_sharded(tmp_path: Path, world_size: int) -> list[dict[str, Tensor]]:
    prefix = str(tmp_path / f"w{world_size}")
    torch.multiprocessing.spawn(_worker, args=(world_size, prefix), nprocs=world_size)
    return [torch.load(f"{prefix}.rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def plain_reference() -> dict[str, Tensor]:
    """The same computations on one process, without sharding, written plainly."""
    encoder, finetuned = small_zoo()
    buffers = {name for name, _ in encoder.named_buffers()}
    stacked = stack_task_vectors(encoder.state_dict(), finetuned, buffers=buffers, buffer_policy="merge")
    reference: dict[str, Tensor] = {"ties": ties_task_vectors(stacked, 0.3, normalize=True)}
    theta0 = {name: value.clone() for name, value in encoder.state_dict().items()}
    raw = torch.full((TASKS, len(stacked)), 0.3) + torch.linspace(-0.1, 0.2, TASKS * len(stacked)).view(TASKS, -1)
    raw.requires_grad_(True)
    coefficients = raw.clamp(0, 1)
    merged = {name: theta0[name] + sum(coefficients[k, i] * stacked[name][k] for k in range(TASKS))
              for i, name in enumerate(stacked)}
    merged = {name: value.detach() if name in buffers else value for name, value in merged.items()}  # no gradient
    x = images()
    plain = Small().eval()
    output = torch.func.functional_call(plain, {**theta0, **merged}, (x,))
    (output.pow(2).mean() * 2).backward()
    reference["grad"] = raw.grad
    reference["merged"] = {name: (merged[name] if name in merged else value).detach()
                           for name, value in theta0.items()}
    reference["features"] = output.detach()
    matrices = [name for name in stacked if stacked[name].dim() >= 3]
    reference["tsv"] = tsv_task_vector(stacked, 1.0, None, matrices=matrices)
    reference["bytes"] = sum(value.numel() * value.element_size() for value in stacked.values())
    reference["stacked"] = stacked
    return reference


def test_shard_rows_is_fsdp2s_split_along_the_first_dimension() -> None:
    for rows in (0, 1, 2, 5, 8, 13):
        for world_size in (1, 2, 3, 4, 8):
            pieces = list(torch.arange(rows).chunk(world_size)) if rows else []
            for rank in range(world_size):
                start, stop = shard_rows(rows, world_size, rank)
                expected = pieces[rank].tolist() if rank < len(pieces) else []
                assert list(range(start, stop)) == expected, (rows, world_size, rank)
    with pytest.raises(ValueError, match="rank 4 is not one of the 4 processes' ranks"):
        shard_rows(10, 4, 4)


@pytest.mark.slow  # starts 1 + 2 + 4 processes
def test_the_sharded_merge_equals_the_plain_merge_on_one_two_and_four_processes(tmp_path) -> None:
    reference = plain_reference()
    encoder, _ = small_zoo()
    names = list(reference["stacked"])
    for world_size in (1, 2, 4):
        results = run_sharded(tmp_path, world_size)
        # Each process stores its rows of every task vector: together exactly the whole, each about 1/N.
        per_process = [int(result["bytes"]) for result in results]
        split = {name for name, parameter in encoder.named_parameters() if parameter.dim() > 0}
        whole = sum(v.numel() * v.element_size() for n, v in reference["stacked"].items() if n not in split)
        expected = [
            whole + sum(value[:, slice(*shard_rows(value.shape[1], world_size, rank))].numel() * value.element_size()
                        for name, value in reference["stacked"].items() if name in split)
            for rank in range(world_size)
        ]
        assert per_process == expected  # rows of the split tensors, all of the 0-dim gain and the buffers
        assert sum(per_process) - (world_size - 1) * whole == reference["bytes"]
        for rank, result in enumerate(results):
            # A process that fails alone while loading stops every process, none is left waiting.
            expected_error = "bad rows" if rank == world_size - 1 else f"process(es) [{world_size - 1}] of the sharded"
            assert result["agreed"].startswith(expected_error)
            torch.testing.assert_close(result["grad"], reference["grad"], rtol=1e-5, atol=1e-6)
            assert bool(result["encoder_grads_cleared"])
            everything = torch.cat([reference["merged"][name].flatten().float() for name in encoder.state_dict()])
            torch.testing.assert_close(result["merged"], everything, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(result["features"], reference["features"][rank::world_size], rtol=1e-5,
                                       atol=1e-6)
            rows = sharded_rows(encoder, names, world_size, rank)
            for key, merged in (("ties", reference["ties"]), ("tsv", reference["tsv"])):
                local = torch.cat([(merged[name][:, slice(*rows[name])] if key == "ties" else
                                    merged[name][slice(*rows[name])]) .flatten() if name in rows
                                   else merged[name].flatten() for name in names])
                torch.testing.assert_close(result[key], local.float(), rtol=1e-5, atol=1e-6)


def test_sharded_evaluation_runs_as_many_batches_on_every_process_and_reads_each_image_once() -> None:
    from types import SimpleNamespace

    from lit_adamerging import MultiTaskDataModule, SyntheticTask

    task = SyntheticTask(num_images=11)
    images = task.test_set().tensors[0]
    sharded_model = SimpleNamespace(evaluates_in_step=True, fit_inputs="images")
    for batch_size, counts in ((2, 2), (3, 2), (4, 1)):
        data = MultiTaskDataModule({"a": task}, eval_batch_size=batch_size)
        data.setup("test")
        seen = []
        for rank in range(3):  # 4, 4 and 3 images
            data.trainer = SimpleNamespace(world_size=3, global_rank=rank, lightning_module=sharded_model)
            (loader,) = data.test_dataloader()
            batches = [batch for batch, _ in loader]
            assert len(batches) == counts and all(0 < len(batch) <= batch_size for batch in batches)
            assert torch.equal(torch.cat(batches), images[rank::3])
            seen += list(range(rank, 11, 3))
        assert sorted(seen) == list(range(11))
    data = MultiTaskDataModule({"a": task}, eval_batch_size=1)
    data.setup("test")
    for rank in range(3):  # every process refuses, the one with the most images too
        data.trainer = SimpleNamespace(world_size=3, global_rank=rank, lightning_module=sharded_model)
        with pytest.raises(ValueError, match="a process with 3 images cannot run the 4 batches.*2 or more"):
            data.test_dataloader()


def test_a_strategy_that_does_not_shard_is_refused_before_anything_loads() -> None:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lit_adamerging import AdaMergingModule, ShardedMergingStrategy, SyntheticZoo, WEMoEModule
    from lit_adamerging.lightning.base import check_strategy

    module = AdaMergingModule(SyntheticZoo(), {"a": 2, "b": 3})
    for strategy in (ModelParallelStrategy(), FSDPStrategy()):
        expected = f"{type(strategy).__name__} does not shard a merge.*ShardedMergingStrategy"
        with pytest.raises(ValueError, match=expected):
            check_strategy(module, strategy)
    check_strategy(module, ShardedMergingStrategy())  # this one is accepted
    with pytest.raises(ValueError, match="WEMoEModule cannot run under ShardedMergingStrategy.*AdaMergingModule"):
        check_strategy(WEMoEModule(SyntheticZoo(), {"a": 2, "b": 3}), ShardedMergingStrategy())


def test_a_sharded_export_to_a_pickle_file_is_refused_when_the_run_starts() -> None:
    from types import SimpleNamespace

    from lit_adamerging import AdaMergingModule, ExportMergedEncoder, ShardedMergingStrategy, SyntheticZoo

    trainer = SimpleNamespace(strategy=ShardedMergingStrategy())
    module = AdaMergingModule(SyntheticZoo(), {"a": 2, "b": 3})
    with pytest.raises(ValueError, match=r"export path 'merged.pt'.*written as .safetensors"):
        ExportMergedEncoder("merged.pt").setup(trainer, module, "fit")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the command
PROBES = '''
import json
import os
import signal

import lightning.pytorch as pl
import torch


class Record(pl.Callback):
    """Save, per process, the learned coefficients and the bytes of task vectors it stores when the fit ends,
    and the test metrics when the test ends."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_fit_end(self, trainer, pl_module) -> None:
        learned = [value.detach().cpu().flatten() for key, value in pl_module.state_dict().items()
                   if key.startswith(pl_module.LEARNED_STATE)]
        stored = pl_module.merger.task_vector_bytes()
        torch.save({"learned": torch.cat(learned), "bytes": stored}, f"{self.prefix}.rank{trainer.global_rank}.pt")

    def on_test_end(self, trainer, pl_module) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
        with open(f"{self.prefix}.rank{trainer.global_rank}.json", "w") as file:
            json.dump(metrics, file)

''' + KILL_AT_PROBE

QUIET = ["--trainer.logger=false", "--trainer.check_val_every_n_epoch=100", "--trainer.enable_model_summary=false"]
CHECKPOINTS = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
               "init_args": {"dirpath": "ckpt", "every_n_train_steps": 5, "save_last": True}}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "probes.py").write_text(PROBES)  # importable: `python -m` puts the cwd on sys.path
    return tmp_path


def callbacks(workdir: Path, name: str, *extra: dict) -> list[str]:
    """``--config`` of a file adding Record(prefix=name) and ``extra`` callbacks to the Trainer."""
    path = workdir / f"{name}.yaml"
    record = {"class_path": "probes.Record", "init_args": {"prefix": name}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [record, *extra]}}))
    return ["--config", str(path)]


def sharded(processes: int) -> list[str]:
    return ["--config", "trainer/sharded", "--trainer.accelerator=cpu", f"--trainer.devices={processes}"]


def recorded(workdir: Path, name: str, processes: int) -> list[dict]:
    return [torch.load(workdir / f"{name}.rank{rank}.pt", weights_only=True) for rank in range(processes)]


def succeeded(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # runs the command on 1, 2 and 4 processes
def test_a_sharded_fit_on_two_and_four_processes_learns_what_one_process_learns(workdir) -> None:
    # Layer-wise AdaMerging++: the coefficients and TIES over task vectors split across processes (plain
    # layer-wise AdaMerging sharded is the resume test's).
    fit = ["fit", "--config", str(TINY_CONFIG), "--method", "layer_wise_adamerging_pp", *QUIET]
    succeeded(run_cli(workdir, *fit, *callbacks(workdir, "one"), "--data.batch_size=8"))
    (one,) = recorded(workdir, "one", 1)
    for processes in (2, 4):
        name = f"split{processes}"
        succeeded(run_cli(workdir, *fit, *sharded(processes), *callbacks(workdir, name),
                          f"--data.batch_size={8 // processes}"))
        results = recorded(workdir, name, processes)
        for result in results:  # the same global batch each step: equal up to float rounding
            torch.testing.assert_close(result["learned"], one["learned"], rtol=0, atol=1e-5)
        # Each process stores its rows of every task vector: together the whole, each about 1/N of it.
        stored = [result["bytes"] for result in results]
        assert sum(stored) == one["bytes"]
        assert max(stored) <= one["bytes"] / processes * 1.1, stored


@pytest.mark.slow  # runs the command five times
def test_checkpoints_resume_and_evaluate_on_another_number_of_processes(workdir) -> None:
    fit = ["fit", "--config", str(TINY_CONFIG), *QUIET]
    succeeded(run_cli(workdir, *fit, *callbacks(workdir, "whole", CHECKPOINTS), "--data.batch_size=8"))
    (workdir / "ckpt").rename(workdir / "whole_ckpt")
    # A sharded fit on 2 processes killed at step 13 resumes from its step-10 checkpoint on 4 processes.
    kill = {"class_path": "probes.KillAt", "init_args": {"step": 13}}
    crash = run_cli(workdir, *fit, *sharded(2), *callbacks(workdir, "killed", CHECKPOINTS, kill),
                    "--data.batch_size=4")
    assert crash.returncode == -9, crash.stderr[-3000:]
    written = torch.load(workdir / "ckpt" / "last.ckpt", weights_only=True)
    assert written["global_step"] == 10
    assert list(written["state_dict"]) == ["merger.coefficients.raw"]  # coefficient-only, as on one process
    succeeded(run_cli(workdir, *fit, *sharded(4), *callbacks(workdir, "resumed"), "--data.batch_size=2",
                      "--ckpt_path", "ckpt/last.ckpt"))
    (whole,) = recorded(workdir, "whole", 1)
    for result in recorded(workdir, "resumed", 4):
        torch.testing.assert_close(result["learned"], whole["learned"], rtol=0, atol=1e-5)
    # The one-process fit's checkpoint evaluated and exported on one process and sharded on two.
    test = ["test", "--config", str(TINY_CONFIG), *QUIET, "--ckpt_path", "whole_ckpt/last.ckpt"]
    succeeded(run_cli(workdir, *test, *callbacks(workdir, "test1"), *export("one.safetensors")))
    succeeded(run_cli(workdir, *test, *sharded(2), *callbacks(workdir, "test2"), *export("two.safetensors")))
    assert_same_evaluation(workdir, "test1", "test2", processes=2)


def export(path: str) -> list[str]:
    """Add an ExportMergedEncoder writing ``path`` (after any ``--config`` that sets the callbacks)."""
    return ["--trainer.callbacks+=lit_adamerging.ExportMergedEncoder", f"--trainer.callbacks.path={path}"]


def assert_same_evaluation(workdir: Path, one: str, split: str, processes: int) -> None:
    """The accuracies of ``one`` (one process) and ``split`` (sharded) and their exported encoders agree."""
    import json

    reference = json.loads((workdir / f"{one}.rank0.json").read_text())
    assert any(key.startswith("test/acc/") for key in reference)
    for rank in range(processes):
        assert json.loads((workdir / f"{split}.rank{rank}.json").read_text()) == pytest.approx(reference, abs=1e-6)
    first, second = load_file(workdir / "one.safetensors"), load_file(workdir / "two.safetensors")
    assert sorted(first) == sorted(second)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # runs the command twice
def test_a_spectral_merge_sharded_gives_the_weights_and_accuracies_of_one_process(workdir) -> None:
    test = ["test", "--config", str(TINY_CONFIG), "--method", "iso_cts_merging", *QUIET]
    succeeded(run_cli(workdir, *test, *callbacks(workdir, "test1"), *export("one.safetensors")))
    succeeded(run_cli(workdir, *test, *sharded(2), *callbacks(workdir, "test2"), *export("two.safetensors")))
    assert_same_evaluation(workdir, "test1", "test2", processes=2)


@pytest.mark.slow  # runs the command
def test_the_command_refuses_a_method_that_does_not_shard_in_one_line(workdir) -> None:
    result = run_cli(workdir, "fit", "--config", str(TINY_CONFIG), "--method", "wemoe", *QUIET, *sharded(1))
    assert result.returncode == 2
    assert "error: WEMoEModule cannot run under ShardedMergingStrategy" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- reading rows of fine-tuned files
def test_each_process_reads_only_its_rows_of_a_safetensors_file(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    from lit_adamerging.models import checkpoints, zoo
    from lit_adamerging.models._select import LazyTensor
    from lit_adamerging.models.encoders import create_encoder

    encoder = create_encoder(TINY_CLIP)
    generator = torch.Generator().manual_seed(3)
    state = encoder.state_dict()
    tuned = {name: value + torch.randn(value.shape, generator=generator) for name, value in state.items()}
    path = tmp_path / "tuned.safetensors"
    save_file({f"model.visual.{name}": value.contiguous() for name, value in tuned.items()}, path)  # a prefix too
    torch.save({f"model.visual.{name}": value for name, value in tuned.items()}, tmp_path / "tuned.pt")

    def whole_read(*args, **kwargs):
        raise AssertionError("the whole file was read")

    indexed: list[tuple[int, int] | None] = []
    original = LazyTensor.__getitem__

    def recording(self, index):
        indexed.append((index.start, index.stop) if isinstance(index, slice) else None)
        return original(self, index)

    for world_size, rank in ((4, 1), (4, 3), (3, 2)):
        rows = sharded_rows(encoder, list(tuned), world_size, rank)
        indexed.clear()
        with monkeypatch.context() as patch:
            patch.setattr(checkpoints, "read_checkpoint", whole_read)
            patch.setattr(zoo, "read_checkpoint", whole_read)
            patch.setattr(LazyTensor, "__getitem__", recording)
            read = zoo.encoder_weights(path, encoder, rows=rows)
        assert list(read) == list(tuned)
        for name, value in tuned.items():
            expected = value[slice(*rows[name])] if name in rows else value
            assert torch.equal(read[name], expected), name
        assert sorted(index for index in indexed if index is not None) == sorted(rows.values())
        # A torch.save file cannot be read in part: it is read whole, then cut to the same rows.
        assert all(torch.equal(a, b) for a, b in zip(zoo.encoder_weights(tmp_path / "tuned.pt", encoder, rows=rows)
                                                      .values(), read.values()))


def test_reading_rows_of_a_file_that_does_not_fit_names_the_file_and_the_tensor(tmp_path) -> None:
    from safetensors.torch import save_file

    from lit_adamerging.models import zoo
    from lit_adamerging.models.checkpoints import CheckpointError
    from lit_adamerging.models.encoders import create_encoder

    encoder = create_encoder(TINY_CLIP)
    state = {name: value.clone() for name, value in encoder.state_dict().items()}
    name = next(name for name, value in state.items() if value.dim() == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, tmp_path / "other.safetensors")
    rows = sharded_rows(encoder, list(state), 2, 0)
    with pytest.raises(CheckpointError, match=f"other.safetensors: shape mismatch for '{name}'"):
        zoo.encoder_weights(tmp_path / "other.safetensors", encoder, rows=rows)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors file"):
        zoo.encoder_weights(tmp_path / "cut.safetensors", encoder, rows=rows)
