"""The decoded test-set cache: same tensors as the uncached path, reuse, keys, corruption, interruption."""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from helpers import TINY_CLIP
from lit_adamerging import AdaMergingModule, ImageFolderTask, MultiTaskDataModule, Preprocess, SyntheticZoo, TaskData
from lit_adamerging.data.cache import DecodedImages, decoded_test_set


def make_tree(root: Path, classes: int, per_class: int, seed: int) -> Path:
    """An ImageFolder test split of random RGB images of varied sizes."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / "test" / f"c{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            height, width = rng.integers(20, 40, size=2)
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


@pytest.fixture()
def trees(tmp_path: Path) -> dict[str, ImageFolderTask]:
    return {
        "alpha": ImageFolderTask(
            root=str(make_tree(tmp_path / "alpha", 3, 4, seed=1)),
            preprocess=Preprocess(image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), crop_pct=0.9),
        ),
        "beta": ImageFolderTask(
            root=str(make_tree(tmp_path / "beta", 2, 5, seed=2)), preprocess=Preprocess(image_size=12)
        ),
    }


def eval_tensors(data: MultiTaskDataModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every eval loader's images and labels as the model receives them (after the transfer hook)."""
    out = []
    for index, loader in enumerate(data.test_dataloader()):
        batches = [data.on_after_batch_transfer(batch, index) for batch in loader]
        images = torch.cat([batch_images for batch_images, _ in batches])
        labels = torch.cat([torch.as_tensor(batch_labels) for _, batch_labels in batches])
        out.append((images, labels))
    return out


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_batches_equal_the_uncached_path(tmp_path, trees, cache):
    reference = MultiTaskDataModule(trees, eval_batch_size=5, cache="none")
    cached = MultiTaskDataModule(trees, batch_size=4, eval_batch_size=5, cache=cache, cache_dir=str(tmp_path / "c"))
    reference.setup("test")
    cached.setup("test")
    for (images, labels), (want_images, want_labels) in zip(eval_tensors(cached), eval_tensors(reference)):
        assert images.dtype == torch.float32 and torch.equal(images, want_images)  # bit for bit
        assert torch.equal(labels, want_labels)
    for index, (task, loader) in enumerate(cached.train_dataloader().items()):
        want = eval_tensors(reference)[index][0]
        epoch = [batch for batch in loader][: len(want) // 4]  # one pass over the task
        assert all(isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 for batch in epoch)  # no labels
        got = cached.on_after_batch_transfer({task: torch.cat(epoch)}, 0)[task]
        assert got.shape[0] == len(want) - len(want) % 4  # whole batches only
        order = torch.cdist(got.flatten(1), want.flatten(1)).argmin(1)
        assert len(set(order.tolist())) == len(order) and torch.equal(got, want[order])  # distinct images, exact
    stored = sorted(p.name for p in (tmp_path / "c").iterdir()) if cache == "disk" else []
    assert len(stored) == (4 if cache == "disk" else 0)  # .u8 + .json per task, no temporary files
    assert all(name.endswith((".u8", ".json")) for name in stored)


def test_disk_cache_is_reused_and_keyed_by_files_and_geometry(tmp_path, trees, monkeypatch):
    cache_dir = tmp_path / "c"
    first = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir))
    first.setup("fit")
    want = eval_tensors(first)

    def no_decoding(self, preprocess=None):
        raise AssertionError("the store should have been reused")

    monkeypatch.setattr(ImageFolderTask, "decoded_test_set", no_decoding)
    again = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir))
    again.setup("fit")
    for (images, labels), (want_images, want_labels) in zip(eval_tensors(again), want):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    monkeypatch.undo()

    # Another normalisation shares the store (normalising happens after it); another size does not.
    renormalised = {
        **trees, "beta": ImageFolderTask(root=trees["beta"].root, preprocess=Preprocess(12, mean=(0, 0, 0)))
    }
    MultiTaskDataModule(renormalised, cache="disk", cache_dir=str(cache_dir)).setup("fit")
    assert len(list(cache_dir.glob("*.json"))) == 2
    resized = {**trees, "beta": ImageFolderTask(root=trees["beta"].root, preprocess=Preprocess(image_size=10))}
    MultiTaskDataModule(resized, cache="disk", cache_dir=str(cache_dir)).setup("fit")
    assert len(list(cache_dir.glob("*.json"))) == 3
    # Replacing an image file changes the key: the new image is read.
    replaced = Path(trees["beta"].root) / "test" / "c0" / "0.png"
    Image.new("RGB", (30, 30), (255, 0, 0)).save(replaced)
    changed = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir))
    changed.setup("fit")
    assert len(list(cache_dir.glob("*.json"))) == 4
    uncached = ImageFolderTask(root=trees["beta"].root, preprocess=Preprocess(image_size=12)).test_set()
    assert torch.equal(eval_tensors(changed)[1][0][0], uncached[0][0])


def test_corrupt_store_is_rebuilt(tmp_path, trees, caplog):
    cache_dir = tmp_path / "c"
    data = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir))
    data.setup("test")
    want = eval_tensors(data)
    for store in cache_dir.glob("*.u8"):
        store.write_bytes(store.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="lit_adamerging.data.cache"):
        rebuilt = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir))
        rebuilt.setup("test")
    assert "incomplete or corrupt; rebuilding it" in caplog.text
    for (images, _), (want_images, _) in zip(eval_tensors(rebuilt), want):
        assert torch.equal(images, want_images)


def test_interrupted_build_leaves_no_store(tmp_path, trees):
    bad = Path(trees["beta"].root) / "test" / "c1" / "9.png"
    bad.write_bytes(b"not a png")
    data = MultiTaskDataModule(trees, cache="disk", cache_dir=str(tmp_path / "c"))
    with pytest.raises(OSError, match=r"cannot read image file '.*beta/test/c1/9\.png'"):
        data.setup("fit")
    names = [p.name for p in (tmp_path / "c").iterdir()]
    assert not any(name.startswith("beta") for name in names)  # nothing half-written is left to be read
    assert not any(name.endswith(".tmp") for name in names)  # the temporary file is removed on the error


def test_disk_store_pickles_as_its_path(tmp_path, trees):
    data = MultiTaskDataModule(trees, cache="disk", cache_dir=str(tmp_path / "c"))
    data.setup("fit")
    stored = data._test_sets["alpha"]
    assert isinstance(stored, DecodedImages) and stored.path is not None
    blob = pickle.dumps(stored)
    assert len(blob) < stored.images.numel()  # the pixels are not in the pickle
    copy = pickle.loads(blob)
    assert torch.equal(copy.images, stored.images) and torch.equal(copy.labels, stored.labels)
    workers = MultiTaskDataModule(trees, cache="disk", cache_dir=str(tmp_path / "c"), num_workers=1)
    workers.setup("test")
    for (images, _), (want, _) in zip(eval_tensors(workers), eval_tensors(data)):
        assert torch.equal(images, want)


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_fit_and_test_through_the_trainer_do_not_depend_on_the_cache(tmp_path, cache):
    # Tasks without a preprocess: the model's (test-vit-tiny: 32 px, CLIP mean/std) is used.
    tasks = {
        name: ImageFolderTask(root=str(make_tree(tmp_path / name, classes, 6, seed)))
        for name, classes, seed in (("alpha", 3, 1), ("beta", 2, 2))
    }
    outcomes = {}
    for mode in ("none", cache):
        pl.seed_everything(0)
        data = MultiTaskDataModule(tasks, batch_size=4, eval_batch_size=5, cache=mode, cache_dir=str(tmp_path / "c"))
        zoo = SyntheticZoo(TINY_CLIP, seed=0)
        module = AdaMergingModule(zoo, num_classes=data.num_classes, lr=0.05)
        trainer = pl.Trainer(
            max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )
        trainer.fit(module, datamodule=data)
        metrics = trainer.test(module, datamodule=data, verbose=False)[0]
        outcomes[mode] = (module.coefficients(), {k: v for k, v in metrics.items() if "/acc/" in k})
    coefficients, accuracies = outcomes[cache]
    assert not torch.allclose(coefficients, torch.full_like(coefficients, 0.3))  # it trained
    assert torch.equal(coefficients, outcomes["none"][0])
    assert accuracies == outcomes["none"][1]


def test_offline_mnist_cache_equals_uncached(offline_datasets):
    task = ImageFolderTask(root=str(offline_datasets("mnist") / "mnist"), preprocess=Preprocess(image_size=32))
    data = MultiTaskDataModule({"mnist": task}, eval_batch_size=500, cache="memory")
    data.setup("test")
    (images, labels), = eval_tensors(data)
    reference = torch.utils.data.DataLoader(task.test_set(), batch_size=500)
    want = [batch for batch in reference]
    assert torch.equal(images, torch.cat([b[0] for b in want])) and torch.equal(labels, torch.cat([b[1] for b in want]))


class EmptyTask(TaskData):
    num_classes = 2

    def test_set(self, preprocess: Preprocess | None = None) -> Dataset:
        return TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))


def test_datamodule_bad_input(tmp_path, trees):
    with pytest.raises(ValueError, match=r"task 'empty': its test split is empty"):
        MultiTaskDataModule({"empty": EmptyTask()}).setup("fit")
    with pytest.raises(ValueError, match=r"task names 'mnist' and 'MNIST' differ only in case"):
        MultiTaskDataModule({"mnist": trees["alpha"], "MNIST": trees["beta"]})
    with pytest.raises(ValueError, match=r"cache must be 'disk', 'memory' or 'none', got 'ram'"):
        MultiTaskDataModule(trees, cache="ram")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_workers must be 0 or more"):
        MultiTaskDataModule(trees, num_workers=-1)


def test_in_place_writes_never_reach_the_store(tmp_path, trees):
    cache_dir = tmp_path / "c"
    data = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir))
    data.setup("test")
    reference = MultiTaskDataModule(trees, cache="none")
    reference.setup("test")
    want = eval_tensors(reference)
    stores = sorted(cache_dir.glob("*.u8"))
    digests = {store: hashlib.sha256(store.read_bytes()).hexdigest() for store in stores}
    if Path("/proc/self/maps").is_file():  # mapped (not read into memory), privately
        maps = Path("/proc/self/maps").read_text().splitlines()
        for store in stores:
            flags = {line.split()[1] for line in maps if line.endswith(str(store))}
            assert flags and all(flag.endswith("p") for flag in flags), flags
    alpha = data._test_sets["alpha"]
    alpha[0][0].fill_(7)
    alpha.images[1:3].mul_(0)
    alpha.images_only().images[3].add_(1)
    assert bool((alpha.images[0] == 7).all())  # the write did happen, in this process's copy
    for store in stores:
        assert hashlib.sha256(store.read_bytes()).hexdigest() == digests[store]
    # a later run (and its DataLoader workers, which map the store again) reads the original images
    for workers in (0, 1):
        again = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir), num_workers=workers)
        again.setup("test")
        for (images, labels), (want_images, want_labels) in zip(eval_tensors(again), want):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_cache_dir_that_is_a_file_is_refused_before_decoding(tmp_path, trees, monkeypatch):
    def no_decoding(self, preprocess=None):
        raise AssertionError("nothing should be decoded")

    monkeypatch.setattr(ImageFolderTask, "decoded_test_set", no_decoding)
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    for cache_dir in (a_file, a_file / "below"):
        data = MultiTaskDataModule(trees, cache="disk", cache_dir=str(cache_dir))
        message = rf"cache_dir '{cache_dir}': '{a_file}' is a file, not a folder; give a folder"
        with pytest.raises(NotADirectoryError, match=message):
            data.setup("fit")
    assert a_file.read_text() == "x"


STALLING_BUILD = """
import sys, time
from torch.utils.data import Dataset
from lit_adamerging import ImageFolderTask, Preprocess
from lit_adamerging.data.cache import decoded_test_set

class Stall(Dataset):
    def __init__(self, inner):
        self.inner = inner
    def __len__(self):
        return len(self.inner)
    def __getitem__(self, index):
        if index == 64:  # the first batch of 64 is in the temporary file by now
            print("stalled", flush=True)
            time.sleep(600)
        return self.inner[index]

class StallingTask(ImageFolderTask):
    def _images(self, transform):
        return Stall(super()._images(transform))

root, cache_dir = sys.argv[1:]
task = StallingTask(root=root, preprocess=Preprocess(image_size=8))
decoded_test_set(task, "big", Preprocess(image_size=8), cache_dir)
"""


def start_stalling_builds(root: Path, cache_dir: Path, count: int) -> list[subprocess.Popen]:
    """``count`` processes building the same store, each stalled after writing its first batch."""
    command = [sys.executable, "-c", STALLING_BUILD, str(root), str(cache_dir)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    for process in processes:  # started together: the imports take seconds
        assert process.stdout.readline().strip() == "stalled"
    return processes


def test_temporary_file_of_a_killed_build_is_removed_by_the_next_build(tmp_path):
    root = make_tree(tmp_path / "big", 2, 40, seed=3)  # 80 images: more than one batch of 64
    task = ImageFolderTask(root=str(root), preprocess=Preprocess(image_size=8))
    cache_dir = tmp_path / "c"
    killed, live = start_stalling_builds(root, cache_dir, 2)
    try:
        (temporary,) = (path for path in cache_dir.iterdir() if f".{killed.pid}." in path.name)
        assert temporary.name.endswith(".tmp") and temporary.stat().st_size > 0
        killed.kill()
        killed.wait()
        assert temporary.exists()  # what kill -9 leaves behind
        stored = decoded_test_set(task, "big", task.preprocess, cache_dir)
        names = sorted(path.name for path in cache_dir.iterdir())
        assert not temporary.exists()
        # the store, its JSON, and the file of the writer still at work, which is kept
        assert len(names) == 3 and sum(f".{live.pid}." in name for name in names) == 1
    finally:
        for process in (killed, live):
            process.kill()
            process.wait()
    want = torch.stack([image for image, _ in task.decoded_test_set()])
    assert torch.equal(stored.images, want) and stored.images.shape[0] == 80


class _Stub:
    """What the data module reads of a Trainer and its model, for a chosen process and fit input kind."""

    def __init__(self, world_size: int = 1, rank: int = 0, fit_inputs: str | None = None) -> None:
        self.world_size, self.global_rank, self.training = world_size, rank, True
        self.lightning_module = type("Model", (), {} if fit_inputs is None else {"fit_inputs": fit_inputs})()


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_unlabeled_batches_are_the_evaluation_images_once_each_split_across_processes(tmp_path, trees, cache):
    data = MultiTaskDataModule(trees, eval_batch_size=3, cache=cache, cache_dir=str(tmp_path / "cache"))
    data.setup("test")
    expected = eval_tensors(data)
    for index, task in enumerate(data.task_names):
        batches = list(data.unlabeled_batches(task))
        assert all(len(positions) <= 3 for positions, _ in batches)
        positions = torch.cat([p for p, _ in batches])
        assert positions.tolist() == list(range(data.num_images(task)))
        assert torch.equal(torch.cat([images for _, images in batches]), expected[index][0])
        shares = []
        for rank in range(2):
            data.trainer = _Stub(world_size=2, rank=rank)
            shares.append([(p, images) for p, images in data.unlabeled_batches(task)])
        data.trainer = None
        seen = torch.cat([p for share in shares for p, _ in share])
        assert sorted(seen.tolist()) == list(range(data.num_images(task)))  # each image on exactly one process
        for share in shares:
            for p, images in share:
                assert torch.equal(images, expected[index][0][p])


def test_fit_batches_are_positions_for_a_model_that_asks_for_them(tmp_path, trees):
    data = MultiTaskDataModule(trees, batch_size=2, cache="memory", unseen_tasks=["beta"])
    data.setup("fit")
    data.trainer = _Stub()
    images = {task: [data.on_after_batch_transfer({task: b}, 0)[task] for b in loader]
              for task, loader in data.train_dataloader().items()}
    data.trainer = _Stub(fit_inputs="indices")
    positions = {task: [data.on_after_batch_transfer({task: b}, 0)[task] for b in loader]
                 for task, loader in data.train_dataloader().items()}
    assert list(positions) == ["alpha"]  # unseen tasks get no fit loader either way
    reference = eval_tensors(data)[0][0]
    for step, batch in enumerate(positions["alpha"]):
        assert batch.dtype == torch.long and batch.shape == (2,)
        assert torch.equal(reference[batch], images["alpha"][step])  # the same stream, as positions
    data.trainer = _Stub(fit_inputs="pixels")
    with pytest.raises(ValueError, match="fit_inputs must be 'images' or 'indices'"):
        data.train_dataloader()


def test_unlabeled_batches_bad_input(trees):
    data = MultiTaskDataModule(trees)
    with pytest.raises(RuntimeError, match="not set up yet"):
        next(data.unlabeled_batches("alpha"))
    data.setup("test")
    with pytest.raises(KeyError, match="unknown task 'gamma'"):
        data.num_images("gamma")


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_a_task_learns_from_its_unlabeled_split_and_is_evaluated_on_its_own(tmp_path, trees, cache):
    root = make_tree(tmp_path / "alpha_more", 3, 5, seed=7)
    other = ImageFolderTask(root=str(root), preprocess=trees["alpha"].preprocess)
    options = dict(batch_size=2, eval_batch_size=4, cache=cache, cache_dir=str(tmp_path / "cache"))
    data = MultiTaskDataModule(trees, unlabeled={"alpha": other}, **options)
    alone = MultiTaskDataModule({"alpha": other}, **options)
    plain = MultiTaskDataModule(trees, **options)
    for module in (data, alone, plain):
        module.setup("fit")
    other_images = eval_tensors(alone)[0][0]
    # what alpha learns from: the other split (15 images), in order and in the fit stream
    assert data.num_images("alpha") == 15 and data.num_images("beta") == plain.num_images("beta")
    assert torch.equal(torch.cat([images for _, images in data.unlabeled_batches("alpha")]), other_images)
    data.trainer = _Stub()
    fit = data.train_dataloader()["alpha"]
    for step, batch in zip(range(3), fit):
        indices = fit.sampler.indices(step)
        assert torch.equal(data.on_after_batch_transfer({"alpha": batch}, 0)["alpha"], other_images[indices])
    data.trainer = None
    # what it is evaluated on: its own test split, as without the option
    for (images, labels), (expected_images, expected_labels) in zip(eval_tensors(data), eval_tensors(plain)):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_unlabeled_splits_bad_input(tmp_path, trees):
    other = ImageFolderTask(root=str(make_tree(tmp_path / "more", 2, 2, seed=3)))
    with pytest.raises(ValueError, match="'alpha': its unlabeled split has 2 classes but its evaluated split 3"):
        MultiTaskDataModule(trees, unlabeled={"alpha": other})
    with pytest.raises(ValueError, match="unlabeled names 'beta', an unseen task, which learns from nothing"):
        MultiTaskDataModule(trees, unseen_tasks=["beta"], unlabeled={"beta": other})
    with pytest.raises(ValueError, match="unlabeled names 'gamma', not a task"):
        MultiTaskDataModule(trees, unlabeled={"gamma": other})


def test_disk_cache_serves_the_new_images_behind_a_symlinked_class_folder(tmp_path):
    make_tree(tmp_path / "ds", 1, 3, seed=6)  # ds/test/c0, a real folder
    behind = make_tree(tmp_path / "behind", 1, 4, seed=7) / "test" / "c0"
    link = tmp_path / "ds" / "test" / "c1"
    link.symlink_to(behind, target_is_directory=True)
    cache_dir = tmp_path / "cache"

    def served_and_fresh() -> tuple[torch.Tensor, torch.Tensor]:
        """The images the disk cache serves, and those decoded from the files now (no cache), both normalised."""
        preprocess = Preprocess(image_size=12)
        data = MultiTaskDataModule({"alpha": ImageFolderTask(str(tmp_path / "ds"), preprocess=preprocess)},
                                   cache="disk", cache_dir=str(cache_dir))
        data.setup("test")
        fresh = ImageFolderTask(str(tmp_path / "ds"), preprocess=preprocess).test_set()
        return eval_tensors(data)[0][0], torch.stack([image for image, _ in fresh])

    first, fresh = served_and_fresh()
    assert first.shape[0] == 7 and torch.equal(first, fresh)
    make_tree(tmp_path / "changed", 1, 4, seed=8)
    for image in (tmp_path / "changed" / "test" / "c0").iterdir():  # the images behind the link change
        shutil.copyfile(image, behind / image.name)
    changed, fresh = served_and_fresh()
    assert torch.equal(changed, fresh) and not torch.equal(changed[3:], first[3:])
    assert torch.equal(changed[:3], first[:3])  # the real folder's images are as they were
    link.unlink()  # the link is pointed elsewhere
    link.symlink_to(make_tree(tmp_path / "elsewhere", 1, 4, seed=9) / "test" / "c0", target_is_directory=True)
    repointed, fresh = served_and_fresh()
    assert torch.equal(repointed, fresh) and not torch.equal(repointed[3:], changed[3:])
    assert len(list(cache_dir.glob("*.json"))) == 3  # one store per state of the files
