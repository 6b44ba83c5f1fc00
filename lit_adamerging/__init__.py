"""lit_adamerging: AdaMerging (Yang et al., ICLR 2024) as a PyTorch Lightning library."""

from lit_adamerging.data import ImageFolderTask, MultiTaskDataModule, SyntheticTask, TaskData, TorchvisionTask
from lit_adamerging.lightning import AdaMergingModule, CoefficientLogger, ExportMergedEncoder, PerTaskAccuracy
from lit_adamerging.models import ModelZoo, OpenCLIPZoo, Preprocess, StateDictZoo, SyntheticZoo, TimmZoo

__version__ = "0.1.0"

__all__ = [
    "AdaMergingModule",
    "CoefficientLogger",
    "ExportMergedEncoder",
    "ImageFolderTask",
    "ModelZoo",
    "OpenCLIPZoo",
    "MultiTaskDataModule",
    "PerTaskAccuracy",
    "Preprocess",
    "StateDictZoo",
    "SyntheticTask",
    "SyntheticZoo",
    "TimmZoo",
    "TorchvisionTask",
    "TaskData",
]
