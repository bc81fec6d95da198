"""The spectral core: operator views of layers, warm-started subspace iteration, the shared state.

* :mod:`.views` — layers as :class:`LinearOperator` objects (matrix, low-rank, exact convolution);
* :mod:`.iteration` — building blocks of the iteration (:func:`cholesky_qr2`);
* :mod:`.backends` — product back-ends (torch, fused Triton kernel) with one interface;
* :mod:`.state` — layer discovery and :class:`SpectralState`, the one state per model.

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
from .state import Coverage, SpectralState, observed_forward, record_input_shapes, unsupported_reason
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
