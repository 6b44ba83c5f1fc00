"""lit_adamerging: AdaMerging (Yang et al., ICLR 2024) as a PyTorch Lightning library.

The names below are imported on first use, so ``import lit_adamerging.merging`` (pure torch)
does not import Lightning, open_clip or timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lit_adamerging._lazy import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "lit_adamerging.data.datamodule": ["MultiTaskDataModule"],
    "lit_adamerging.data.datasets": ["ImageFolderTask", "TorchvisionTask"],
    "lit_adamerging.data.tasks": ["SyntheticTask", "TaskData"],
    "lit_adamerging.lightning.callbacks": ["CoefficientLogger", "ExportMergedEncoder", "PerTaskAccuracy"],
    "lit_adamerging.lightning.adamerging": ["AdaMergingModule"],
    "lit_adamerging.lightning.base": ["MergingModule"],
    "lit_adamerging.lightning.data_free": ["TaskArithmeticModule"],
    "lit_adamerging.lightning.emr": ["EMRMergingModule"],
    "lit_adamerging.lightning.rank_wise": ["RankWiseAdaMergingModule"],
    "lit_adamerging.lightning.sharded": ["ShardedMergingStrategy"],
    "lit_adamerging.lightning.spectral": ["IsotropicMergingModule", "TSVMergingModule"],
    "lit_adamerging.lightning.statistics": ["FisherMergingModule", "RegMeanModule"],
    "lit_adamerging.lightning.surgery": ["SurgeryModule"],
    "lit_adamerging.lightning.wemoe": ["WEMoEModule"],
    "lit_adamerging.models.preprocess": ["Preprocess"],
    "lit_adamerging.models.zoo": ["ModelZoo", "OpenCLIPZoo", "StateDictZoo", "SyntheticZoo", "TimmZoo"],
})

if TYPE_CHECKING:
    from lit_adamerging.data.datamodule import MultiTaskDataModule as MultiTaskDataModule
    from lit_adamerging.data.datasets import ImageFolderTask as ImageFolderTask
    from lit_adamerging.data.datasets import TorchvisionTask as TorchvisionTask
    from lit_adamerging.data.tasks import SyntheticTask as SyntheticTask
    from lit_adamerging.data.tasks import TaskData as TaskData
    from lit_adamerging.lightning.adamerging import AdaMergingModule as AdaMergingModule
    from lit_adamerging.lightning.base import MergingModule as MergingModule
    from lit_adamerging.lightning.callbacks import CoefficientLogger as CoefficientLogger
    from lit_adamerging.lightning.callbacks import ExportMergedEncoder as ExportMergedEncoder
    from lit_adamerging.lightning.callbacks import PerTaskAccuracy as PerTaskAccuracy
    from lit_adamerging.lightning.data_free import TaskArithmeticModule as TaskArithmeticModule
    from lit_adamerging.lightning.emr import EMRMergingModule as EMRMergingModule
    from lit_adamerging.lightning.rank_wise import RankWiseAdaMergingModule as RankWiseAdaMergingModule
    from lit_adamerging.lightning.sharded import ShardedMergingStrategy as ShardedMergingStrategy
    from lit_adamerging.lightning.spectral import IsotropicMergingModule as IsotropicMergingModule
    from lit_adamerging.lightning.spectral import TSVMergingModule as TSVMergingModule
    from lit_adamerging.lightning.statistics import FisherMergingModule as FisherMergingModule
    from lit_adamerging.lightning.statistics import RegMeanModule as RegMeanModule
    from lit_adamerging.lightning.surgery import SurgeryModule as SurgeryModule
    from lit_adamerging.lightning.wemoe import WEMoEModule as WEMoEModule
    from lit_adamerging.models.preprocess import Preprocess as Preprocess
    from lit_adamerging.models.zoo import ModelZoo as ModelZoo
    from lit_adamerging.models.zoo import OpenCLIPZoo as OpenCLIPZoo
    from lit_adamerging.models.zoo import StateDictZoo as StateDictZoo
    from lit_adamerging.models.zoo import SyntheticZoo as SyntheticZoo
    from lit_adamerging.models.zoo import TimmZoo as TimmZoo
