"""ImageNet-C corruptions of task images: definitions and parameters, determinism, bad input, the decoded cache,
the data module, the command line and the paper's robustness config."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CONFIGS, TINY_CLIP
from lit_adamerging import ImageFolderTask, MultiTaskDataModule, Preprocess, TorchvisionTask
from lit_adamerging.cli import AdaMergingCLI
from lit_adamerging.data import corruptions
from lit_adamerging.data.cache import store_name
from lit_adamerging.data.corruptions import CORRUPTIONS, corrupt_image, image_seed

# ImageNet-C's severity parameters (make_imagenet_c.py), for the naive references below
GAUSSIAN_SCALE = [0.08, 0.12, 0.18, 0.26, 0.38]
IMPULSE_AMOUNT = [0.03, 0.06, 0.09, 0.17, 0.27]
MOTION_RADIUS_SIGMA = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)]
CONTRAST_FACTOR = [0.4, 0.3, 0.2, 0.1, 0.05]
JPEG_QUALITY = [25, 18, 15, 10, 7]
PIXELATE_FACTOR = [0.6, 0.5, 0.4, 0.3, 0.25]
RANDOM = {"gaussian_noise", "impulse_noise", "motion_blur", "spatter"}  # the others ignore the seed


def picture(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth, photo-like uint8 image [3, size, size]: a random 7 x 7 image upsampled (bicubic)."""
    small = np.random.default_rng(seed).integers(0, 256, size=(7, 7, 3), dtype=np.uint8)
    pixels = np.array(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def hwc(image: torch.Tensor) -> np.ndarray:
    """[H, W, 3] in memory order (sums over a strided view may round differently)."""
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())


def chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


# --------------------------------------------------------------------------------------------- #
# The corruptions
# --------------------------------------------------------------------------------------------- #


def test_the_papers_seven_corruptions_in_its_order():
    assert CORRUPTIONS == ("gaussian_noise", "impulse_noise", "motion_blur", "pixelate", "spatter", "contrast",
                           "jpeg_compression")


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_the_image_and_is_deterministic(name):
    image = picture(32)
    first = corrupt_image(image, name, 1, seed=3)
    assert first.dtype == torch.uint8 and first.shape == image.shape
    assert not torch.equal(first, image)  # even the mildest severity changes it
    assert torch.equal(corrupt_image(image, name, 1, seed=3), first)
    assert torch.equal(image, picture(32))  # the input is left alone
    other_seed = corrupt_image(image, name, 1, seed=4)
    assert torch.equal(other_seed, first) == (name not in RANDOM)


def test_corrupted_images_are_the_same_in_a_fresh_process(tmp_path):
    image = picture(40, 1)
    np.save(tmp_path / "image.npy", image.numpy())
    here = {
        f"{name}/{severity}": hashlib.sha256(corrupt_image(image, name, severity, 11).numpy().tobytes()).hexdigest()
        for name in CORRUPTIONS
        for severity in (1, 5)
    }
    script = (
        "import hashlib, json, sys, numpy, torch\n"
        "from lit_adamerging.data.corruptions import CORRUPTIONS, corrupt_image\n"
        "image = torch.from_numpy(numpy.load(sys.argv[1]))\n"
        "print(json.dumps({f'{n}/{s}': hashlib.sha256(corrupt_image(image, n, s, 11).numpy().tobytes()).hexdigest()"
        " for n in CORRUPTIONS for s in (1, 5)}))"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "image.npy")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == here


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_5_lies_farther_from_the_clean_image_than_severity_1(name):
    images = [picture(32, seed) for seed in range(4)]
    mild = np.mean([mean_distance(corrupt_image(image, name, 1, seed), image) for seed, image in enumerate(images)])
    strong = np.mean([mean_distance(corrupt_image(image, name, 5, seed), image) for seed, image in enumerate(images)])
    assert strong > mild > 0


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_deterministic_corruptions_follow_imagenet_c_definitions(severity):
    image = picture(48, severity)
    pixels = hwc(image).astype(np.float64) / 255
    # contrast: (x - per-channel mean) * c + mean
    means = pixels.mean(axis=(0, 1), keepdims=True)
    want = np.uint8(np.clip((pixels - means) * CONTRAST_FACTOR[severity - 1] + means, 0, 1) * 255)
    assert torch.equal(corrupt_image(image, "contrast", severity, 0), chw(want))
    # JPEG at quality q, read back
    buffer = io.BytesIO()
    Image.fromarray(hwc(image)).save(buffer, "JPEG", quality=JPEG_QUALITY[severity - 1])
    want = np.array(Image.open(buffer))
    assert torch.equal(corrupt_image(image, "jpeg_compression", severity, 0), chw(want))
    # pixelate: box-downsample to a fraction c of the side, box-upsample back
    side = int(48 * PIXELATE_FACTOR[severity - 1])
    small = Image.fromarray(hwc(image)).resize((side, side), Image.BOX)
    want = np.array(small.resize((48, 48), Image.BOX))
    assert torch.equal(corrupt_image(image, "pixelate", severity, 0), chw(want))


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_random_corruptions_follow_imagenet_c_definitions(severity):
    image, seed = picture(64, severity), 1000 + severity
    pixels = hwc(image).astype(np.float64)
    # Gaussian noise: x + N(0, c^2) in [0, 1], drawn from numpy's legacy generator seeded with the image's seed
    noise = np.random.RandomState(seed).normal(size=pixels.shape, scale=GAUSSIAN_SCALE[severity - 1])
    want = np.uint8(np.clip(pixels / 255 + noise, 0, 1) * 255)
    assert torch.equal(corrupt_image(image, "gaussian_noise", severity, seed), chw(want))

    # motion blur, ImageMagick's: a one-sided Gaussian-weighted line of 2 * radius + 1 taps at an angle drawn
    # uniformly in [-45, 45] degrees; tap i reads the pixel at round(i * (cos a, sin a)) (edge pixels beyond)
    radius, sigma = MOTION_RADIUS_SIGMA[severity - 1]
    angle = math.radians(np.random.RandomState(seed).uniform(-45, 45))
    weights = [math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(2 * radius + 1)]
    rows, cols = np.arange(64)[:, None], np.arange(64)[None, :]
    blurred = np.zeros_like(pixels)
    for i, weight in enumerate(weights):
        dx, dy = math.ceil(i * math.cos(angle) - 0.5), math.ceil(i * math.sin(angle) - 0.5)
        blurred = blurred + weight / sum(weights) * pixels[np.clip(rows + dy, 0, 63), np.clip(cols + dx, 0, 63)]
    got = corrupt_image(image, "motion_blur", severity, seed)
    assert (got.int() - chw(np.uint8(np.clip(blurred, 0, 255))).int()).abs().max() <= 1  # float rounding

    # impulse noise: a fraction c of the values set to 0 or 255, half each
    got = hwc(corrupt_image(image, "impulse_noise", severity, seed)).astype(int)
    changed = got != pixels
    amount = IMPULSE_AMOUNT[severity - 1]
    assert np.isin(got[changed], [0, 255]).all()
    assert abs(changed.mean() - amount) < 0.02  # 12,288 values: the binomial's sd is under 0.005
    assert abs((got[changed] == 0).mean() - 0.5) < 0.1


def test_numpy_global_random_state_is_left_as_it_was():
    np.random.seed(123)
    before = np.random.get_state(legacy=False)
    for name in CORRUPTIONS:
        corrupt_image(picture(32), name, 3, seed=5)
    after = np.random.get_state(legacy=False)
    assert after["state"]["key"].tolist() == before["state"]["key"].tolist()
    assert (after["state"]["pos"], after["has_gauss"], after["gauss"]) == (
        before["state"]["pos"], before["has_gauss"], before["gauss"])
    assert np.random.normal() == np.random.RandomState(123).normal()


def test_image_seed_depends_on_every_part():
    base = image_seed(0, "ImageFolderTask:a/test", 7, "motion_blur", 3)
    assert base == image_seed(0, "ImageFolderTask:a/test", 7, "motion_blur", 3) and 0 <= base < 2**32
    others = [
        image_seed(1, "ImageFolderTask:a/test", 7, "motion_blur", 3),
        image_seed(0, "ImageFolderTask:b/test", 7, "motion_blur", 3),
        image_seed(0, "ImageFolderTask:a/test", 8, "motion_blur", 3),
        image_seed(0, "ImageFolderTask:a/test", 7, "spatter", 3),
        image_seed(0, "ImageFolderTask:a/test", 7, "motion_blur", 4),
    ]
    assert len({base, *others}) == 6


# --------------------------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------------------------- #

NAMES = "gaussian_noise, impulse_noise, motion_blur, pixelate, spatter, contrast, jpeg_compression"


@pytest.mark.parametrize("make", [
    lambda **kw: ImageFolderTask(root="/nowhere", **kw),
    lambda **kw: TorchvisionTask("mnist", root="/nowhere", **kw),
])
def test_bad_corruption_settings_fail_at_construction_with_the_valid_ones(make):
    # root does not exist: the errors come from the settings, before anything is read
    with pytest.raises(ValueError, match=f"unknown corruption 'fog'; valid corruptions: {NAMES}"):
        make(corruption="fog", severity=1)
    for severity in (0, 6, None, True, "3", 2.0):
        with pytest.raises(ValueError, match=r"corruption 'pixelate' needs a severity, one of 1, 2, 3, 4, 5 .*got"):
            make(corruption="pixelate", severity=severity)
    with pytest.raises(ValueError, match=r"severity=3 without a corruption; give `corruption` as well \(one of "):
        make(severity=3)
    with pytest.raises(ValueError, match=r"corruption_seed must be an integer, got 'x'"):
        make(corruption="pixelate", severity=2, corruption_seed="x")


def test_corrupt_image_refuses_bad_images_and_settings():
    with pytest.raises(ValueError, match=f"corrupt_image: unknown corruption 'Blur'; valid corruptions: {NAMES}"):
        corrupt_image(picture(32), "Blur", 1, 0)
    with pytest.raises(ValueError, match="corrupt_image: corruption 'spatter' needs a severity, one of 1, 2, 3, 4, 5"):
        corrupt_image(picture(32), "spatter", 0, 0)
    with pytest.raises(ValueError, match=r"needs a uint8 tensor \[3, H, W\], got torch.float32 \(3, 32, 32\)"):
        corrupt_image(picture(32).float(), "spatter", 1, 0)
    with pytest.raises(ValueError, match=r"at least 32 px a side .* got \(32, 31\)"):
        corrupt_image(picture(32)[:, :, :31], "spatter", 1, 0)


def test_too_small_images_are_refused_naming_the_task(tmp_path):
    task = ImageFolderTask(root=str(make_tree(tmp_path / "small")), preprocess=Preprocess(image_size=16),
                           corruption="contrast", severity=2)
    with pytest.raises(ValueError, match=r"ImageFolderTask\(root='.*small'.*corruption='contrast'.* at least 32 px, "
                                         r"and its preprocessing gives 16 px"):
        task.test_set()


# --------------------------------------------------------------------------------------------- #
# Tasks, the decoded cache, the data module
# --------------------------------------------------------------------------------------------- #


def make_tree(root: Path, classes: int = 2, per_class: int = 3, seed: int = 0) -> Path:
    """An ImageFolder test split of smooth random images, 36-48 px a side."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / "test" / f"c{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            width, height = (int(v) for v in rng.integers(36, 49, size=2))
            small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            Image.fromarray(small).resize((width, height), Image.BICUBIC).save(folder / f"{index}.png")
    return root


PRE = Preprocess(image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))


def eval_images(data: MultiTaskDataModule) -> list[torch.Tensor]:
    """Every eval loader's images as the model receives them (after the transfer hook)."""
    return [
        torch.cat([data.on_after_batch_transfer(batch, index)[0] for batch in loader])
        for index, loader in enumerate(data.test_dataloader())
    ]


def naive_corrupted(task: ImageFolderTask) -> torch.Tensor:
    """The task's images decoded, corrupted one by one with the public API and normalised."""
    clean = ImageFolderTask(root=task.root, preprocess=task.preprocess).decoded_test_set()
    return torch.stack([
        task.preprocess.normalize(corrupt_image(image, task.corruption, task.severity, image_seed(
            task.corruption_seed, task.corruption_identity(), index, task.corruption, task.severity)))
        for index, (image, _) in enumerate(clean)
    ])


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_uncached_and_naive_corrupted_images_are_equal(tmp_path, cache):
    tasks = {
        "alpha": ImageFolderTask(root=str(make_tree(tmp_path / "alpha", seed=1)), preprocess=PRE,
                                 corruption="gaussian_noise", severity=4),
        "beta": ImageFolderTask(root=str(make_tree(tmp_path / "beta", seed=2)), preprocess=PRE,
                                corruption="spatter", severity=5, corruption_seed=9),
    }
    uncached = MultiTaskDataModule(tasks, eval_batch_size=4, cache="none")
    cached = MultiTaskDataModule(tasks, batch_size=2, eval_batch_size=4, cache=cache, cache_dir=str(tmp_path / "c"))
    uncached.setup("fit")
    cached.setup("fit")
    clean = MultiTaskDataModule({name: ImageFolderTask(root=t.root, preprocess=PRE) for name, t in tasks.items()},
                                cache="none")
    clean.setup("test")
    for images, want, (name, task), clean_images in zip(
        eval_images(cached), eval_images(uncached), tasks.items(), eval_images(clean)
    ):
        assert torch.equal(images, want)  # bit for bit
        assert torch.equal(images, naive_corrupted(task))
        assert not torch.equal(images, clean_images)
    # fit (the unlabeled images AdaMerging learns on) reads the corrupted images too
    for index, (name, loader) in enumerate(cached.train_dataloader().items()):
        batch = cached.on_after_batch_transfer({name: next(iter(loader))}, 0)[name]
        want = eval_images(uncached)[index]
        assert all(any(torch.equal(image, other) for other in want) for image in batch)


def test_cache_keys_on_corruption_severity_and_seed_and_reuses_corrupted_stores(tmp_path, monkeypatch):
    root = str(make_tree(tmp_path / "alpha"))
    cache_dir = tmp_path / "c"
    settings = [{}, {"corruption": "impulse_noise", "severity": 3}, {"corruption": "impulse_noise", "severity": 4},
                {"corruption": "contrast", "severity": 3},
                {"corruption": "impulse_noise", "severity": 3, "corruption_seed": 1}]
    built = []
    for options in settings:
        data = MultiTaskDataModule({"alpha": ImageFolderTask(root=root, preprocess=PRE, **options)},
                                   cache="disk", cache_dir=str(cache_dir))
        data.setup("test")
        built.append(eval_images(data)[0])
    names = sorted(path.stem for path in cache_dir.glob("*.json"))
    assert len(names) == len(settings)  # one store each
    assert sum("-impulse_noise3-" in name for name in names) == 2 and sum("-contrast3-" in name for name in names) == 1
    assert all(not torch.equal(built[i], built[j]) for i in range(5) for j in range(i))

    # the second run maps the stored corrupted split: nothing is decoded or corrupted again
    def refuse(*args, **kwargs):
        raise AssertionError("the corrupted store should have been reused")

    monkeypatch.setattr(corruptions, "corrupt_image", refuse)
    monkeypatch.setattr(ImageFolderTask, "_images", refuse)
    again = MultiTaskDataModule({"alpha": ImageFolderTask(root=root, preprocess=PRE, **settings[1])},
                                cache="disk", cache_dir=str(cache_dir))
    again.setup("fit")
    assert torch.equal(eval_images(again)[0], built[1])
    assert len(list(cache_dir.glob("*.json"))) == len(settings)


def test_store_name_holds_the_corruption_library_version():
    task = ImageFolderTask(root="/data/x", corruption="pixelate", severity=2)
    key = task.corruption_settings()
    assert key is not None and key["library"].startswith("imagecorruptions-imaug==")
    assert key["identity"] == "ImageFolderTask:x/test"
    assert ImageFolderTask(root="/data/x").corruption_settings() is None
    name = store_name("x", "source", PRE, key)
    assert name.startswith("x-pixelate2-32px-")
    assert store_name("x", "source", PRE, {**key, "library": "imagecorruptions-imaug==9"}) != name
    assert store_name("x", "source", PRE) != name


def test_per_image_seeds_follow_the_image_and_the_folder_name_not_the_location(tmp_path):
    root = make_tree(tmp_path / "here" / "alpha", classes=1, per_class=1)
    shutil.copy(root / "test" / "c0" / "0.png", root / "test" / "c0" / "1.png")  # the same picture twice

    def corrupted(path: Path) -> list[torch.Tensor]:
        task = ImageFolderTask(root=str(path), preprocess=PRE, corruption="gaussian_noise", severity=1)
        return [image for image, _ in task.decoded_test_set()]

    first, second = corrupted(root)
    assert not torch.equal(first, second)  # the image's position is in its seed
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "alpha")
    assert all(torch.equal(a, b) for a, b in zip(corrupted(moved), (first, second)))  # same on any machine
    renamed = shutil.copytree(root, tmp_path / "beta")
    assert not torch.equal(corrupted(renamed)[0], first)  # another task draws other noise


# --------------------------------------------------------------------------------------------- #
# Command line and the paper's config
# --------------------------------------------------------------------------------------------- #


def cli_with(*args: str) -> AdaMergingCLI:
    with mock.patch.object(sys, "argv", ["lit-adamerging"]):  # pytest's own arguments are not the CLI's
        return AdaMergingCLI(run=False, args=list(args),
                             save_config_kwargs={"overwrite": True})


def test_corruption_in_a_cli_config_reaches_fit_and_the_cache(tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "default_root_dir": str(tmp_path / "run")},  # where the CLI saves its config.yaml
        "model": {"zoo": {"class_path": "lit_adamerging.SyntheticZoo",
                          "init_args": {"encoder": TINY_CLIP, "seed": 0}}},
        "data": {"batch_size": 2, "cache": "disk", "cache_dir": str(tmp_path / "c"), "tasks": {
            "alpha": {"class_path": "lit_adamerging.ImageFolderTask",
                      "init_args": {"root": str(make_tree(tmp_path / "alpha", seed=1)),
                                    "corruption": "motion_blur", "severity": 3}},
            "beta": {"class_path": "lit_adamerging.ImageFolderTask",
                     "init_args": {"root": str(make_tree(tmp_path / "beta", seed=2))}},
        }},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    cli = cli_with("--config", str(path), "--method", "layer_wise_adamerging")
    alpha = cli.datamodule.tasks["alpha"]
    assert (alpha.corruption, alpha.severity, alpha.corruption_seed) == ("motion_blur", 3, 0)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    stores = sorted(p.stem for p in (tmp_path / "c").glob("*.json"))
    assert len(stores) == 2 and stores[0].startswith("alpha-motion_blur3-32px-") and stores[1].startswith("beta-32px-")
    # the model's preprocessing (test-vit-tiny: 32 px, CLIP's mean and std) was used, then the corruption
    stored = cli.datamodule._test_sets["alpha"]
    want = ImageFolderTask(root=alpha.root, preprocess=cli.model.eval_preprocess(), corruption="motion_blur",
                           severity=3)
    assert torch.equal(cli.datamodule._normalizers["alpha"].normalize(stored.images), naive_corrupted(want))

    bad = {**config, "data": {**config["data"], "tasks": {"alpha": {**config["data"]["tasks"]["alpha"]}}}}
    bad["data"]["tasks"]["alpha"]["init_args"] = {**bad["data"]["tasks"]["alpha"]["init_args"], "severity": 7}
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="corruption 'motion_blur' needs a severity, one of 1, 2, 3, 4, 5"):
        cli_with("--config", str(path), "--method", "layer_wise_adamerging")


def test_unknown_corruption_in_a_cli_config_lists_the_valid_ones(tmp_path, capsys):
    config = {"model": {"zoo": {"class_path": "lit_adamerging.SyntheticZoo",
                                "init_args": {"encoder": TINY_CLIP}}},
              "data": {"tasks": {"alpha": {"class_path": "lit_adamerging.ImageFolderTask",
                                           "init_args": {"root": "/nowhere", "corruption": "fog", "severity": 1}}}}}
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli_with("--config", str(tmp_path / "config.yaml"))
    error = capsys.readouterr().err
    assert "corruption" in error and "fog" in error and all(name in error for name in CORRUPTIONS)


@pytest.mark.parametrize("method", ["task_arithmetic", "layer_wise_adamerging"])
def test_paper_robustness_config(method):
    paper = CONFIGS / "paper"
    configs = (paper / "trainer.yaml", paper / "robustness.yaml", paper / "vit_b32.yaml")
    cli = cli_with(*(arg for config in configs for arg in ("--config", str(config))), "--method", method)
    assert cli.datamodule.task_names == ["cars", "eurosat", "resisc45", "gtsrb"]
    for name, task in cli.datamodule.tasks.items():
        assert isinstance(task, TorchvisionTask) and task.dataset == name and task.root == f"data/{name}"
        assert (task.corruption, task.severity, task.corruption_seed) == ("motion_blur", 2, 0)
    assert cli.model.zoo.model == "ViT-B-32" and cli.trainer.max_steps == 500 and cli.datamodule.batch_size == 32
    assert cli.model.num_classes == {"cars": 196, "eurosat": 10, "resisc45": 45, "gtsrb": 43}
    # another corruption for one run: each task's from the command line
    overrides = [arg for name in cli.datamodule.task_names
                 for arg in (f"--data.tasks.{name}.init_args.corruption", "pixelate")]
    changed = cli_with(*(arg for config in configs for arg in ("--config", str(config))), *overrides)
    assert {task.corruption for task in changed.datamodule.tasks.values()} == {"pixelate"}
