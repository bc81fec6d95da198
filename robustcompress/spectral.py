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
    >>> model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    >>> state = SpectralState(model, k=2)
    >>> state.step(50)
    >>> exact = torch.linalg.svdvals(model[0].weight.double())[:2]
    >>> torch.allclose(state.sigmas("0").double(), exact, rtol=1e-4)
    True
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ._checks import positive_int, nonnegative_int
from .layers import LowRankConv2d, LowRankLinear

__all__ = [
    "LinearOperator",
    "MatrixView",
    "LowRankView",
    "FunctionOperator",
    "matrix_view",
    "conv_operator",
    "operator_for",
    "record_input_shapes",
    "cholesky_qr2",
    "SpectralState",
    "SUPPORTED_LAYERS",
    "unsupported_reason",
]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, LowRankLinear, LowRankConv2d)

# Default of SpectralState(stack_max_numel=...) on CUDA: without the fused
# kernel, layers up to this many weights are stacked into one bmm per shape group: there launch overhead dominates small
# layers. Larger ones are multiplied in place, since stacking copies every
# weight once more per step. On CPU stacking never paid (measured on ResNet-18
# and a 30-layer MLP of 64×64 layers: equal or slower), so CPU layers are
# multiplied in place.
BATCH_MAX_NUMEL = 1 << 18

# Modules that carry weights but have no operator view here yet: refused by name.
_REFUSED = {
    nn.Conv3d: "Conv3d is not supported yet",
    nn.ConvTranspose1d: "ConvTranspose layers are not supported yet",
    nn.ConvTranspose2d: "ConvTranspose layers are not supported yet",
    nn.ConvTranspose3d: "ConvTranspose layers are not supported yet",
    nn.Embedding: "Embedding is not supported (a lookup table, not an operator on the input)",
    nn.EmbeddingBag: "EmbeddingBag is not supported",
    nn.MultiheadAttention: "attention has no fixed linear operator; not supported",
    nn.Bilinear: "Bilinear is not a linear operator of its input; not supported",
}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision weights are iterated in float32: the Gram matrices of
    # subspace iteration lose everything in 8 or 11 mantissa bits.
    return torch.float64 if dtype == torch.float64 else torch.float32


class LinearOperator:
    """A linear map ``R^n → R^m`` given by products, with its adjoint.

    Subclasses implement :meth:`matvec` and :meth:`rmatvec`; both take and
    return column blocks (``n × k`` / ``m × k``) in the operator's compute dtype
    and are differentiable with respect to the layer's parameters.
    """

    shape: tuple[int, int]
    #: operators with equal, non-None keys can be stacked into one batched matrix product
    batch_key: tuple | None = None

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``W v`` for a block ``v`` of shape ``n × k``."""
        raise NotImplementedError

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """``Wᵀ u`` for a block ``u`` of shape ``m × k``."""
        raise NotImplementedError

    def matrix(self) -> torch.Tensor:
        """The dense ``m × n`` matrix, built column by column from :meth:`matvec`."""
        n = self.shape[1]
        eye = torch.eye(n, device=self.device, dtype=self.dtype)
        cols = [self.matvec(eye[:, i:i + 1024]) for i in range(0, n, 1024)]
        return torch.cat(cols, dim=1)

    def frobenius(self) -> torch.Tensor:
        """``‖W‖_F`` (differentiable)."""
        return torch.linalg.matrix_norm(self.matrix())

    def blocks(self) -> list[torch.Tensor]:
        """Matrices whose singular values, together, are the operator's."""
        return [self.matrix()]


class MatrixView(LinearOperator):
    """A weight seen as a matrix ``out × (in·k…)``, optionally row-scaled.

    Grouped convolutions are block diagonal: ``g`` blocks of
    ``(out/g) × (in/g·k…)``, whose singular values together are the operator's
    (so ``σ₁`` is the largest over the groups). A row scale ``s`` gives
    ``diag(s)·W`` (a layer folded with the eval-mode BatchNorm after it).
    """

    def __init__(self, weight: torch.Tensor, groups: int = 1, row_scale: Callable[[], torch.Tensor] | None = None):
        if weight.dim() < 2:
            raise ValueError(f"Expected a weight with at least 2 dimensions, but got shape {tuple(weight.shape)}")
        if weight.shape[0] % groups:
            raise ValueError(f"out features {weight.shape[0]} not divisible by groups={groups}")
        self.weight = weight
        self.groups = groups
        self.row_scale = row_scale
        m = weight.shape[0]
        n = groups * weight[0].numel()
        self.shape = (m, n)
        self.batch_key = ("matrix", m, n, str(weight.device), _compute_dtype(weight.dtype)) if groups == 1 else None

    @property
    def device(self):
        return self.weight.device

    @property
    def dtype(self):
        return _compute_dtype(self.weight.dtype)

    def _scale(self) -> torch.Tensor | None:
        return None if self.row_scale is None else self.row_scale().to(self.dtype)

    def _blocks_raw(self) -> torch.Tensor:
        """``g × (out/g) × (in/g·k…)`` unscaled blocks."""
        return rearrange(self.weight.to(self.dtype), "(g o) i ... -> g o (i ...)", g=self.groups)

    def matrix2d(self) -> torch.Tensor:
        """The row-scaled weight as ``out × (in/g·k…)`` (for ungrouped layers, the matrix)."""
        w = rearrange(self.weight.to(self.dtype), "o i ... -> o (i ...)")
        s = self._scale()
        return w if s is None else s[:, None] * w

    def matvec(self, v):
        # The row scale is applied to the product, never to W: diag(s)·W would
        # write a scaled copy of the weight on every call.
        if self.groups == 1:
            out = rearrange(self.weight.to(self.dtype), "o i ... -> o (i ...)") @ v
        else:
            vg = rearrange(v, "(g c) k -> g c k", g=self.groups)
            out = rearrange(torch.bmm(self._blocks_raw(), vg), "g o k -> (g o) k")
        s = self._scale()
        return out if s is None else s[:, None] * out

    def rmatvec(self, u):
        s = self._scale()
        if s is not None:
            u = s[:, None] * u
        if self.groups == 1:
            w = rearrange(self.weight.to(self.dtype), "o i ... -> o (i ...)")
            return w.T @ u
        ug = rearrange(u, "(g o) k -> g o k", g=self.groups)
        return rearrange(torch.bmm(self._blocks_raw().transpose(1, 2), ug), "g c k -> (g c) k")

    def blocks(self):
        b = self._blocks_raw()
        s = self._scale()
        if s is not None:
            b = rearrange(s, "(g o) -> g o 1", g=self.groups) * b
        return list(b.unbind(0))

    def matrix(self):
        return torch.block_diag(*self.blocks())

    def frobenius(self):
        return torch.linalg.vector_norm(self.matrix2d())


class LowRankView(LinearOperator):
    """The product ``diag(s)·B·A`` of a factorised layer, as one operator (matrix view)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, row_scale: Callable[[], torch.Tensor] | None = None):
        self.a = a  # r × n (or r × in × kh × kw)
        self.b = b  # m × r (or m × r × 1 × 1)
        self.row_scale = row_scale
        self.shape = (b.shape[0], a[0].numel())

    @property
    def device(self):
        return self.a.device

    @property
    def dtype(self):
        return _compute_dtype(self.a.dtype)

    def _factors(self):
        a = rearrange(self.a.to(self.dtype), "r ... -> r (...)")
        b = rearrange(self.b.to(self.dtype), "o r ... -> o (r ...)")
        return a, b

    def _scale(self):
        return None if self.row_scale is None else self.row_scale().to(self.dtype)

    def matvec(self, v):
        a, b = self._factors()
        out = b @ (a @ v)
        s = self._scale()
        return out if s is None else s[:, None] * out

    def rmatvec(self, u):
        a, b = self._factors()
        s = self._scale()
        if s is not None:
            u = s[:, None] * u
        return a.T @ (b.T @ u)

    def matrix(self):
        a, b = self._factors()
        s = self._scale()
        w = b @ a
        return w if s is None else s[:, None] * w

    def frobenius(self):
        # ‖BA‖_F² = tr((BᵀB)(AAᵀ)) without forming BA: r × r work.
        a, b = self._factors()
        s = self._scale()
        if s is not None:
            b = s[:, None] * b
        return ((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt()


class FunctionOperator(LinearOperator):
    """A linear layer applied at a fixed input size: the exact operator of a convolution.

    ``fn`` maps a batch ``N × input_shape`` to ``N × output_shape`` linearly
    (the layer without its bias, any padding mode); the adjoint is the
    vector–Jacobian product of ``fn`` (autograd), exact for every padding mode.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], input_shape: Sequence[int],
                 reference: torch.Tensor, channel_scale: Callable[[], torch.Tensor] | None = None,
                 frobenius_fn: Callable[[], torch.Tensor] | None = None):
        self.fn = fn
        self.input_shape = tuple(int(s) for s in input_shape)
        self.reference = reference
        self.channel_scale = channel_scale
        self._frobenius_fn = frobenius_fn
        with torch.no_grad():
            out = fn(torch.zeros((1, *self.input_shape), device=reference.device, dtype=self.dtype))
        self.output_shape = tuple(out.shape[1:])
        self.shape = (math.prod(self.output_shape), math.prod(self.input_shape))

    @property
    def device(self):
        return self.reference.device

    @property
    def dtype(self):
        return _compute_dtype(self.reference.dtype)

    def _apply(self, x):
        y = self.fn(x)
        if self.channel_scale is not None:
            s = self.channel_scale().to(self.dtype)
            y = y * s.reshape(1, -1, *([1] * (y.dim() - 2)))
        return y

    def matvec(self, v):
        x = rearrange(v, "n k -> k n").reshape(v.shape[1], *self.input_shape)
        return rearrange(self._apply(x).reshape(v.shape[1], -1), "k m -> m k")

    def rmatvec(self, u):
        k = u.shape[1]
        differentiable = torch.is_grad_enabled()
        # The vector–Jacobian product of a linear map (at any point) is its
        # adjoint, exact for every padding mode. Plain autograd rather than
        # torch.func.vjp: the latter imports torch._dynamo (seconds) on first use.
        with torch.enable_grad():
            x0 = torch.zeros((k, *self.input_shape), device=u.device, dtype=u.dtype, requires_grad=True)
            y = self._apply(x0)
            (g,) = torch.autograd.grad(y, x0, rearrange(u, "m k -> k m").reshape(k, *self.output_shape),
                                       create_graph=differentiable)
        return rearrange(g.reshape(k, -1), "k n -> n k")

    def frobenius(self):
        if self._frobenius_fn is not None:
            f2 = self._frobenius_fn()
            if self.channel_scale is not None:
                f2 = (f2 * self.channel_scale().to(self.dtype) ** 2)
            return f2.sum().clamp_min(0).sqrt()
        return super().frobenius()


def _bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[], torch.Tensor]:
    def scale() -> torch.Tensor:
        s = torch.rsqrt(bn.running_var + bn.eps)
        return s if bn.weight is None else bn.weight * s
    return scale


def matrix_view(layer: nn.Module | torch.Tensor, bn: nn.Module | None = None) -> LinearOperator:
    """The matrix view of a layer: ``rearrange(w, "o i ... -> o (i ...)")``.

    For ``LowRankLinear`` / ``LowRankConv2d`` the product ``B·A``; for a
    grouped convolution the block-diagonal matrix of its groups; with ``bn``
    (a BatchNorm with running statistics) the folded ``diag(γ/√(var+ε))·W``.

    Args:
        layer: a supported module, or a weight tensor (≥ 2-D) given directly.
        bn: the BatchNorm that follows the layer, to fold in.

    Returns:
        A :class:`LinearOperator`.

    Example:
        >>> matrix_view(nn.Conv2d(3, 8, 3)).shape
        (8, 27)
    """
    scale = _bn_scale(bn) if bn is not None else None
    if isinstance(layer, torch.Tensor):
        return MatrixView(layer, 1, scale)
    if isinstance(layer, (LowRankLinear, LowRankConv2d)):
        return LowRankView(layer.weight_a, layer.weight_b, scale)
    if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return MatrixView(layer.weight, getattr(layer, "groups", 1), scale)
    raise TypeError(f"No matrix view for {type(layer).__name__}; supported: "
                    f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} or a weight tensor")


def conv_operator(layer: nn.Module, input_shape: Sequence[int], bn: nn.Module | None = None) -> FunctionOperator:
    """The convolution as the linear map it is at ``input_shape`` (bias excluded).

    Stride, dilation, groups and every padding mode are honoured (the layer's
    own convolution is applied); the adjoint is exact through autograd's vector–Jacobian product.

    Args:
        layer: ``nn.Conv1d``, ``nn.Conv2d`` or ``LowRankConv2d``.
        input_shape: ``(C, L)`` or ``(C, H, W)``, one example without the batch dimension.
        bn: an eval-mode BatchNorm to fold in per output channel.

    Returns:
        A :class:`FunctionOperator` of shape ``(C_out·H'·W', C·H·W)``.

    Example:
        >>> conv_operator(nn.Conv2d(1, 2, 3, padding=1), (1, 4, 4)).shape
        (32, 16)
    """
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, LowRankConv2d)):
        raise TypeError(f"conv_operator needs Conv1d, Conv2d or LowRankConv2d, but got {type(layer).__name__}")
    input_shape = tuple(input_shape)
    expected = 2 if isinstance(layer, nn.Conv1d) else 3
    if len(input_shape) != expected or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"Expected input_shape to be {expected} positive ints (channels first, no batch), "
                         f"but got input_shape={input_shape!r}")
    in_ch = layer.in_channels
    if input_shape[0] != in_ch:
        raise ValueError(f"input_shape has {input_shape[0]} channels but the layer expects {in_ch}")
    ref = layer.weight_a if isinstance(layer, LowRankConv2d) else layer.weight
    dtype = _compute_dtype(ref.dtype)
    if isinstance(layer, LowRankConv2d):
        def fn(x):
            return F.conv2d(F.conv2d(x, layer.weight_a.to(dtype), None, **layer.conv_args), layer.weight_b.to(dtype))
        frob = None
    else:
        def fn(x):
            return layer._conv_forward(x, layer.weight.to(dtype), None)
        frob = None
        if layer.padding_mode == "zeros":
            # ‖A‖_F² = Σ over output positions of the squared taps that land
            # inside the input = the convolution of an all-ones input with W².
            def frob():
                ones = torch.ones((1, *input_shape), device=ref.device, dtype=dtype)
                out = layer._conv_forward(ones, layer.weight.to(dtype) ** 2, None)
                return out.sum(dim=tuple(d for d in range(out.dim()) if d != 1))
    scale = _bn_scale(bn) if bn is not None else None
    return FunctionOperator(fn, input_shape, ref, scale, frob)


def record_input_shapes(model: nn.Module, example_input: torch.Tensor,
                        modules: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Run one forward pass and record each layer's input shape (batch dimension dropped).

    The model's train/eval mode is restored and no gradient is recorded.

    Args:
        model: the network.
        example_input: one batch as the model takes it.
        modules: names to record (default: every supported layer).

    Returns:
        ``{name: input_shape}``.
    """
    named = dict(model.named_modules())
    wanted = list(modules) if modules is not None else [n for n, m in named.items() if isinstance(m, SUPPORTED_LAYERS)]
    unknown = [n for n in wanted if n not in named]
    if unknown:
        raise ValueError(f"Unknown module names {unknown}; layers of this model: "
                         f"{[n for n, m in named.items() if isinstance(m, SUPPORTED_LAYERS)]}")
    shapes: dict[str, tuple[int, ...]] = {}
    _observe_forward(model, example_input, wanted,
                     lambda name, args, out: shapes.setdefault(name, tuple(args[0].shape[1:])))
    return shapes


def _observe_forward(model: nn.Module, example_input: torch.Tensor, names: Iterable[str],
                     observe: Callable[[str, tuple, torch.Tensor], object]) -> None:
    """One eval-mode, no-grad forward pass calling ``observe(name, args, output)`` for each named module.

    The hooks never change an output, are always removed, and the model's
    train/eval mode is restored, also on error.
    """
    handles = []
    was_training = model.training
    try:
        for name in names:
            def hook(mod, args, out, name=name) -> None:
                observe(name, args, out)
            handles.append(model.get_submodule(name).register_forward_hook(hook))
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def operator_for(layer: nn.Module, view: str = "matrix", input_shape: Sequence[int] | None = None,
                 bn: nn.Module | None = None) -> LinearOperator:
    """The operator of one layer in the chosen view (``"matrix"`` or ``"operator"``).

    Linear layers are matrices in both views; convolutions in the operator
    view need ``input_shape``.
    """
    if view not in ("matrix", "operator"):
        raise ValueError(f"Expected view to be 'matrix' or 'operator', but got view={view!r}")
    if view == "operator" and isinstance(layer, (nn.Conv1d, nn.Conv2d, LowRankConv2d)):
        if input_shape is None:
            raise ValueError(
                f"The operator view of {type(layer).__name__} needs its input size: pass input_shape=(C, H, W) "
                "for the model input (or example_input) to SpectralState, or input_shapes={name: shape}")
        return conv_operator(layer, input_shape, bn)
    return matrix_view(layer, bn)


def cholesky_qr2(y: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the columns of ``y`` (``… × n × k``) by CholeskyQR, twice.

    Columns are normalised first, which removes their scale from the Gram
    matrix's condition number; CholeskyQR2 then orthonormalises to working
    precision while the Gram is numerically positive definite. Where Cholesky
    fails (rank-deficient or badly conditioned blocks) Householder QR is used.
    The direction of the first column is kept.

    Args:
        y: a batch of ``n × k`` blocks with ``k ≤ n``.

    Returns:
        ``Q`` of the same shape with ``QᵀQ = I``.

    Example:
        >>> q = cholesky_qr2(torch.randn(10, 3))
        >>> torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
        True
    """
    q = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    for _ in range(2):
        gram = q.transpose(-1, -2) @ q
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()) or not bool(torch.isfinite(chol).all()):
            qr, r = torch.linalg.qr(y)
            # Householder QR fixes signs arbitrarily; keep column directions.
            sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
            return qr * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)
        q = torch.linalg.solve_triangular(chol, q.transpose(-1, -2), upper=False).transpose(-1, -2)
    return q


def unsupported_reason(module: nn.Module) -> str | None:
    """Why the spectral state cannot track ``module``.

    Returns:
        None if it is a supported layer; ``""`` if it holds no weight of its
        own (containers, activations, …); otherwise the reason, for messages.
    """
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module):
        return "parametrized modules (torch.nn.utils.parametrize, e.g. weight_norm/spectral_norm) are not supported"
    if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
        return "weight_norm'ed modules are not supported"
    for t, why in _REFUSED.items():
        if type(module) is t:
            return why
    if isinstance(module, SUPPORTED_LAYERS):
        w = module.weight_a if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            return f"its weight is not a floating-point tensor (dtype={getattr(w, 'dtype', None)})"
        if w.numel() == 0:
            return "its weight is empty"
        if "lora" in type(module).__name__.lower():
            return "LoRA adapters are not supported"
        return None
    if "lora" in type(module).__name__.lower():
        return "LoRA adapters are not supported"
    return ""


def _find_bn_successors(model: nn.Module, names: Sequence[str],
                        example_input: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """Layers whose only consumer is a BatchNorm over their output channels, found with torch.fx.

    BatchNorm scales dim 1. For a convolution that is its output-channel axis;
    for a Linear only when its output is ``(N, F)`` — on ``(N, L, F)`` the
    Linear acts on the last axis and BN on ``L``, and ``diag(s)·W`` would be
    the wrong operator. The feature counts must match; with an example input
    the Linear's output rank is checked too.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model simply gets no folding
        return {}
    ranks: dict[str, int] = {}
    if example_input is not None:
        _observe_forward(model, example_input, names, lambda name, args, out: ranks.setdefault(name, out.dim()))
    named = dict(model.named_modules())
    wanted = set(names)
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in wanted or len(node.users) != 1:
            continue
        (user,) = node.users
        bn = named.get(user.target) if user.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats or bn.running_var is None:
            continue
        layer = named[node.target]
        if isinstance(layer, (nn.Linear, LowRankLinear)):
            if bn.num_features != layer.out_features or ranks.get(node.target, 2) != 2:
                continue
        elif bn.num_features != layer.out_channels if hasattr(layer, "out_channels") else True:
            continue
        found[node.target] = bn
    return found


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


class SpectralState(nn.Module):
    """Warm-started top-k singular directions of every layer of a model.

    One state per model, created and owned by the user or the optimizer
    wrapper; every penalty, the tracker and the report read it, so a training
    step reads each weight once. The model itself is not modified and nothing
    is added to its ``state_dict``.

    Args:
        model: the network.
        k: directions tracked per layer (clamped to ``min(m, n)`` per layer).
        layers: names to track (default: every supported layer). Naming an
            unknown or unsupported module is an error.
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
        seed: seed of the random starting vectors.

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
        # Kept outside the module tree: the state must not own (or save) the model.
        object.__setattr__(self, "_model", model)
        self.k = k
        self.view = view
        self.fold_bn = fold_bn
        self.on_nonfinite = on_nonfinite
        self.backend = backend
        self.stack_max_numel = None if stack_max_numel is None else nonnegative_int(stack_max_numel, "stack_max_numel")
        self.skipped: dict[str, str] = {}
        self.aliases: dict[str, str] = {}

        # remove_duplicate=False: a module used twice (tied weights) is seen under both names.
        named = dict(model.named_modules(remove_duplicate=False))
        if layers is not None:
            if isinstance(layers, str):
                raise TypeError("Expected layers to be a sequence of layer names, but got a single string; wrap it in a list")
            unknown = [n for n in layers if n not in named]
            if unknown:
                known = [n for n, m in named.items() if isinstance(m, SUPPORTED_LAYERS)]
                raise ValueError(f"Unknown layer names {unknown}; supported layers of this model: {known}")
            for n in layers:
                reason = unsupported_reason(named[n])
                if reason:
                    raise ValueError(f"Layer {n!r} ({type(named[n]).__name__}) cannot be tracked: {reason}")
            candidates = list(layers)
        else:
            candidates = []
            for name, module in named.items():
                reason = unsupported_reason(module)
                if reason is None:
                    candidates.append(name)
                elif reason != "":
                    self.skipped[name] = reason

        # Tied weights (one Parameter in two layers) are one operator: track the first.
        seen: dict[int, str] = {}
        tracked = []
        for name in candidates:
            module = named[name]
            pid = id(module.weight_a if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight)
            if pid in seen:
                self.aliases[name] = seen[pid]
                continue
            seen[pid] = name
            tracked.append(name)
        if not tracked:
            raise ValueError("The model has no layer the spectral state can track "
                             f"(supported: {', '.join(t.__name__ for t in SUPPORTED_LAYERS)}); skipped: {self.skipped}")

        shapes: dict[str, tuple[int, ...]] = {}
        if view == "operator":
            if input_shapes is not None:
                shapes = {n: tuple(s) for n, s in input_shapes.items()}
            elif example_input is not None or input_shape is not None:
                if example_input is None:
                    p = next(model.parameters())
                    example_input = torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype)
                shapes = record_input_shapes(model, example_input, tracked)
        self._input_shapes = shapes
        if fold_bn and example_input is None and input_shape is not None:
            p = next(model.parameters())
            example_input = torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype)
        self._bn = _find_bn_successors(model, tracked, example_input) if fold_bn else {}
        self._names = tracked
        self._ops: dict[str, LinearOperator] = {}
        for name in tracked:
            self._ops[name] = operator_for(named[name], view, shapes.get(name), self._bn.get(name))

        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleDict()
        for name in tracked:
            op = self._ops[name]
            m, n = op.shape
            self.layers[_key(name)] = _LayerBuffers(m, n, min(k, m, n), op.dtype, op.device, gen)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._cache_version = None
        if init_iter:
            self.step(init_iter)
            self.steps.zero_()

    # ------------------------------------------------------------------ access
    # ------------------------------------------------------------------ access
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
        """The classifier head: the model's last supported layer in module order (tracked or not)."""
        last = None
        for name, module in self._model.named_modules():
            if unsupported_reason(module) is None:
                last = name
        return last

    def _buf(self, name: str) -> _LayerBuffers:
        if name in self.aliases:
            name = self.aliases[name]
        if name not in self._ops:
            raise KeyError(f"Layer {name!r} is not tracked by this SpectralState; tracked: {self._names}")
        return self.layers[_key(name)]

    def module(self, name: str) -> nn.Module:
        """The tracked module called ``name``."""
        self._buf(name)
        return self._model.get_submodule(name)

    def operator(self, name: str) -> LinearOperator:
        """The operator iterated for ``name`` (BN-folded where applicable)."""
        self._buf(name)
        return self._ops[self.aliases.get(name, name)]

    def input_shape(self, name: str) -> tuple[int, ...] | None:
        """The recorded input shape of a layer (operator view), else None."""
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
        """``(U, V)``: left (``m × k``) and right (``n × k``) singular vector estimates, detached."""
        b = self._buf(name)
        return b.U.detach().clone(), b.V.detach().clone()

    def sigma(self, name: str) -> torch.Tensor:
        """``σ₁ ≈ uᵀ W v`` with ``u, v`` detached: differentiable, gradient ``u vᵀ``.

        Always ≤ the true σ₁ (for unit u, v); equal at convergence.
        """
        b = self._buf(name)
        op = self._ops[self.aliases.get(name, name)]
        u, v = b.U[:, :1].detach(), b.V[:, :1].detach()
        return (u * op.matvec(v)).sum()

    def top_sigmas(self, name: str) -> torch.Tensor:
        """Differentiable ``σ_j ≈ u_jᵀ W v_j`` for all k tracked directions."""
        b = self._buf(name)
        op = self._ops[self.aliases.get(name, name)]
        return (b.U.detach() * op.matvec(b.V.detach())).sum(0)

    def frobenius(self, name: str) -> torch.Tensor:
        """``‖W‖_F`` of the iterated operator (differentiable)."""
        self._buf(name)
        return self._ops[self.aliases.get(name, name)].frobenius()

    # ------------------------------------------------------------------ iteration
    def _check_shapes(self) -> None:
        for name in self._names:
            try:
                module = self._model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"Layer {name!r} is no longer in the model; build a new SpectralState") from None
            old = self._ops[name]
            ref = module.weight_a if isinstance(module, (LowRankLinear, LowRankConv2d)) else module.weight
            current = old.a if isinstance(old, LowRankView) else (old.weight if isinstance(old, MatrixView) else old.reference)
            if ref is not current:
                # The parameter object was replaced (e.g. by pruning): rebuild the view.
                self._ops[name] = operator_for(module, self.view, self._input_shapes.get(name), self._bn.get(name))
            op = self._ops[name]
            m, n = op.shape
            buf = self.layers[_key(name)]
            if buf.V.device != op.device or buf.V.dtype != op.dtype:
                # The model moved (model.cuda(), model.double()): the warm vectors follow it.
                buf.to(device=op.device, dtype=op.dtype)
            if buf.U.shape[0] != m or buf.V.shape[0] != n:
                raise ValueError(
                    f"Layer {name!r} changed shape since the SpectralState was built: operator was "
                    f"{buf.U.shape[0]}×{buf.V.shape[0]}, now {m}×{n}. Build a new SpectralState.")

    def _products(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``U₀ = W V`` and ``Y = Wᵀ U₀`` for every layer, batched."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rest = list(names)
        if self.backend != "torch":
            rest = self._products_fused(rest, out)
        groups: dict[tuple, list[str]] = {}
        singles = []
        for name in rest:
            op = self._ops[name]
            key = op.batch_key
            limit = self.stack_max_numel
            if limit is None:
                limit = 0 if op.device.type == "cpu" else BATCH_MAX_NUMEL
            if key is not None and op.shape[0] * op.shape[1] <= limit:
                groups.setdefault(key + (self.layers[_key(name)].V.shape[1],), []).append(name)
            else:
                singles.append(name)
        for key, members in groups.items():
            if len(members) == 1:
                singles.extend(members)
                continue
            w = torch.stack([self._ops[n].matrix2d() for n in members])
            v = torch.stack([self.layers[_key(n)].V for n in members])
            u0 = torch.bmm(w, v)
            y = torch.bmm(w.transpose(1, 2), u0)
            for i, n in enumerate(members):
                out[n] = (u0[i], y[i])
        for name in singles:
            op = self._ops[name]
            v = self.layers[_key(name)].V
            u0 = op.matvec(v)
            out[name] = (u0, op.rmatvec(u0))
        return out

    def _products_fused(self, names: list[str], out: dict) -> list[str]:
        """Send ungrouped matrix views to the fused Triton kernel (CUDA); return the layers left."""
        eligible = [n for n in names if isinstance(self._ops[n], MatrixView) and self._ops[n].groups == 1
                    and self._ops[n].weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
                    and (self._ops[n].device.type == "cuda" or self.backend == "triton")]
        if not eligible:
            if self.backend == "triton":
                raise RuntimeError("backend='triton' but no layer is one the kernel runs: an ungrouped matrix view "
                                   "with float32, bfloat16 or float16 weights")
            return names
        from . import kernels

        if not kernels.triton_available(self._ops[eligible[0]].device):
            if self.backend == "triton":
                raise RuntimeError("backend='triton' requested but Triton is not available for these tensors "
                                   "(pip install 'robustcompress[kernels]'; on CPU, the interpreter needs "
                                   "TRITON_INTERPRET=1 set before triton is first imported)")
            return names
        if getattr(self, "_fused", None) is None:
            # Plain attribute, not a buffer: it caches the kernel's pointer table,
            # rebuilt only when a weight's address, shape or dtype changes.
            self._fused = kernels.FusedPowerStep()
            self._fused_scales: dict[str, torch.Tensor] = {}
        ops = [self._ops[n] for n in eligible]
        weights = [rearrange(op.weight, "o i ... -> o (i ...)") for op in ops]
        scales = []
        for name, op in zip(eligible, ops):
            if op.row_scale is None:
                scales.append(None)
                continue
            # Persistent fp32 buffers, refreshed in place, keep the table's addresses stable.
            fresh = op.row_scale().detach().float()
            buf = self._fused_scales.get(name)
            if buf is None or buf.shape != fresh.shape or buf.device != fresh.device:
                buf = self._fused_scales[name] = fresh.clone()
            else:
                buf.copy_(fresh)
            scales.append(buf)
        vs = [self.layers[_key(n)].V for n in eligible]
        if any(v.dtype != torch.float32 for v in vs):
            vs = [v.float() for v in vs]
        us, ys = self._fused(weights, vs, scales)
        for n, u0, y in zip(eligible, us, ys):
            dt = self.layers[_key(n)].V.dtype
            out[n] = (u0.to(dt), y.to(dt))
        return [n for n in names if n not in out]

    @torch.no_grad()
    def step(self, n_iter: int = 1) -> None:
        """Run ``n_iter`` warm subspace iterations on every tracked layer.

        Non-finite values are kept out of the buffers. On CUDA each iteration
        synchronises with the host once or twice (k = 1: to choose the
        list-wide update; k > 1: CholeskyQR2's QR fallback), and the check
        that raises or warns once per call.

        Raises:
            ValueError: a weight holds NaN/Inf (``on_nonfinite="raise"``), or a
                layer's shape changed since the state was built.
        """
        positive_int(n_iter, "n_iter")
        self._check_shapes()
        finite_flags: list[torch.Tensor] = []
        for _ in range(n_iter):
            products = self._products(self._names)
            by_k: dict[tuple, list[str]] = {}
            for name in self._names:
                u0 = products[name][0]
                by_k.setdefault((u0.shape[1], str(u0.device), u0.dtype), []).append(name)
            flags = {}
            for (k, _, _), members in by_k.items():
                update = self._power_update if k == 1 else self._ritz_update
                flags.update(update(members, products))
            finite_flags.append(torch.stack([flags[n].to(self.steps.device) for n in self._names]))
            self.steps += 1
        ok = torch.stack(finite_flags).all(0).tolist()
        bad = [n for n, good in zip(self._names, ok) if not good]
        if bad:
            msg = (f"Non-finite values (NaN/Inf) in the weights of layer(s) {bad}; "
                   "their spectral state was left unchanged")
            if self.on_nonfinite == "raise":
                raise ValueError(msg + " (pass on_nonfinite='skip' to warn instead)")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def _power_update(self, members: list[str], products) -> dict[str, torch.Tensor]:
        """k = 1: u = W v / ‖W v‖, v ← WᵀW v / ‖WᵀW v‖, σ = uᵀ W v_new = ‖WᵀW v‖ / ‖W v‖.

        That σ is exactly what :meth:`sigma` evaluates right after the step
        (so penalties can use it without another product) and lies between the
        Ritz value ``‖W v‖`` and the true σ₁ (Cauchy–Schwarz; ``u`` is a unit vector).
        """
        bufs = [self.layers[_key(n)] for n in members]
        u0s = [products[n][0] for n in members]
        ys = [products[n][1] for n in members]
        # List-wide (foreach) operations: the cost per layer is a few
        # microseconds, not a dozen small-tensor calls.
        s = torch.stack(torch._foreach_norm(u0s))
        yn = torch.stack(torch._foreach_norm(ys))
        tiny = torch.finfo(s.dtype).tiny
        ok = torch.isfinite(s) & torch.isfinite(yn)
        live = ok & (s > tiny) & (yn > tiny)
        if bool(live.all()):
            norms = torch.cat([s, yn]).tolist()
            torch._foreach_copy_([b.U for b in bufs], torch._foreach_div(u0s, norms[: len(bufs)]))
            torch._foreach_copy_([b.V for b in bufs], torch._foreach_div(ys, norms[len(bufs):]))
            torch._foreach_copy_([b.S for b in bufs], list((yn / s).reshape(-1, 1).unbind(0)))
            return dict(zip(members, ok.unbind(0)))
        flags = {}
        for i, (name, buf) in enumerate(zip(members, bufs)):
            # σ = 0 (a zero matrix) has no singular vectors, and non-finite
            # weights none worth keeping: keep the previous ones.
            buf.U.copy_(torch.where(live[i], u0s[i] / s[i].clamp_min(tiny), buf.U))
            buf.V.copy_(torch.where(live[i], ys[i] / yn[i].clamp_min(tiny), buf.V))
            buf.S.copy_(torch.where(live[i], yn[i] / s[i].clamp_min(tiny), torch.where(ok[i], s[i], buf.S[0])).reshape(1))
            flags[name] = ok[i]
        return flags

    def _ritz_update(self, members: list[str], products) -> dict[str, torch.Tensor]:
        """k > 1: Rayleigh–Ritz on span(V), G = U₀ᵀU₀ = VᵀWᵀWV, batched over layers."""
        grams = torch.stack([products[n][0].T @ products[n][0] for n in members])
        finite = torch.isfinite(grams).flatten(1).all(1)
        grams = torch.where(finite[:, None, None], grams, torch.zeros_like(grams))
        lam, q = torch.linalg.eigh(grams)
        lam, q = lam.flip(-1), q.flip(-1)
        sig = lam.clamp_min(0).sqrt()
        tiny = torch.finfo(sig.dtype).eps * sig[:, :1].clamp_min(torch.finfo(sig.dtype).tiny) * 16
        flags = {}
        for i, name in enumerate(members):
            buf = self.layers[_key(name)]
            u0, y = products[name]
            ok = finite[i] & torch.isfinite(y).all()
            flags[name] = ok
            qi, s = q[i], sig[i]
            # Directions with σ ≈ 0 carry no singular vectors: keep the previous ones.
            live = (s > tiny[i]) & ok
            u_new = torch.where(live[None, :], (u0 @ qi) / s.clamp_min(torch.finfo(s.dtype).tiny), buf.U)
            y_rot = torch.where(live[None, :], y @ qi, buf.V @ qi)
            v_new = cholesky_qr2(torch.where(ok, y_rot, buf.V))
            buf.U.copy_(u_new)
            buf.V.copy_(torch.where(ok, v_new, buf.V))
            buf.S.copy_(torch.where(ok, s, buf.S))
        return flags

    def extra_repr(self) -> str:
        return f"layers={len(self._names)}, k={self.k}, view={self.view!r}, fold_bn={self.fold_bn}"
