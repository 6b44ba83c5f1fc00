"""The decoded test-set cache: each test image read, resized and cropped once, then kept as uint8.

AdaMerging reads every task's test split hundreds of times. Decoding image files and resizing them
costs far more than indexing a tensor, so each split is decoded once into ``[N, 3, S, S]`` uint8
(the output of :meth:`Preprocess.decode`) plus ``N`` labels. The float normalisation, a cheap
elementwise operation, is applied to whole batches later (on the device, by the data module), and
gives the same tensors bit for bit as the uncached path.

On disk a store is two files in the cache folder: ``<name>.u8`` (the raw bytes, memory-mapped
copy-on-write when read: every process on a machine shares one copy in the page cache, and an
in-place write to an image changes that process's copy, never the file) and ``<name>.json`` (count,
size, labels). Both are written atomically (:func:`~lit_adamerging.io.atomic_path`); the JSON comes
last, so its presence marks a complete store, and an interrupted build leaves nothing behind that
gets read (its temporary file is removed by the next build).
The name holds a hash of the task's files (:meth:`ImageFileTask.source_key`; symbolic links followed, so
images changed behind a linked folder are seen), of the geometric
preprocessing, of the Pillow and torchvision versions and, for a corrupted task, of its corruption,
severity, seed and the corruption library's version (:meth:`ImageFileTask.corruption_settings`):
change any and the store is rebuilt. A corrupted split is thus computed once and then reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import PIL
import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_adamerging.data.image_file_task import ImageFileTask
from lit_adamerging.data.images import ImageReadError
from lit_adamerging.io import atomic_path, write_text_atomic
from lit_adamerging.models.preprocess import Preprocess

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: 16-bit grayscale images scaled to 8 bits, no longer clipped


class DecodedImages(Dataset):
    """Decoded uint8 images ``[N, 3, S, S]`` with their labels (or images only, ``labels=None``).

    Items are ``(image, label)`` or ``image``. ``__getitems__`` fetches a whole batch with one
    indexing operation (the DataLoader hands its result to :func:`collate_batch` as is). A store
    memory-mapped from ``path`` pickles as its path, so DataLoader workers map it again instead of
    copying it.
    """

    def __init__(self, images: Tensor, labels: Tensor | None, path: str | None = None) -> None:
        self.images = images
        self.labels = labels
        self.path = path

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Any:
        return self.images[index] if self.labels is None else (self.images[index], int(self.labels[index]))

    def __getitems__(self, indices: list[int]) -> Any:
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.images[rows] if self.labels is None else (self.images[rows], self.labels[rows])

    def images_only(self) -> DecodedImages:
        """The same images without labels: what AdaMerging may train on."""
        return DecodedImages(self.images, None, self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["images"] = tuple(self.images.shape)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["path"] is not None:
            state["images"] = _map(Path(state["path"]), tuple(state["images"]))
        self.__dict__.update(state)


def collate_batch(batch: Any) -> Any:
    """The collate function for :class:`DecodedImages`: ``__getitems__`` already built the batch."""
    return batch


def _map(path: Path, shape: tuple[int, ...]) -> Tensor:
    # shared=False maps the file MAP_PRIVATE: pages are read lazily and shared until written, and a
    # write copies the page for this process instead of reaching the file.
    return torch.from_file(str(path), shared=False, size=math.prod(shape), dtype=torch.uint8).view(shape)


def store_name(
    task_name: str, source_key: str, preprocess: Preprocess, corruption: Mapping[str, Any] | None = None
) -> str:
    """The file name (without suffix) of a store: readable prefix + hash of everything that shapes it.

    ``corruption``: the task's :meth:`~ImageFileTask.corruption_settings` (``None``: clean images).
    """
    identity: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": source_key,
        "image_size": preprocess.image_size,
        "interpolation": preprocess.interpolation,
        "center_crop": preprocess.center_crop,
        "crop_pct": preprocess.crop_pct,
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
    }
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", task_name)[:40]
    if corruption is not None:  # absent for clean images, so their stores keep the names they had
        identity["corruption"] = dict(corruption)
        readable += f"-{corruption['corruption']}{corruption['severity']}"
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return f"{readable}-{preprocess.image_size}px-{digest}"


def decoded_test_set(
    task: ImageFileTask, task_name: str, preprocess: Preprocess, cache_dir: str | Path | None, num_workers: int = 0
) -> DecodedImages:
    """``task``'s test split decoded with ``preprocess``: in memory (``cache_dir=None``) or as a store on disk.

    A store already in ``cache_dir`` is memory-mapped without reading any image; otherwise the split
    is decoded (``num_workers`` processes) and written there first.
    """
    if cache_dir is None:
        images, labels = _decode(task.decoded_test_set(preprocess), task_name, num_workers, writer=None)
        return DecodedImages(images, labels)
    folder = Path(cache_dir).expanduser()
    _check_folder(folder)
    name = store_name(task_name, task.source_key(), preprocess, task.corruption_settings())
    data_path, meta_path = folder / f"{name}.u8", folder / f"{name}.json"
    stored = _read_store(data_path, meta_path)
    if stored is not None:
        return stored
    with atomic_path(data_path) as temporary, open(temporary, "wb") as out:
        shape, labels = _decode(task.decoded_test_set(preprocess), task_name, num_workers, writer=out)
    meta = {"format": FORMAT_VERSION, "task": task_name, "shape": list(shape), "labels": labels.tolist()}
    write_text_atomic(meta_path, json.dumps(meta))
    log.info("decoded test-set cache of task %r written to %s", task_name, data_path)
    stored = _read_store(data_path, meta_path)
    assert stored is not None
    return stored


def _check_folder(folder: Path) -> None:
    """Refuse a cache folder that is, or lies under, a file (before anything is decoded)."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise NotADirectoryError(
                    f"cache_dir {str(folder)!r}: {str(existing)!r} is a file, not a folder; give a folder for "
                    "the decoded test-set cache (it is created if missing), or use cache='memory'."
                )
            return


def _decode(dataset: Dataset, task_name: str, num_workers: int, writer: BinaryIO | None) -> tuple[Any, Tensor]:
    """Decode ``(uint8 image, label)`` items in order.

    Returns the images tensor (or, with ``writer``, its shape) and the labels.
    """
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise ValueError(f"task {task_name!r}: its test split is empty; there is nothing to merge on.")
    images: list[Tensor] = []
    labels: list[Tensor] = []
    done = reported = 0
    # Its own generator: building the cache must not draw from the global RNG (the run's shuffles stay the same).
    loader = DataLoader(dataset, batch_size=64, num_workers=num_workers, generator=torch.Generator())
    for batch_images, batch_labels in _named_errors(loader, task_name):
        if writer is None:
            images.append(batch_images)
        else:
            writer.write(batch_images.contiguous().numpy().tobytes())
        labels.append(batch_labels.long())
        done += len(batch_labels)
        if done * 10 // total > reported:
            reported = done * 10 // total
            log.info("decoding the test split of %r: %d/%d images", task_name, done, total)
    all_labels = torch.cat(labels)
    if writer is None:
        return torch.cat(images), all_labels
    return (total, *batch_images.shape[1:]), all_labels


def _named_errors(loader: DataLoader, task_name: str) -> Iterator[Any]:
    """``loader``'s batches; an image file it cannot decode is reported with the task's name."""
    try:
        yield from loader
    except ImageReadError as error:
        raise error.in_task(task_name) from error


def _read_store(data_path: Path, meta_path: Path) -> DecodedImages | None:
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(int(size) for size in meta["shape"])
        labels = torch.tensor(meta["labels"], dtype=torch.long)
        complete = meta["format"] == FORMAT_VERSION and len(labels) == shape[0] and len(shape) == 4
        expected_bytes = math.prod(shape)
    except (ValueError, KeyError, TypeError, IndexError):
        complete, expected_bytes = False, -1
    if not complete or not data_path.is_file() or data_path.stat().st_size != expected_bytes:
        log.warning("decoded test-set cache %s is incomplete or corrupt; rebuilding it", meta_path)
        meta_path.unlink(missing_ok=True)
        return None
    return DecodedImages(_map(data_path, shape), labels, str(data_path))
