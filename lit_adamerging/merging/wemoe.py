"""WEMoE: weight-ensembling mixtures of experts (Tang et al., "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts", ICML 2024).

The encoder's MLPs are not merged once: each becomes a mixture whose weights depend on its input.
For an MLP with pretrained weights ``theta_0`` and task vectors ``tau_k``, a small router on the
MLP's input gives per-task weights ``r(x)`` for each sample, and that sample runs through
``theta_0 + sum_k r_k(x) tau_k``. Every other tensor of the encoder is merged statically (task
arithmetic). The routers are what test-time adaptation learns.

Here a mixture is attached to an encoder without changing its modules or their names
(:class:`WeightEnsemblingMixture`): a hook on each MLP computes the routing weights from its input,
and each of the MLP's linear or pointwise-convolution layers adds the per-sample term
``(sum_k r_k tau_k) x`` to the output its pretrained weights give (:func:`per_sample_delta`: batched
over samples and tasks, the per-sample weights built a few samples at a time and never stored for
the backward). An encoder's state dict is unchanged by the mixture, so its other tensors can be
swapped for a merge as any merged encoder's are.

Which modules are MLPs (:func:`find_mlp_modules`): a transformer block's MLP (open_clip's ``c_fc`` +
``c_proj``, timm's ``fc1`` + ``fc2``) and, in timm's EfficientNet/MobileNet family, each inverted
residual block, whose pointwise expansion and projection (``conv_pw``, ``conv_pwl``) are a
per-position two-layer MLP over the channels, the depthwise convolution between them mixing
positions as attention does in a transformer. Their routers see the block's input.

:func:`save_wemoe` writes what rebuilds the model (the encoder with its static merge, the MLPs' task
vectors, the routers); :func:`load_wemoe` reads it back onto an encoder of the same architecture.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_adamerging.merging._export_file import json_field, read_export

WEMOE_FORMAT = "lit_adamerging.wemoe"
WEMOE_FORMAT_VERSION = "1"
_ENCODER = "encoder."
_TASK_VECTORS = "task_vectors."
_ROUTERS = "routers."

# Per-sample weights are built for this many entries at a time (64 MiB of float32) in the forward and backward.
_CHUNK_ENTRIES = 1 << 24


class WEMoEFileError(ValueError):
    """A file is not a readable WEMoE export."""


# ----------------------------------------------------------------------------- which modules
def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def find_mlp_modules(encoder: nn.Module) -> list[str]:
    """The names of ``encoder``'s modules that WEMoE turns into mixtures, in module order.

    A module qualifies when its children include ``c_fc`` and ``c_proj`` (open_clip's MLP) or ``fc1``
    and ``fc2`` (timm's ``Mlp``), both linear, or ``conv_pw`` and ``conv_pwl`` (timm's inverted
    residual block), both pointwise convolutions.

    Example:
        >>> import open_clip  # doctest: +SKIP
        >>> find_mlp_modules(open_clip.create_model("ViT-B-32").visual)[:2]  # doctest: +SKIP
        ['transformer.resblocks.0.mlp', 'transformer.resblocks.1.mlp']
    """
    pairs = (("c_fc", "c_proj"), ("fc1", "fc2"), ("conv_pw", "conv_pwl"))
    found = []
    for name, module in encoder.named_modules():
        children = _children(module)
        if any(
            first in children and second in children and all(_mixable(children[key]) for key in (first, second))
            for first, second in pairs
        ):
            found.append(name)
    return found


def _mixable(module: nn.Module) -> bool:
    """A linear layer, or a pointwise convolution (1x1 kernel, stride 1, no padding, one group)."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
        and module.groups == 1 and module.padding in ((0, 0), "valid")
    )


def mixed_layers(encoder: nn.Module, mlp: str) -> list[str]:
    """The layers inside ``encoder``'s module ``mlp`` whose weights are mixed per sample: its linear layers and
    pointwise convolutions, by their names in ``encoder``; an error naming the module when there are none."""
    try:
        module = encoder.get_submodule(mlp)
    except AttributeError:
        raise ValueError(
            f"the encoder {type(encoder).__name__} has no module {mlp!r}; WEMoE's mlp_modules must name modules of "
            f"the encoder (found by default: {find_mlp_modules(encoder)[:4]})."
        ) from None
    layers = [f"{mlp}.{name}" if mlp else name for name, child in module.named_modules() if name and _mixable(child)]
    if not layers:
        raise ValueError(
            f"module {mlp!r} ({type(module).__name__}) of the encoder has no linear layer nor pointwise convolution, "
            "so WEMoE has no weights to mix in it; name the encoder's MLP modules (e.g. 'transformer.resblocks.0.mlp')."
        )
    return layers


def _sequence_first(encoder: nn.Module, mlp: str) -> bool:
    """Whether the 3-d hidden states reaching ``mlp`` are ``[tokens, batch, width]``: the nearest enclosing module
    with a ``batch_first`` attribute (open_clip's ``Transformer``) says; otherwise batch first."""
    parts = mlp.split(".") if mlp else []
    for depth in range(len(parts), -1, -1):
        module = encoder.get_submodule(".".join(parts[:depth]))
        if isinstance(getattr(module, "batch_first", None), bool):
            return not module.batch_first
    return False


def _as_tokens(x: Tensor, sequence_first: bool) -> Tensor:
    """``x`` as ``[batch, positions, features]``: features last for linear inputs, channels of an image-like
    ``[batch, channels, height, width]``."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x.transpose(0, 1) if sequence_first else x
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"WEMoE mixes 2-d, 3-d or 4-d inputs, got a {x.dim()}-d input of shape {tuple(x.shape)}.")


# ----------------------------------------------------------------------------- routers
def check_router(depth: int, init: float) -> None:
    """Refuse a router depth that is not a whole number >= 0 and an initial weight that is not a finite number."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"router_depth must be a whole number >= 0 (WEMoE's 2), got {depth!r}.")
    if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
        raise ValueError(f"init must be a finite number (the routers' initial weight, WEMoE's 0.3), got {init!r}.")


class Router(nn.Module):
    """Per-task weights for each sample from the hidden states of an MLP's input (WEMoE's router).

    ``depth`` linear layers, ReLU between them, hidden width ``width`` (FusionBench's
    ``router_hidden_layers``: 2 is ``Linear(width, width) -> ReLU -> Linear(width, tasks)``); every
    weight drawn from N(0, 0.01^2) (from ``generator`` if given), the hidden biases 0 and the last bias ``init``, so
    the routing
    weights start near ``init`` for every task (task arithmetic at ``init``). Applied to every
    position, then averaged over the positions: ``[batch, positions, width] -> [batch, tasks]``.
    ``depth`` 0 is a learnable vector that ignores the input.
    """

    def __init__(
        self, width: int, num_tasks: int, depth: int = 2, init: float = 0.3, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_router(depth, init)
        self.depth = depth
        if depth == 0:
            self.constant = nn.Parameter(torch.full((num_tasks,), float(init)))
            self.layers = nn.Sequential()
            return
        sizes = [width] * depth + [num_tasks]
        layers: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
            linear = nn.Linear(fan_in, fan_out)
            nn.init.normal_(linear.weight, std=0.01, generator=generator)
            nn.init.constant_(linear.bias, float(init) if index == depth - 1 else 0.0)
            layers += [linear, nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])

    def forward(self, hidden: Tensor) -> Tensor:
        if self.depth == 0:
            return self.constant.expand(hidden.shape[0], -1)
        return self.layers(hidden).mean(dim=1)


# ----------------------------------------------------------------------------- the per-sample term
class _PerSampleDelta(torch.autograd.Function):
    """``out[b] = x[b] @ (sum_k r[b, k] tau[k])^T``; the per-sample weights are rebuilt in chunks in the backward,
    never saved. Differentiable in ``x`` and ``r``; ``tau`` is a constant."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, routing: Tensor, tau: Tensor) -> Tensor:
        ctx.save_for_backward(x, routing, tau)
        flat = tau.flatten(1).to(x.dtype)
        out = x.new_empty(*x.shape[:2], tau.shape[1])
        for start, stop in _chunks(x.shape[0], flat.shape[1]):
            weights = (routing[start:stop].to(x.dtype) @ flat).view(stop - start, *tau.shape[1:])
            out[start:stop] = torch.bmm(x[start:stop], weights.transpose(1, 2))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, routing, tau = ctx.saved_tensors
        flat = tau.flatten(1).to(grad.dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_routing = None
        if ctx.needs_input_grad[1]:
            grad_routing = torch.empty(routing.shape, dtype=grad.dtype, device=grad.device)
        for start, stop in _chunks(x.shape[0], flat.shape[1]):
            g = grad[start:stop]
            if grad_x is not None:
                weights = (routing[start:stop].to(grad.dtype) @ flat).view(stop - start, *tau.shape[1:])
                grad_x[start:stop] = torch.bmm(g, weights)
            if grad_routing is not None:  # <tau_k, g_b^T x_b>: the weight gradient of each sample against each tau
                outer = torch.bmm(g.transpose(1, 2), x[start:stop].to(grad.dtype))
                grad_routing[start:stop] = outer.flatten(1) @ flat.t()
        return grad_x, None if grad_routing is None else grad_routing.to(routing.dtype), None


def _chunks(samples: int, entries: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_ENTRIES // max(entries, 1))
    return [(start, min(start + step, samples)) for start in range(0, samples, step)]


def per_sample_delta(x: Tensor, routing: Tensor, weight_tau: Tensor, bias_tau: Tensor | None = None) -> Tensor:
    """What per-sample weights add to a linear layer's output: ``x[b] @ (sum_k r[b, k] W_k)^T + sum_k r[b, k] b_k``.

    Args:
        x: ``[batch, positions, in]`` inputs.
        routing: ``[batch, tasks]`` weights of each sample.
        weight_tau: ``[tasks, out, in]`` task vectors of the weight.
        bias_tau: ``[tasks, out]`` task vectors of the bias, if any.

    Returns ``[batch, positions, out]``, differentiable in ``x`` and ``routing``. Batched over samples
    and tasks (no Python loop over either); the per-sample weights are built for a few samples at a
    time and rebuilt in the backward rather than kept, so memory does not grow with the batch.

    Example:
        >>> x, r, tau = torch.randn(2, 3, 4), torch.rand(2, 5), torch.randn(5, 6, 4)
        >>> expected = torch.stack([x[b] @ torch.einsum("k,koi->oi", r[b], tau).T for b in range(2)])
        >>> torch.allclose(per_sample_delta(x, r, tau), expected, atol=1e-5)
        True
    """
    out = _PerSampleDelta.apply(x, routing, weight_tau)
    if bias_tau is not None:
        out = out + (routing.to(out.dtype) @ bias_tau.to(out.dtype)).unsqueeze(1)
    return out


# ----------------------------------------------------------------------------- the mixture
def _key(name: str) -> str:
    """A module name as a ModuleDict key (dots are not allowed there)."""
    return name.replace(".", "__")


class WeightEnsemblingMixture(nn.Module):
    """Routers and the MLPs' task vectors, attached to an encoder by hooks: its MLPs become weight-ensembling
    mixtures.

    The encoder's own tensors are what the mixture adds to: its MLP layers must hold the pretrained
    weights ``theta_0`` (their task vectors are here), its other tensors whatever static merge is
    wanted. A hook on each MLP routes its input (:class:`Router`); each mixed layer then adds
    :func:`per_sample_delta` to its output. The routers are the only parameters.

    Args:
        encoder: the encoder to attach to (hooks are registered on its modules; :meth:`detach` removes them).
        task_vectors: ``{name: [tasks, *shape]}`` for every weight (and bias, if merged) of the mixed layers;
            the other keys are ignored.
        mlp_modules: the modules made mixtures (default :func:`find_mlp_modules`).
        router_depth, init: the routers' (see :class:`Router`).
        seed: the routers' initial weights are drawn from a generator with this seed, one router after the other (the
            same routers in every process and every run, whatever the global random state).

    Example:
        >>> mlp = nn.Sequential()
        >>> mlp.add_module("fc1", nn.Linear(4, 8)); mlp.add_module("fc2", nn.Linear(8, 4))
        >>> encoder = nn.Sequential(); encoder.add_module("mlp", mlp)
        >>> tvs = {n: torch.zeros(3, *p.shape) for n, p in encoder.named_parameters()}
        >>> mixture = WeightEnsemblingMixture(encoder, tvs)
        >>> mixture.mlp_modules, encoder(torch.randn(2, 5, 4)).shape
        (['mlp'], torch.Size([2, 5, 4]))
    """

    def __init__(
        self,
        encoder: nn.Module,
        task_vectors: Mapping[str, Tensor],
        mlp_modules: Sequence[str] | None = None,
        router_depth: int = 2,
        init: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mlp_modules is None:
            mlp_modules = find_mlp_modules(encoder)
            if not mlp_modules:
                raise ValueError(
                    f"the encoder {type(encoder).__name__} has no module WEMoE recognises as an MLP (children c_fc and "
                    "c_proj or fc1 and fc2, both linear; or conv_pw and conv_pwl, both pointwise convolutions); name "
                    "the modules to make mixtures with mlp_modules=[...] (model.mlp_modules in a config)."
                )
        mlp_modules = list(mlp_modules)
        if len(set(mlp_modules)) != len(mlp_modules):
            raise ValueError(f"mlp_modules names a module twice: {mlp_modules}.")
        check_router(router_depth, init)
        self.mlp_modules = mlp_modules
        self.layers: dict[str, list[str]] = {mlp: mixed_layers(encoder, mlp) for mlp in mlp_modules}
        nested = [(a, b) for a in mlp_modules for b in mlp_modules if a != b and b.startswith(a + ".")]
        if nested:
            raise ValueError(f"mlp_modules {nested[0][1]!r} lies inside {nested[0][0]!r}; name each MLP once.")
        num_tasks = None
        self.tensor_names: list[str] = []
        self.task_vectors = nn.Module()
        for layer in (name for names in self.layers.values() for name in names):
            module = encoder.get_submodule(layer)
            if f"{layer}.weight" not in task_vectors:
                raise ValueError(
                    f"there is no task vector for {layer}.weight (a mixed layer of WEMoE); its fine-tuned weights "
                    "must be given."
                )
            for kind in ("weight", "bias"):
                name = f"{layer}.{kind}"
                if name not in task_vectors:
                    continue
                stacked = task_vectors[name]
                expected = getattr(module, kind).shape
                if stacked.shape[1:] != expected:
                    raise ValueError(f"task vectors of {name!r} have shape {tuple(stacked.shape)}, expected "
                                     f"[tasks, {', '.join(map(str, expected))}].")
                if num_tasks is not None and stacked.shape[0] != num_tasks:
                    raise ValueError(f"task vectors of {name!r} hold {stacked.shape[0]} tasks, others {num_tasks}.")
                num_tasks = stacked.shape[0]
                self.task_vectors.register_buffer(_key(name), stacked, persistent=False)
                self.tensor_names.append(name)
        assert num_tasks is not None
        self.num_tasks = num_tasks
        generator = torch.Generator().manual_seed(seed)
        self.routers = nn.ModuleDict({
            _key(mlp): Router(_input_width(encoder, self.layers[mlp][0]), num_tasks, router_depth, init, generator)
            for mlp in mlp_modules
        })
        self._sequence_first = {mlp: _sequence_first(encoder, mlp) for mlp in mlp_modules}
        self._routing: dict[str, Tensor] = {}
        self._recording: dict[str, Tensor] | None = None
        self._handles: list[Any] = []
        self._attach(encoder)

    def stacked(self, name: str) -> Tensor | None:
        """The task vectors ``[tasks, *shape]`` of the mixed tensor ``name``, ``None`` if it has none."""
        return self.task_vectors._buffers.get(_key(name))

    def _attach(self, encoder: nn.Module) -> None:
        for mlp, layers in self.layers.items():
            module = encoder.get_submodule(mlp)
            self._handles.append(module.register_forward_pre_hook(self._route_hook(mlp)))
            self._handles.append(module.register_forward_hook(self._forget_hook(mlp)))
            for layer in layers:
                self._handles.append(encoder.get_submodule(layer).register_forward_hook(self._mix_hook(mlp, layer)))

    def detach(self) -> None:
        """Remove the hooks: the encoder runs its own weights again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def route(self, mlp: str, x: Tensor) -> Tensor:
        """The routing weights ``[batch, tasks]`` of the MLP ``mlp`` for its input ``x``.

        A transformer's MLP reads LayerNorm's output; a convolutional block reads the raw residual stream, whose
        scale grows with depth, so for an image-like ``x`` the router reads each position's channels normalised the
        same way (no learned scale).
        """
        hidden = _as_tokens(x, self._sequence_first[mlp])
        if x.dim() == 4:
            hidden = F.layer_norm(hidden, hidden.shape[-1:])
        return self.routers[_key(mlp)](hidden)

    def _route_hook(self, mlp: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._routing[mlp] = self.route(mlp, args[0])
            if self._recording is not None:
                self._recording[mlp] = self._routing[mlp].detach()
        return hook

    def _forget_hook(self, mlp: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._routing.pop(mlp, None)
        return hook

    def _mix_hook(self, mlp: str, layer: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            routing = self._routing[mlp]
            x = args[0]
            weight = self.stacked(f"{layer}.weight")
            bias = self.stacked(f"{layer}.bias")
            if isinstance(module, nn.Conv2d):  # pointwise: a linear layer over the channels at every position
                tokens = x.flatten(2).transpose(1, 2)
                delta = per_sample_delta(tokens, routing, weight.reshape(weight.shape[:3]), bias)
                return output + delta.transpose(1, 2).reshape(output.shape).to(output.dtype)
            sequence_first = self._sequence_first[mlp] and x.dim() == 3
            delta = per_sample_delta(_as_tokens(x, sequence_first), routing, weight, bias)
            if x.dim() == 2:
                delta = delta.squeeze(1)
            elif sequence_first:
                delta = delta.transpose(0, 1)
            return output + delta.to(output.dtype)
        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, Tensor]]:
        """Inside the block, the forwards' routing weights ``[batch, tasks]`` are kept (detached) in the dict it gives,
        by MLP module name (the last forward's)."""
        self._recording = {}
        try:
            yield self._recording
        finally:
            self._recording = None


def _input_width(encoder: nn.Module, layer: str) -> int:
    module = encoder.get_submodule(layer)
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


class WEMoEEncoder(nn.Module):
    """An encoder with a :class:`WeightEnsemblingMixture` attached: what :func:`load_wemoe` returns.

    ``forward(images)`` gives the features; inside ``with model.mixture.recording() as routing:`` the forwards
    also leave each MLP's routing weights in ``routing``.
    """

    def __init__(self, encoder: nn.Module, mixture: WeightEnsemblingMixture, tasks: Sequence[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.mixture = mixture
        self.tasks = list(tasks)

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)


# ----------------------------------------------------------------------------- file
def save_wemoe(
    encoder_state: Mapping[str, Tensor], mixture: WeightEnsemblingMixture, tasks: Sequence[str], path: str | Path
) -> Path:
    """Write a WEMoE model to ``path`` (``.safetensors``), atomically; NaN or infinite values are refused.

    The file holds ``encoder.<name>`` (``encoder_state``: the encoder with its static merge, the MLP layers
    pretrained), ``task_vectors.<name>`` (the mixed tensors' ``[tasks, *shape]``), ``routers.<module>.<name>``
    and, as metadata, ``format`` (``lit_adamerging.wemoe``), ``version``, ``tasks``, ``mlp_modules`` and
    ``router_depth`` (JSON). :func:`load_wemoe` rebuilds the model from it.
    """
    from safetensors.torch import save_file

    from lit_adamerging.io import write_atomic

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a WEMoE export is a .safetensors file; give a path ending in .safetensors.")
    if len(tasks) != mixture.num_tasks:
        raise ValueError(f"{len(tasks)} task names for a mixture of {mixture.num_tasks} tasks.")
    tensors = {_ENCODER + name: value for name, value in encoder_state.items()}
    tensors.update({_TASK_VECTORS + name: mixture.stacked(name) for name in mixture.tensor_names})
    tensors.update({_ROUTERS + name: value for name, value in mixture.routers.state_dict().items()})
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        raise FloatingPointError(f"the WEMoE model holds NaN or infinite values ({bad[:5]}); nothing was written to "
                                 f"{path}.")
    tensors = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    depth = next(iter(mixture.routers.values())).depth
    metadata = {
        "format": WEMOE_FORMAT,
        "version": WEMOE_FORMAT_VERSION,
        "tasks": json.dumps(list(tasks)),
        "mlp_modules": json.dumps(mixture.mlp_modules),
        "router_depth": json.dumps(depth),
    }
    return write_atomic(path, lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_wemoe(path: str | Path, encoder: nn.Module) -> WEMoEEncoder:
    """Rebuild a :func:`save_wemoe` model on ``encoder`` (the same architecture, e.g. the pretrained one).

    The encoder's tensors are replaced by the file's (strictly: every key, every shape), the mixture
    attached with the file's task vectors and routers. A file that does not fit is a
    :class:`WEMoEFileError` naming it and what is wrong.
    """
    path = Path(path)
    metadata, tensors = read_export(
        path, "a WEMoE export", WEMOE_FORMAT, WEMOE_FORMAT_VERSION, WEMoEFileError,
        "ExportMergedEncoder writes one for the wemoe method",
    )
    tasks = json_field(metadata, "tasks", path, WEMoEFileError)
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise WEMoEFileError(f"{path}: the metadata's 'tasks' must be a non-empty list of names, got {tasks!r}.")
    mlp_modules = json_field(metadata, "mlp_modules", path, WEMoEFileError)
    depth = json_field(metadata, "router_depth", path, WEMoEFileError)
    if not isinstance(mlp_modules, list) or not all(isinstance(m, str) for m in mlp_modules) or not isinstance(
        depth, int
    ):
        raise WEMoEFileError(f"{path}: the metadata's 'mlp_modules' (a list of names) or 'router_depth' (a number) "
                             "is garbled.")
    sections: dict[str, dict[str, Tensor]] = {_ENCODER: {}, _TASK_VECTORS: {}, _ROUTERS: {}}
    for name, value in tensors.items():
        prefix = next((p for p in sections if name.startswith(p)), None)
        if prefix is None:
            raise WEMoEFileError(f"{path}: unexpected tensor {name!r}; the file is garbled.")
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise WEMoEFileError(f"{path}: {name!r} holds NaN or infinite values.")
        sections[prefix][name[len(prefix):]] = value
    expected = encoder.state_dict()
    if sections[_ENCODER].keys() != expected.keys():
        missing = sorted(expected.keys() - sections[_ENCODER].keys())
        extra = sorted(sections[_ENCODER].keys() - expected.keys())
        raise WEMoEFileError(f"{path}: the file's encoder does not match the given encoder (missing {missing[:5]}, "
                             f"unexpected {extra[:5]}); give an encoder of the architecture it was exported from.")
    wrong = [name for name, value in expected.items() if sections[_ENCODER][name].shape != value.shape]
    if wrong:
        raise WEMoEFileError(f"{path}: tensor(s) {wrong[:5]} have other shapes than the given encoder's; give an "
                             "encoder of the architecture it was exported from.")
    encoder.load_state_dict(sections[_ENCODER])
    try:
        mixture = WeightEnsemblingMixture(encoder, sections[_TASK_VECTORS], mlp_modules, depth)
        mixture.routers.load_state_dict(sections[_ROUTERS])
    except (ValueError, RuntimeError) as error:
        raise WEMoEFileError(f"{path}: its mixture does not fit the encoder or is incomplete: {error}") from error
    if mixture.num_tasks != len(tasks) or set(mixture.tensor_names) != sections[_TASK_VECTORS].keys():
        raise WEMoEFileError(f"{path}: its task vectors do not match its {len(tasks)} tasks and mixed layers.")
    return WEMoEEncoder(encoder, mixture, tasks)
