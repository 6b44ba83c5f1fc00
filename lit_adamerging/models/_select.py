"""Pick an encoder's weights out of a checkpoint, under whatever prefix they were saved, and check them."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from lit_adamerging.io import SAFETENSORS_DTYPES
from lit_adamerging.models._errors import SHOWN, CheckpointError, few
from lit_adamerging.models._hf_clip import hf_vision_prefix

__all__ = ["select_encoder_weights"]


_DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class LazyTensor:
    """A tensor of an open ``.safetensors`` file, read when indexed: ``tensor[start:stop]`` reads those rows only,
    ``tensor[...]`` all of it; ``shape`` and ``dtype`` come from the file's header (``dtype`` ``None``: one this
    reader does not know). :func:`~lit_adamerging.models.checkpoints.read_checkpoint_rows` makes them."""

    def __init__(self, entry: Any) -> None:
        self._entry = entry
        self.shape = torch.Size(entry.get_shape())
        self.dtype = _DTYPES_BY_NAME.get(entry.get_dtype())

    def __getitem__(self, index: Any) -> Tensor:
        return self._entry[index]



def _candidate_prefixes(state: Mapping[str, Tensor], expected: Collection[str]) -> set[str]:
    """``""`` and every ``P`` (empty or ending in ``.``) with ``P + k`` a checkpoint key for an expected ``k``."""
    prefixes = {""}
    for key in state:
        for position, char in enumerate(key):
            if char == "." and key[position + 1 :] in expected:
                prefixes.add(key[: position + 1])
    return prefixes


def _extra_layers(under_prefix: Collection[str], expected: Collection[str]) -> list[str]:
    """Keys that add numbered children (layers, blocks) to a sequence the encoder has fewer of."""
    children: dict[str, set[str]] = {}
    for key in expected:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                children.setdefault(".".join(parts[:i]), set()).add(part)
    extra = []
    for key in under_prefix:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            parent = ".".join(parts[:i])
            if part.isdigit() and parent in children and part not in children[parent]:
                extra.append(key)
                break
    return extra


def select_encoder_weights(
    state: Mapping[str, Any],
    expected: Mapping[str, Tensor],
    *,
    source: str,
    missing_ok: Collection[str] = (),
    rows: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Tensor]:
    """Pick the encoder's entries out of a checkpoint and check them against ``expected``.

    The expected keys are looked for under the prefix (empty or ending in ``.``, e.g. ``module.``,
    ``model.visual.``, ``image_encoder.model.visual.``) under which most of them are found;
    entries outside it (text tower, ``logit_scale``, classifier heads) are ignored.

    Args:
        state: a checkpoint as returned by :func:`read_checkpoint`.
        expected: the encoder's own ``state_dict()``: the keys, shapes and dtypes wanted.
        source: where ``state`` came from (a file name), for error messages.
        missing_ok: keys that may be absent; they are taken from ``expected`` (e.g. ``{"proj"}``
            for a Hugging Face ``CLIPVisionModel`` folder). ``*num_batches_tracked`` always may.
        rows: ``{key: (start, stop)}``: return only those rows of these keys (checked against the whole
            tensor's shape first); ``state``'s entries may be tensors read when indexed
            (:class:`~lit_adamerging.models.checkpoints.LazyTensor`), so only those rows are read.

    Returns:
        Exactly the keys of ``expected``, in its order. Floating-point tensors are cast to the
        expected dtype (e.g. from float16), integer tensors to the expected integer dtype.

    Raises:
        CheckpointError: no or not all expected keys are found, the checkpoint has more layers than
            the encoder, a shape differs, floating point meets integer, or a value is NaN or infinite.

    Example:
        >>> import torch
        >>> expected = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
        >>> checkpoint = {"model.weight": torch.ones(2, 3, dtype=torch.float16), "model.bias": torch.ones(2),
        ...               "head.weight": torch.ones(5, 2)}
        >>> weights = select_encoder_weights(checkpoint, expected, source="example.pt")
        >>> list(weights), weights["weight"].dtype
        (['weight', 'bias'], torch.float32)
    """
    expected_keys = list(expected)
    wanted = set(expected_keys)
    counts = {
        prefix: sum(prefix + key in state for key in expected_keys) for prefix in _candidate_prefixes(state, wanted)
    }
    prefix = min(counts, key=lambda p: (-counts[p], len(p), p))
    hint = ""
    if hf_vision_prefix(state) is not None:
        hint = (
            " The checkpoint looks like Hugging Face CLIP weights: give the model folder (with config.json) "
            "instead of the weights file, so that they are renamed to open_clip's."
        )
    if counts[prefix] == 0:
        raise CheckpointError(
            f"{source}: none of the encoder's {len(expected_keys)} keys (e.g. {expected_keys[:3]}) is in the "
            f"checkpoint, under any prefix; its keys are {few(list(state))}. The checkpoint was probably saved "
            f"from a different model or library than the encoder; check the encoder name in the zoo.{hint}"
        )
    allowed_missing = set(missing_ok)
    missing = [
        key
        for key in expected_keys
        if prefix + key not in state and key not in allowed_missing and not key.endswith("num_batches_tracked")
    ]
    where = f" (under the prefix {prefix!r})" if prefix else ""
    if missing:
        raise CheckpointError(
            f"{source}: {len(missing)} of the encoder's {len(expected_keys)} keys are missing from the "
            f"checkpoint{where}: {few(missing)}. The checkpoint's architecture probably differs from the "
            f"encoder's; check the encoder name in the zoo.{hint}"
        )
    under_prefix = [key[len(prefix) :] for key in state if key.startswith(prefix) and key[len(prefix) :] not in wanted]
    extra = _extra_layers(under_prefix, wanted)
    if extra:
        raise CheckpointError(
            f"{source}: the checkpoint has layers the encoder lacks{where}: {few([prefix + k for k in extra])}. "
            "It was probably saved from a deeper architecture; check the encoder name in the zoo."
        )
    selected: dict[str, Tensor] = {}
    mismatched: list[str] = []
    rows = rows or {}
    for key in expected_keys:
        reference = expected[key]
        if prefix + key not in state:
            kept = reference.detach()
            selected[key] = (kept[slice(*rows[key])] if key in rows else kept).clone()
            continue
        name = prefix + key
        value = state[name]
        if not isinstance(value, (Tensor, LazyTensor)):
            raise CheckpointError(f"{source}: {name!r} is a {type(value).__name__}, not a tensor.")
        if value.shape != reference.shape:
            mismatched.append(f"{name!r}: checkpoint {list(value.shape)} vs encoder {list(reference.shape)}")
            continue
        if mismatched:  # nothing more is read once the checkpoint is known not to fit
            continue
        value = value[slice(*rows[key])] if key in rows else value[...]
        selected[key] = _convert(value, reference, name=name, source=source)
    if mismatched:
        more = f" (and {len(mismatched) - SHOWN} more)" if len(mismatched) > SHOWN else ""
        raise CheckpointError(
            f"{source}: shape mismatch for {'; '.join(mismatched[:SHOWN])}{more}. The checkpoint's "
            "architecture differs from the encoder's; check the encoder name in the zoo."
        )
    return selected


def _convert(value: Tensor, reference: Tensor, *, name: str, source: str) -> Tensor:
    value = value.detach()
    if value.dtype != reference.dtype:
        if value.is_floating_point() != reference.is_floating_point() or value.is_complex() != reference.is_complex():
            raise CheckpointError(
                f"{source}: {name!r} has dtype {value.dtype} but the encoder's is {reference.dtype}; floating "
                "point and integer weights cannot be exchanged, so the checkpoint does not fit this encoder."
            )
        before = value.dtype
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(_non_finite(source, name))
        value = value.to(reference.dtype)
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{source}: {name!r} overflows to infinity when cast from {before} to the encoder's {reference.dtype}."
            )
    elif (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise CheckpointError(_non_finite(source, name))
    return value


def _non_finite(source: str, name: str) -> str:
    return f"{source}: {name!r} has NaN or infinite values; the checkpoint is corrupt or diverged."
