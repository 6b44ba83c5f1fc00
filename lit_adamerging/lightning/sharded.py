"""The strategy that splits the merge's weights across processes: Lightning's FSDP2 strategy, checkpoints kept small.

:class:`ShardedMergingStrategy` is Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy`
(PyTorch's FSDP2, ``fully_shard``) with every process in one data-parallel group, and the checkpoints of
the other strategies: what a method learns is replicated (the coefficients), so rank 0 writes it through
the Trainer's checkpoint reader/writer, and every process reads it back the same way
(:class:`~lit_adamerging.lightning.checkpoint_io.SafeCheckpointIO`: plain data, size limits). A checkpoint
written by a sharded run loads in a run on any number of processes, sharded or not, and the other way round.

The merging module does the sharding itself (:meth:`~lit_adamerging.MergingModule.configure_model` builds a
:class:`~lit_adamerging.merging.ShardedMergedEncoder` on the strategy's mesh): each process builds the
pretrained encoder, keeps its rows of it, and reads only its rows of each fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import Tensor
from torch.optim import Optimizer


def is_sharded(trainer: Any) -> bool:
    """Whether ``trainer`` (a Trainer, or ``None`` outside one) runs under :class:`ShardedMergingStrategy`."""
    return isinstance(getattr(trainer, "strategy", None), ShardedMergingStrategy)


class ShardedMergingStrategy(ModelParallelStrategy):
    """Every process holds ``1/N`` of the pretrained weights and of every task vector (FSDP2 over all processes).

    Use it as a Trainer strategy with a merging module that shards (task arithmetic, TIES, AdaMerging and
    AdaMerging++, TSV-M, Iso-C/Iso-CTS); the ``trainer/sharded`` preset sets it up. On CPU processes the
    process group is gloo's, on GPUs NCCL's (``process_group_backend`` chooses another).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=ShardedMergingStrategy(), logger=False)
        >>> type(trainer.strategy).__name__
        'ShardedMergingStrategy'

    Args:
        process_group_backend: ``"gloo"``, ``"nccl"``, ...; ``None``: the device's default.
        timeout: how long a collective may wait for the other processes.
    """

    def __init__(
        self, process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout
    ) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
            process_group_backend=process_group_backend, timeout=timeout,
        )

    def setup_environment(self) -> None:
        # One data-parallel group of every process (ModelParallelStrategy's "auto" would be one per node).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # Checkpoints: the learned state is replicated and small, so it is saved and loaded as a single-device
    # run's is (Strategy's methods), not as ModelParallelStrategy's distributed or gathered state dicts.
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return Strategy.lightning_module_state_dict(self)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        return Strategy.optimizer_state(self, optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only)
