"""RegMean (Jin et al., *Dataless Knowledge Fusion by Merging Weights of Language Models*, ICLR 2023).

Every linear map ``y = x W^T`` of the encoder is merged as the solution of the regression that
asks the merged map to reproduce each fine-tuned model's outputs on that model's own inputs:

    W*^T = (sum_k G~_k)^{-1} sum_k G~_k W_k^T,   G_k = X_k^T X_k / rows_k,

where ``X_k`` stacks, one row per token / position, the inputs the layer received in fine-tuned
model ``k`` on unlabeled images of task ``k``, and ``G~`` is ``G`` with its off-diagonal entries
multiplied by ``alpha`` (the paper's shrinking; ``alpha = 1`` is the plain regression). Each Gram
is a per-row mean, as in the authors' released code and FusionBench: every model weighs the same
whatever its number of images (the paper writes the sums ``X_k^T X_k``, which is the same when
every task gives the same number of rows, as with a fixed number of images per task). The system
is solved with ``torch.linalg.solve`` in float64. Biases and every other tensor are averaged.

Layers (:func:`regmean_layers`):

- ``nn.Linear``: one regression over its input features.
- ``nn.Conv2d``: a linear map over unfolded patches (``F.unfold`` with the layer's kernel,
  stride, padding and dilation), one regression per group: grouped and depthwise convolutions
  have one Gram per group, ``[groups, d, d]`` with ``d = in_channels / groups * kh * kw``.
- ``nn.MultiheadAttention`` used as self-attention (query, key and value the same tensor, as in
  open_clip's ViT): its packed ``in_proj_weight`` maps that one input to q, k and v, so it is one
  regression over it; its ``out_proj`` is never called through its own forward
  (``F.multi_head_attention_forward`` reads its weight), so its input, the attention output
  before the projection, is recomputed in the attention's hook (the same attention with an
  identity output projection). Cross-attention is an error.

Grams are recorded by forward hooks (:class:`GramRecorder`), summed over batches in float64
(each batch's ``X^T X`` computed in float32) with row counts, so sums from several processes
add up before the division.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REGMEAN_ALPHA = 0.95
"""Off-diagonal scale of the Grams (FusionBench's CLIP ``reduce_non_diagonal_ratio``)."""

REGMEAN_IMAGES = 256
"""Images per task the Grams are estimated on (FusionBench's CLIP ``num_regmean_examples``)."""

LayerKind = Literal["linear", "conv2d", "attention_in", "attention_out"]

SUPPORTED_TYPES = "nn.Linear, nn.Conv2d (any groups) and nn.MultiheadAttention used as self-attention"

# Unfolded conv inputs are built this many values at a time at most (a slice of the batch each).
_UNFOLD_BUDGET = 1 << 24


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` is a ``base`` whose forward is ``base``'s own (a subclass that pads or reshapes first is not)."""
    return isinstance(module, base) and type(module).forward is base.forward


def _kind(module: nn.Module) -> LayerKind | None:
    if _plain(module, nn.Linear):
        return "linear"
    if _plain(module, nn.Conv2d):
        return "conv2d"
    if _plain(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
        return "attention_in"
    return None


def regmean_layers(encoder: nn.Module, modules: Sequence[str] | None = None) -> dict[str, LayerKind]:
    """``{weight tensor name: kind}`` of the layers RegMean merges.

    ``modules=None`` finds every supported layer (see the module docstring): each plain
    ``nn.Linear`` and ``nn.Conv2d`` (a subclass with its own forward, such as a conv that pads
    itself, is averaged instead), and each ``nn.MultiheadAttention`` with a packed in-projection
    (``<name>.in_proj_weight``) and its ``<name>.out_proj.weight``. ``modules`` names the
    modules to merge instead (an attention's ``out_proj`` may be named without the attention);
    a name that is not a module, or a module of another type, is a ``ValueError``.
    """
    named = dict(encoder.named_modules())
    attention_of = {
        f"{name}.out_proj" if name else "out_proj": name
        for name, module in named.items() if isinstance(module, nn.MultiheadAttention)
    }

    def layers_of(name: str, module: nn.Module) -> dict[str, LayerKind] | None:
        prefix = f"{name}." if name else ""
        if name in attention_of:  # never called itself: its input comes from its attention's hook
            return {f"{prefix}weight": "attention_out"} if _kind(named[attention_of[name]]) else None
        kind = _kind(module)
        if kind == "attention_in":
            return {f"{prefix}in_proj_weight": kind}
        return {f"{prefix}weight": kind} if kind else None

    if modules is None:
        found = (layers_of(name, module) or {} for name, module in named.items())
        return {weight: kind for layer in found for weight, kind in layer.items()}
    if isinstance(modules, str):
        raise ValueError(f"modules must be a list of module names, got the string {modules!r}; write [{modules}].")
    layers: dict[str, LayerKind] = {}
    for name in modules:
        if name not in named:
            supported = [n for n, m in named.items() if layers_of(n, m)]
            raise ValueError(
                f"RegMean: the encoder has no module {name!r}; its supported layers include {supported[:5]}."
            )
        found = layers_of(name, named[name])
        if found is None:
            raise ValueError(
                f"RegMean cannot merge module {name!r} of type {type(named[name]).__name__}: it supports "
                f"{SUPPORTED_TYPES} (not a subclass that overrides forward, nor an attention with separate q/k/v "
                "projections). Leave it out of the modules to merge; its tensors are then averaged."
            )
        layers.update(found)
    return layers


class GramRecorder:
    """A context manager whose forward hooks sum each layer's ``X^T X`` and count its rows.

    Args:
        encoder: the model whose layers are hooked (run it inside the ``with`` block).
        layers: ``{weight tensor name: kind}`` from :func:`regmean_layers`.

    Attributes:
        grams: ``{weight name: float64 [groups, d, d]}`` sums (``groups`` is 1 except for grouped convs).
        rows: ``{weight name: float64 scalar tensor}``, the rows summed.

    The hooks are removed when the block ends, also on an error. An attention that is called
    with a key or value other than its query raises a ``ValueError`` naming it.
    """

    def __init__(self, encoder: nn.Module, layers: Mapping[str, LayerKind]) -> None:
        self.encoder = encoder
        self.layers = dict(layers)
        self.grams: dict[str, Tensor] = {}
        self.rows: dict[str, Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> GramRecorder:
        modules = dict(self.encoder.named_modules())
        attention: dict[str, list[str]] = {}
        for weight, kind in self.layers.items():
            owner = weight.rpartition(".")[0]
            if kind == "attention_in":
                attention.setdefault(owner, []).append(weight)
            elif kind == "attention_out":
                attention.setdefault(owner.rpartition(".")[0], []).append(weight)
            else:
                hook = self._linear_hook if kind == "linear" else self._conv_hook
                self._handles.append(modules[owner].register_forward_hook(_bound(hook, weight), with_kwargs=True))
        for owner, weights in attention.items():
            hook = _bound(self._attention_hook, owner, weights)
            self._handles.append(modules[owner].register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _add(self, weight: str, rows: Tensor) -> None:
        """Add ``rows [groups, n, d]`` of inputs to ``weight``'s Gram."""
        rows = rows.detach().float()
        gram = torch.matmul(rows.transpose(1, 2), rows).double()
        if weight in self.grams:
            self.grams[weight] += gram
            self.rows[weight] += rows.shape[1]
        else:
            self.grams[weight] = gram
            self.rows[weight] = torch.tensor(float(rows.shape[1]), dtype=torch.float64, device=gram.device)

    def _linear_hook(self, weight: str, module: nn.Linear, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs["input"]
        self._add(weight, x.reshape(1, -1, x.shape[-1]))

    def _conv_hook(self, weight: str, module: nn.Conv2d, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else kwargs["input"]
        if x.dim() == 3:
            x = x.unsqueeze(0)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            # 'same' (possibly uneven) and non-zero padding modes: pad as the layer does, then unfold unpadded.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, _pad_widths(module), mode=mode)
            padding = 0
        groups = module.groups
        per_image = x.shape[1] * module.kernel_size[0] * module.kernel_size[1] * x.shape[2] * x.shape[3]
        step = max(1, _UNFOLD_BUDGET // max(per_image, 1))
        for start in range(0, x.shape[0], step):
            patches = F.unfold(
                x[start:start + step], module.kernel_size, dilation=module.dilation, padding=padding,
                stride=module.stride,
            )  # [n, C * kh * kw, L], channel-major like weight.reshape(out, -1)
            n, width, positions = patches.shape
            grouped = patches.reshape(n, groups, width // groups, positions).permute(1, 0, 3, 2)
            self._add(weight, grouped.reshape(groups, n * positions, width // groups))

    def _attention_hook(
        self, owner: str, weights: list[str], module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any
    ) -> None:
        call = _MHA_SIGNATURE.bind(module, *args, **kwargs)
        call.apply_defaults()
        query, key, value = call.arguments["query"], call.arguments["key"], call.arguments["value"]
        if not (_same(query, key) and _same(query, value)):
            raise ValueError(
                f"RegMean: the attention {owner!r} ({type(module).__name__}) is called with a key or value other than "
                "its query (cross-attention); RegMean merges self-attention only (one input for q, k and v). Name the "
                "modules to merge without it (its tensors are then averaged)."
            )
        for weight in weights:
            if self.layers[weight] == "attention_in":
                self._add(weight, query.reshape(1, -1, query.shape[-1]))
            else:
                before = _attention_before_projection(module, query, call.arguments)
                self._add(weight, before.reshape(1, -1, before.shape[-1]))


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _pad_widths(conv: nn.Conv2d) -> list[int]:
    """``F.pad``'s ``[left, right, top, bottom]`` for the padding ``conv`` applies, from its ``padding``.

    ``"same"`` splits each side's total ``dilation * (kernel - 1)`` as ``nn.Conv2d`` does (the
    extra entry of an odd total on the right / bottom); ``"valid"`` pads nothing. Another string
    is a ``ValueError`` (``nn.Conv2d`` accepts none).
    """
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        height, width = (d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
        return [width // 2, width - width // 2, height // 2, height - height // 2]
    if isinstance(conv.padding, str):
        raise ValueError(f"RegMean: the Conv2d padding {conv.padding!r} is neither 'same', 'valid' nor sizes.")
    height, width = conv.padding
    return [width, width, height, height]


def _bound(hook: Any, *front: Any) -> Any:
    def call(*args: Any) -> Any:
        return hook(*front, *args)

    return call


def _same(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


@torch.no_grad()
def _attention_before_projection(module: nn.MultiheadAttention, query: Tensor, arguments: Mapping[str, Any]) -> Tensor:
    """The input of ``module.out_proj`` in self-attention on ``query``: the attention with an identity projection."""
    x = query.transpose(0, 1) if module.batch_first and query.dim() == 3 else query
    embed = module.embed_dim
    identity = torch.eye(embed, dtype=x.dtype, device=x.device)
    output, _ = F.multi_head_attention_forward(
        x, x, x, embed, module.num_heads, module.in_proj_weight, module.in_proj_bias, module.bias_k, module.bias_v,
        module.add_zero_attn, 0.0, identity, torch.zeros(embed, dtype=x.dtype, device=x.device),
        training=False, key_padding_mask=arguments["key_padding_mask"], need_weights=False,
        attn_mask=arguments["attn_mask"], is_causal=arguments["is_causal"],
    )
    return output


def shrink_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """``gram [..., d, d]`` with its off-diagonal entries multiplied by ``alpha`` (the diagonal kept).

    Example:
        >>> shrink_off_diagonal(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 0.5)
        tensor([[2.0000, 0.5000],
                [0.5000, 2.0000]])
    """
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))


def _as_groups(weight: Tensor, groups: int) -> Tensor:
    """``weight [out, ...]`` as ``[groups, d, out / groups]``, the ``W^T`` of each group's regression."""
    return weight.reshape(groups, weight.shape[0] // groups, -1).transpose(1, 2)


class RegMeanAverage:
    """RegMean's merge, added one model at a time.

    Holds, per merged weight, the running sums ``sum_k G~_k``, ``sum_k G~_k W_k^T`` and
    ``sum_k W_k`` (float64), never the models: ``add(weights_k, grams_k)`` for each model, then
    :meth:`result`. An input feature that is zero in every row of every model (a convolution tap
    that only ever sees padding) leaves its weights undetermined: they are averaged.

    Args:
        alpha: off-diagonal scale of every Gram, in ``[0, 1]`` (1: the plain regression; 0: only
            the diagonal, a per-input-feature weighted average).
    """

    def __init__(self, alpha: float = REGMEAN_ALPHA) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
        self.alpha = alpha
        self._grams: dict[str, Tensor] = {}
        self._products: dict[str, Tensor] = {}
        self._weight_sums: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.num_models = 0

    def add(self, weights: Mapping[str, Tensor], grams: Mapping[str, Tensor]) -> None:
        """Add one model: its tensors ``weights`` and the per-row mean Grams of its merged layers' inputs."""
        if self._grams and set(grams) != set(self._grams):
            raise ValueError(
                f"model {self.num_models}: its Grams name other layers than the first model's "
                f"({sorted(set(grams) ^ set(self._grams))[:5]}); every model needs the same layers."
            )
        for name, gram in grams.items():
            if name not in weights:
                raise ValueError(f"model {self.num_models}: there is a Gram for {name!r} but no such tensor.")
            weight = weights[name]
            gram = gram.double()
            if gram.dim() == 2:
                gram = gram.unsqueeze(0)
            groups, width = gram.shape[0], gram.shape[-1]
            if weight.shape[0] % groups or weight.numel() != weight.shape[0] * width:
                raise ValueError(
                    f"model {self.num_models}, tensor {name!r}: a Gram of shape {tuple(gram.shape)} does not fit a "
                    f"weight of shape {tuple(weight.shape)} (expected [groups, d, d] with out * d entries)."
                )
            shrunk = shrink_off_diagonal(gram, self.alpha)
            transposed = _as_groups(weight.double(), groups)
            if name in self._grams:
                self._grams[name] += shrunk
                self._products[name] += shrunk @ transposed
                self._weight_sums[name] += transposed
            else:
                self._grams[name], self._products[name] = shrunk, shrunk @ transposed
                self._weight_sums[name] = transposed.clone()
                self._shapes[name] = (weight.shape, weight.dtype)
        self.num_models += 1

    def result(self) -> dict[str, Tensor]:
        """``{weight name: merged weight}`` in each weight's shape and dtype."""
        if not self.num_models:
            raise ValueError("no models were added; add at least one (weights, grams) pair.")
        merged = {}
        for name, gram in self._grams.items():
            shape, dtype = self._shapes[name]
            products = self._products[name]
            dead = torch.diagonal(gram, dim1=-2, dim2=-1) == 0  # [groups, d]: zero rows and columns (a PSD matrix)
            if bool(dead.any()):
                gram, products = gram.clone(), products.clone()
                torch.diagonal(gram, dim1=-2, dim2=-1)[dead] = 1.0
                products[dead] = self._weight_sums[name][dead] / self.num_models
            try:
                solution = torch.linalg.solve(gram, products)  # [groups, d, out / groups]
            except torch.linalg.LinAlgError:
                solution = None
            if solution is None or not bool(torch.isfinite(solution).all()):
                raise ValueError(
                    f"RegMean: the summed Gram of {name!r} is singular (fewer rows than input features, or inputs that "
                    f"are linearly dependent, with alpha={self.alpha}); use more images or alpha < 1, or leave that "
                    "layer out of the modules to merge."
                )
            merged[name] = solution.transpose(1, 2).reshape(shape).to(dtype)
        return merged


def regmean_merge(
    finetuned: Sequence[Mapping[str, Tensor]],
    grams: Sequence[Mapping[str, Tensor]],
    *,
    alpha: float = REGMEAN_ALPHA,
) -> dict[str, Tensor]:
    """RegMean's merged weight for every tensor ``grams`` name.

    ``grams[k]`` is ``{weight name: per-row mean Gram}`` of model ``k`` (``GramRecorder``'s sums
    divided by its rows): ``[d, d]`` or ``[groups, d, d]``. Tensors without a Gram are not
    returned: the caller decides what they become (RegMean averages them).

    Example:
        >>> w = [{"w": torch.tensor([[1.0, 0.0]])}, {"w": torch.tensor([[0.0, 1.0]])}]
        >>> g = [{"w": torch.diag(torch.tensor([1.0, 0.0]))}, {"w": torch.diag(torch.tensor([0.0, 1.0]))}]
        >>> regmean_merge(w, g, alpha=1.0)
        {'w': tensor([[1., 1.]])}
    """
    if len(finetuned) != len(grams):
        raise ValueError(f"got {len(finetuned)} models but {len(grams)} sets of Grams; give one per model.")
    average = RegMeanAverage(alpha)
    for weights, model_grams in zip(finetuned, grams):
        average.add(weights, model_grams)
    return average.result()
