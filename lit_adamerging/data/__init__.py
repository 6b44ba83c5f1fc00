"""Data: task datasets and the multi-task DataModule."""

from lit_adamerging.data.datamodule import MultiTaskDataModule
from lit_adamerging.data.tasks import ImagesOnly, SyntheticTask, TaskData

__all__ = ["ImagesOnly", "MultiTaskDataModule", "SyntheticTask", "TaskData"]
