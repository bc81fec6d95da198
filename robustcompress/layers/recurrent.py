"""Recurrent layers: RNN, LSTM and GRU (and their cells), one operator per layer, direction, matrix and gate.

``nn.LSTM`` stores, per layer ``k`` and direction (suffix ``_reverse``),
``weight_ih_l{k}`` (``4H × in``), ``weight_hh_l{k}`` (``4H × H``, or
``4H × P`` with ``proj_size = P``) and, with projections, ``weight_hr_l{k}``
(``P × H``). The gates are row blocks: LSTM ``i, f, g, o``; GRU ``r, z, n``;
a plain RNN has one. Each gate's block is its own operator (a row slice of
the stored weight, no copy): the gates act through different
nonlinearities, so their norms are separate gains.

Pruning rule ``"rnn_units"``: hidden unit ``j`` is row ``j`` of every gate
block of ``weight_ih`` and ``weight_hh`` *and* column ``j`` of ``weight_hh``
(its recurrent input) — removed together, and its activation statistics are
grouped the same way.

Example:
    >>> from torch import nn
    >>> from .registry import layer_views
    >>> [v.name for v in layer_views(nn.GRU(3, 4, bidirectional=True))][:4]
    ['weight_ih_l0.r', 'weight_ih_l0.z', 'weight_ih_l0.n', 'weight_hh_l0.r']
"""

from __future__ import annotations

from torch import nn

from .builtin import weight_of
from .registry import LayerKind, LayerView, ViewOptions, register_layer_kind
from .specs import MatrixSpec

__all__ = ["GATES", "rnn_parameter_names"]

#: Gate names in the order of their row blocks.
GATES = {"LSTM": ("i", "f", "g", "o"), "GRU": ("r", "z", "n"), "RNN_TANH": ("",), "RNN_RELU": ("",)}


def rnn_parameter_names(rnn: nn.RNNBase) -> list[str]:
    """The weight matrices of an RNN/LSTM/GRU in storage order (no biases).

    Example:
        >>> rnn_parameter_names(nn.LSTM(3, 4, proj_size=2))
        ['weight_ih_l0', 'weight_hh_l0', 'weight_hr_l0']
    """
    names = []
    for k in range(rnn.num_layers):
        for suffix in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
            names += [f"weight_ih_l{k}{suffix}", f"weight_hh_l{k}{suffix}"]
            if getattr(rnn, "proj_size", 0):
                names.append(f"weight_hr_l{k}{suffix}")
    return names


def _rnn_views(m: nn.RNNBase, options: ViewOptions) -> list[LayerView]:
    if m.mode not in GATES:
        raise ValueError(f"Unknown recurrent mode {m.mode!r}; known: {sorted(GATES)}")
    gates = GATES[m.mode]
    h = m.hidden_size
    views = []
    for pname in rnn_parameter_names(m):
        get, params = weight_of(m, pname)
        if pname.startswith("weight_hr"):
            views.append(LayerView(pname, MatrixSpec(get), params))
            continue
        for g, gate in enumerate(gates):
            rows = slice(g * h, (g + 1) * h)
            name = f"{pname}.{gate}" if gate else pname
            views.append(LayerView(name, MatrixSpec(get, rows=None if len(gates) == 1 else rows), params))
    return views


def _cell_views(m: nn.RNNCellBase, options: ViewOptions) -> list[LayerView]:
    gates = GATES["LSTM"] if isinstance(m, nn.LSTMCell) else GATES["GRU"] if isinstance(m, nn.GRUCell) else ("",)
    h = m.hidden_size
    views = []
    for pname in ("weight_ih", "weight_hh"):
        get, params = weight_of(m, pname)
        for g, gate in enumerate(gates):
            rows = None if len(gates) == 1 else slice(g * h, (g + 1) * h)
            views.append(LayerView(f"{pname}.{gate}" if gate else pname, MatrixSpec(get, rows=rows), params))
    return views


RECURRENT_CELL = register_layer_kind(LayerKind(
    "recurrent_cell", (nn.RNNCellBase,), _cell_views, feature_axis=-1, can_be_head=False, prune="rnn_units"))
RECURRENT = register_layer_kind(LayerKind(
    "recurrent", (nn.RNNBase,), _rnn_views, feature_axis=-1, can_be_head=False, prune="rnn_units"))
