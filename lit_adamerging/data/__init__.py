"""Data: task datasets (synthetic, image folders, torchvision and the paper's datasets), the multi-task DataModule,
and the contract between it and the models.

The names below are imported on first use (Lightning only with :class:`MultiTaskDataModule`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lit_adamerging._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "lit_adamerging.data.contract": [
        "DeclaresFitInputs", "DescribesTasks", "ReadsImagesAs", "ReportsPreprocess", "UnlabeledImages",
    ],
    "lit_adamerging.data.datamodule": ["MultiTaskDataModule"],
    "lit_adamerging.data.image_folder": ["ImageFolderTask"],
    "lit_adamerging.data.images": ["ImageReadError"],
    "lit_adamerging.data.splits": ["eurosat_split_indices", "eurosat_test_indices", "sun397_test_indices"],
    "lit_adamerging.data.tasks": ["ImagesOnly", "SyntheticTask", "TaskData"],
    "lit_adamerging.data.torchvision_task": ["TorchvisionTask"],
})

if TYPE_CHECKING:
    from lit_adamerging.data.contract import DeclaresFitInputs as DeclaresFitInputs
    from lit_adamerging.data.contract import DescribesTasks as DescribesTasks
    from lit_adamerging.data.contract import ReadsImagesAs as ReadsImagesAs
    from lit_adamerging.data.contract import ReportsPreprocess as ReportsPreprocess
    from lit_adamerging.data.contract import UnlabeledImages as UnlabeledImages
    from lit_adamerging.data.datamodule import MultiTaskDataModule as MultiTaskDataModule
    from lit_adamerging.data.image_folder import ImageFolderTask as ImageFolderTask
    from lit_adamerging.data.images import ImageReadError as ImageReadError
    from lit_adamerging.data.splits import eurosat_split_indices as eurosat_split_indices
    from lit_adamerging.data.splits import eurosat_test_indices as eurosat_test_indices
    from lit_adamerging.data.splits import sun397_test_indices as sun397_test_indices
    from lit_adamerging.data.tasks import ImagesOnly as ImagesOnly
    from lit_adamerging.data.tasks import SyntheticTask as SyntheticTask
    from lit_adamerging.data.tasks import TaskData as TaskData
    from lit_adamerging.data.torchvision_task import TorchvisionTask as TorchvisionTask
