"""Lightning glue: the merging modules (siblings on one base), the callbacks."""

from lit_adamerging.lightning.adamerging import AdaMergingModule
from lit_adamerging.lightning.base import MergingModule
from lit_adamerging.lightning.callbacks import CoefficientLogger, ExportMergedEncoder, PerTaskAccuracy
from lit_adamerging.lightning.data_free import TaskArithmeticModule
from lit_adamerging.lightning.emr import EMRMergingModule
from lit_adamerging.lightning.rank_wise import RankWiseAdaMergingModule
from lit_adamerging.lightning.sharded import ShardedMergingStrategy
from lit_adamerging.lightning.spectral import IsotropicMergingModule, TSVMergingModule
from lit_adamerging.lightning.statistics import FisherMergingModule, RegMeanModule
from lit_adamerging.lightning.surgery import SurgeryModule
from lit_adamerging.lightning.wemoe import WEMoEModule

__all__ = [
    "AdaMergingModule", "CoefficientLogger", "EMRMergingModule", "ExportMergedEncoder", "FisherMergingModule",
    "IsotropicMergingModule", "MergingModule", "PerTaskAccuracy", "RankWiseAdaMergingModule", "RegMeanModule",
    "ShardedMergingStrategy", "SurgeryModule", "TSVMergingModule", "TaskArithmeticModule", "WEMoEModule",
]
