"""The data module <-> model contract (lit_adamerging.data.contract), the fit stream's explicit seed, and the
evaluation sampler that gives every process its own images, against plain references."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DistributedSampler

from lit_adamerging.data import (
    DeclaresFitInputs,
    DescribesTasks,
    ImageFolderTask,
    MultiTaskDataModule,
    ReadsImagesAs,
    ReportsPreprocess,
    SyntheticTask,
    UnlabeledImages,
)
from lit_adamerging.data.sampling import EvalShardSampler
from lit_adamerging.models.preprocess import Preprocess


def image_tree(root: Path, per_class: int = 3) -> Path:
    """``root/test/{a,b}/<i>.png``, small RGB images of different sizes."""
    for label in ("a", "b"):
        (root / "test" / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10 + i, 13), (40 * i, 90, 200)).save(root / "test" / label / f"{i}.png")
    return root


class Recorder(pl.LightningModule):
    """A model that offers the data module nothing, and keeps the batches it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.fit_batches: list = []
        self.eval_batches: list = []

    def training_step(self, batch, batch_idx):
        self.fit_batches.append(batch)
        return self.weight * 0.0

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.eval_batches.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD([self.weight], lr=0.1)


class ReadsItsOwnWay(Recorder):
    """A model that implements the whole :class:`ReadsImagesAs`."""

    fit_inputs = "indices"

    def eval_preprocess(self) -> Preprocess | None:
        return Preprocess(image_size=8)


class PreprocessOnly(Recorder):
    """A model that reports its preprocessing and declares no fit inputs."""

    def eval_preprocess(self) -> Preprocess | None:
        return Preprocess(image_size=6)


def trainer(tmp_path: Path, limit_val_batches: int = 0) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=limit_val_batches, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip


def test_models_implement_the_model_side_or_not() -> None:
    assert isinstance(ReadsItsOwnWay(), ReadsImagesAs)
    assert isinstance(ReadsItsOwnWay(), ReportsPreprocess) and isinstance(ReadsItsOwnWay(), DeclaresFitInputs)
    assert isinstance(PreprocessOnly(), ReportsPreprocess) and not isinstance(PreprocessOnly(), ReadsImagesAs)
    assert not isinstance(Recorder(), ReportsPreprocess) and not isinstance(Recorder(), DeclaresFitInputs)


def test_a_model_of_the_protocol_is_read_through_it(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "ds")
    data = MultiTaskDataModule({"shapes": ImageFolderTask(str(root))}, batch_size=2, eval_batch_size=6, cache="memory")
    model = ReadsItsOwnWay()
    run = trainer(tmp_path, limit_val_batches=1)
    run.fit(model, datamodule=data)
    assert data.model_preprocess() == Preprocess(image_size=8)
    (batch,) = model.fit_batches
    assert list(batch) == ["shapes"] and batch["shapes"].dtype == torch.int64  # positions: fit_inputs "indices"
    expected = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:2]
    assert torch.equal(batch["shapes"], expected)
    run.validate(model, datamodule=data, verbose=False)
    images, labels = model.eval_batches[0]
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.float32  # the model's preprocessing
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_model_offering_part_or_none_of_it(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "ds")
    model = PreprocessOnly()  # its preprocessing, and images to fit on
    data = MultiTaskDataModule({"shapes": ImageFolderTask(str(root))}, batch_size=2, cache="none")
    trainer(tmp_path).fit(model, datamodule=data)
    (batch,) = model.fit_batches
    assert batch["shapes"].shape == (2, 3, 6, 6) and batch["shapes"].dtype == torch.float32

    plain = Recorder()  # nothing: each task's own preprocessing, and images
    own = ImageFolderTask(str(root), preprocess=Preprocess(image_size=4))
    trainer(tmp_path).fit(plain, datamodule=MultiTaskDataModule({"shapes": own}, batch_size=2, cache="none"))
    assert plain.fit_batches[0]["shapes"].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="has no eval preprocessing"):
        trainer(tmp_path).fit(Recorder(), datamodule=MultiTaskDataModule({"shapes": ImageFolderTask(str(root))}))


def test_a_wrong_fit_inputs_is_refused() -> None:
    class Wrong(Recorder):
        fit_inputs = "labels"

    data = MultiTaskDataModule({"a": SyntheticTask(num_images=4)})
    data.trainer = SimpleNamespace(lightning_module=Wrong(), world_size=1, global_rank=0)  # type: ignore[assignment]
    data.setup("fit")
    with pytest.raises(ValueError, match="Wrong.fit_inputs must be 'images' or 'indices', got 'labels'"):
        data.train_dataloader()


def test_the_data_module_implements_the_data_side() -> None:
    data = MultiTaskDataModule(
        {"a": SyntheticTask(num_classes=3, num_images=7), "b": SyntheticTask(num_classes=5, num_images=4)},
        unseen_tasks=["b"], eval_batch_size=3,
    )  # fmt: skip
    assert isinstance(data, UnlabeledImages) and isinstance(data, DescribesTasks)
    assert not isinstance(object(), DescribesTasks)
    data.setup("test")

    def read(source: UnlabeledImages, task: str) -> list[int]:
        """What a model reads through the protocol alone."""
        return [int(p) for positions, _ in source.unlabeled_batches(task, "cpu") for p in positions]

    assert dict(data.num_classes) == {"a": 3, "b": 5} and list(data.unseen_tasks) == ["b"]
    assert read(data, "a") == list(range(data.num_images("a"))) == list(range(7))


# ---------------------------------------------------------------------------------------------------- the seed


def fit_stream(data: MultiTaskDataModule, task: str = "a") -> list[int]:
    data.setup("fit")
    return list(data.train_dataloader()[task].sampler)


def test_the_fit_stream_follows_the_seed_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = {"a": SyntheticTask(num_images=12)}
    for seed in (0, 1, 7):
        expected = torch.randperm(12, generator=torch.Generator().manual_seed(seed)).tolist()  # one pass, 3 steps of 4
        assert fit_stream(MultiTaskDataModule(tasks, batch_size=4, seed=seed)) == expected
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # Lightning's seed_everything sets it: the stream reads the argument
    assert fit_stream(MultiTaskDataModule(tasks, batch_size=4)) == fit_stream(MultiTaskDataModule(tasks, batch_size=4,
                                                                                                  seed=0))
    for bad in (True, 1.5, "3"):
        with pytest.raises(ValueError, match="seed must be an integer"):
            MultiTaskDataModule(tasks, seed=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- the evaluation sampler


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("num_images", [0, 7, 8, 9, 10, 31, 100])
def test_eval_shards_are_lightnings_unrepeated_ones(world_size: int, num_images: int) -> None:
    if 0 < num_images < world_size:
        with pytest.raises(ValueError, match="one would get none"):
            EvalShardSampler(num_images, world_size, 0)
        return
    old = pytest.importorskip("lightning.pytorch.overrides.distributed").UnrepeatedDistributedSampler
    shards = [list(EvalShardSampler(num_images, world_size, rank)) for rank in range(world_size)]
    for rank, shard in enumerate(shards):
        sampler = EvalShardSampler(num_images, world_size, rank)
        assert shard == list(range(rank, num_images, world_size)) and len(sampler) == len(shard)
        reference = old(range(num_images), num_replicas=world_size, rank=rank, shuffle=False)
        assert shard == list(reference) and len(sampler) == len(reference)
    assert sorted(i for shard in shards for i in shard) == list(range(num_images))  # each image once


def test_eval_shard_sampler_is_left_in_place_by_lightning_and_checks_its_rank() -> None:
    # Lightning replaces, under DDP, the samplers of loaders that are not DistributedSamplers.
    assert isinstance(EvalShardSampler(10, 2, 1), DistributedSampler)
    for rank in (-1, 2):
        with pytest.raises(ValueError, match=f"rank {rank} is not one of the 2 processes' ranks"):
            EvalShardSampler(10, 2, rank)


def test_every_process_evaluates_and_reads_its_own_images() -> None:
    task = SyntheticTask(num_images=11)
    data = MultiTaskDataModule({"a": task}, eval_batch_size=2)
    data.setup("test")
    images = task.test_set().tensors[0]
    for rank in range(3):
        data.trainer = SimpleNamespace(world_size=3, global_rank=rank, lightning_module=None)  # type: ignore[assignment]
        (loader,) = data.test_dataloader()
        assert list(loader.sampler) == list(range(rank, 11, 3))
        assert torch.equal(torch.cat([batch for batch, _ in loader]), images[rank::3])
        positions = torch.cat([p for p, _ in data.unlabeled_batches("a")])
        assert positions.tolist() == list(range(rank, 11, 3))
