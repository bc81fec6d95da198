"""The layer registry: the one home of layer facts.

For every weight-bearing module type, a :class:`LayerKind` says what the
rest of the package needs to know, so nothing else asks
``isinstance(m, nn.Linear)``:

* its operator(s): ``views(module, options)`` returns named
  :class:`LayerView` s, each an operator *descriptor*
  (:mod:`~robustcompress.layers.specs`) plus the parameters it reads —
  ``spectral.views`` turns descriptors into operators;
* ``feature_axis``: the output axis that carries features (activation statistics);
* ``can_be_head``: whether the layer can be a classifier head;
* ``fold_norm``: how a following BatchNorm folds in (``"channels"``: over
  output channels, dim 1, any output rank; ``"features"``: only when the
  output is ``(N, F)``; ``None``: never);
* ``prune`` / ``truncate``: how structured pruning and rank truncation treat it
  (see :data:`PRUNE_RULES`, :data:`TRUNCATE_RULES`);
* ``penalize``: whether penalties act on it by default (``False`` with an
  ``exclusion_reason`` for metrics-only kinds such as Embedding);
* ``claims_children``: its views cover its submodules' weights (packed
  attention, LoRA wrappers), so discovery does not descend into them (a
  bool, or ``(module, options) -> bool`` when it depends on the options).

Public API (small on purpose):

=====================================  ===============================================
``register_layer_kind(kind)``          add a kind (a type registered twice is an error)
``unregister_layer_kind(name)``        remove a kind (returns it)
``layer_kind(module)``                 the kind of a module, or None
``layer_views(module, options)``       its checked views
``find_layers(model, options)``        every view of a model, the skipped modules and aliases
``head_name(model)``                   the classifier head's module name
``ViewOptions``                        ``attention="projections" | "circuits"``
=====================================  ===============================================

Lookup precedence (:func:`layer_kind`): walk ``type(module).__mro__`` from
the most derived class; at each class an entry registered with the class
object wins over one registered with its qualified name
(``"transformers.pytorch_utils.Conv1D"`` — recognised without importing
transformers); the first class with an entry decides. So a subclass of
``nn.Linear`` is a Linear unless its own class is registered.

Example — a custom kind in a few lines:

    >>> import torch
    >>> from torch import nn
    >>> class Scaled(nn.Module):                   # y = (g·W) x
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(3, 5))
    ...         self.g = 2.0
    ...     def forward(self, x):
    ...         return x @ (self.g * self.w).T
    >>> kind = LayerKind(
    ...     name="scaled", types=(Scaled,),
    ...     views=lambda m, opts: [LayerView("", MatrixSpec(lambda: m.g * m.w), ("w",))])
    >>> _ = register_layer_kind(kind, example=Scaled())
    >>> layer_kind(Scaled()).name
    'scaled'
    >>> [layer.name for layer in find_layers(nn.Sequential(Scaled(), nn.Linear(3, 2))).layers]
    ['0', '1']
    >>> _ = unregister_layer_kind("scaled")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

from .specs import LowRankSpec, MatrixSpec, Spec, check_spec

__all__ = [
    "LayerKind",
    "LayerView",
    "Layer",
    "LayerCatalog",
    "ViewOptions",
    "PRUNE_RULES",
    "TRUNCATE_RULES",
    "register_layer_kind",
    "unregister_layer_kind",
    "layer_kind",
    "layer_kinds",
    "layer_views",
    "find_layers",
    "head_name",
]

#: How structured pruning treats a kind.
PRUNE_RULES = {
    "rows": "remove output features/channels (rows of the operator) with the inputs of their consumers",
    "heads": "remove attention heads (their Q/K/V rows and O columns together)",
    "rnn_units": "remove hidden units: a unit's gate rows (LSTM i,f,g,o; GRU r,z,n) with its weight_hh column",
    "none": "not pruned",
}
#: How rank truncation treats a kind.
TRUNCATE_RULES = {
    "factorize": "replace by a low-rank layer B·A when r·(m+n) < m·n",
    "rank": "already factorised: lower the inner rank",
    "none": "not truncated",
}
_FOLD_RULES = ("channels", "features", None)
_ATTENTION_MODES = ("projections", "circuits")


@dataclass(frozen=True)
class ViewOptions:
    """Choices that change which operators a kind describes.

    Args:
        attention: ``"projections"`` (default: Q, K, V, O as four matrices —
            what prune and truncate act on, and cheap) or ``"circuits"``
            (per head ``W_O^h W_V^h`` and ``W_Q^hᵀ W_K^h``, each one operator:
            ``σ₁(W_Q)σ₁(W_K)`` only upper-bounds the logit map's gain).
    """

    attention: str = "projections"

    def __post_init__(self) -> None:
        if self.attention not in _ATTENTION_MODES:
            raise ValueError(f"Expected attention to be 'projections' or 'circuits', but got attention={self.attention!r}")


@dataclass(frozen=True)
class LayerView:
    """One operator of a layer.

    Args:
        name: the view's name inside the module (``""`` for a kind's only
            view; ``"q"``, ``"weight_hh_l0.f"``, …). The layer's name is
            ``module_name.name``.
        spec: the operator descriptor.
        params: names (relative to the module, as in ``named_parameters``)
            of the parameters the operator reads.
        penalize: False for a view left out of penalties inside a penalised
            kind (a submodule's metrics-only view, e.g. T5's relative position
            bias inside an attention block).
    """

    name: str
    spec: Spec
    params: tuple[str, ...]
    penalize: bool = True


@dataclass(frozen=True)
class LayerKind:
    """Everything the package knows about one kind of layer (see the module docstring)."""

    name: str
    types: tuple[type | str, ...]
    views: Callable[[nn.Module, ViewOptions], list[LayerView]]
    feature_axis: int = -1
    can_be_head: bool = True
    fold_norm: str | None = None
    prune: str = "none"
    truncate: str = "none"
    penalize: bool = True
    exclusion_reason: str = ""
    claims_children: bool | Callable[[nn.Module, ViewOptions], bool] = False

    def claims(self, module: nn.Module, options: ViewOptions) -> bool:
        """Whether this kind's views cover ``module``'s submodules under ``options``."""
        c = self.claims_children
        return bool(c(module, options)) if callable(c) else bool(c)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Expected name to be a non-empty string, but got name={self.name!r}")
        if isinstance(self.types, (type, str)) or not self.types:
            raise TypeError(f"Expected types to be a non-empty tuple of classes or qualified class names, "
                            f"but got types={self.types!r}")
        for t in self.types:
            if not (isinstance(t, type) and issubclass(t, nn.Module)) and not (isinstance(t, str) and "." in t):
                raise TypeError(f"Expected each of types to be an nn.Module subclass or a qualified class name "
                                f"like 'transformers.pytorch_utils.Conv1D', but got {t!r}")
        if not callable(self.views):
            raise TypeError(f"Expected views to be callable (module, options) -> list[LayerView], but got {self.views!r}")
        if self.fold_norm not in _FOLD_RULES:
            raise ValueError(f"Expected fold_norm to be one of {_FOLD_RULES}, but got fold_norm={self.fold_norm!r}")
        if self.prune not in PRUNE_RULES:
            raise ValueError(f"Expected prune to be one of {sorted(PRUNE_RULES)}, but got prune={self.prune!r}")
        if self.truncate not in TRUNCATE_RULES:
            raise ValueError(f"Expected truncate to be one of {sorted(TRUNCATE_RULES)}, but got truncate={self.truncate!r}")
        if not self.penalize and not self.exclusion_reason:
            raise ValueError("A kind left out of penalties (penalize=False) needs an exclusion_reason")


@dataclass
class Layer:
    """One discovered operator of a model.

    ``name`` is ``module_name`` (single-view kinds) or ``module_name.view``.
    """

    name: str
    module_name: str
    module: nn.Module
    kind: LayerKind
    view: LayerView

    @property
    def spec(self) -> Spec:
        return self.view.spec

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The parameters this operator reads (the stored tensors, e.g. a parametrization's ``original``)."""
        return [self.module.get_parameter(p) for p in self.view.params]

    @property
    def penalize(self) -> bool:
        """Whether penalties act on this operator by default (see :attr:`exclusion_reason`)."""
        return self.kind.penalize and self.view.penalize

    @property
    def exclusion_reason(self) -> str:
        """Why penalties leave this operator out by default (``""`` when they do not)."""
        if self.penalize:
            return ""
        return self.kind.exclusion_reason or "a metrics-only submodule view (see its own layer kind)"


@dataclass
class LayerCatalog:
    """What :func:`find_layers` found.

    Attributes:
        layers: one :class:`Layer` per operator, in module order (tied weights once).
        skipped: ``{module name: reason}`` for weight-bearing modules left out.
        aliases: ``{name: tracked name}`` for operators that read the same
            weight as an earlier one (tied weights; a tied ``lm_head``
            follows its Embedding).
    """

    layers: list[Layer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __getitem__(self, name: str) -> Layer:
        name = self.aliases.get(name, name)
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"No layer called {name!r}; layers: {self.names()}")


_BY_TYPE: dict[type, LayerKind] = {}
_BY_NAME: dict[str, LayerKind] = {}
_KINDS: dict[str, LayerKind] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_layer_kind(kind: LayerKind, *, example: nn.Module | None = None) -> LayerKind:
    """Add a layer kind to the registry.

    Args:
        kind: the kind. Its name and each of its types must be new.
        example: a module of this kind; its views are built and checked now
            (shapes, slices, factor sizes), so a wrong descriptor fails at
            registration rather than in training.

    Returns:
        ``kind``.

    Raises:
        ValueError: the name or a type is already registered (naming the
            kind that holds it), or the example's views do not fit its weights.

    Example: see the module docstring.
    """
    if not isinstance(kind, LayerKind):
        raise TypeError(f"Expected a LayerKind, but got {type(kind).__name__}")
    if kind.name in _KINDS:
        raise ValueError(f"A layer kind called {kind.name!r} is already registered; unregister it first")
    for t in kind.types:
        holder = _BY_TYPE.get(t) if isinstance(t, type) else _BY_NAME.get(t)
        if holder is None and isinstance(t, type):
            holder = _BY_NAME.get(_qualname(t))
        elif holder is None:
            holder = next((k for c, k in _BY_TYPE.items() if _qualname(c) == t), None)
        if holder is not None:
            label = t.__name__ if isinstance(t, type) else t
            raise ValueError(f"{label} is already registered as layer kind {holder.name!r}; "
                             f"unregister_layer_kind({holder.name!r}) first to replace it")
    if example is not None:
        if not any(_matches(type(example), t) for t in kind.types):
            raise TypeError(f"example is a {type(example).__name__}, not one of the kind's types {kind.types}")
        _checked_views(kind, example, ViewOptions(), type(example).__name__)
    _KINDS[kind.name] = kind
    for t in kind.types:
        if isinstance(t, type):
            _BY_TYPE[t] = kind
        else:
            _BY_NAME[t] = kind
    return kind


def _matches(cls: type, t: type | str) -> bool:
    return any(c is t or _qualname(c) == t for c in cls.__mro__)


def unregister_layer_kind(name: str) -> LayerKind:
    """Remove the kind called ``name`` and return it.

    Example:
        >>> k = unregister_layer_kind("embedding"); _ = register_layer_kind(k)
    """
    if name not in _KINDS:
        raise KeyError(f"No layer kind called {name!r}; registered: {sorted(_KINDS)}")
    kind = _KINDS.pop(name)
    for t in kind.types:
        (_BY_TYPE if isinstance(t, type) else _BY_NAME).pop(t, None)
    return kind


def layer_kinds() -> dict[str, LayerKind]:
    """Every registered kind by name (a copy)."""
    return dict(_KINDS)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``: the entry of the most derived class in its MRO (class before name), or None.

    Example:
        >>> layer_kind(nn.Conv2d(1, 2, 3)).name, layer_kind(nn.ReLU())
        ('conv', None)
    """
    for cls in type(module).__mro__:
        kind = _BY_TYPE.get(cls) or _BY_NAME.get(_qualname(cls))
        if kind is not None:
            return kind
    return None


def _checked_views(kind: LayerKind, module: nn.Module, options: ViewOptions, where: str) -> list[LayerView]:
    views = kind.views(module, options)
    if not isinstance(views, (list, tuple)) or not all(isinstance(v, LayerView) for v in views):
        raise TypeError(f"{where}: layer kind {kind.name!r} returned {type(views).__name__}, expected a list of LayerView")
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: layer kind {kind.name!r} returned duplicate view names {names}")
    own = dict(module.named_parameters())
    for v in views:
        label = f"{where}" + (f" view {v.name!r}" if v.name else "")
        missing = [p for p in v.params if p not in own]
        if missing:
            raise ValueError(f"{label}: parameters {missing} are not parameters of the module; it has {sorted(own)}")
        check_spec(v.spec, label)
    return list(views)


def layer_views(module: nn.Module, options: ViewOptions | None = None) -> list[LayerView]:
    """The checked views of one module (``[]`` when its type has no kind).

    Example:
        >>> [v.name for v in layer_views(nn.LSTM(3, 4))][:3]
        ['weight_ih_l0.i', 'weight_ih_l0.f', 'weight_ih_l0.g']
    """
    kind = layer_kind(module)
    if kind is None:
        return []
    return _checked_views(kind, module, options or ViewOptions(), type(module).__name__)


def _spec_key(spec: Spec) -> tuple:
    if isinstance(spec, MatrixSpec):
        return ("matrix",) + spec.stored_key()
    if isinstance(spec, LowRankSpec):
        return ("lowrank", _spec_key(spec.a), _spec_key(spec.b))
    return ("lora", _spec_key(spec.base), _spec_key(spec.a), _spec_key(spec.b), spec.scale)


def _own_weights(module: nn.Module) -> list[str]:
    own = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if parametrize.is_parametrized(module):
        # A parametrized weight is a property; its stored tensors live in a ParametrizationList.
        own += [n for n, plist in module.parametrizations.items()
                if any(p.dim() >= 2 for p in plist.parameters())]
    return own


def find_layers(model: nn.Module, options: ViewOptions | None = None) -> LayerCatalog:
    """Every operator of ``model``, by walking its modules through the registry.

    A module whose kind ``claims_children`` is not descended into. Modules
    holding a ≥ 2-D parameter of their own with no kind are listed in
    ``skipped`` with their type name — never silently ignored. An operator
    reading the same weight (up to transpose) as an earlier one is an alias;
    when a penalised kind (a tied ``lm_head``) ties to a metrics-only one
    (its Embedding), the metrics-only one owns the weight.

    Args:
        model: the network.
        options: view choices (:class:`ViewOptions`).

    Returns:
        A :class:`LayerCatalog`.

    Raises:
        ValueError: a module's kind refuses it (e.g. DoRA) or describes a view
            that does not fit its weights; the message names the module.

    Example:
        >>> cat = find_layers(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)))
        >>> cat.names(), [l.penalize for l in cat.layers]
        (['0', '1'], [False, True])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
    options = options or ViewOptions()
    catalog = LayerCatalog()
    claimed: list[str] = []
    owner: dict[tuple, int] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        if any(mname.startswith(c + ".") for c in claimed):
            continue
        kind = layer_kind(module)
        if kind is None:
            own = _own_weights(module)
            if own and not _is_parametrization(module):
                catalog.skipped[mname] = (f"no registered layer kind for {_qualname(type(module))} "
                                          f"(weights {own}); see robustcompress.layers.register_layer_kind")
            continue
        if kind.claims(module, options):
            claimed.append(mname)
        where = f"{mname or '<model>'} ({type(module).__name__})"
        for view in _checked_views(kind, module, options, where):
            full = ".".join(p for p in (mname, view.name) if p)
            layer = Layer(full, mname, module, kind, view)
            # Same parameters, same part of them (up to transpose): one operator under two names.
            pids = tuple(id(module.get_parameter(p)) for p in view.params)
            key = (pids, _spec_key(view.spec)) if pids else (id(layer),)
            if key in owner:
                first = catalog.layers[owner[key]]
                if first.penalize and not layer.penalize:
                    # The metrics-only kind (an Embedding) owns a tied weight.
                    catalog.layers[owner[key]] = layer
                    catalog.aliases = {a: (full if t == first.name else t) for a, t in catalog.aliases.items()}
                    catalog.aliases[first.name] = full
                else:
                    catalog.aliases[full] = first.name
                continue
            owner[key] = len(catalog.layers)
            catalog.layers.append(layer)
    return catalog


def _is_parametrization(module: nn.Module) -> bool:
    # ParametrizationList holds `original`; its weights are reported through the parametrized module.
    return type(module).__name__ == "ParametrizationList"


def head_name(model: nn.Module, options: ViewOptions | None = None) -> str | None:
    """The classifier head: the last module in module order whose kind can be a head.

    Example:
        >>> head_name(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(-1)))
        '2'
    """
    last = None
    claimed: list[str] = []
    for mname, module in model.named_modules():
        if any(mname.startswith(c + ".") for c in claimed):
            continue
        kind = layer_kind(module)
        if kind is None:
            continue
        if kind.claims(module, options or ViewOptions()):
            claimed.append(mname)
        if kind.can_be_head:
            last = mname
    return last
