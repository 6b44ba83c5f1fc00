"""The AdaMerging paper's 11 datasets: their names, class counts, file layouts under ``root`` and download limits.

:class:`~lit_adamerging.TorchvisionTask` reads them; nothing here reads a file.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["EXPECTED_LAYOUT", "NOT_DOWNLOADABLE", "PROMPT_TASK", "SUN397_PARTITION_CANDIDATES",
           "TORCHVISION_NUM_CLASSES", "TorchvisionName"]  # fmt: skip

TorchvisionName = Literal[
    "mnist", "fashion_mnist", "cifar10", "gtsrb", "usps", "svhn", "eurosat", "dtd", "sun397", "cars", "resisc45"
]

TORCHVISION_NUM_CLASSES: dict[str, int] = {
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "gtsrb": 43,
    "usps": 10,
    "svhn": 10,
    "eurosat": 10,
    "dtd": 47,
    "sun397": 397,
    "cars": 196,
    "resisc45": 45,
}
"""Class count of every :class:`TorchvisionTask` dataset (known without reading any file)."""

EXPECTED_LAYOUT: dict[str, str] = {
    "mnist": "root/MNIST/raw/t10k-images-idx3-ubyte and root/MNIST/raw/t10k-labels-idx1-ubyte (torchvision "
    "also requires the train-images-idx3-ubyte and train-labels-idx1-ubyte files next to them)",
    "fashion_mnist": "root/FashionMNIST/raw/t10k-images-idx3-ubyte and root/FashionMNIST/raw/t10k-labels-idx1-ubyte "
    "(torchvision also requires the train-images-idx3-ubyte and train-labels-idx1-ubyte files next to them)",
    "cifar10": "root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (checksums verified)",
    "gtsrb": "root/gtsrb/GT-final_test.csv and root/gtsrb/GTSRB/Final_Test/Images/<image>.ppm",
    "usps": "root/usps.t.bz2",
    "svhn": "root/test_32x32.mat (checksum verified)",
    "eurosat": "root/eurosat/2750/<class>/<image>.jpg with the 10 class folders",
    "dtd": "root/dtd/dtd/images/<class>/<image>.jpg and root/dtd/dtd/labels/test1.txt",
    "sun397": "root/SUN397/ClassName.txt and root/SUN397/<letter>/<class>/sun_<id>.jpg, and optionally the official "
    "partition file Testing_01.txt in root/SUN397, root or root/Partitions (without it a fixed-seed split is used)",
    "cars": "root/stanford_cars/devkit/cars_meta.mat, root/stanford_cars/cars_test_annos_withlabels.mat and "
    "root/stanford_cars/cars_test/<image>.jpg",
    "resisc45": "root/NWPU-RESISC45/<class>/<image>.jpg (45 class folders) and the published split file "
    "root/resisc45-test.txt (one image file name per line)",
}
"""Where each dataset's files must be under ``root``, for the error raised when they are missing."""

NOT_DOWNLOADABLE: dict[str, str] = {
    "cars": "Stanford Cars cannot be downloaded automatically (torchvision's download URL is broken); "
    "place the files there yourself",
    "resisc45": "RESISC45 is not in torchvision and cannot be downloaded automatically; place the files there "
    "yourself (resisc45-test.txt is the published test split of Neumann et al.'s remote sensing benchmark, "
    "also used by torchgeo)",
}
"""Why a dataset cannot be fetched with ``download: true``, for the error raised when it is missing."""

PROMPT_TASK: dict[str, str] = {"usps": "mnist"}
"""Datasets whose class names are another task's (:mod:`lit_adamerging.models.prompts`)."""

SUN397_PARTITION_CANDIDATES: tuple[str, ...] = (
    "SUN397/Testing_01.txt", "Testing_01.txt", "Partitions/Testing_01.txt", "SUN397/Partitions/Testing_01.txt",
)  # fmt: skip
"""Where SUN397's official test partition file is looked for, relative to ``root``, in this order."""
