"""CLIP zero-shot classification heads, built from class names and prompt templates and cached on disk.

Per class: encode every prompt with the text tower, L2-normalise each embedding, average them,
renormalise; stack the classes and scale by the model's logit scale. The head L2-normalises the
image features, so ``logits = logit_scale * normalize(f) @ normalize(class embeddings).T``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lit_adamerging.io import save_state_dict
from lit_adamerging.models.heads import ClassificationHead, head_source
from lit_adamerging.models.prompts import format_prompts


@torch.no_grad()
def build_zero_shot_head(
    clip_model: nn.Module,
    tokenizer: object,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> ClassificationHead:
    """A :class:`ClassificationHead` whose rows are the classes' averaged prompt embeddings.

    ``clip_model`` is an open_clip CLIP (it needs ``encode_text`` and ``logit_scale``);
    ``tokenizer`` is ``open_clip.get_tokenizer(model_name)``.
    """
    if not class_names:
        raise ValueError("a zero-shot head needs at least one class name.")
    prompts = [format_prompts(name, templates) for name in class_names]
    flat = [prompt for per_class in prompts for prompt in per_class]
    device = clip_model.logit_scale.device
    embeddings = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start : start + batch_size]).to(device)  # type: ignore[operator]
        embeddings.append(F.normalize(clip_model.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(embeddings).view(len(class_names), len(templates), -1)
    class_embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)
    scale = clip_model.logit_scale.exp().float()
    return ClassificationHead(scale * class_embeddings, bias=None, normalize=True)


def text_tower_digest(clip_model: nn.Module) -> str:
    """A hash of every weight outside the image tower: what a zero-shot head depends on."""
    digest = hashlib.sha256()
    for name, tensor in clip_model.state_dict().items():
        if name.startswith("visual."):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_zero_shot_head(
    clip_model: nn.Module,
    tokenizer: object,
    class_names: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None,
    *,
    model_name: str,
    task: str,
    text_digest: str,
) -> ClassificationHead:
    """:func:`build_zero_shot_head`, reusing ``cache_dir/<task>-<key>.safetensors`` when present.

    The key hashes the model name, the text-tower weights (``text_digest``), the class names and
    the templates, so any change to them builds a new head.
    """
    if cache_dir is None:
        return build_zero_shot_head(clip_model, tokenizer, class_names, templates)
    key = hashlib.sha256(
        json.dumps([model_name, text_digest, list(class_names), list(templates)]).encode()
    ).hexdigest()[:20]
    safe_task = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
    path = Path(cache_dir).expanduser() / f"{safe_task}-{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        weight = load_file(str(path))["weight"]
        if weight.shape[0] == len(class_names):
            return ClassificationHead(weight, bias=None, normalize=True, source=head_source(path, task))
    head = build_zero_shot_head(clip_model, tokenizer, class_names, templates)
    save_state_dict({"weight": head.weight}, path)
    return head
