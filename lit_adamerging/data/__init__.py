"""Data: task datasets (synthetic, image folders, torchvision and the paper's datasets) and the multi-task DataModule."""

from lit_adamerging.data.datamodule import MultiTaskDataModule
from lit_adamerging.data.datasets import (
    ImageFolderTask,
    TorchvisionTask,
    eurosat_split_indices,
    eurosat_test_indices,
    sun397_test_indices,
)
from lit_adamerging.data.tasks import ImagesOnly, SyntheticTask, TaskData

__all__ = [
    "ImageFolderTask",
    "ImagesOnly",
    "MultiTaskDataModule",
    "SyntheticTask",
    "TaskData",
    "TorchvisionTask",
    "eurosat_split_indices",
    "eurosat_test_indices",
    "sun397_test_indices",
]
