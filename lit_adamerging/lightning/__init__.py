"""Lightning glue: the AdaMerging LightningModule, the modules of the other data-learning methods, callbacks."""

from lit_adamerging.lightning.callbacks import CoefficientLogger, ExportMergedEncoder, PerTaskAccuracy
from lit_adamerging.lightning.module import AdaMergingModule
from lit_adamerging.lightning.statistics import FisherMergingModule, RegMeanModule
from lit_adamerging.lightning.surgery import SurgeryModule

__all__ = [
    "AdaMergingModule", "CoefficientLogger", "ExportMergedEncoder", "FisherMergingModule", "PerTaskAccuracy",
    "RegMeanModule", "SurgeryModule",
]
