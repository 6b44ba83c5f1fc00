"""Read model weights from the checkpoint formats found in the wild, and pick an encoder's weights out.

:func:`read_checkpoint` turns a file or folder into a flat ``{key: tensor}`` dict:

* ``.safetensors`` files;
* ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` files written by ``torch.save``: a plain state dict, or a
  container holding one under ``state_dict`` (Lightning), ``model_state_dict``, ``model``,
  ``module`` (DeepSpeed) or ``ema``;
* with ``allow_pickle=True`` only, files holding pickled Python objects, such as whole
  ``nn.Module`` objects (``torch.save(model)``, e.g. the task_vectors release, whose
  ``src.modeling.ImageEncoder`` objects load without that project's source tree);
* a Hugging Face CLIP folder (``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``,
  possibly sharded) of a ``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` or ``CLIPModel``:
  its image tower, renamed to open_clip's ``VisionTransformer`` keys.

:func:`select_encoder_weights` then finds the encoder's keys in such a dict under whatever prefix
they were saved (``module.``, ``model.visual.``, ...), ignores everything else (text tower, heads)
and checks names, shapes, dtypes and values against the encoder's own ``state_dict()``.

Example:
    >>> import torch
    >>> expected = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    >>> checkpoint = {"model.weight": torch.ones(2, 3, dtype=torch.float16), "model.bias": torch.ones(2),
    ...               "head.weight": torch.ones(5, 2)}
    >>> weights = select_encoder_weights(checkpoint, expected, source="example.pt")
    >>> list(weights), weights["weight"].dtype
    (['weight', 'bias'], torch.float32)
"""

from __future__ import annotations

import json
import pickle
import re
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CHECKPOINT_SUFFIXES", "CheckpointError", "read_checkpoint", "select_encoder_weights"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema")
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_SHOWN = 5  # how many keys an error message lists


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not hold the weights the encoder needs."""


# --------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Read weights from a file or folder into a flat ``{key: tensor}`` dict.

    Args:
        path: a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file, or a Hugging Face
            CLIP model folder.
        allow_pickle: also accept files holding pickled Python objects (whole modules, custom
            classes). Loading such a file can run arbitrary code: only for trusted files.

    Returns:
        The state dict as saved (keys keep their prefixes; see :func:`select_encoder_weights`). For
        a Hugging Face CLIP folder, the image tower under open_clip ``VisionTransformer`` names without
        prefix (the keys of ``open_clip.create_model(name).visual.state_dict()``); ``proj`` is absent
        when the folder holds a plain ``CLIPVisionModel`` (no projection). Hugging Face's
        ``hidden_act`` is not carried over: OpenAI CLIP weights use QuickGELU, so build the open_clip
        encoder with ``force_quick_gelu=True`` (or a ``-quickgelu`` model) for them.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        CheckpointError: the file type is unsupported, the file is unreadable, holds no tensors, or
            holds pickled objects while ``allow_pickle`` is false.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; check the path in the zoo configuration. The paper's "
            "fine-tuned CLIP encoders are published by the task_vectors project (zeroshot.pt and "
            "<Task>/finetuned.pt, linked from github.com/mlfoundations/task_vectors) and, as Hugging Face "
            "folders, by FusionBench (e.g. tanganke/clip-vit-base-patch32_<task>; download them with "
            "`huggingface-cli download <repo> --local-dir <folder>`)."
        )
    if path.is_dir():
        return _read_hf_clip_folder(path, allow_pickle=allow_pickle)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return _read_torch_file(path, allow_pickle=allow_pickle)
    raise CheckpointError(
        f"{path}: unsupported checkpoint file type {path.suffix!r}; give a file ending in one of "
        f"{', '.join(CHECKPOINT_SUFFIXES)}, or a Hugging Face CLIP model folder."
    )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({error}); the file may be truncated."
        ) from error
    if not state:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors; it is not a model checkpoint.")
    return state


def _read_torch_file(path: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if allow_pickle:
            loaded = _load_pickled(path)
        else:
            raise _refusal(path, error) from error
    except Exception as error:  # zip/EOF/key errors of corrupt or foreign files
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({error.__class__.__name__}: {error}); "
            "the file may be truncated or not written by torch.save."
        ) from error
    state = _extract_state_dict(loaded)
    if state is None:
        raise CheckpointError(
            f"{path}: found no tensors to use as weights in a {_describe(loaded)}; expected a state dict, "
            f"or a dict holding one under one of the keys {list(CONTAINER_KEYS)}."
        )
    return state


def _refusal(path: Path, error: Exception) -> CheckpointError:
    """The error for a file that ``torch.load(weights_only=True)`` refused."""
    message = str(error)
    lines = [line.strip() for line in message.split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
    reason = lines[0] if lines else error.__class__.__name__
    if not re.search(r"GLOBAL|reduce|new object|Can only build", message):
        return CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({reason}); the file may be truncated or not written by "
            "torch.save. If it holds pickled Python objects from a trusted source, set `allow_pickle: true` on "
            "the zoo (Python: `allow_pickle=True`)."
        )
    found = re.search(r"GLOBAL ([\w.]+)", message)
    reference = f" (it references {found.group(1)})" if found else ""
    return CheckpointError(
        f"{path}: the file holds pickled Python objects{reference}, not just tensors, and loading it can run "
        "arbitrary code. If the file comes from a trusted source, set `allow_pickle: true` on the zoo "
        "(Python: `allow_pickle=True`); otherwise convert it to a plain state dict (.safetensors) where it "
        "was made."
    )


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)
        more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
        return f"dict with top-level keys {keys[:10]}{more}"
    return f"{type(obj).__module__}.{type(obj).__qualname__} object"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _extract_state_dict(obj: Any, depth: int = 0) -> dict[str, Tensor] | None:
    """The state dict in a loaded object: a dict of tensors, a container of one, or a module."""
    if depth > 4:
        return None
    if _is_state_dict(obj):
        return {str(key): value for key, value in obj.items()}
    if isinstance(obj, nn.Module):
        try:
            state = obj.state_dict()
        except Exception:  # noqa: BLE001 - a stand-in that never got its state
            state = {}
        if state:
            return {key: value.detach() for key, value in state.items()}
        obj = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    elif not isinstance(obj, Mapping) and isinstance(getattr(obj, "__dict__", None), dict):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if key in obj:
                found = _extract_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


# ------------------------------------------------------------------------------ pickled Python objects
class _StandIn(nn.Module):
    """Takes the place of a pickled class whose module cannot be imported.

    It accepts any pickled state; when that state is an ``nn.Module``'s ``__dict__`` (with
    ``_parameters``, ``_buffers``, ``_modules``) the stand-in behaves as that module for
    ``state_dict()``. It cannot be run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.__dict__["_stand_in_args"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, slots) pairs
        if not isinstance(state, dict):
            state = {"_stand_in_state": state}
        if "_parameters" not in state:
            nn.Module.__init__(self)
        nn.Module.__setstate__(self, state)

    def __setitem__(self, key: Any, value: Any) -> None:  # pickled dict subclasses
        self.__dict__.setdefault("_stand_in_items", {})[key] = value

    def append(self, value: Any) -> None:  # pickled list subclasses
        self.__dict__.setdefault("_stand_in_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_stand_in_list", []).extend(values)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__module__}.{type(self).__qualname__} was loaded without its source code; "
            "only its weights can be used."
        )


_STAND_INS: dict[tuple[str, str], type] = {}


def _stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name.rpartition(".")[2], (_StandIn,), {"__module__": module, "__qualname__": name})
    return _STAND_INS[key]


class _LenientUnpickler(pickle.Unpickler):
    """An unpickler that replaces classes it cannot import by :class:`_StandIn` subclasses."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except Exception:  # noqa: BLE001 - missing module or name, or a module that fails to import
            return _stand_in(module, name)


def _lenient_load(file: Any, **kwargs: Any) -> Any:
    return _LenientUnpickler(file, **kwargs).load()


_LENIENT_PICKLE = types.SimpleNamespace(
    Unpickler=_LenientUnpickler,
    load=_lenient_load,
    loads=pickle.loads,
    Pickler=pickle.Pickler,
    dump=pickle.dump,
    dumps=pickle.dumps,
    __name__="lit_adamerging_lenient_pickle",
)


def _load_pickled(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LENIENT_PICKLE)
    except Exception as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, even with allow_pickle ({error.__class__.__name__}: "
            f"{error}); the file may be truncated or not written by torch.save."
        ) from error


# ---------------------------------------------------------------------------- Hugging Face CLIP folders
_HF_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}


def _read_hf_clip_folder(folder: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder}: a folder, but not a Hugging Face model folder (no config.json); give a weights file "
            f"({', '.join(CHECKPOINT_SUFFIXES)}) or a folder saved by transformers' save_pretrained."
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_file}: not a readable JSON config ({error}).") from error
    state: dict[str, Tensor] | None = None
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            state = _read_hf_weights(folder / name, allow_pickle=allow_pickle)
            break
    if state is None:
        raise CheckpointError(
            f"{folder}: Hugging Face model folder without weights; expected one of {list(HF_WEIGHT_FILES)}."
        )
    return _convert_hf_clip_vision(state, source=str(folder), model_type=str(config.get("model_type")))


def _read_hf_weights(file: Path, *, allow_pickle: bool) -> dict[str, Tensor]:
    if not file.name.endswith(".index.json"):
        return read_checkpoint(file, allow_pickle=allow_pickle)
    try:
        weight_map = json.loads(file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{file}: not a readable shard index (needs a 'weight_map'): {error}.") from error
    state: dict[str, Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        state.update(read_checkpoint(file.parent / shard, allow_pickle=allow_pickle))
    return state


def _hf_vision_prefix(state: Mapping[str, Tensor]) -> str | None:
    """The prefix of a Hugging Face CLIP vision tower's keys (``"vision_model."`` or ``""``), if any."""
    marker = "embeddings.patch_embedding.weight"
    prefixes = [key[: -len(marker)] for key in state if key.endswith(marker)]
    prefixes = sorted((p for p in prefixes if p + "pre_layrnorm.weight" in state), key=len)
    return prefixes[0] if prefixes else None


def _convert_hf_clip_vision(state: Mapping[str, Tensor], *, source: str, model_type: str) -> dict[str, Tensor]:
    """Rename a Hugging Face CLIP image tower to open_clip ``VisionTransformer`` keys."""
    prefix = _hf_vision_prefix(state)
    if prefix is None:
        raise CheckpointError(
            f"{source}: not a Hugging Face CLIP model (model_type {model_type!r}): no "
            "'vision_model.embeddings.patch_embedding.weight' / 'vision_model.pre_layrnorm.weight'; only "
            "CLIPVisionModel, CLIPVisionModelWithProjection and CLIPModel folders are supported."
        )

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(
                f"{source}: Hugging Face CLIP weights lack {key!r}; the folder is incomplete or not a CLIP model."
            )
        return state[key]

    embeddings = f"{prefix}embeddings."
    out: dict[str, Tensor] = {
        "class_embedding": take(f"{embeddings}class_embedding"),
        "positional_embedding": take(f"{embeddings}position_embedding.weight"),
        "proj": torch.empty(0),  # placeholder keeping open_clip's key order; set or removed below
        "conv1.weight": take(f"{embeddings}patch_embedding.weight"),
        "ln_pre.weight": take(f"{prefix}pre_layrnorm.weight"),
        "ln_pre.bias": take(f"{prefix}pre_layrnorm.bias"),
    }
    pattern = re.compile(re.escape(f"{prefix}encoder.layers.") + r"(\d+)\.")
    layers = sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: Hugging Face CLIP encoder layers {layers} are not numbered 0..n-1.")
    for i in layers:
        hf = f"{prefix}encoder.layers.{i}."
        ours = f"transformer.resblocks.{i}."
        attention = f"{hf}self_attn."
        out[ours + "ln_1.weight"] = take(hf + _HF_LAYER["ln_1.weight"])
        out[ours + "ln_1.bias"] = take(hf + _HF_LAYER["ln_1.bias"])
        out[ours + "attn.in_proj_weight"] = torch.cat([take(f"{attention}{p}_proj.weight") for p in "qkv"], dim=0)
        out[ours + "attn.in_proj_bias"] = torch.cat([take(f"{attention}{p}_proj.bias") for p in "qkv"], dim=0)
        for name in list(_HF_LAYER)[2:]:
            out[ours + name] = take(hf + _HF_LAYER[name])
    out["ln_post.weight"] = take(f"{prefix}post_layernorm.weight")
    out["ln_post.bias"] = take(f"{prefix}post_layernorm.bias")
    projection = state.get("visual_projection.weight")
    if projection is None:
        del out["proj"]
    else:
        out["proj"] = projection.t().contiguous()
    return out


# ------------------------------------------------------------------------------------------ selecting
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


def _few(keys: list[str]) -> str:
    more = f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more}"


def select_encoder_weights(
    state: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    *,
    source: str,
    missing_ok: Collection[str] = (),
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

    Returns:
        Exactly the keys of ``expected``, in its order. Floating-point tensors are cast to the
        expected dtype (e.g. from float16), integer tensors to the expected integer dtype.

    Raises:
        CheckpointError: no or not all expected keys are found, the checkpoint has more layers than
            the encoder, a shape differs, floating point meets integer, or a value is NaN or infinite.
    """
    expected_keys = list(expected)
    wanted = set(expected_keys)
    counts = {
        prefix: sum(prefix + key in state for key in expected_keys) for prefix in _candidate_prefixes(state, wanted)
    }
    prefix = min(counts, key=lambda p: (-counts[p], len(p), p))
    hint = ""
    if _hf_vision_prefix(state) is not None:
        hint = (
            " The checkpoint looks like Hugging Face CLIP weights: give the model folder (with config.json) "
            "instead of the weights file, so that they are renamed to open_clip's."
        )
    if counts[prefix] == 0:
        raise CheckpointError(
            f"{source}: none of the encoder's {len(expected_keys)} keys (e.g. {expected_keys[:3]}) is in the "
            f"checkpoint, under any prefix; its keys are {_few(list(state))}. The checkpoint was probably saved "
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
            f"checkpoint{where}: {_few(missing)}. The checkpoint's architecture probably differs from the "
            f"encoder's; check the encoder name in the zoo.{hint}"
        )
    under_prefix = [key[len(prefix) :] for key in state if key.startswith(prefix) and key[len(prefix) :] not in wanted]
    extra = _extra_layers(under_prefix, wanted)
    if extra:
        raise CheckpointError(
            f"{source}: the checkpoint has layers the encoder lacks{where}: {_few([prefix + k for k in extra])}. "
            "It was probably saved from a deeper architecture; check the encoder name in the zoo."
        )
    selected: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key in expected_keys:
        reference = expected[key]
        if prefix + key not in state:
            selected[key] = reference.detach().clone()
            continue
        name = prefix + key
        value = state[name]
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{source}: {name!r} is a {type(value).__name__}, not a tensor.")
        if value.shape != reference.shape:
            mismatched.append(f"{name!r}: checkpoint {list(value.shape)} vs encoder {list(reference.shape)}")
            continue
        selected[key] = _convert(value, reference, name=name, source=source)
    if mismatched:
        more = f" (and {len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else ""
        raise CheckpointError(
            f"{source}: shape mismatch for {'; '.join(mismatched[:_SHOWN])}{more}. The checkpoint's "
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
