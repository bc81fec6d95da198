"""Choosing layers: by name, module type or predicate, with the classifier head left out on request.

One home for the selection that penalties, projections and the tracker
share. Layers are the operators the layer registry finds
(:func:`robustcompress.layers.find_layers`): a module with one operator is
named like the module, one with several (attention Q/K/V/O, recurrent
gates) ``f"{module}.{view}"``. Selecting by type or predicate tests the
operator's module; naming a module selects all of its operators.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> select_layers(model, None), select_layers(model, None, exclude_head=False)
    (['0'], ['0', '2'])
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .layers import LayerCatalog, ViewOptions, find_layers, head_name

__all__ = ["LayerSpec", "select_layers", "frozen_layers"]

#: None | Sequence[str] | type | tuple[type, ...] | Callable[[str, nn.Module], bool]
LayerSpec = Any


def select_layers(model: nn.Module, layers: LayerSpec = None, *, exclude_head: bool = True,
                  candidates: Sequence[str] | None = None, catalog: LayerCatalog | None = None,
                  options: ViewOptions | None = None) -> list[str]:
    """Resolve a layer selection to operator names (module order), with clear errors.

    Args:
        model: the network.
        layers: None (every layer whose kind penalties act on), a sequence of
            operator or module names (a metrics-only layer such as an
            Embedding may be named), a module type or tuple of types, or a
            predicate ``(name, module) -> bool``.
        exclude_head: leave the classifier head (:func:`robustcompress.layers.head_name`)
            out of type / predicate / default selections.
        candidates: only these names may be chosen (the layers a shared state tracks).
        catalog: the model's :class:`~robustcompress.layers.LayerCatalog` (found here when None).
        options: view options for finding the catalog.

    Returns:
        The chosen operator names.

    Raises:
        TypeError / ValueError: a malformed selection, an unknown or unusable
            name, or a selection that matches nothing.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> select_layers(model, nn.Conv2d), select_layers(model, ["2"])
        (['0'], ['2'])
    """
    catalog = find_layers(model, options) if catalog is None else catalog
    allowed = None if candidates is None else set(candidates)
    everything = [layer for layer in catalog.layers if allowed is None or layer.name in allowed]
    supported = [layer for layer in everything if layer.penalize]
    head = head_name(model) if exclude_head else None

    def keep(layer) -> bool:
        return layer.module_name != head

    if layers is None:
        chosen = [layer.name for layer in supported if keep(layer)]
    elif isinstance(layers, str):
        raise TypeError(f"Expected layers to be a sequence of layer names, but got the single string {layers!r}; "
                        "wrap it in a list")
    elif isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        chosen = [layer.name for layer in supported if isinstance(layer.module, layers) and keep(layer)]
    elif callable(layers):
        chosen = [layer.name for layer in supported if keep(layer) and bool(layers(layer.name, layer.module))]
    else:
        try:
            names = list(layers)
        except TypeError:
            raise TypeError("Expected layers to be None, a sequence of names, a module type (or tuple of types) "
                            f"or a predicate (name, module) -> bool, but got layers={layers!r}") from None
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"Expected layer names to be strings, but got layers={layers!r}")
        usable = {layer.name for layer in everything}
        wanted: set[str] = set()
        modules = dict(model.named_modules(remove_duplicate=False))
        unknown, unusable = [], []
        for n in names:
            target = catalog.aliases.get(n, n)
            views = [layer.name for layer in catalog.layers if layer.module_name == n]
            if target in usable:
                wanted.add(target)
            elif views and all(v in usable for v in views):
                wanted.update(views)
            elif n in modules or target in catalog.names() or views:
                unusable.append(n)
            else:
                unknown.append(n)
        if unknown:
            raise ValueError(f"Unknown layer names {unknown}; layers of this model: {[x.name for x in supported]}")
        if unusable:
            reasons = {n: catalog.skipped[n] for n in unusable if n in catalog.skipped}
            raise ValueError(f"Layers {unusable} cannot be selected (no registered layer kind"
                             f"{', or not tracked by the given state' if candidates is not None else ''})"
                             f"{f': {reasons}' if reasons else ''}; usable layers: {sorted(usable)}")
        chosen = [layer.name for layer in everything if layer.name in wanted]
    if not chosen:
        raise ValueError(f"The layer selection layers={layers!r} matches no layer (exclude_head={exclude_head}); "
                         f"layers: {[x.name for x in supported]}")
    return chosen


def frozen_layers(catalog: LayerCatalog, names: Sequence[str]) -> list[str]:
    """The names among ``names`` whose operator parameters all have ``requires_grad=False``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> frozen_layers(find_layers(model), ["0", "2"])
        ['0']
    """
    return [n for n in names if not any(p.requires_grad for p in catalog[n].parameters)]
