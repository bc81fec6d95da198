"""The spectral core: operator views of layers, warm-started subspace iteration, the shared state.

* :mod:`.views` — layers as :class:`LinearOperator` objects (matrix, low-rank, exact convolution);
* :mod:`.iteration` — the iteration core (:func:`ritz_step`, :func:`subspace_iteration`, :func:`cholesky_qr2`);
* :mod:`.backends` — product back-ends (torch, fused Triton kernel) with one interface;
* :mod:`.sharded` — FSDP2 (DTensor) weights iterated on their local shards;
* :mod:`.discovery` — observed forward passes, input shapes, BatchNorm successors, coverage;
* :mod:`.state` — :class:`SpectralState`, the one state per model (warm vectors, residual intervals).

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

from .backends import FusedBackend, ProductBackend, TorchBackend
from .iteration import cholesky_qr2
from .discovery import Coverage, observed_forward, record_input_shapes, unsupported_reason
from .state import SpectralState
from .views import (
    FunctionOperator,
    LinearOperator,
    LowRankView,
    MatrixView,
    conv_operator,
    matrix_view,
    operator_for,
)

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
    "unsupported_reason",
    "ProductBackend",
    "TorchBackend",
    "FusedBackend",
    "Coverage",
    "observed_forward",
]
