"""lit_adamerging: AdaMerging (Yang et al., ICLR 2024) as a PyTorch Lightning library."""

from lit_adamerging.data import MultiTaskDataModule, SyntheticTask, TaskData
from lit_adamerging.lightning import AdaMergingModule, CoefficientLogger, ExportMergedEncoder, PerTaskAccuracy
from lit_adamerging.models import ModelZoo, OpenCLIPZoo, StateDictZoo, SyntheticZoo, TimmZoo

__version__ = "0.1.0"

__all__ = [
    "AdaMergingModule",
    "CoefficientLogger",
    "ExportMergedEncoder",
    "ModelZoo",
    "OpenCLIPZoo",
    "MultiTaskDataModule",
    "PerTaskAccuracy",
    "StateDictZoo",
    "SyntheticTask",
    "SyntheticZoo",
    "TimmZoo",
    "TaskData",
]
