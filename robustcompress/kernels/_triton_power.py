"""Triton kernels behind :func:`robustcompress.kernels.fused_power_step`.

Importing this module imports Triton; :mod:`robustcompress.kernels` loads it
only on first use. Whether the kernels run compiled (CUDA) or in Triton's CPU
interpreter is decided here, at import, by ``TRITON_INTERPRET``.

Layout (written by :mod:`robustcompress.kernels.fused`, all int64):

* layer table, one row of ``LAYER_FIELDS`` per layer: address of element
  ``[0, 0]`` of the operator's matrix ``M`` (the stored weight's pointer plus
  the view's offset), address of ``V``, address of the row scale (any valid
  float32 address when there is none), has-scale flag, ``m``, ``n``, ``k``,
  offset of ``U`` in the flat output, offset of the layer's workspace, number
  of row tiles, offset of ``Y`` in the flat output, row stride and column
  stride of ``M`` in elements (``M[i, j]`` sits at ``base + i·sr + j·sc``),
  address of the ``U`` addend ``X`` (``m × k`` float32; any valid address when
  there is none), has-addend flag;
* tile table, ``TILE_FIELDS`` per row tile: layer index, first row, tile index
  within the layer;
* chunk table, ``CHUNK_FIELDS`` per reduction chunk: layer index, first element.

Strided views are read in place: a transposed weight (transformers'
``Conv1D``, LoRA ``fan_in_fan_out``), a column slice (an attention head's
columns of ``W_O``) or a row slice (packed Q/K/V) is a base address and two
strides into the one stored tensor, never a copy. ``LAYOUT`` (constexpr)
specialises the loads: 0 row-major (``sc = 1``: a chunk's columns are
contiguous, vectorised along the columns), 1 column-major (``sr = 1``: a
transposed weight; the tile's rows are contiguous, so each stored row
contributes ``BM`` consecutive elements and the loads vectorise along the
rows — the host gives these tiles more rows and fewer columns for longer
contiguous runs), 2 any other strides (plain gathers).

Phase 1 (one program per row tile of ``BM`` rows): ``U_tile = s ⊙ (M_tile V + X_tile)``
is stored, then ``P_tile = M_tileᵀ (s ⊙ U_tile)`` goes to the tile's own
workspace slot. The second sweep re-reads the ``BM × n`` row block just read,
which is small enough to come from L2, so DRAM sees each weight once.
The addend ``X`` carries a low-rank term computed outside (LoRA's
``s·B(A V)``), so ``U`` is the whole operator's product and ``Y = Mᵀ U``
needs no second read of ``M``.
Phase 2 sums the slots of each layer in tile order: ``Y = Σ_tiles P_tile``.
No float atomics anywhere, so results are bit-identical run to run.
"""

from __future__ import annotations

import triton
import triton.language as tl

LAYER_FIELDS = 15
TILE_FIELDS = 3
CHUNK_FIELDS = 2

# Triton's interpreter replaces @triton.jit functions at decoration time.
try:  # pragma: no cover - depends on the Triton build
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except ImportError:  # pragma: no cover
    _Interpreted = ()


@triton.jit
def _load_tile(w_base, rows, cols, sr, sc, mask, LAYOUT: tl.constexpr):
    # M[rows, cols] upcast to float32. The layout decides which axis the
    # compiler may treat as contiguous (and so vectorise the loads along).
    if LAYOUT == 0:
        ptrs = w_base + rows[:, None] * sr + cols[None, :]
    elif LAYOUT == 1:
        ptrs = w_base + rows[:, None] + cols[None, :] * sc
    else:
        ptrs = w_base + rows[:, None] * sr + cols[None, :] * sc
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_kernel(
    layer_tab,
    tile_tab,
    u_base,
    ws_base,
    LF: tl.constexpr,
    W_DTYPE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KP: tl.constexpr,
    USE_DOT: tl.constexpr,
    ALIGN: tl.constexpr,
    LAYOUT: tl.constexpr,
):
    t = tl.program_id(0)
    tile = tile_tab + t * 3
    layer = tl.load(tile)
    row0 = tl.load(tile + 1)
    tile_idx = tl.load(tile + 2)
    row = layer_tab + layer * LF
    w_ptr = tl.load(row).to(tl.pointer_type(W_DTYPE))
    v_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    s_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    has_s = tl.load(row + 3)
    m = tl.load(row + 4)
    n = tl.load(row + 5)
    k = tl.load(row + 6)
    u_off = tl.load(row + 7)
    ws_off = tl.load(row + 8)
    sr = tl.load(row + 11)
    sc = tl.load(row + 12)
    x_ptr = tl.load(row + 13).to(tl.pointer_type(tl.float32))
    has_x = tl.load(row + 14)

    if ALIGN > 1:
        # Every M in this launch starts 16-byte aligned and its leading stride
        # (sr row-major, sc column-major) is a multiple of 16 bytes: say so, or
        # the compiler cannot vectorise the loads.
        w_ptr = tl.multiple_of(w_ptr, 16)
        if LAYOUT == 0:
            sr = tl.multiple_of(sr, ALIGN)
        else:
            sc = tl.multiple_of(sc, ALIGN)

    rows = row0 + tl.arange(0, BM)
    if LAYOUT == 1:
        rows = tl.max_contiguous(tl.multiple_of(rows, BM), BM)
    rmask = rows < m
    cols_k = tl.arange(0, KP)
    kmask = cols_k < k

    # U_tile = M_tile V, accumulated over column chunks in float32.
    u = tl.zeros((BM, KP), dtype=tl.float32)
    for c0 in range(0, n, BN):
        cols = tl.max_contiguous(tl.multiple_of(c0 + tl.arange(0, BN), BN), BN)
        cmask = cols < n
        w = _load_tile(w_ptr, rows, cols, sr, sc, rmask[:, None] & cmask[None, :], LAYOUT)
        if USE_DOT:
            v = tl.load(
                v_ptr + cols[:, None] * k + cols_k[None, :],
                mask=cmask[:, None] & kmask[None, :],
                other=0.0,
            )
            u = tl.dot(w, v, u, input_precision="ieee")
        else:
            for j in tl.static_range(KP):
                vj = tl.load(v_ptr + cols * k + j, mask=cmask & (cols * 0 + j < k), other=0.0)
                uj = tl.sum(w * vj[None, :], axis=1)
                u += tl.where(cols_k[None, :] == j, uj[:, None], 0.0)

    # U = s ⊙ (M V + X) for the operator diag(s) M (+ a low-rank term in X), and Y = Mᵀ (s ⊙ U).
    umask = rmask[:, None] & kmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * k + cols_k[None, :], mask=umask & (rows[:, None] * 0 + has_x != 0),
                other=0.0)
    u = u + x
    s = tl.load(s_ptr + rows, mask=rmask & (rows * 0 + has_s != 0), other=1.0)
    u = u * s[:, None]
    tl.store(u_base + u_off + rows[:, None] * k + cols_k[None, :], u, mask=umask)
    us = u * s[:, None]

    slot = ws_base + ws_off + tile_idx * n * k
    for c0 in range(0, n, BN):
        cols = tl.max_contiguous(tl.multiple_of(c0 + tl.arange(0, BN), BN), BN)
        cmask = cols < n
        w = _load_tile(w_ptr, rows, cols, sr, sc, rmask[:, None] & cmask[None, :], LAYOUT)
        if USE_DOT:
            p = tl.dot(tl.trans(w), us, input_precision="ieee")
        else:
            p = tl.zeros((BN, KP), dtype=tl.float32)
            for j in tl.static_range(KP):
                uj = tl.sum(tl.where(cols_k[None, :] == j, us, 0.0), axis=1)
                pj = tl.sum(w * uj[:, None], axis=0)
                p += tl.where(cols_k[None, :] == j, pj[:, None], 0.0)
        tl.store(slot + cols[:, None] * k + cols_k[None, :], p, mask=cmask[:, None] & kmask[None, :])


@triton.jit
def _reduce_kernel(layer_tab, chunk_tab, ws_base, y_base, LF: tl.constexpr, BR: tl.constexpr):
    c = tl.program_id(0)
    layer = tl.load(chunk_tab + c * 2)
    start = tl.load(chunk_tab + c * 2 + 1)
    row = layer_tab + layer * LF
    n = tl.load(row + 5)
    k = tl.load(row + 6)
    ws_off = tl.load(row + 8)
    n_tiles = tl.load(row + 9)
    y_off = tl.load(row + 10)
    nk = n * k
    idx = start + tl.arange(0, BR)
    mask = idx < nk
    acc = tl.zeros((BR,), dtype=tl.float32)
    # Fixed summation order over the tiles: deterministic.
    for j in range(0, n_tiles):
        acc += tl.load(ws_base + ws_off + j * nk + idx, mask=mask, other=0.0)
    tl.store(y_base + y_off + idx, acc, mask=mask)


def interpreted() -> bool:
    """True when the kernels above run in Triton's CPU interpreter."""
    return bool(_Interpreted) and isinstance(_tile_kernel, _Interpreted)


TL_DTYPES = {"float32": tl.float32, "bfloat16": tl.bfloat16, "float16": tl.float16}
