"""Operator views and warm-started subspace iteration: the spectral core.

Everything above this module (metrics, bound, penalties, trackers) reads one
:class:`SpectralState` per model. Per layer it keeps ``k`` warm right vectors
``V`` (``n × k``, orthonormal) and left vectors ``U`` (``m × k``), and one step
is one pass of subspace iteration with Rayleigh–Ritz::

    U₀ = W V,  Y = Wᵀ U₀                       (each W read once)
    G = U₀ᵀ U₀ = Vᵀ WᵀW V = Q Λ Qᵀ              (k × k)
    σ_j = √λ_j,  U = U₀ Q / σ,  V ← orth(Y Q)   (CholeskyQR2, QR fallback)

Because ``V`` is orthonormal, the Ritz values ``σ_j`` are *lower* bounds of the
true singular values (Cauchy interlacing); warm-started from the last training
step, one iteration per step tracks a slowly moving spectrum. The first column
pair gives ``σ₁ ≈ uᵀ W v`` with ``v ∝ Wᵀ u``, whose gradient (u, v detached) is
``u vᵀ`` — the same estimator ``torch.nn.utils.parametrizations.spectral_norm``
uses, for every layer at once.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    >>> state = SpectralState(model, k=2)
    >>> state.step(50)
    >>> exact = torch.linalg.svdvals(model[0].weight.double())[:2]
    >>> torch.allclose(state.sigmas("0").double(), exact, rtol=1e-4)
    True
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import torch
from torch import nn

from .._checks import nonnegative_float, nonnegative_int, positive_int
from ..layers import Layer, LayerCatalog, ViewOptions, batchnorm_scale, find_layers, layer_kind, layer_views
from ..layers import head_name as registry_head_name
from ..layers import with_row_scale
from .backends import FusedBackend, ProductBackend, TorchBackend
from .iteration import cholesky_qr2, gram_upper_bound, power_step, ritz_step
from .sharded import ShardedBackend, ShardedView, refuse_bn_folding, sharded_operator
from .discovery import Coverage, find_bn_successors, layer_problem, record_input_shapes
from .views import LinearOperator, operator_from_spec

__all__ = ["SpectralState"]


@functools.lru_cache(maxsize=None)
def _exponent_range(dtype: torch.dtype) -> tuple[int, int]:
    """Exponents ``e`` with ``2^e`` and ``2^-e`` both normal numbers of ``dtype``."""
    info = torch.finfo(dtype)
    return math.ceil(math.log2(info.tiny)) + 1, min(math.floor(math.log2(info.max)) - 1, -math.ceil(math.log2(info.tiny)) - 1)


def _fingerprint(layer: Layer, buf: nn.Module) -> tuple | None:
    """What :meth:`SpectralState._check_layer` depends on: the stored tensors (identity, type, shape, device,
    dtype) and the warm vectors' shapes, device and dtype. Equal fingerprints skip the full check."""
    try:
        params = layer.parameters
    except AttributeError:  # a stored tensor is gone (e.g. a removed parametrization): always check fully
        return None
    tensors = tuple((id(p), type(p), p.shape, p.device, p.dtype) for p in params)
    return tensors + ((buf.U.shape, buf.V.shape, buf.V.device, buf.V.dtype),)


def _key(name: str) -> str:
    return name.replace(".", "-") or "-root"


class _LayerBuffers(nn.Module):
    """Warm vectors of one layer, as buffers so they travel with state_dict() and .to()."""

    def __init__(self, m: int, n: int, k: int, dtype: torch.dtype, device, generator: torch.Generator):
        super().__init__()
        v = torch.randn(n, k, generator=generator, dtype=torch.float64)
        u = torch.randn(m, k, generator=generator, dtype=torch.float64)
        self.register_buffer("V", cholesky_qr2(v).to(device=device, dtype=dtype))
        self.register_buffer("U", (u / u.norm(dim=0, keepdim=True)).to(device=device, dtype=dtype))
        self.register_buffer("S", torch.zeros(k, device=device, dtype=dtype))
        # Residual intervals of the last iteration: some singular value lies in
        # [C_j − R_j, C_j + R_j]. Not saved (recomputed by the next step); inf until then.
        self.register_buffer("C", torch.zeros(k, device=device, dtype=dtype), persistent=False)
        self.register_buffer("R", torch.full((k,), float("inf"), device=device, dtype=dtype), persistent=False)


class SpectralState(nn.Module):
    """Warm-started top-k singular directions of every layer of a model.

    One state per model, created and owned by the user or the optimizer
    wrapper; every penalty, the tracker and the report read it, so a training
    step reads each weight once. The model itself is not modified and nothing
    is added to its ``state_dict``.

    Args:
        model: the network.
        k: directions tracked per layer (clamped to ``min(m, n)`` per layer).
        layers: names to track: operator names (``"attn.q"``) or module names
            (all of the module's operators). Default: every layer whose kind
            penalties act on; metrics-only kinds (Embedding, and a head tied to
            it) are tracked only when named. Naming an unknown module, or one
            with no registered layer kind, is an error.
        view: ``"matrix"`` (weights as ``out × (in·k…)``, cheap) or
            ``"operator"`` (convolutions as the map at their real input size).
        input_shape: the model's input shape without batch dimension (operator view).
        example_input: alternatively, one input batch (operator view).
        input_shapes: alternatively, ``{layer name: input shape}`` (operator view).
        fold_bn: iterate a layer followed by BatchNorm as ``diag(γ/√(var+ε))·W``
            using the running statistics (the operator the model applies in eval mode).
            A Linear applied to sequences ``(N, L, F)`` and followed by a
            BatchNorm1d over ``L`` is not that operator: pass ``input_shape`` /
            ``example_input`` (the output rank is then checked) or ``fold_bn=False``.
        on_nonfinite: ``"raise"`` (a ValueError naming the layer) or ``"skip"``
            (warn, keep that layer's previous vectors). NaN never enters the state.
        backend: ``"auto"`` (the fused Triton kernel on CUDA when available, else
            batched torch), ``"torch"`` or ``"triton"``.
        stack_max_numel: torch path: layers of one shape with at most this many
            weights are stacked into one batched product (default: 2¹⁸ on
            CUDA, where launches dominate small layers; 0 on CPU, where
            stacking measured slower than multiplying in place).
        init_iter: iterations run at construction so estimates start near convergence.
        refine_tol: relative residual ``ρ_1/s_1`` above which a layer's estimate
            counts as unconverged (see :meth:`residual_interval`).
        refine_budget: extra layer-iterations per :meth:`step`, as a fraction of
            the number of tracked layers, spent on the unconverged layers of the
            previous step (0: off). E.g. 0.5 with 40 layers: at most 20 extra.
        seed: seed of the random starting vectors.
        attention: ``"projections"`` (Q, K, V, O as four matrices) or
            ``"circuits"`` (per head ``W_O^h W_V^h`` and ``W_Q^hᵀ W_K^h``); see
            :class:`robustcompress.layers.ViewOptions`.

    Layers are found through the layer registry (:mod:`robustcompress.layers`):
    a module kind with one operator is tracked under the module's name, one
    with several (attention Q/K/V/O, recurrent gates) under
    ``f"{module}.{view}"``. Weight-bearing modules left out are listed in
    :attr:`skipped` with the reason, and building the state warns once when
    there are any (:meth:`coverage` gives the share of weights tracked).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> state = SpectralState(model, k=2)
        >>> state.names
        ['0', '2']
        >>> state.sigma("0").backward()  # gradient u vᵀ lands on model[0].weight
    """

    def __init__(
        self,
        model: nn.Module,
        k: int = 1,
        layers: Sequence[str] | None = None,
        view: str = "matrix",
        input_shape: Sequence[int] | None = None,
        example_input: torch.Tensor | None = None,
        input_shapes: dict[str, Sequence[int]] | None = None,
        fold_bn: bool = True,
        on_nonfinite: str = "raise",
        backend: str = "auto",
        init_iter: int = 10,
        seed: int = 0,
        stack_max_numel: int | None = None,
        attention: str = "projections",
        refine_tol: float = 1e-3,
        refine_budget: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected model to be an nn.Module, but got {type(model).__name__}")
        positive_int(k, "k")
        nonnegative_int(init_iter, "init_iter")
        if view not in ("matrix", "operator"):
            raise ValueError(f"Expected view to be 'matrix' or 'operator', but got view={view!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Expected on_nonfinite to be 'raise' or 'skip', but got on_nonfinite={on_nonfinite!r}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"Expected backend to be 'auto', 'torch' or 'triton', but got backend={backend!r}")
        refine_tol = nonnegative_float(refine_tol, "refine_tol")
        refine_budget = nonnegative_float(refine_budget, "refine_budget")
        # Kept outside the module tree: the state must not own (or save) the model.
        object.__setattr__(self, "_model", model)
        self.k = k
        self.view = view
        self.fold_bn = fold_bn
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        limit = None if stack_max_numel is None else nonnegative_int(stack_max_numel, "stack_max_numel")
        self._torch_backend = TorchBackend(limit)
        # Asked in order; the torch back-end computes every operator, so it comes last.
        self._backends: list[ProductBackend] = [self._torch_backend]
        if backend != "torch":
            self._backends.insert(0, FusedBackend(strict=backend == "triton"))
        self.aliases: dict[str, str] = {}
        # Per layer, what _check_layer last accepted (see _fingerprint).
        self._checked: dict[str, tuple] = {}

        self.options = ViewOptions(attention=attention)
        tracked = self._choose_layers(model, layers)
        self._input_shapes, example_input = self._shapes_for(model, tracked, input_shape, example_input, input_shapes)
        if fold_bn and any(sharded_operator(n, self._layers[n].spec) is not None for n in tracked):
            # Tracing for BatchNorm successors would run FSDP's forward hooks; folding is refused instead.
            refuse_bn_folding(model)
            self._bn = {}
        else:
            self._bn = find_bn_successors(model, self._layers, example_input) if fold_bn else {}
        self._names = tracked
        self._ops: dict[str, LinearOperator] = {n: self._build_operator(n) for n in tracked}
        self._sharded = ShardedBackend()

        gen = torch.Generator().manual_seed(seed)
        self.refine_tol, self.refine_budget = refine_tol, refine_budget
        self.layer_iterations = 0
        self._pending_residuals: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._last_plan: dict[str, int] = {}
        self.layers = nn.ModuleDict()
        for name in tracked:
            op = self._ops[name]
            m, n = op.shape
            self.layers[_key(name)] = _LayerBuffers(m, n, min(k, m, n), op.dtype, op.device, gen)
            if isinstance(op, ShardedView):
                op.shard_buffers(self.layers[_key(name)])
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._cache_version = None
        # Layers iterated as W/c (their σ₁ far from 1; see _iterate), decided after each step.
        self._scaled: set[str] = set()
        if init_iter:
            self.step(init_iter)
            self.steps.zero_()
            self.layer_iterations = 0

    def _choose_layers(self, model: nn.Module, layers: Sequence[str] | None) -> list[str]:
        """Find the tracked layers (``self._layers``, ``self.aliases``) and record what is left out (``skipped``)."""
        catalog = find_layers(model, self.options)
        by_name = {layer.name: layer for layer in catalog.layers}
        #: weight-bearing modules (or operators) left out, ``{name: reason}``, over the whole model
        self.skipped: dict[str, str] = dict(catalog.skipped)
        if layers is not None:
            chosen = self._resolve(model, catalog, layers)
        else:
            chosen = []
            for layer in catalog.layers:
                problem = layer_problem(layer)
                if problem is not None:
                    self.skipped[layer.name] = problem
                elif not layer.kind.penalize:
                    # Metrics-only kinds (Embedding) are tracked only when named in layers=.
                    self.skipped[layer.name] = layer.kind.exclusion_reason
                else:
                    chosen.append(layer.name)
        chosen_set = set(chosen)
        for alias, target in catalog.aliases.items():
            if target in chosen_set:
                self.aliases[alias] = target
            elif layers is None:
                self.skipped[alias] = f"shares its weight with {target!r}, which is not tracked"
        if not chosen:
            raise ValueError("The model has no layer the spectral state can track (registered kinds are listed by "
                             f"robustcompress.layers.layer_kinds()); skipped: {self.skipped}")
        if self.skipped:
            listed = "; ".join(f"{n or '(root)'}: {why}" for n, why in self.skipped.items())
            warnings.warn(f"SpectralState leaves out {len(self.skipped)} weight-bearing module(s) or operator(s) of "
                          f"{type(model).__name__} (state.coverage() gives the share tracked): {listed}",
                          UserWarning, stacklevel=3)
        self._layers: dict[str, Layer] = {n: by_name[n] for n in chosen}
        return list(chosen)

    def _shapes_for(self, model: nn.Module, tracked: list[str], input_shape, example_input, input_shapes
                    ) -> tuple[dict[str, tuple[int, ...]], torch.Tensor | None]:
        """Convolution input shapes for the operator view, and the example input BatchNorm discovery traces."""
        shapes: dict[str, tuple[int, ...]] = {}
        if example_input is None and input_shape is not None:
            p = next(model.parameters())
            example_input = torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype)
        conv_modules = sorted({self._layers[n].module_name for n in tracked
                               if getattr(self._layers[n].spec, "conv", None) is not None})
        if self.view == "operator" and conv_modules:
            if input_shapes is not None:
                shapes = {n: tuple(s) for n, s in input_shapes.items()}
            elif example_input is not None:
                shapes = record_input_shapes(model, example_input, conv_modules)
        return shapes, example_input

    # ------------------------------------------------------------------ access
    @property
    def stack_max_numel(self) -> int | None:
        """Torch back-end: the largest layer (in weights) stacked into a batched product."""
        return self._torch_backend.stack_max_numel

    @property
    def model(self) -> nn.Module:
        """The model this state tracks (not a submodule of the state)."""
        return self._model

    @property
    def names(self) -> list[str]:
        """Tracked layer names, in module order."""
        return list(self._names)

    @property
    def head_name(self) -> str | None:
        """The classifier head's module name: the last module whose layer kind can be a head (tracked or not)."""
        return registry_head_name(self._model)

    def layer(self, name: str) -> Layer:
        """The registry's record of the tracked operator ``name`` (module, kind, view, parameters)."""
        self._buf(name)
        return self._layers[self.aliases.get(name, name)]

    def is_frozen(self, name: str) -> bool:
        """True when every stored tensor the operator of ``name`` reads has ``requires_grad=False``."""
        return not any(t.requires_grad for t in self.operator_tensors(name))

    def operator_tensors(self, name: str) -> list[torch.Tensor]:
        """The stored tensors the operator of ``name`` reads (gradients of its σ land on these)."""
        return self.layer(name).parameters

    def coverage(self) -> Coverage:
        """Tracked / skipped counts, frozen tracked layers and the share of weight elements tracked.

        Example:
            >>> import warnings
            >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
            >>> with warnings.catch_warnings():
            ...     warnings.simplefilter("ignore")
            ...     cov = SpectralState(model).coverage()
            >>> cov.tracked, cov.skipped, round(cov.share, 2)
            (1, 1, 0.29)
        """
        weights = {id(p): p.numel() for p in self._model.parameters() if p.dim() >= 2}
        tracked = {id(t): t.numel() for n in self._names for t in self.operator_tensors(n) if id(t) in weights}
        frozen = [n for n in self._names if self.is_frozen(n)]
        return Coverage(len(self._names), len(self.skipped), frozen, sum(tracked.values()), sum(weights.values()))

    def _resolve(self, model: nn.Module, catalog: LayerCatalog, layers: Sequence[str]) -> list[str]:
        """Explicit ``layers=``: operator names, aliases or module names, in module order."""
        if isinstance(layers, str):
            raise TypeError("Expected layers to be a sequence of layer names, but got a single string; wrap it in a list")
        names = list(layers)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"Expected layer names to be strings, but got layers={layers!r}")
        by_module: dict[str, list[str]] = {}
        for layer in catalog.layers:
            by_module.setdefault(layer.module_name, []).append(layer.name)
        for alias, target in catalog.aliases.items():
            by_module.setdefault(alias, [target])
        known = set(catalog.names())
        modules = dict(model.named_modules(remove_duplicate=False))
        wanted: set[str] = set()
        for n in names:
            if n in known:
                wanted.add(n)
            elif n in catalog.aliases:
                wanted.add(catalog.aliases[n])
            elif n in by_module:
                wanted.update(by_module[n])
            elif n in modules:
                why = catalog.skipped.get(n) or "it holds no weight of its own"
                raise ValueError(f"Layer {n!r} ({type(modules[n]).__name__}) cannot be tracked: {why}")
            else:
                raise ValueError(f"Unknown layer names {[x for x in names if x not in known and x not in modules]}; "
                                 f"layers of this model: {catalog.names()}")
        chosen = [layer.name for layer in catalog.layers if layer.name in wanted]
        for n in chosen:
            problem = layer_problem(catalog[n])
            if problem is not None:
                raise ValueError(f"Layer {n!r} ({type(catalog[n].module).__name__}) cannot be tracked: {problem}")
        return chosen

    def _build_operator(self, name: str) -> LinearOperator:
        layer = self._layers[name]
        spec = layer.spec
        sharded = sharded_operator(name, spec, self.view)  # a DTensor weight: iterated on its local shard
        if sharded is not None:
            if self._bn.get(name) is not None:
                raise ValueError(f"Layer {name!r}: folding a BatchNorm into a sharded weight is not supported yet; "
                                 "pass fold_bn=False")
            return sharded
        bn = self._bn.get(name)
        if bn is not None:
            spec = with_row_scale(spec, lambda bn=bn: batchnorm_scale(bn))
        return operator_from_spec(spec, self.view, self._input_shapes.get(layer.module_name))

    def _buf(self, name: str) -> _LayerBuffers:
        if name in self.aliases:
            name = self.aliases[name]
        if name not in self._ops:
            raise KeyError(f"Layer {name!r} is not tracked by this SpectralState; tracked: {self._names}")
        return self.layers[_key(name)]

    def module(self, name: str) -> nn.Module:
        """The module the tracked operator ``name`` belongs to."""
        return self.layer(name).module

    def operator(self, name: str) -> LinearOperator:
        """The operator iterated for ``name`` (BN-folded where applicable)."""
        self._buf(name)
        return self._ops[self.aliases.get(name, name)]

    def matrix_operator(self, name: str) -> LinearOperator:
        """The (BN-folded) matrix view of ``name``: :meth:`operator` in the matrix view, built anew in the operator view."""
        op = self.operator(name)
        if self.view == "matrix":
            return op
        layer = self.layer(name)
        spec = layer.spec
        bn = self.folded_bn(name)
        if bn is not None:
            spec = with_row_scale(spec, lambda: batchnorm_scale(bn))
        return operator_from_spec(spec, "matrix")

    def input_shape(self, name: str) -> tuple[int, ...] | None:
        """The recorded input shape of a layer (operator view), else None."""
        if name in self._layers or name in self.aliases:
            return self._input_shapes.get(self.layer(name).module_name)
        return self._input_shapes.get(name)

    def folded_bn(self, name: str) -> nn.Module | None:
        """The BatchNorm folded into ``name``'s operator, if any."""
        return self._bn.get(self.aliases.get(name, name))

    def k_of(self, name: str) -> int:
        """Directions tracked for ``name`` (``min(k, m, n)``)."""
        return self._buf(name).S.numel()

    def sigmas(self, name: str) -> torch.Tensor:
        """Ritz estimates ``σ₁ ≥ … ≥ σ_k`` (detached): lower bounds of the true singular values."""
        return self._buf(name).S.detach().clone()

    def vectors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, V)``: left (``m × k``) and right (``n × k``) singular vector estimates, detached.

        For a layer sharded by FSDP2 (``DTensor``) the sharded block is a
        ``DTensor`` too, and for a slice that straddles the ranks (packed Q/K/V
        rows) it spans the weight's whole sharded axis, zero outside the slice
        (see :mod:`robustcompress.spectral.sharded`): ``L × k``, not ``m × k``.
        """
        b = self._buf(name)
        return b.U.detach().clone(), b.V.detach().clone()

    def sigma(self, name: str) -> torch.Tensor:
        """``σ₁ ≈ uᵀ W v`` with ``u, v`` detached: differentiable, gradient ``u vᵀ``.

        Always ≤ the true σ₁ (for unit u, v); equal at convergence.

        Raises:
            ValueError: the layer left the model or changed shape since the state was built.
        """
        b = self._buf(name)
        self._check_layer(self.aliases.get(name, name))
        op = self._ops[self.aliases.get(name, name)]
        if isinstance(op, ShardedView):
            return op.sigmas_expr(b, 1)[0]
        u, v = b.U[:, :1].detach(), b.V[:, :1].detach()
        return (u * op.matvec(v)).sum()

    def top_sigmas(self, name: str) -> torch.Tensor:
        """Differentiable ``σ_j ≈ u_jᵀ W v_j`` for all k tracked directions (checked as :meth:`sigma`)."""
        b = self._buf(name)
        self._check_layer(self.aliases.get(name, name))
        op = self._ops[self.aliases.get(name, name)]
        if isinstance(op, ShardedView):
            return op.sigmas_expr(b, b.S.numel())
        return (b.U.detach() * op.matvec(b.V.detach())).sum(0)

    def frobenius(self, name: str) -> torch.Tensor:
        """``‖W‖_F`` of the iterated operator (differentiable)."""
        b = self._buf(name)
        op = self._ops[self.aliases.get(name, name)]
        return op.frobenius_expr(b) if isinstance(op, ShardedView) else op.frobenius()

    # ------------------------------------------------------------------ iteration
    def _check_shapes(self) -> None:
        for name in self._names:
            self._check_layer(name)

    def _check_layer(self, name: str) -> None:
        """The layer is still in the model, with the shape its vectors have (replaced modules re-described)."""
        layer = self._layers[name]
        try:
            module = self._model.get_submodule(layer.module_name)
        except AttributeError:
            raise ValueError(f"Layer {name!r} is no longer in the model; build a new SpectralState") from None
        buf = self.layers[_key(name)]
        seen = self._checked.get(name)
        if seen is not None and module is layer.module and seen == _fingerprint(layer, buf):
            return  # nothing the checks below read has changed since they last passed
        if module is not layer.module:
            # The module was replaced (e.g. by pruning): describe the new one with the same view.
            views = {v.name: v for v in layer_views(module, self.options)}
            if layer.view.name not in views:
                raise ValueError(f"Layer {name!r} was replaced by a {type(module).__name__} without the operator "
                                 f"{layer.view.name or 'of the old layer'}; build a new SpectralState")
            self._layers[name] = Layer(name, layer.module_name, module, layer_kind(module), views[layer.view.name])
            self._ops[name] = self._build_operator(name)
        elif not isinstance(self._ops[name], ShardedView) and sharded_operator(name, layer.spec) is not None:
            self._ops[name] = self._build_operator(name)  # the model was sharded after the state was built
        op = self._ops[name]
        # A sharded block spans the weight's whole sharded axis (see ShardedView).
        m, n = op.buffer_shape if isinstance(op, ShardedView) else op.shape
        if isinstance(op, ShardedView):
            # Warm vectors drawn for the full operator are sliced to this rank's rows (once).
            op.shard_buffers(buf)
        if buf.V.device != op.device or buf.V.dtype != op.dtype:
            # The model moved (model.cuda(), model.double()): the warm vectors follow it.
            buf.to(device=op.device, dtype=op.dtype)
        if buf.U.shape[0] != m or buf.V.shape[0] != n:
            raise ValueError(
                f"Layer {name!r} changed shape since the SpectralState was built: operator was "
                f"{buf.U.shape[0]}×{buf.V.shape[0]}, now {m}×{n}. Build a new SpectralState.")
        self._checked[name] = _fingerprint(self._layers[name], buf)

    def _products(self, names: list[str], scales: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``U₀ = (W/c) V`` and ``Y = (W/c)ᵀ U₀`` for every layer, each back-end taking the layers it computes.

        The products are those of the operator divided by its scale ``c``
        (:meth:`_scales`): the back-ends multiply ``V/c`` and ``Y`` is divided
        by ``c`` once more, so no intermediate holds ``σ²`` of the raw weights.
        """
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rest = {n: self._ops[n] for n in names}
        vs = {n: self.layers[_key(n)].V for n in names}
        scaled = [n for n in names if n in scales]  # the others: c = 1
        if scaled:
            vs.update(zip(scaled, torch._foreach_div([vs[n] for n in scaled], [scales[n] for n in scaled])))
        for backend in self._backends:
            if not rest:
                break
            done = backend.products(rest, {n: vs[n] for n in rest})
            out.update(done)
            rest = {n: op for n, op in rest.items() if n not in done}
        if scaled:
            ys = torch._foreach_div([out[n][1] for n in scaled], [scales[n] for n in scaled])
            out.update({n: (out[n][0], y) for n, y in zip(scaled, ys)})
        return out

    def _scales(self, names: list[str], ref: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per layer a power of two ``c ≈ σ₁`` the iteration divides the operator by.

        Weights of any finite magnitude then give products of order one: the
        raw ``Y = WᵀW V`` of weights of order 1e30 overflows float32 (1e60) and
        that of weights of order 1e-20 is subnormal (1e-40), which stalls the
        iteration. ``c`` is the last estimate ``σ₁`` rounded up to a power of
        two (so dividing and multiplying back are exact), or that of ``ref``
        (one value per layer, e.g. the largest entry of ``W V``); 1 where
        neither is a positive finite number. Computed on the device, without
        a host synchronisation.
        """
        bufs = [self.layers[_key(n)] for n in names]
        if ref is None:
            ref = torch.stack(torch._foreach_max([b.S for b in bufs]))  # S is sorted: its max is σ₁
        ref = ref if ref.dtype == torch.float64 else ref.float()
        # c and 1/c must be normal numbers of each layer's own dtype (float16: 2^-13 … 2^14).
        dtypes = {b.S.dtype for b in bufs}
        e = torch.frexp(ref).exponent
        if len(dtypes) == 1:
            e = e.clamp(*_exponent_range(bufs[0].S.dtype))
        else:
            lo, hi = zip(*(_exponent_range(b.S.dtype) for b in bufs))
            e = torch.minimum(torch.maximum(e, e.new_tensor(lo)), e.new_tensor(hi))
        c = torch.where(torch.isfinite(ref) & (ref > 0), torch.ldexp(torch.ones_like(ref), e), torch.ones_like(ref))
        return {n: ci if ci.dtype == b.S.dtype else ci.to(b.S.dtype) for n, b, ci in zip(names, bufs, c.unbind(0))}

    def _iterate(self, names: list[str], scales: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One iteration on ``names`` (on ``W/c``, scaled back); returns their finiteness flags (one bool per name)."""
        sharded = {n: self._ops[n] for n in names if isinstance(self._ops[n], ShardedView)}
        flags = {}
        if sharded:
            # Sharded layers: one all-reduce for all of them, the update from reduced values.
            flags.update(self._sharded.step(sharded, {n: self.layers[_key(n)] for n in sharded}))
        names_all, names = names, [n for n in names if n not in sharded]
        if scales is None:
            # Only layers whose σ₁ left the band where W's own products are
            # safe (see _in_band) are scaled; the others take c = 1, for free.
            scaled = [n for n in names if n in self._scaled]
            scales = self._scales(scaled) if scaled else {}
        products = self._products(names, scales)
        # The updates see the scaled operator: its estimates (and any other
        # per-layer values the buffers keep besides U, V) are divided by c
        # before and multiplied back after — exactly, c being a power of two.
        values, per_value = [], []
        for n in scales:
            for key, t in self.layers[_key(n)]._buffers.items():
                if key not in ("U", "V") and t is not None:
                    values.append(t)
                    per_value.append(scales[n])
        if values:
            torch._foreach_div_(values, per_value)
        by_k: dict[tuple, list[str]] = {}
        for name in names:
            u0 = products[name][0]
            by_k.setdefault((u0.shape[1], str(u0.device), u0.dtype), []).append(name)
        for (k, _, _), members in by_k.items():
            update = self._power_update if k == 1 else self._ritz_update
            flags.update(update(members, products))
        if values:
            torch._foreach_mul_(values, per_value)
        return torch.stack([flags[n].to(self.steps.device) for n in names_all])

    def _in_band(self, name: str, sigma: float) -> bool:
        """Whether ``σ₁ = sigma`` lets the layer's raw products ``W V``, ``WᵀW V`` stay normal numbers.

        The band is a quarter of the dtype's exponent range each way
        (float32: 2^±31, float16: 2^±3), leaving ``σ²`` and the row sums room.
        """
        lo, hi = _exponent_range(self.layers[_key(name)].S.dtype)
        e = math.frexp(sigma)[1]
        return lo // 4 <= e <= hi // 4

    def _rescue(self, names: list[str], n_iter: int) -> list[str]:
        """Rerun, at a probed scale, layers whose products were non-finite or whose estimate is 0.

        A scale taken from a stale estimate (the weights grew or shrank by
        orders of magnitude since, or there is no estimate yet) can make the
        products overflow or underflow; finite weights are then not to blame.
        Layers whose probe ``W V`` is 0 (zero weights) are left as they are.

        Returns:
            The layers whose weights hold NaN/Inf.

        Raises:
            ValueError: finite weights whose products are not representable
                even at the probed scale, naming the layers and their dtype.
        """
        finite = [n for n in names if all(bool(torch.isfinite(t).all()) for t in self.operator_tensors(n))]
        redo, probes = [], []
        for n in finite:
            # The largest entry of W V: no squares, so representable whenever the weights are.
            p = self._ops[n].matvec(self.layers[_key(n)].V).abs().amax()
            if not float(p) == 0:
                redo.append(n)
                probes.append(p.to(self.steps.device, torch.float64))
        if redo:
            scales = self._scales(redo, torch.stack(probes))
            ok = torch.ones(len(redo), dtype=torch.bool, device=self.steps.device)
            for _ in range(n_iter):
                ok &= self._iterate(redo, scales)
                scales = self._scales(redo)
            lost = [n for n, good in zip(redo, ok.tolist()) if not good]
            if lost:
                dtypes = sorted({str(self._ops[n].dtype) for n in lost})
                raise ValueError(f"The weights of layer(s) {lost} are finite but out of the range the spectral "
                                 f"state can represent in {', '.join(dtypes)} (their products overflow even "
                                 "after scaling); rescale the weights or use float64")
        return [n for n in names if n not in finite]

    @torch.no_grad()
    def step(self, n_iter: int = 1) -> None:
        """Run ``n_iter`` warm subspace iterations on every tracked layer, then the refinement budget.

        With ``refine_budget > 0``, up to ``⌊refine_budget · layers⌋`` extra
        layer-iterations go to the layers whose relative residual
        ``ρ_1/s_1`` (:meth:`residual_interval`) exceeded ``refine_tol`` at the
        *previous* step, worst first, round-robin. Deciding from the previous
        step's residuals adds no host synchronisation on CUDA (they are copied
        to the host asynchronously at the end of each step), and inside a CUDA
        graph capture the last plan is reused, so the work stays fixed.

        Non-finite values are kept out of the buffers. On CUDA each iteration
        synchronises with the host once or twice (k = 1: to choose the
        list-wide update; k > 1: CholeskyQR2's QR fallback), and the check
        that raises or warns once per call.

        A layer whose ``σ₁`` is far from 1 (outside ``2^±31`` in float32) is
        iterated as ``W/c`` with ``c`` a power of two near its last estimate,
        so finite weights of any magnitude (1e30 or 1e-20 in float32) neither
        overflow nor stall; a layer whose products
        still come out non-finite (or its estimate 0) with finite weights is
        rerun at a scale probed from ``W V`` — weights are blamed only when
        they do hold NaN/Inf.

        Raises:
            ValueError: a weight holds NaN/Inf (``on_nonfinite="raise"``), a
                layer's finite weights are beyond what its dtype can iterate, or a
                layer's shape changed (or it left the model) since the state was built.
        """
        positive_int(n_iter, "n_iter")
        self._check_shapes()
        plan = self._refine_plan()
        finite_flags: list[torch.Tensor] = []
        for _ in range(n_iter):
            finite_flags.append(self._iterate(self._names))
            self.steps += 1
        for r in range(max(plan.values(), default=0)):
            members = [n for n in self._names if plan.get(n, 0) > r]
            flags = dict(zip(members, self._iterate(members).unbind(0)))
            finite_flags.append(torch.stack([flags.get(n, torch.ones((), dtype=torch.bool, device=self.steps.device))
                                             for n in self._names]))
        #: layer-iterations run so far (base iterations plus refinement), for cost accounting
        self.layer_iterations += n_iter * len(self._names) + sum(plan.values())
        ok_t = torch.stack(finite_flags).all(0)
        s0 = torch.stack(torch._foreach_max([self.layers[_key(n)].S for n in self._names])).to(ok_t.device)
        ok, top = torch.stack([ok_t.to(torch.float64), s0.to(torch.float64)]).tolist()
        bad = [n for n, good in zip(self._names, ok) if not good]
        # Sharded layers are iterated on reduced blocks by their back-end and never rescaled here.
        local = [not isinstance(self._ops[n], ShardedView) for n in self._names]
        unknown = [n for n, good, s, lc in zip(self._names, ok, top, local) if lc and good and not s > 0]
        outside = {n for n, s, lc in zip(self._names, top, local) if lc and s > 0 and not self._in_band(n, s)}
        # Iterated unscaled this step although their σ₁ is outside the band:
        # their products may have lost precision; rerun them scaled.
        new = [n for n in outside if n not in self._scaled and n not in bad]
        self._scaled = outside
        # A sharded layer has no global product to probe a scale with: its bad products are reported as they are.
        bad_sharded = [n for n, lc in zip(self._names, local) if not lc and n in bad]
        bad = [n for n in bad if n not in bad_sharded]
        if bad or unknown or new:
            # Finite weights whose products overflowed or underflowed at the
            # last estimate's scale are rerun at a probed scale, not blamed.
            nonfinite = self._rescue(bad + unknown + new, n_iter)
            self._scaled |= {n for n in bad + unknown + new if n not in nonfinite}
            bad = [n for n in nonfinite if n in bad]
        bad += bad_sharded
        self._snapshot_residuals()
        if bad:
            msg = (f"Non-finite values (NaN/Inf) in the weights of layer(s) {bad}; "
                   "their spectral state was left unchanged")
            if self.on_nonfinite == "raise":
                raise ValueError(msg + " (pass on_nonfinite='skip' to warn instead)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _relative_residuals(self) -> torch.Tensor:
        # Sharded layers are never refined: an extra iteration would be an extra
        # collective on every rank (their residuals are kept all the same).
        # A zero (or skipped non-finite) layer has no residual to reduce (C = 0, R = inf):
        # it is not refined either, or it would take budget every step and never converge.
        tops = [torch.zeros(1) if isinstance(self._ops[n], ShardedView) else
                torch.where((b.C[:1] > 0) & torch.isfinite(b.R[:1]),
                            b.R[:1] / b.C[:1].clamp_min(torch.finfo(b.C.dtype).tiny), 0.0).float()
                for n, b in ((n, self.layers[_key(n)]) for n in self._names)]
        return torch.cat([t.to(self.steps.device) for t in tops])

    def _snapshot_residuals(self) -> None:
        if not self.refine_budget:
            return
        rel = self._relative_residuals()
        if rel.device.type == "cuda":
            host = torch.empty(rel.shape, dtype=rel.dtype, pin_memory=True)
            host.copy_(rel, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending_residuals = (host, event)
        else:
            self._pending_residuals = (rel.clone(), None)

    def _refine_plan(self) -> dict[str, int]:
        """``{layer: extra iterations}`` from the previous step's residuals (empty when refinement is off)."""
        budget = int(self.refine_budget * len(self._names))
        if budget == 0 or self._pending_residuals is None:
            return {}
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return self._last_plan
        host, event = self._pending_residuals
        if event is not None:
            event.synchronize()  # recorded a whole training step ago: already complete
        rel = host.tolist()
        if len(rel) != len(self._names):
            return {}
        worst = sorted((r, i) for i, r in enumerate(rel) if r > self.refine_tol)[::-1]
        plan: dict[str, int] = {}
        while worst and budget > 0:
            for _, i in worst[:budget]:
                plan[self._names[i]] = plan.get(self._names[i], 0) + 1
            budget -= min(budget, len(worst))
        self._last_plan = plan
        return plan

    def _power_update(self, members: list[str], products) -> dict[str, torch.Tensor]:
        """k = 1: u = W v / ‖W v‖, v ← WᵀW v / ‖WᵀW v‖, σ = uᵀ W v_new = ‖WᵀW v‖ / ‖W v‖.

        That σ is exactly what :meth:`sigma` evaluates right after the step
        (so penalties can use it without another product) and lies between the
        Ritz value ``‖W v‖`` and the true σ₁ (Cauchy–Schwarz; ``u`` is a unit vector).
        The residual interval (:func:`~.iteration.power_step`) is kept for the pair
        ``(u, v_old)`` around the Ritz value.
        """
        bufs = [self.layers[_key(n)] for n in members]
        u0s = [products[n][0] for n in members]
        ys = [products[n][1] for n in members]
        # List-wide (foreach) operations inside power_step: the cost per layer is a few microseconds.
        s, yn, radius, ok = power_step(u0s, ys, [b.V for b in bufs])
        # The products are of W/c (c ≈ σ₁, see _scales), so s and yn are of
        # order one; 0 means a zero operator (or an underflow the scale fixes).
        live = ok & (s > 0) & (yn > 0)
        torch._foreach_copy_([b.C for b in bufs], list(torch.where(ok, s, torch.zeros_like(s)).reshape(-1, 1).unbind(0)))
        torch._foreach_copy_([b.R for b in bufs], list(radius.reshape(-1, 1).unbind(0)))
        if bool(live.all()):
            norms = torch.cat([s, yn]).tolist()
            torch._foreach_copy_([b.U for b in bufs], torch._foreach_div(u0s, norms[: len(bufs)]))
            torch._foreach_copy_([b.V for b in bufs], torch._foreach_div(ys, norms[len(bufs):]))
            torch._foreach_copy_([b.S for b in bufs], list((yn / s).reshape(-1, 1).unbind(0)))
            return dict(zip(members, ok.unbind(0)))
        flags = {}
        s_safe, yn_safe = torch.where(live, s, torch.ones_like(s)), torch.where(live, yn, torch.ones_like(yn))
        for i, (name, buf) in enumerate(zip(members, bufs)):
            # σ = 0 (a zero matrix) has no singular vectors, and non-finite
            # weights none worth keeping: keep the previous ones.
            buf.U.copy_(torch.where(live[i], u0s[i] / s_safe[i], buf.U))
            buf.V.copy_(torch.where(live[i], ys[i] / yn_safe[i], buf.V))
            buf.S.copy_(torch.where(live[i], yn[i] / s_safe[i], torch.where(ok[i], s[i], buf.S[0])).reshape(1))
            flags[name] = ok[i]
        return flags

    def _ritz_update(self, members: list[str], products) -> dict[str, torch.Tensor]:
        """k > 1: Rayleigh–Ritz on span(V) (:func:`~.iteration.ritz_step`), one layer at a time."""
        flags = {}
        for name in members:
            buf = self.layers[_key(name)]
            u0, y = products[name]
            res = ritz_step(u0, y, buf.V)
            # Directions with σ ≈ 0 carry no singular vectors: keep the previous ones.
            live = torch.isfinite(res.radius) & res.ok
            buf.U.copy_(torch.where(live[None, :], res.u, buf.U))
            buf.V.copy_(torch.where(res.ok, res.v, buf.V))
            buf.S.copy_(torch.where(res.ok, res.sigma, buf.S))
            buf.C.copy_(torch.where(res.ok, res.sigma, torch.zeros_like(res.sigma)))
            buf.R.copy_(res.radius)
            flags[name] = res.ok
        return flags

    # ------------------------------------------------------------------ error of the estimates
    def residual_interval(self, name: str) -> torch.Tensor:
        """Intervals ``[s_j − ρ_j, s_j + ρ_j]`` (``k × 2``), each holding some singular value.

        For the Ritz pair ``(u_j, v_j)`` of the last iteration with value
        ``s_j = u_jᵀ W v_j``, the residual ``r_j = [W v_j − s_j u_j; Wᵀu_j − s_j v_j]``
        gives ``ρ_j = ‖r_j‖/√2`` and some singular value of ``W`` (as it was at
        that iteration; or 0 when ``W`` is not square) within ``ρ_j`` of ``s_j`` — the residual bound for the
        symmetric dilation ``[[0, W], [Wᵀ, 0]]``. It does not say which one: a
        converged non-top pair has ``ρ ≈ 0`` too, so a swap of the top
        direction is caught only with ``k ≥ 2`` (compare ``s_2`` with ``s_1``).
        ``inf`` before the first iteration and for directions with ``s ≈ 0``.

        Example:
            >>> model = nn.Sequential(nn.Linear(5, 5))
            >>> state = SpectralState(model, init_iter=3)
            >>> lo, hi = state.residual_interval("0")[0].tolist()
            >>> true = torch.linalg.svdvals(model[0].weight.detach().double())
            >>> bool(((true >= lo - 1e-6) & (true <= hi + 1e-6)).any())
            True
        """
        b = self._buf(name)
        return torch.stack([b.C - b.R, b.C + b.R], dim=-1).detach().clone()

    def relative_residual(self, name: str) -> float:
        """``ρ_1 / s_1`` of the top direction at the last iteration (``inf`` when unknown)."""
        b = self._buf(name)
        c, r = float(b.C[0]), float(b.R[0])
        return r / c if c > 0 else math.inf

    @torch.no_grad()
    def sigma1_bounds(self, name: str, gram_iter: int = 0) -> tuple[float, float]:
        """Lower and upper bounds of σ₁ of the layer's operator as it is now.

        Lower: the top Ritz value ``θ_1`` of ``W`` on the warm subspace ``V``
        (one product). Upper: ``√(‖W‖_F² − Σ_{j=2..k} θ_j²)``, valid because Ritz
        values interlace (``θ_j ≤ σ_j``), so the subtracted energy never exceeds
        ``Σ_{j≥2} σ_j²``. With ``gram_iter > 0`` the upper bound is also capped
        by Gram iteration on the materialised operator (tighter, costs ``O(mn·min(m,n))``).
        Sharded (``DTensor``) layers: from the last step's reduced values, without
        communication (``ShardedView.sigma1_bounds`` in :mod:`robustcompress.spectral.sharded`).

        Args:
            name: a tracked layer.
            gram_iter: Gram-iteration steps for the upper bound (0: off).

        Returns:
            ``(lower, upper)`` floats, ``lower ≤ σ₁ ≤ upper`` up to rounding.

        Example:
            >>> model = nn.Sequential(nn.Linear(8, 5))
            >>> state = SpectralState(model, k=2)
            >>> lo, hi = state.sigma1_bounds("0")
            >>> s1 = float(torch.linalg.svdvals(model[0].weight.detach().double())[0])
            >>> lo <= s1 * (1 + 1e-6) and s1 <= hi * (1 + 1e-6)
            True
        """
        nonnegative_int(gram_iter, "gram_iter")
        b = self._buf(name)
        op = self._ops[self.aliases.get(name, name)]
        if isinstance(op, ShardedView):
            if gram_iter:
                raise ValueError(f"Layer {name!r} is sharded (DTensor): gram_iter > 0 would materialise its "
                                 "weight; pass gram_iter=0")
            return op.sigma1_bounds(b)  # from the last step's reduced values, identical on every rank
        u0 = op.matvec(b.V).double()
        theta = torch.linalg.eigvalsh(u0.T @ u0).flip(-1).clamp_min(0).sqrt()
        fro2 = float(op.frobenius().double()) ** 2
        upper = math.sqrt(max(fro2 - float((theta[1:] ** 2).sum()), float(theta[0]) ** 2))
        if gram_iter:
            upper = min(upper, float(gram_upper_bound(op.matrix(), gram_iter)))
        return float(theta[0]), upper

    # ------------------------------------------------------------------ saving and loading
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Checked before any buffer of this state is copied: a NaN in a saved
        # vector would otherwise enter the iteration and be blamed on the weights.
        self.check_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def check_state_dict(self, state_dict: dict, prefix: str = "") -> None:
        """Check saved warm vectors before loading them; nothing is loaded.

        :meth:`load_state_dict` runs this first, so a corrupt checkpoint
        changes nothing; a wrapper that loads several objects can run it
        before loading any of them. Missing keys and shapes are left to
        torch's own checks.

        Args:
            state_dict: as saved by :meth:`state_dict` (under ``prefix``).
            prefix: the state's key prefix inside a larger state dict.

        Raises:
            ValueError: naming the layer and buffer, when a saved ``V``, ``U`` or
                ``S`` holds NaN/Inf, ``S`` is negative, ``V``'s columns are not
                orthonormal, or ``steps`` is not a non-negative integer.

        Example:
            >>> state = SpectralState(nn.Sequential(nn.Linear(4, 3)))
            >>> saved = state.state_dict()
            >>> saved["layers.0.V"][0] = float("nan")
            >>> state.check_state_dict(saved)
            Traceback (most recent call last):
                ...
            ValueError: Cannot load the SpectralState: buffer 'layers.0.V' of layer '0' holds non-finite values (NaN/Inf)
        """
        steps = state_dict.get(prefix + "steps")
        if isinstance(steps, torch.Tensor) and (steps.is_floating_point() or bool((steps < 0).any())):
            raise ValueError(f"Cannot load the SpectralState: buffer {prefix}steps must be a non-negative integer, "
                             f"got {steps!r}")
        for name in self._names:
            for buf in ("V", "U", "S"):
                key = f"{prefix}layers.{_key(name)}.{buf}"
                t = state_dict.get(key)
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    continue  # missing, or not a tensor: torch's own checks report it
                where = f"Cannot load the SpectralState: buffer {key!r} of layer {name!r}"
                sharded = hasattr(t, "to_local")  # a DTensor (FSDP2): check this rank's block only
                t = t.to_local() if sharded else t
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where} holds non-finite values (NaN/Inf)")
                if buf == "S" and bool((t < 0).any()):
                    raise ValueError(f"{where} holds negative singular value estimates {t.tolist()}")
                if buf == "V" and t.dim() == 2 and not sharded:
                    gram = t.double().T @ t.double()
                    err = float((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).abs().max())
                    if err > max(1e-3, 8 * torch.finfo(t.dtype).eps):
                        raise ValueError(f"{where} does not hold orthonormal columns (max |VᵀV − I| = {err:.3g})")

    def extra_repr(self) -> str:
        return f"layers={len(self._names)}, k={self.k}, view={self.view!r}, fold_bn={self.fold_bn}"
