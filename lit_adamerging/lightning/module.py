"""The AdaMerging LightningModule: thin Lightning glue around :class:`MergedEncoder`."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lit_adamerging.lightning.callbacks import PerTaskAccuracy
from lit_adamerging.merging import (
    BufferPolicy,
    Granularity,
    MergedEncoder,
    entropy,
    stack_task_vectors,
    ties_task_vectors,
)
from lit_adamerging.models.encoders import feature_dim
from lit_adamerging.models.preprocess import Preprocess
from lit_adamerging.models.zoo import LazyStateDicts, ModelZoo

StorageDtype = Literal["float32", "bfloat16", "float16"]
COEFFICIENTS_KEY = "merger.coefficients.raw"

# The frozen encoder and heads run in eval mode on purpose (see AdaMergingModule.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class AdaMergingModule(pl.LightningModule):
    """Learns merging coefficients by minimising the entropy of every task head on unlabeled images.

    The encoder, task vectors and heads are loaded from ``zoo`` in :meth:`configure_model` (once,
    on the right process), so constructing the module is cheap. A checkpoint holds only the
    coefficients and the hyperparameters: the frozen weights are rebuilt from the zoo.

    The data-free baselines are the same module, evaluated without fitting: task arithmetic is
    ``granularity="task", init=0.3``; weight averaging is ``init=None`` (``1/T``); TIES-merging
    adds ``ties_k=0.2, ties_normalize=True``. AdaMerging++ is AdaMerging with ``ties_k=0.2``.

    Args:
        zoo: where the pretrained encoder, the fine-tuned encoders and the heads come from.
        num_classes: ``{task: number of classes}`` in task order (the CLI links it from the data).
        granularity: ``"task"`` (one coefficient per task) or ``"layer"`` (one per task and tensor).
        init: initial coefficient; ``None`` means ``1 / number of tasks``.
        clamp: clamp coefficients to ``[0, 1]`` in the forward (the paper's default).
        ties_k: if set, TIES trim/elect/disjoint the task vectors first, keeping this fraction.
        ties_normalize: divide TIES vectors by the number of tasks keeping each entry (TIES-merging).
        buffer_policy: what to do with floating-point buffers (see :data:`BufferPolicy`).
        task_vector_dtype: storage dtype of the stacked task vectors (the merge runs in fp32).
        lr: Adam learning rate.
        betas: Adam betas.
    """

    def __init__(
        self,
        zoo: ModelZoo,
        num_classes: dict[str, int] | None = None,
        granularity: Granularity = "layer",
        init: float | None = 0.3,
        clamp: bool = True,
        ties_k: float | None = None,
        ties_normalize: bool = False,
        buffer_policy: BufferPolicy = "pretrained",
        task_vector_dtype: StorageDtype = "float32",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}.")
        if task_vector_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"task_vector_dtype must be float32, bfloat16 or float16, got {task_vector_dtype!r}.")
        if ties_k is not None and not 0.0 < ties_k <= 1.0:
            raise ValueError(f"ties_k must be in (0, 1] (a fraction, 0.2 for the paper's 20%), got {ties_k}.")
        if ties_normalize and ties_k is None:
            raise ValueError("ties_normalize needs ties_k: set ties_k (e.g. 0.2) to use TIES.")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        self.save_hyperparameters()
        if isinstance(self.hparams.get("zoo"), ModelZoo):
            # Outside the CLI the zoo is a Python object; a checkpoint keeps only plain data, so
            # load_from_checkpoint then needs zoo=... again.
            del self.hparams["zoo"]
        self.zoo = zoo
        self.num_classes = dict(num_classes) if num_classes is not None else None
        self.merger: MergedEncoder | None = None
        self.heads = nn.ModuleDict()
        self._pending_coefficients: Tensor | None = None
        self._eval_tensors: dict[str, Tensor] | None = None

    @property
    def task_names(self) -> list[str]:
        if not self.num_classes:
            raise ValueError(
                "AdaMergingModule has no tasks: pass num_classes={task: classes} "
                "(the CLI links it from the data module's tasks)."
            )
        return list(self.num_classes)

    def eval_preprocess(self) -> Preprocess | None:
        """The encoder's eval preprocessing (from the zoo, no weights loaded); the data module reads images with it."""
        return self.zoo.preprocess()

    # ----------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.merger is not None:
            return
        tasks = self.task_names
        loaded = self.zoo.load(self.num_classes)
        try:
            width: int | None = feature_dim(loaded.encoder)
        except ValueError:  # an encoder from a custom zoo may not say; the first forward will tell
            width = None
        for task in tasks:
            if task not in loaded.heads or task not in loaded.finetuned:
                raise KeyError(f"the zoo returned no head or fine-tuned weights for task {task!r}.")
            head = loaded.heads[task]
            if head.num_classes != self.num_classes[task]:
                raise ValueError(
                    f"task {task!r}: its head has {head.num_classes} classes but its dataset has "
                    f"{self.num_classes[task]}; the head and the data must describe the same classes."
                )
            if width is not None and head.weight.shape[1] != width:
                raise ValueError(
                    f"task {task!r}: its head takes {head.weight.shape[1]} features but the encoder returns {width}."
                )
        encoder = loaded.encoder.eval()
        buffers = {name for name, _ in encoder.named_buffers()}
        # In the coefficients' task order, still loaded one at a time if the zoo loads lazily.
        finetuned = LazyStateDicts({task: functools.partial(loaded.finetuned.__getitem__, task) for task in tasks})
        task_vectors = stack_task_vectors(
            encoder.state_dict(),
            finetuned,
            buffers=buffers,
            buffer_policy=self.hparams.buffer_policy,
            dtype=getattr(torch, self.hparams.task_vector_dtype),
        )
        del finetuned, loaded.finetuned
        if self.hparams.ties_k is not None:
            task_vectors = ties_task_vectors(task_vectors, self.hparams.ties_k, normalize=self.hparams.ties_normalize)
        init = 1.0 / len(tasks) if self.hparams.init is None else self.hparams.init
        self.merger = MergedEncoder(encoder, task_vectors, self.hparams.granularity, init, self.hparams.clamp)
        self.heads = nn.ModuleDict({task: loaded.heads[task].requires_grad_(False).eval() for task in tasks})
        # Under DDP every process builds the same frozen weights from the zoo: only the coefficients
        # need syncing, so DDP neither broadcasts the (large) task vectors nor the encoder.
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in [*self.named_parameters(), *self.named_buffers()] if name != COEFFICIENTS_KEY
        ]
        if self._pending_coefficients is not None:
            self._set_coefficients(self._pending_coefficients)
            self._pending_coefficients = None

    def _built_merger(self) -> MergedEncoder:
        if self.merger is None:
            self.configure_model()
        assert self.merger is not None
        return self.merger

    def train(self, mode: bool = True) -> AdaMergingModule:
        """Only the coefficients learn: encoder and heads stay in eval mode (no dropout, fixed batch-norm)."""
        super().train(mode)
        if self.merger is not None:
            self.merger.eval()
            self.heads.eval()
        return self

    # ----------------------------------------------------------------- coefficients
    def coefficients(self) -> Tensor:
        """The coefficients in use, ``[tasks, merged tensors]`` (clamped if ``clamp``)."""
        return self._built_merger().coefficients().detach()

    def _set_coefficients(self, raw: Tensor) -> None:
        assert self.merger is not None
        target = self.merger.coefficients.raw
        if raw.shape != target.shape:
            raise ValueError(
                f"the checkpoint's coefficients have shape {tuple(raw.shape)} but this model needs "
                f"{tuple(target.shape)} ({len(self.task_names)} tasks, granularity "
                f"{self.hparams.granularity!r}); it was saved for other tasks, models or settings."
            )
        with torch.no_grad():
            target.copy_(raw)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {COEFFICIENTS_KEY: checkpoint["state_dict"][COEFFICIENTS_KEY]}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load the coefficients (the only learned state); other keys are ignored.

        Works before the model is built (``load_from_checkpoint``): the coefficients are applied in
        :meth:`configure_model`, where their shape is checked against the zoo.
        """
        if COEFFICIENTS_KEY not in state_dict:
            raise KeyError(
                f"the state dict has no {COEFFICIENTS_KEY!r}; it is not an AdaMergingModule checkpoint "
                f"(keys: {list(state_dict)[:5]})."
            )
        raw = state_dict[COEFFICIENTS_KEY].detach().clone()
        if self.merger is None:
            self._pending_coefficients = raw
        else:
            self._set_coefficients(raw)
        return nn.modules.module._IncompatibleKeys([], [])

    # ----------------------------------------------------------------- steps
    def forward(self, images: Tensor, task: str) -> Tensor:
        """Logits of ``task``'s head on ``images`` with the merged encoder."""
        features = self._built_merger()(images, self._eval_tensors)
        return self.heads[task](features)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        tasks = self.task_names
        missing = [task for task in tasks if task not in batch]
        if missing:
            raise KeyError(f"the training batch has no images for task(s) {missing}; got {list(batch)}.")
        sizes = [batch[task].shape[0] for task in tasks]
        features = self._built_merger()(torch.cat([batch[task] for task in tasks]))
        entropies = {
            task: entropy(self.heads[task](chunk)).mean() for task, chunk in zip(tasks, features.split(sizes))
        }
        loss = torch.stack(list(entropies.values())).sum()
        total = sum(sizes)
        self.log("train/loss", loss, prog_bar=True, batch_size=total)
        self.log_dict({f"train/entropy/{task}": value for task, value in entropies.items()}, batch_size=total)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self._built_merger().coefficients.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas)
        )

    def _merge_for_evaluation(self) -> None:
        with torch.no_grad():
            self._eval_tensors = {k: v.detach() for k, v in self._built_merger().merged_tensors().items()}

    def _end_evaluation(self) -> None:
        self._eval_tensors = None

    def _evaluation_step(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> dict[str, Any]:
        images, labels = batch
        task = self.task_names[dataloader_idx]
        return {"task": task, "logits": self(images, task), "labels": labels}

    def on_validation_start(self) -> None:
        self._merge_for_evaluation()

    def on_validation_end(self) -> None:
        self._end_evaluation()

    def on_test_start(self) -> None:
        self._merge_for_evaluation()

    def on_test_end(self) -> None:
        self._end_evaluation()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluation_step(batch, dataloader_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._evaluation_step(batch, dataloader_idx)

    def configure_callbacks(self) -> list[pl.Callback]:
        if any(isinstance(callback, PerTaskAccuracy) for callback in self.trainer.callbacks):
            return []
        return [PerTaskAccuracy()]
