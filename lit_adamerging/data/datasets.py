"""Real image datasets as tasks: the names this module has always offered, each defined in the module of its job.

* :mod:`lit_adamerging.data.images`: decoding image files, :class:`ImageReadError`, :func:`read_rgb`;
* :mod:`lit_adamerging.data.files`: which files a task reads (:data:`IMAGE_EXTENSIONS`, :func:`fingerprint`);
* :mod:`lit_adamerging.data.image_file_task`: :class:`ImageFileTask`, the base of the tasks below (preprocessing,
  corruption);
* :mod:`lit_adamerging.data.image_folder`: :class:`ImageFolderTask`, offline ``root/{train,test}/<class>/<images>``
  trees;
* :mod:`lit_adamerging.data.torchvision_task`: :class:`TorchvisionTask`, the test splits the AdaMerging paper
  evaluates on, per dataset;
* :mod:`lit_adamerging.data.paper_datasets`: the paper's datasets (:data:`TORCHVISION_NUM_CLASSES`, layouts);
* :mod:`lit_adamerging.data.splits`: the splits torchvision does not define (EuroSAT, SUN397's fallback).
"""

from __future__ import annotations

from lit_adamerging.data.files import IMAGE_EXTENSIONS, fingerprint
from lit_adamerging.data.image_file_task import ImageFileTask
from lit_adamerging.data.image_folder import ImageFolderTask
from lit_adamerging.data.images import ImageReadError, read_rgb
from lit_adamerging.data.paper_datasets import TORCHVISION_NUM_CLASSES
from lit_adamerging.data.splits import (
    EUROSAT_SPLIT_SEED,
    SUN397_SPLIT_SEED,
    eurosat_split_indices,
    eurosat_test_indices,
    sun397_test_indices,
)
from lit_adamerging.data.torchvision_task import TorchvisionTask

__all__ = [
    "EUROSAT_SPLIT_SEED",
    "IMAGE_EXTENSIONS",
    "SUN397_SPLIT_SEED",
    "TORCHVISION_NUM_CLASSES",
    "ImageFileTask",
    "ImageFolderTask",
    "ImageReadError",
    "TorchvisionTask",
    "eurosat_split_indices",
    "eurosat_test_indices",
    "fingerprint",
    "read_rgb",
    "sun397_test_indices",
]
