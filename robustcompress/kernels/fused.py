"""Host side of the fused power step: pointer tables, caching, launches.

Triton is imported on the first call, never at import of this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._checks import positive_int
from .reference import check_power_step_args

__all__ = ["FusedPowerStep", "fused_power_step", "triton_available"]


def _kernels():
    # Deferred so that `import robustcompress` never imports Triton.
    from . import _triton_power

    return _triton_power


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the fused Triton kernel can run on tensors of ``device``.

    CUDA tensors need Triton and a CUDA device; CPU tensors need Triton's
    interpreter, i.e. ``TRITON_INTERPRET=1`` set before the kernels were first
    imported. ``device=None`` asks whether either holds.

    Args:
        device: a device, its name, or ``None``.

    Returns:
        ``True`` when :func:`fused_power_step` can run there.

    Example:
        >>> isinstance(triton_available("cpu"), bool)
        True
    """
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"Expected device to be a torch.device or its name, but got device={device!r}") from exc
    try:
        kern = _kernels()
    except Exception:  # noqa: BLE001 - a broken Triton install means "not available"
        return False
    interp = kern.interpreted()
    if device is None:
        return interp or torch.cuda.is_available()
    if device.type == "cpu":
        return interp
    if device.type == "cuda":
        return (not interp) and torch.cuda.is_available()
    return False


@dataclass
class _Group:
    """One launch of the tile kernel: the layers sharing a weight dtype."""

    dtype: torch.dtype
    layout: int  # 0 row-major (column stride 1), 1 column-major (row stride 1), 2 other strides
    align: int  # the leading stride is a multiple of `align` elements (16 bytes); 1 = unknown
    tile_start: int
    n_tiles: int
    kp: int
    use_dot: bool
    bm: int
    bn: int


@dataclass
class _Plan:
    key: tuple
    table: torch.Tensor  # int64, on the device: layers | tiles | chunks
    layer_tab: torch.Tensor
    tile_tab: torch.Tensor
    chunk_tab: torch.Tensor
    groups: list[_Group]
    n_chunks: int
    u_size: int
    y_size: int
    ws_size: int
    u_shapes: list[tuple[int, int]]
    y_shapes: list[tuple[int, int]]


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(x)))


def _strides(w: torch.Tensor) -> tuple[int, int]:
    """``(sr, sc)`` of a 2-D view in elements; the stride of a length-1 axis is never used, so it is normalised."""
    m, n = w.shape
    sr, sc = w.stride()
    if n == 1:
        sc = 1
    elif m == 1:
        sr = 1 if sc != 1 else n
    return sr, sc


def _layout(w: torch.Tensor) -> int:
    sr, sc = _strides(w)
    return 0 if sc == 1 else 1 if sr == 1 else 2


class FusedPowerStep:
    r"""A reusable fused power step that caches its pointer table.

    Calling it computes, for every layer ``l`` with operator
    ``A_l = diag(s_l) W_l``, ``U_l = A_l V_l`` and ``Y_l = A_lᵀ U_l`` (float32
    accumulation, IEEE float32 products, no TF32), reading each weight once
    from DRAM, in one Triton launch per weight dtype and memory layout plus
    one deterministic reduction launch. A weight may be any strided 2-D view
    of a stored tensor — transposed (``Conv1D``), row- or column-sliced
    (packed Q/K/V, attention heads) — and is read in place: the table holds
    its address and its two strides. With ``u_addends``,
    ``U_l = diag(s_l)(W_l V_l + X_l)`` and ``Y_l = W_lᵀ diag(s_l) U_l`` (a
    low-rank term such as LoRA's ``s·B(A V)`` computed outside).

    The table of addresses, shapes and strides is built once and rebuilt only
    when any weight's ``(data_ptr, shape, strides, dtype)`` or ``V``'s, row
    scale's or addend's address or shape changes — so callers that update
    ``V`` in place (``v.copy_(...)``) launch with no host-to-device copy,
    which also makes the call capturable in a CUDA graph.

    Tiles: a row tile of ``A_l`` is ``BM`` rows by ``n_l`` columns, walked in
    chunks of ``BN`` columns. Row-major views (column stride 1) load each row's
    chunk contiguously. For a transposed view (row stride 1) the same tile is a
    column block of the stored weight: each of its stored rows contributes
    ``BM`` consecutive elements, so those tiles get twice the rows and half
    the columns (the same tile size) and the loads vectorise along the rows.
    Keeping row tiles of the *operator* for every layout is what lets one
    program finish ``P = A_tileᵀ(s ⊙ U_tile)`` from the tile it just read,
    so each weight is still read once.

    Args:
        block_rows: rows per tile (power of two, ≥ 16).
        block_cols: columns per chunk (power of two, ≥ 16).
        num_warps: warps per program on CUDA (ignored by the interpreter).
        reduce_block: elements of ``Y`` per reduction program (power of two).
        hints: tell the compiler when weights are 16-byte aligned with a
            leading stride (rows of a row-major view, stored rows of a
            transposed one) a multiple of 16 bytes (vectorised loads); layers
            that are not run in a separate launch without the hint.

    Example (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):
        >>> step = FusedPowerStep()
        >>> w, v = torch.eye(3), torch.ones(3, 2)
        >>> for _ in range(2):
        ...     us, ys = step([w], [v])       # the second call reuses the table
        >>> step.builds
        1
    """

    def __init__(
        self,
        block_rows: int = 32,
        block_cols: int = 128,
        num_warps: int = 4,
        reduce_block: int = 512,
        hints: bool = True,
    ):
        for name, val in (("block_rows", block_rows), ("block_cols", block_cols), ("reduce_block", reduce_block)):
            positive_int(val, name)
            if val < 16 or val & (val - 1):
                raise ValueError(f"Expected {name} to be a power of two >= 16, but got {name}={val!r}")
        positive_int(num_warps, "num_warps")
        if num_warps & (num_warps - 1):
            raise ValueError(f"Expected num_warps to be a power of two, but got num_warps={num_warps!r}")
        self.block_rows = block_rows
        self.block_cols = block_cols
        self.num_warps = num_warps
        self.reduce_block = reduce_block
        if not isinstance(hints, bool):
            raise TypeError(f"Expected hints to be a bool, but got hints={hints!r}")
        self.hints = hints
        self.builds = 0  # how many pointer tables were built (a cache miss each)
        # Checks only: fill the outputs with this value before the launch, so a
        # check can prove every element is written (torch.empty may hold anything).
        self._debug_fill: float | None = None
        self._plan: _Plan | None = None

    def _align(self, w: torch.Tensor) -> int:
        layout = _layout(w)
        if layout == 2:
            return 1
        per16 = 16 // w.element_size()
        leading = _strides(w)[layout]
        if self.hints and w.data_ptr() % 16 == 0 and leading % per16 == 0:
            return per16
        return 1

    def _key(self, weights, vs, scales, addends) -> tuple:
        return (weights[0].device,) + tuple(
            (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, v.data_ptr(), tuple(v.shape),
             0 if s is None else s.data_ptr(), 0 if x is None else x.data_ptr())
            for w, v, s, x in zip(weights, vs, scales, addends)
        )

    def _tile_shape(self, layout: int) -> tuple[int, int]:
        if layout == 1:
            # Column-major: longer contiguous runs down the rows, same tile size.
            return 2 * self.block_rows, max(16, self.block_cols // 2)
        return self.block_rows, self.block_cols

    def _build(self, key, weights, vs, scales, addends) -> _Plan:
        kern = _kernels()
        device = weights[0].device
        L = len(weights)
        # Group layers by dtype; inside a group, widest rows first so the
        # longest tiles start early and the tail of the grid stays short.
        order = sorted(range(L), key=lambda i: (str(weights[i].dtype), _layout(weights[i]), -self._align(weights[i]),
                                                -weights[i].shape[1], i))
        layer_rows = [[0] * kern.LAYER_FIELDS for _ in range(L)]
        tiles: list[tuple[int, int, int]] = []
        groups: list[_Group] = []
        u_off = y_off = ws_off = 0
        u_offs, y_offs = [0] * L, [0] * L
        for i in range(L):
            m, n = weights[i].shape
            k = vs[i].shape[1]
            u_offs[i], y_offs[i] = u_off, y_off
            u_off += m * k
            y_off += n * k
        for i in order:
            w, v, s, x = weights[i], vs[i], scales[i], addends[i]
            m, n = w.shape
            k = v.shape[1]
            layout, align = _layout(w), self._align(w)
            if not groups or (groups[-1].dtype, groups[-1].layout, groups[-1].align) != (w.dtype, layout, align):
                bm, bn = self._tile_shape(layout)
                groups.append(_Group(w.dtype, layout, align, len(tiles), 0, 1, False, bm, bn))
            g = groups[-1]
            bm = g.bm
            n_tiles = -(-m // bm)
            for j in range(n_tiles):
                tiles.append((i, j * bm, j))
            g.n_tiles += n_tiles
            g.kp = max(g.kp, k)
            layer_rows[i] = [
                w.data_ptr(),
                v.data_ptr(),
                v.data_ptr() if s is None else s.data_ptr(),  # never read without a scale
                0 if s is None else 1,
                m,
                n,
                k,
                u_offs[i],
                ws_off,
                n_tiles,
                y_offs[i],
                *_strides(w),
                v.data_ptr() if x is None else x.data_ptr(),  # never read without an addend
                0 if x is None else 1,
            ]
            ws_off += n_tiles * n * k
        for g in groups:
            # tl.dot needs every block dimension >= 16: pad k to 16 or 32 there.
            g.use_dot = g.kp > 8
            g.kp = max(16, _pow2_at_least(g.kp)) if g.use_dot else _pow2_at_least(g.kp)
            if g.use_dot:
                g.bn = min(g.bn, 64)  # W chunk, V chunk and U all sit in registers
        br = self.reduce_block
        chunks = [(i, c) for i in range(L) for c in range(0, weights[i].shape[1] * vs[i].shape[1], br)]
        flat = [x for r in layer_rows for x in r] + [x for t in tiles for x in t] + [x for c in chunks for x in c]
        table = torch.tensor(flat, dtype=torch.int64).to(device)
        a = L * kern.LAYER_FIELDS
        b = a + len(tiles) * kern.TILE_FIELDS
        self.builds += 1
        return _Plan(
            key=key,
            table=table,
            layer_tab=table[:a],
            tile_tab=table[a:b],
            chunk_tab=table[b:],
            groups=groups,
            n_chunks=len(chunks),
            u_size=u_off,
            y_size=y_off,
            ws_size=ws_off,
            u_shapes=[(w.shape[0], v.shape[1]) for w, v in zip(weights, vs)],
            y_shapes=[(w.shape[1], v.shape[1]) for w, v in zip(weights, vs)],
        )

    @torch.no_grad()
    def __call__(
        self,
        weights: Sequence[torch.Tensor],
        vs: Sequence[torch.Tensor],
        row_scales: Sequence[torch.Tensor | None] | None = None,
        u_addends: Sequence[torch.Tensor | None] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        weights, vs, scales, addends = check_power_step_args(weights, vs, row_scales, u_addends)
        device = weights[0].device
        if not triton_available(device):
            raise RuntimeError(
                f"The fused power step cannot run on {device}: it needs Triton with a CUDA device, or "
                "TRITON_INTERPRET=1 set before Triton is first imported for CPU tensors. "
                "Use robustcompress.kernels.power_step_reference instead."
            )
        kern = _kernels()
        key = self._key(weights, vs, scales, addends)
        plan = self._plan
        if plan is None or plan.key != key:
            plan = self._plan = self._build(key, weights, vs, scales, addends)
        u_flat = torch.empty(plan.u_size, dtype=torch.float32, device=device)
        y_flat = torch.empty(plan.y_size, dtype=torch.float32, device=device)
        ws = torch.empty(plan.ws_size, dtype=torch.float32, device=device)
        if self._debug_fill is not None:
            for t in (u_flat, y_flat, ws):
                t.fill_(self._debug_fill)
        ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with ctx:
            for g in plan.groups:
                tile_tab = plan.tile_tab[g.tile_start * kern.TILE_FIELDS :]
                kern._tile_kernel[(g.n_tiles,)](
                    plan.layer_tab,
                    tile_tab,
                    u_flat,
                    ws,
                    LF=kern.LAYER_FIELDS,
                    W_DTYPE=kern.TL_DTYPES[str(g.dtype).removeprefix("torch.")],
                    BM=g.bm,
                    BN=g.bn,
                    KP=g.kp,
                    USE_DOT=g.use_dot,
                    ALIGN=g.align,
                    LAYOUT=g.layout,
                    num_warps=self.num_warps,
                )
            kern._reduce_kernel[(plan.n_chunks,)](
                plan.layer_tab, plan.chunk_tab, ws, y_flat, LF=kern.LAYER_FIELDS, BR=self.reduce_block, num_warps=4
            )
        us = [t.view(shape) for t, shape in zip(u_flat.split([a * b for a, b in plan.u_shapes]), plan.u_shapes)]
        ys = [t.view(shape) for t, shape in zip(y_flat.split([a * b for a, b in plan.y_shapes]), plan.y_shapes)]
        return us, ys


def fused_power_step(
    weights: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    row_scales: Sequence[torch.Tensor | None] | None = None,
    u_addends: Sequence[torch.Tensor | None] | None = None,
    *,
    step: FusedPowerStep | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r"""One fused power step over many layers: ``U_l = A_l V_l``, ``Y_l = A_lᵀ U_l``.

    ``A_l = diag(s_l) W_l`` (``W_l`` when the row scale is ``None``), so
    ``Y_l = A_lᵀ A_l V_l = Σ_i s_i² w_i (w_iᵀ V_l)`` over the rows ``w_i``:
    the kernel accumulates it per row tile while the tile is on chip, so each
    weight is read from DRAM once. With an addend ``X_l``,
    ``U_l = diag(s_l)(W_l V_l + X_l)`` and ``Y_l = W_lᵀ diag(s_l) U_l``.
    Float32 accumulation with IEEE float32 products; bit-identical run to run
    (no atomics). Same results as :func:`power_step_reference` up to float32
    rounding.

    Args:
        weights: 2-D matrices (float32 / bfloat16 / float16) on one device, any
            strides: a transposed or sliced view of a stored weight is read in place.
        vs: float32 contiguous ``(n_l, k_l)`` blocks, ``1 <= k_l <= 32``.
        row_scales: ``None`` or per layer ``None`` / a length-``m_l`` vector.
        u_addends: ``None`` or per layer ``None`` / a contiguous float32 ``(m_l, k_l)`` block.
        step: a :class:`FusedPowerStep` whose cached pointer table is reused
            (pass the same one every iteration); a fresh one when ``None``.

    Returns:
        ``(us, ys)``: float32 ``U_l`` (``m_l × k_l``) and ``Y_l`` (``n_l × k_l``),
        views into two flat buffers allocated by this call.

    Example (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``):
        >>> w = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> us, ys = fused_power_step([w], [torch.ones(2, 1)])
        >>> ys[0].flatten().tolist()
        [9.0, 1.0]
        >>> us, ys = fused_power_step([w.T], [torch.ones(2, 1)])   # a transposed view, read in place
        >>> ys[0].flatten().tolist()
        [9.0, 1.0]
    """
    if step is not None and not isinstance(step, FusedPowerStep):
        raise TypeError(f"Expected step to be a FusedPowerStep or None, but got {type(step).__name__}")
    return (step or FusedPowerStep())(weights, vs, row_scales, u_addends)
