"""Lightning glue: the AdaMerging LightningModule and its callbacks."""

from lit_adamerging.lightning.callbacks import CoefficientLogger, ExportMergedEncoder, PerTaskAccuracy
from lit_adamerging.lightning.module import AdaMergingModule

__all__ = ["AdaMergingModule", "CoefficientLogger", "ExportMergedEncoder", "PerTaskAccuracy"]
