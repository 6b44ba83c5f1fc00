"""The offline benchmark's datasets: where to find them, and how to get them where there are none.

The benchmark reads four ImageFolder trees (``mnist``, ``fashion_mnist``, ``cifar10``, ``gtsrb``)
laid out as ``<root>/<name>/classes.txt`` (readable names in label order) and
``<root>/<name>/{train,test}/<NN>_<slug>/<index>.png`` (``NN`` the zero-padded label). A root *has*
a dataset when ``<root>/<name>/train`` and ``<root>/<name>/test`` are folders. :func:`find_data_root`
picks the root, in this order:

1. the ``data_root`` argument (the benchmark's ``--data-root``);
2. the environment variable ``LIT_ADAMERGING_DATA``;
3. ``<repository>/../shared/datasets``, only when the package is imported from a source checkout;
4. the cache folder (``$XDG_CACHE_HOME/lit_adamerging/datasets``, by default
   ``~/.cache/lit_adamerging/datasets``), filled by :func:`download_datasets` where it lacks a dataset.

The download goes through torchvision (raw files in ``<cache>/torchvision``), then draws a random
subset with a fixed seed from the official train and from the official test split
(:data:`SUBSET_SIZES`: the sizes of the offline trees) and writes it in the same layout, grey 28x28
PNGs for the MNISTs and RGB 32x32 ones for CIFAR-10 and GTSRB (whose images of varying size are
resized). Each tree is written into a temporary folder, completed by the marker file
:data:`MARKER`, and renamed into place, so a tree in the cache without the marker is never used.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from lit_adamerging.io import atomic_directory, write_text_atomic
from lit_adamerging.models.prompts import class_names

__all__ = [
    "DATA_ENV",
    "DOWNLOADABLE",
    "MARKER",
    "SUBSET_SEED",
    "SUBSET_SIZES",
    "DataNotFoundError",
    "checkout_datasets_dir",
    "default_cache_dir",
    "download_datasets",
    "find_data_root",
    "has_dataset",
]

log = logging.getLogger(__name__)

DATA_ENV = "LIT_ADAMERGING_DATA"
"""The environment variable naming a folder of ImageFolder trees."""

SUBSET_SIZES: dict[str, tuple[int, int]] = {
    "mnist": (6000, 2000),
    "fashion_mnist": (6000, 2000),
    "cifar10": (6000, 2000),
    "gtsrb": (8000, 2500),
}
"""(train, test) images drawn from each dataset's official splits, as in the offline trees."""

DOWNLOADABLE: tuple[str, ...] = tuple(SUBSET_SIZES)
SUBSET_SEED = 0
MARKER = ".lit_adamerging.json"
"""Written last into a downloaded tree: what it holds and how it was drawn."""


class _Source(NamedTuple):
    kind: str  # of the PNGs: "grey" (mode L) or "RGB"
    side: int  # the PNGs are side x side
    torchvision: str  # the torchvision.datasets class
    split_argument: str  # "train" (train=True/False) or "split" (split="train"/"test")
    description: str  # for SOURCE.md


_SOURCES: dict[str, _Source] = {
    "mnist": _Source("grey", 28, "MNIST", "train", "MNIST handwritten digits (LeCun, Cortes, Burges)"),
    "fashion_mnist": _Source("grey", 28, "FashionMNIST", "train", "Fashion-MNIST (Xiao, Rasul, Vollgraf 2017)"),
    "cifar10": _Source("RGB", 32, "CIFAR10", "train", "CIFAR-10 (Krizhevsky 2009)"),
    "gtsrb": _Source("RGB", 32, "GTSRB", "split", "German Traffic Sign Recognition Benchmark (Stallkamp et al. 2012)"),
}


class DataNotFoundError(FileNotFoundError):
    """The datasets are in none of the places searched and could not be downloaded; the message says where it looked."""


def has_dataset(root: str | Path, name: str, require_marker: bool = False) -> bool:
    """Whether ``root/name/{train,test}`` are folders (and, with ``require_marker``, ``root/name/MARKER`` a file)."""
    tree = Path(root).expanduser() / name
    complete = not require_marker or (tree / MARKER).is_file()
    return (tree / "train").is_dir() and (tree / "test").is_dir() and complete


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lit_adamerging/datasets``, or ``~/.cache/lit_adamerging/datasets`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "lit_adamerging" / "datasets"


def checkout_datasets_dir(package_dir: str | Path | None = None) -> Path | None:
    """``<repository>/../shared/datasets`` when the package is imported from a source checkout, else ``None``.

    A checkout is recognised by a ``setup.cfg`` next to the package folder (``package_dir``;
    ``None``: this package's) whose ``[metadata] name`` is the package's name; an installed wheel
    has none, and then nothing beside it is searched.
    """
    package = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parents[1]
    setup_cfg = package.parent / "setup.cfg"
    if not setup_cfg.is_file():
        return None
    config = configparser.ConfigParser(interpolation=None)
    try:
        config.read(setup_cfg, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return None
    if config.get("metadata", "name", fallback=None) != package.name:
        return None
    return package.parent.parent / "shared" / "datasets"


def find_data_root(
    datasets: Sequence[str] = DOWNLOADABLE,
    data_root: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    seed: int = SUBSET_SEED,
) -> Path:
    """The folder holding an ImageFolder tree for each of ``datasets``, searched in the order of the module docstring.

    ``data_root`` and ``LIT_ADAMERGING_DATA`` are the user's choice: when given, they must hold
    every dataset (no fallback). The folder beside the checkout is used when it holds every
    dataset; otherwise the cache is, after downloading the datasets it lacks (with ``download``;
    see :func:`download_datasets` for ``sizes`` and ``seed``). A complete tree in the cache is used
    whatever sizes and seed it was drawn with (its :data:`MARKER` records them).

    Args:
        datasets: the dataset folder names the caller reads.
        data_root: a folder of ImageFolder trees chosen by the user, or ``None``.
        cache_dir: the download cache; ``None``: :func:`default_cache_dir`.
        download: download missing datasets into the cache.
        sizes: ``{name: (train, test)}`` image counts of downloaded subsets; ``None``: :data:`SUBSET_SIZES`.
        seed: seed of the downloaded subsets.

    Returns:
        The root; ``root / name`` is the tree of dataset ``name``.

    Raises:
        ValueError: ``datasets`` is empty or names a dataset twice.
        DataNotFoundError: ``data_root`` or ``LIT_ADAMERGING_DATA`` lacks a dataset; or no place has
            them all and downloading is off or fails (the message lists each place searched).
        FileExistsError: the cache holds a folder for a dataset that was not written completely by
            :func:`download_datasets` (see there).
    """
    names = list(datasets)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"find_data_root: datasets must name each dataset once, got {names}.")
    if data_root is not None:
        return _chosen(Path(data_root).expanduser(), names, "the data_root argument (--data-root)")
    if os.environ.get(DATA_ENV):
        return _chosen(Path(os.environ[DATA_ENV]).expanduser(), names, f"the environment variable {DATA_ENV}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    looked = [f"{DATA_ENV}: not set"]
    beside = checkout_datasets_dir()
    if beside is None:
        looked.append("beside the checkout: the package is not imported from a source checkout")
    else:
        missing = [name for name in names if not has_dataset(beside, name)]
        if not missing:
            log.info("datasets %s: %s (beside the checkout)", names, beside)
            return beside
        looked.append(f"beside the checkout: {beside} lacks {missing}")
    missing = [name for name in names if not has_dataset(cache, name, require_marker=True)]
    if not missing:
        log.info("datasets %s: %s (the download cache)", names, cache)
        return cache
    looked.append(f"the download cache: {cache} lacks {missing}")
    if not download:
        raise DataNotFoundError(_not_found(missing, looked, "downloading is off"))
    not_downloadable = [name for name in missing if name not in _SOURCES]
    if not_downloadable:
        raise DataNotFoundError(
            _not_found(missing, looked, f"{not_downloadable} cannot be downloaded (only {', '.join(DOWNLOADABLE)} can)")
        )
    try:
        download_datasets(missing, cache, sizes=sizes, seed=seed)
    except DataNotFoundError as error:
        raise DataNotFoundError(_not_found(missing, looked, str(error))) from error.__cause__
    return cache


def _chosen(root: Path, names: list[str], where: str) -> Path:
    missing = [name for name in names if not has_dataset(root, name)]
    if missing:
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else None
        holds = f"it holds the folders {present}" if present is not None else "it is not a folder"
        raise DataNotFoundError(
            f"{where} names {str(root)!r}, which has no ImageFolder tree for {missing} (expected "
            f"<root>/<name>/train and <root>/<name>/test); {holds}. Point it at the folder that holds "
            f"them, or leave it unset to use the folder beside a source checkout or the download cache."
        )
    log.info("datasets %s: %s (%s)", names, root, where)
    return root


def _not_found(missing: list[str], looked: list[str], reason: str) -> str:
    places = "".join(f"\n  - {line}" for line in looked)
    return (
        f"no ImageFolder trees for {missing}; looked in:{places}\n"
        f"and could not download them: {reason}.\n"
        f"Give a folder holding <name>/train and <name>/test for each dataset with the data_root argument "
        f"(the benchmark's --data-root) or the environment variable {DATA_ENV}, or place the offline trees "
        f"in ../shared/datasets beside a source checkout."
    )


def download_datasets(
    datasets: Sequence[str] = DOWNLOADABLE,
    cache_dir: str | Path | None = None,
    *,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    seed: int = SUBSET_SEED,
) -> Path:
    """Download each of ``datasets`` the cache lacks through torchvision and write its ImageFolder subset there.

    Torchvision's files go to ``<cache>/torchvision`` (kept, so a later build does not download
    again; delete them once the trees are written to save space). From the official train split
    ``sizes[name][0]`` images and from the official test split ``sizes[name][1]`` are drawn at random
    without replacement (numpy ``default_rng(seed)``), kept in their order in the split, and written
    as ``<cache>/<name>/{train,test}/<NN>_<slug>/<position>.png`` with ``classes.txt``, ``SOURCE.md``
    and, last, :data:`MARKER`; the tree is written in a temporary folder and renamed into place.

    Returns:
        The cache folder.

    Raises:
        ValueError: a dataset is not one of :data:`DOWNLOADABLE`, or a size is not an integer in
            ``[1, split size]``.
        DataNotFoundError: torchvision could not download or read a dataset (its exception is
            named in the message and chained).
        FileExistsError: ``<cache>/<name>`` exists without :data:`MARKER` (not written completely
            by this function): it is never used or replaced; remove it to download again. (A complete
            tree written by another process while this one was writing is used.)
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sizes = SUBSET_SIZES if sizes is None else sizes
    unknown = [name for name in datasets if name not in _SOURCES]
    if unknown:
        raise ValueError(f"download_datasets: cannot download {unknown}; choose from {', '.join(DOWNLOADABLE)}.")
    for name in datasets:
        if has_dataset(cache, name, require_marker=True):
            continue
        if (cache / name).exists():
            raise FileExistsError(
                f"{cache / name} exists but was not written completely by lit_adamerging (no {MARKER} in it): "
                f"it is not used. Remove it to download {name} again, or pass its parent folder as data_root "
                f"if it is a complete ImageFolder tree."
            )
        try:
            _write_tree(name, cache, _split_sizes(name, sizes), seed)
        except FileExistsError:
            if not has_dataset(cache, name, require_marker=True):
                raise
            log.info("%s was written by another process meanwhile; using that one", cache / name)
    return cache


def _split_sizes(name: str, sizes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    pair = sizes.get(name)
    if (
        not isinstance(pair, Sequence)
        or len(pair) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair)
    ):
        raise ValueError(
            f"download_datasets: sizes[{name!r}] must be (train, test) positive image counts, got {pair!r}."
        )
    return dict(zip(("train", "test"), pair, strict=True))


def _torchvision_split(name: str, raw: Path, split: str) -> Any:
    from torchvision import datasets as tv

    source = _SOURCES[name]
    value: Any = split == "train" if source.split_argument == "train" else split
    try:
        return getattr(tv, source.torchvision)(str(raw), download=True, **{source.split_argument: value})
    except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision raises RuntimeError
        raise DataNotFoundError(
            f"torchvision could not download or read {source.torchvision} ({split} split) into {str(raw)!r}: "
            f"{type(error).__name__}: {str(error).strip()}"
        ) from error


def _write_tree(name: str, cache: Path, sizes: dict[str, int], seed: int) -> None:
    source = _SOURCES[name]
    raw = cache / "torchvision"
    splits = {split: _torchvision_split(name, raw, split) for split in sizes}
    chosen = {split: _subset(name, split, len(data), sizes[split], seed) for split, data in splits.items()}
    names = class_names(name)
    folders = [f"{label:0{max(2, len(str(len(names) - 1)))}d}_{_slug(text)}" for label, text in enumerate(names)]
    width = max(5, len(str(max(sizes.values()) - 1)))
    log.info("writing %s: %s images from torchvision's %s into %s", name, sizes, source.torchvision, cache / name)
    with atomic_directory(cache / name) as tree:
        (tree / "classes.txt").write_text("".join(f"{text}\n" for text in names), encoding="utf-8")
        for split, data in splits.items():
            for folder in folders:
                (tree / split / folder).mkdir(parents=True)
            for position, index in enumerate(chosen[split]):
                image, label = data[index]
                if not 0 <= label < len(folders):
                    raise ValueError(
                        f"torchvision's {source.torchvision} {split} image {index} has label {label}, not in "
                        f"[0, {len(folders)}); its files under {str(raw)!r} are not the official ones."
                    )
                if image.size != (source.side, source.side):
                    image = image.resize((source.side, source.side), Image.Resampling.BILINEAR)
                image.save(tree / split / folders[label] / f"{position:0{width}d}.png", format="PNG")
        (tree / "SOURCE.md").write_text(
            f"{source.description}, {source.side}x{source.side} {source.kind}. Downloaded through torchvision "
            f"({source.torchvision}). Random subset (seed {seed}) of the official train and test splits.\n\n"
            f"Images per split: {json.dumps(sizes)}; classes: {len(names)}.\n",
            encoding="utf-8",
        )
        marker = {"dataset": name, "torchvision": source.torchvision, "seed": seed, "images": sizes}
        write_text_atomic(tree / MARKER, json.dumps(marker, indent=2) + "\n")


def _subset(name: str, split: str, available: int, size: int, seed: int) -> list[int]:
    """``size`` distinct indices of ``range(available)`` drawn with ``seed``, in increasing order."""
    if size > available:
        raise ValueError(
            f"{name}: the {split} subset has {size} images, but torchvision's {split} split only {available}."
        )
    return sorted(np.random.default_rng(seed).choice(available, size=size, replace=False).tolist())


def _slug(text: str) -> str:
    """``"speed limit 20 km/h"`` -> ``"speed_limit_20_km_h"``: the class folder name after the label."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
