"""The spectral state on weights sharded by FSDP2 (``DTensor``), without gathering a weight.

``torch.distributed.fsdp.fully_shard`` stores each weight as a ``DTensor``
sharded on dim 0 of the *stored* tensor: the operator's rows for ``Linear``
(stored out × in), its columns for a layer stored in × out (transformers'
``Conv1D``). The iteration runs on the operator ``A`` whose rows are sharded
(``A = W`` for row-sharded weights, ``A = Wᵀ`` for column-sharded ones), so
the warm orthonormal block ``B`` (``V``, resp. ``U``) lives on the unsharded
side and is replicated, while the other block ``C`` (``U``, resp. ``V``) is
sharded exactly like the weight. Rank ``r`` holds the rows ``A_r``::

    P_r = A_r B                      (local: C's rows on this rank)
    Z   = Σ_r A_rᵀ P_r = AᵀA B        (all-reduced, replicated)
    G   = Bᵀ Z = PᵀP                  (k × k, from the reduced Z only)
    σ_j = √λ_j(G),  C_r = P_r Q / σ,  B ← orth(Z Q)

so one iteration moves ``n·k`` numbers per layer (``m·k`` for column-sharded
ones), never the ``m·n`` weight. The blocks ``Z`` of every layer and the
partial sums ``‖A_r‖_F²`` travel in **one** all-reduce per iteration (per
process group). Everything replicated (``B``, ``σ``) is computed from reduced
values only, so it is bitwise identical on every rank; a rank holding no rows
contributes zeros.

Penalties need ``σ_j = c_jᵀ A b_j`` and ``‖W‖_F`` as differentiable values.
Both are known globally after the step without more communication
(``c_jᵀ A b_j = (Z q_j)ᵀ b_j / σ_j``; ``‖W‖_F²`` came with the all-reduce),
and their gradients live on the local shard (``∂σ/∂A_r = c_r bᵀ``). The
differentiable value is therefore the reduced number plus the local term minus
its detached copy: the value is global, the gradient ``c_r bᵀ`` lands on the
local shard of the weight. These values belong to the weights of the last
:meth:`SpectralState.step`; reading them after the weights changed raises.

For row-sharded weights the iteration is exactly the unsharded one
(``U₀ = W V``, ``Y = Wᵀ U₀``). For column-sharded weights it is the same
iteration on ``Wᵀ`` (``U`` is the warm block), which converges to the same
singular triplets but is a different sequence of iterates.

**Packed blocks straddling ranks.** A registry operator may be a slice of the
stored weight (Q, K, V of ``MultiheadAttention.in_proj_weight`` or of a
``Conv1D`` ``c_attn``, recurrent gates). A slice across the unsharded axis is
taken locally. A slice along the sharded axis is the intersection of the
rank's rows with the slice — possibly empty (that rank contributes zeros), the
same all-reduce carries it. The sharded block is then stored over the
weight's whole sharded axis, sharded exactly like the weight and zero outside
the slice (see :class:`ShardedView`), so ``torch.distributed.checkpoint``
saves and reshards it on any number of ranks. (Such a checkpoint does not load
into an *unsharded* state, whose block has the slice's rows only.)

**LoRA and low-rank layers** (``W₀ + s·B·A``, ``B·A``) whose factors
``fully_shard`` shards on dim 0 — ``W₀`` and ``B`` on the operator's rows,
``A`` along ``r`` — are iterated without gathering a factor
(:class:`ShardedFactorView`): ``A V``, ``Bᵀ W₀ V`` and ``BᵀB`` (``r × k``,
``r × k``, ``r × r``) are reduced before ``Z``, and ``A V`` again after the
update, because the gradient of ``σ`` on ``B`` needs ``A v`` of the new ``v``.
A step of one iteration therefore runs **three** all-reduces when such layers
exist (each batched over all of them), and **one** otherwise. The first one
runs even when the weights did not change since the last step: whether they
did is a per-rank fact (tensor versions), and a collective that some ranks
skip would hang the others. ``‖W₀ + s·B·A‖_F`` is refused for
them (its gradient on ``W₀``'s rows needs the whole ``A``).

**Error bounds.** The residual of each Ritz pair of the dilation comes from
replicated values only (``ρ_j = ‖Z q_j/θ_j − θ_j B q_j‖/√2``), so
:meth:`SpectralState.residual_interval`, ``relative_residual`` and
``sigma1_bounds`` are meaningful for sharded layers, bitwise identical on
every rank, and cost no communication; they describe the weights of the last
step (``sigma1_bounds`` raises when the weights changed since).

Placements the state cannot iterate without gathering — ``Partial``,
``_StridedShard``, a sharded dimension that is not the operator's rows or
columns, two mesh dimensions sharding one weight, LoRA factors sharded on other
axes (a ``fan_in_fan_out`` base sharded on its input axis) — are refused with
an error naming the layer and its placement. Still refused as well: grouped
convolutions, the exact operator view of convolutions, folded BatchNorms,
strided slices, sliced or transposed factors (attention circuits) and
low-rank convolutions on sharded weights.

Example:
    >>> import torch
    >>> a = torch.randn(7, 5, dtype=torch.float64)
    >>> b = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0]
    >>> parts = [local_products(a_r, b) for a_r in a.split([4, 3])]  # two "ranks"
    >>> z = sum(p[1] for p in parts)
    >>> torch.allclose(z, a.T @ a @ b)
    True
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from ..layers import LoRASpec, LowRankSpec
from .iteration import cholesky_qr2
from .views import LinearOperator

__all__ = ["is_sharded", "ShardedView", "ShardedFactorView", "ShardedBackend", "local_products", "factor_terms",
           "factor_products", "ritz_update", "sharded_operator", "refuse_bn_folding"]


def _dtensor():
    # torch.distributed.tensor costs seconds to import, and any DTensor that
    # exists has imported it already: look it up instead of importing it.
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(weight: object) -> bool:
    """Whether ``weight`` is a ``DTensor`` (a weight distributed by FSDP2 or tensor parallelism).

    Example:
        >>> is_sharded(torch.zeros(2, 2))
        False
    """
    mod = _dtensor()
    return mod is not None and isinstance(weight, mod.DTensor)


def local_products(a_local: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's share of an iteration: ``P_r = A_r B``, ``A_rᵀ P_r`` and ``‖A_r‖_F²``.

    Summing the last two over the ranks gives ``Z = AᵀA B`` and ``‖A‖_F²``.
    A rank with no rows (``A_r`` is ``0 × n``) returns zeros.

    Args:
        a_local: this rank's rows of the operator, ``m_r × n``.
        b: the replicated warm block, ``n × k``.

    Returns:
        ``(P_r, A_rᵀ P_r, ‖A_r‖_F²)``.

    Example:
        >>> p, z, f2 = local_products(torch.zeros(0, 3), torch.ones(3, 1))
        >>> p.shape, z.flatten().tolist(), float(f2)
        (torch.Size([0, 1]), [0.0, 0.0, 0.0], 0.0)
    """
    p = a_local @ b
    return p, a_local.T @ p, a_local.square().sum()


def factor_terms(w0_r: torch.Tensor | None, b_r: torch.Tensor, a_c: torch.Tensor, v: torch.Tensor,
                 a_range: tuple[int, int], rank: int) -> list[torch.Tensor]:
    """One rank's terms of ``A V``, ``Bᵀ W₀ V`` and ``BᵀB`` for ``M = W₀ + s·B·A``; summed over the ranks.

    ``A V`` is placed at this rank's rows ``a_range`` of ``A`` (zeros elsewhere).
    ``W₀`` is None for a low-rank layer ``M = B·A`` (then ``Bᵀ W₀ V = 0``).

    Args:
        w0_r: this rank's rows of ``W₀`` (``m_r × n``) or None.
        b_r: this rank's rows of ``B`` (``m_r × r``).
        a_c: this rank's rows of ``A`` (``r_c × n``).
        v: the replicated block ``V`` (``n × k``).
        a_range: ``[lo, hi)`` of ``a_c`` in ``A``'s rows.
        rank: ``r``.

    Returns:
        ``[A V (r × k), Bᵀ W₀ V (r × k), BᵀB (r × r)]``, this rank's share.

    Example:
        >>> a, b, v = torch.randn(2, 4), torch.randn(3, 2), torch.randn(4, 1)
        >>> av, h, g = factor_terms(None, b, a[1:], v, (1, 2), 2)
        >>> torch.allclose(av[1], (a @ v)[1]), float(av[0, 0]), float(h.abs().sum())
        (True, 0.0, 0.0)
    """
    av = v.new_zeros(rank, v.shape[1])
    av[a_range[0]:a_range[1]] = a_c @ v
    h = b_r.T @ (w0_r @ v) if w0_r is not None else v.new_zeros(rank, v.shape[1])
    return [av, h, b_r.T @ b_r]


def factor_products(w0_r: torch.Tensor | None, b_r: torch.Tensor, a_c: torch.Tensor, v: torch.Tensor,
                    a_range: tuple[int, int], av: torch.Tensor, h: torch.Tensor, g: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's share of an iteration of ``M = W₀ + s·B·A`` from the reduced ``A V``, ``H = Bᵀ W₀ V``, ``G = BᵀB``.

    ``P_r = W₀_r V + s B_r (A V)`` (this rank's rows of ``M V``),
    ``BᵀP = H + s G (A V)`` (replicated), and the two terms of ``MᵀP`` this rank
    holds: ``W₀_rᵀ P_r`` and ``s A_cᵀ (BᵀP)_c``; summed over the ranks they
    give ``Z = MᵀM V``.

    Returns:
        ``(P_r, W₀_rᵀ P_r, s A_cᵀ (BᵀP)_c, BᵀP)``.

    Example:
        >>> w0, a, b, v = torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2), torch.randn(4, 1)
        >>> terms = factor_terms(w0, b, a, v, (0, 2), 2)
        >>> p, z0, za, _ = factor_products(w0, b, a, v, (0, 2), *terms, 0.5)
        >>> m = w0 + 0.5 * b @ a
        >>> torch.allclose(p, m @ v, atol=1e-5), torch.allclose(z0 + za, m.T @ m @ v, atol=1e-4)
        (True, True)
    """
    p = scale * (b_r @ av)
    if w0_r is not None:
        p = w0_r @ v + p
        z0 = w0_r.T @ p
    else:
        z0 = p.new_zeros(v.shape)
    btp = h + scale * (g @ av)
    za = scale * (a_c.T @ btp[a_range[0]:a_range[1]])
    return p, z0, za, btp


@torch.no_grad()
def ritz_update(p: torch.Tensor, z: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                s: torch.Tensor, r: torch.Tensor, center: torch.Tensor | None = None,
                radius: torch.Tensor | None = None,
                also: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> torch.Tensor:
    """Update ``(C_r, B, σ)`` in place from this rank's ``P_r`` and the reduced ``Z``.

    k = 1: ``s = √(bᵀz) = ‖A b‖``, ``c_r = p_r / s``, ``b ← z/‖z‖``,
    ``σ = ‖z‖ / s = cᵀ A b_new`` (what the unsharded state computes).
    k > 1: Rayleigh–Ritz with ``G = BᵀZ``: ``σ_j = √λ_j``, ``C_r = P_r Q / σ``,
    ``B ← orth(Z Q)`` (CholeskyQR2). Directions with ``σ ≈ 0`` keep their
    previous vectors, and a non-finite ``Z`` leaves everything unchanged.
    Only reduced quantities decide anything, so every rank takes the same branch.

    The residual of the Ritz pair ``(c_j, b_j) = (A B q_j / θ_j, B q_j)`` of the
    symmetric dilation ``[[0, A], [Aᵀ, 0]]`` needs no product either:
    ``A b_j − θ_j c_j = 0`` exactly and ``Aᵀ c_j − θ_j b_j = Z q_j / θ_j − θ_j B q_j``,
    so ``ρ_j = ‖Z q_j / θ_j − θ_j B q_j‖ / √2`` (the unsharded state's radius) is
    computed from replicated values only: identical on every rank.

    Args:
        p: ``P_r = A_r B`` (``m_r × k``).
        z: the all-reduced ``Z = AᵀA B`` (``n × k``).
        b: the warm block ``B`` (``n × k``, orthonormal), updated in place.
        c: this rank's rows of ``C`` (``m_r × k``), updated in place.
        s: ``σ`` (``k``), updated in place.
        r: ``c_jᵀ A b_j`` for the new vectors (``k``), written in place.
        center: optional (``k``): the Ritz values ``θ_j`` of the pre-update block, written in place.
        radius: optional (``k``): their residual half-widths ``ρ_j`` (``inf`` where ``θ_j ≈ 0``).
        also: pairs ``(X, out)`` of ``N × k`` blocks transformed like ``(P_r, C_r)``:
            ``out ← X Q / σ`` (e.g. ``BᵀP`` into ``BᵀC`` for factorised layers).

    Returns:
        A 0-d bool tensor: whether ``Z`` was finite (the update happened).

    Example:
        >>> a = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> b, c = torch.tensor([[0.6], [0.8]], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)
        >>> s, r = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        >>> for _ in range(30):
        ...     p, z, _ = local_products(a, b)
        ...     ok = ritz_update(p, z, b, c, s, r)
        >>> round(float(s), 6), bool(ok)
        (3.0, True)
    """
    k = b.shape[1]
    tiny = torch.finfo(z.dtype).tiny
    inf = torch.full_like(s, math.inf)
    ok = torch.isfinite(z).all()
    if k == 1:
        s2 = (b * z).sum()
        sv = s2.clamp_min(0).sqrt()
        zn = torch.linalg.vector_norm(z)
        ok = ok & torch.isfinite(sv)
        live = ok & (sv > tiny) & (zn > tiny)
        sv_safe = sv.clamp_min(tiny)
        if radius is not None:
            rho = torch.linalg.vector_norm(z / sv_safe - sv * b) / math.sqrt(2.0)
            radius.copy_(torch.where(ok & (sv > tiny), rho.reshape(1), inf))
        if center is not None:
            center.copy_(torch.where(ok, sv, torch.zeros_like(sv)).reshape(1))
        c.copy_(torch.where(live, p / sv_safe, c))
        for x, out in also:
            out.copy_(torch.where(live, x / sv_safe, out))
        b.copy_(torch.where(live, z / zn.clamp_min(tiny), b))
        s.copy_(torch.where(live, zn / sv_safe, torch.where(ok, sv, s[0])).reshape(1))
        r.copy_(torch.where(ok, torch.where(live, s, torch.zeros_like(s)), r))
        return ok
    gram = b.T @ z
    gram = torch.where(ok, (gram + gram.T) / 2, torch.zeros_like(gram))
    lam, q = torch.linalg.eigh(gram)
    lam, q = lam.flip(-1), q.flip(-1)
    sig = lam.clamp_min(0).sqrt()
    floor = torch.finfo(sig.dtype).eps * sig[:1].clamp_min(tiny) * 16
    live = (sig > floor) & ok
    sig_safe = sig.clamp_min(tiny)
    c.copy_(torch.where(live[None, :], (p @ q) / sig_safe, c))
    for x, out in also:
        out.copy_(torch.where(live[None, :], (x @ q) / sig_safe, out))
    zq = z @ q
    bq = b @ q
    if radius is not None:
        rho = torch.linalg.vector_norm(zq / sig_safe - sig * bq, dim=0) / math.sqrt(2.0)
        radius.copy_(torch.where(live, rho, inf))
    if center is not None:
        center.copy_(torch.where(ok, sig, torch.zeros_like(sig)))
    z_rot = torch.where(live[None, :], zq, bq)
    b_new = cholesky_qr2(torch.where(ok, z_rot, b))
    # c_jᵀ A b_j = q_jᵀ PᵀA b_j / σ_j = (Z q_j)ᵀ b_j / σ_j: no second product, no reduction.
    # A direction that kept an old c has no such identity; its value is taken as 0 (σ_j ≈ 0 there).
    r_new = torch.where(live, (zq * b_new).sum(0) / sig_safe, torch.zeros_like(sig))
    b.copy_(torch.where(ok, b_new, b))
    s.copy_(torch.where(ok, sig, s))
    r.copy_(torch.where(ok, r_new, r))
    return ok


def _placement_error(name: str, weight: torch.Tensor, why: str) -> ValueError:
    return ValueError(
        f"Layer {name!r}: its weight is a DTensor with placements {tuple(weight.placements)} on a "
        f"{weight.device_mesh.ndim}-D mesh, which the spectral state cannot iterate without gathering the "
        f"weight ({why}). Supported: Shard(0) or Shard(1) of a 2-D weight (Shard(0) for convolutions) on one "
        "mesh dimension, Replicate on the others; the weight is never all-gathered.")


def _span(sl: slice | None, size: int, name: str) -> tuple[int, int]:
    if sl is None:
        return 0, size
    start, stop, step = sl.indices(size)
    if step != 1:
        raise ValueError(f"Layer {name!r}: a strided slice {sl} of a sharded weight is not supported")
    return start, max(start, stop)


def _shard_of(name: str, weight: torch.Tensor) -> tuple[int, int, tuple[int, int]] | None:
    """``(mesh dim, tensor dim, this rank's [lo, hi) along it)`` of a sharded DTensor; None if replicated.

    Raises for placements that would need a gather (``Partial``, ``_StridedShard``, two sharded mesh dims).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sharded = []
    for mesh_dim, pl in enumerate(weight.placements):
        if type(pl) is Shard:
            sharded.append((mesh_dim, pl.dim))
        elif not isinstance(pl, Replicate):
            raise _placement_error(name, weight, f"{pl} is not a plain Shard or Replicate")
    if len(sharded) > 1:
        raise _placement_error(name, weight, "more than one mesh dimension shards it")
    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    if tuple(local_shape) != tuple(weight.to_local().shape):
        raise _placement_error(name, weight, f"its local shard {tuple(weight.to_local().shape)} is not the "
                               f"chunk {tuple(local_shape)} DTensor describes")
    if not sharded:
        return None
    mesh_dim, dim = sharded[0]
    return mesh_dim, dim, (offset[dim], offset[dim] + local_shape[dim])


class ShardedView(LinearOperator):
    """A layer's matrix view whose stored ``DTensor`` weight is sharded along the operator's rows or columns.

    The operator is the registry's ``M = (W or Wᵀ)[rows, cols]``
    (:class:`~robustcompress.layers.MatrixSpec`; ``W`` seen as
    ``rearrange(w, "o i ... -> o (i ...)")``). ``side`` says what is sharded:
    ``"rows"`` (iterated as ``A = M``), ``"cols"`` (iterated as ``A = Mᵀ``) or
    ``"replicated"`` (every rank holds ``W``). A slice across the unsharded
    axis is taken locally (packed Q/K/V of a ``Conv1D`` stored in × out and
    sharded on its input axis). A slice along the sharded axis (packed Q/K/V
    of ``MultiheadAttention.in_proj_weight`` sharded on its rows) may straddle
    ranks: this rank's rows of ``A`` are the intersection of its rows of the
    weight with the slice, possibly none (it then contributes zeros).

    The sharded block (``U`` for ``"rows"``, ``V`` for ``"cols"``) is stored
    over the weight's whole sharded axis, as a ``DTensor`` sharded exactly like
    the weight (``Shard(0)`` on the weight's mesh dimension, the same chunks),
    its rows outside the slice zero: ``L × k`` with ``L`` the length of that
    axis (``3d`` for a K block of a ``3d × d`` packed weight), and ``m × k`` —
    the operator's own rows — when the operator is not sliced along it.
    ``torch.distributed.checkpoint`` therefore saves and reshards it like the
    weight; the operator's vectors are its rows ``[start, stop)`` of the slice.

    Args:
        name: the layer's name (for messages).
        spec: the layer's matrix descriptor; ``spec.weight()`` is a ``DTensor``.

    Raises:
        ValueError: a placement or descriptor that cannot be iterated without gathering.
    """

    def __init__(self, name: str, spec) -> None:
        weight = spec.weight()
        if not is_sharded(weight):
            raise TypeError(f"Expected layer {name!r}'s weight to be a DTensor, but got {type(weight).__name__}")
        if spec.groups != 1:
            raise ValueError(f"Layer {name!r}: sharded grouped convolutions are not supported yet")
        if spec.row_scale is not None:
            raise ValueError(f"Layer {name!r}: a row scale (folded BatchNorm) on a sharded weight is not supported "
                             "yet; pass fold_bn=False")
        self.name = name
        self.spec = spec
        mesh = weight.device_mesh
        shard = _shard_of(name, weight)
        stored = (weight.shape[0], weight[0].numel())
        full = (stored[1], stored[0]) if spec.transpose else stored  # (W or Wᵀ) before slicing
        self.mesh_dim: int | None = None
        self.side = "replicated"
        self._rows = _span(spec.rows, full[0], name)
        self._cols = _span(spec.cols, full[1], name)
        self.shape = (self._rows[1] - self._rows[0], self._cols[1] - self._cols[0])
        if shard is None:
            self.local_range = (0, self.shape[0])
            self._axis = (self.shape[0], (0, self.shape[0]))
            self._live = (0, self.shape[0])
        else:
            self.mesh_dim, dim, (lo, hi) = shard
            if dim not in (0, 1) or (dim == 1 and weight.dim() > 2):
                raise _placement_error(name, weight, f"Shard({dim}) is neither the operator's rows nor its columns")
            self.side = "rows" if (dim == 0) != spec.transpose else "cols"
            span = self._rows if self.side == "rows" else self._cols
            #: this rank's [lo, hi) of the weight's sharded axis (= its rows of the stored sharded block)
            self.local_range = (lo, hi)
            # (length of the sharded axis, the operator's slice of it)
            self._axis = (full[0] if self.side == "rows" else full[1], span)
            i0 = min(max(lo, span[0]), hi)
            # this rank's rows of A: the intersection of [lo, hi) with the slice, as offsets into the local shard
            self._live = (i0 - lo, max(i0, min(hi, span[1])) - lo)
        self._mesh = mesh
        self.group = None if self.mesh_dim is None else mesh.get_group(self.mesh_dim)
        # Filled by ShardedBackend.step: the reduced ‖M‖_F², and the versions it belongs to.
        self._frob2: torch.Tensor | None = None
        self._stamp: tuple | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The stored ``DTensor`` (the layer's current one)."""
        return self.spec.weight()

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # As for unsharded views: half-precision weights are iterated in float32.
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    @property
    def buffer_shape(self) -> tuple[int, int]:
        """Global rows of the stored ``(U, V)`` buffers: the sharded one spans the weight's whole sharded axis."""
        m, n = self.shape
        if self.side == "rows":
            return self._axis[0], n
        if self.side == "cols":
            return m, self._axis[0]
        return m, n

    def iterated_local(self) -> torch.Tensor:
        """This rank's rows of the iterated operator ``A`` (``M`` or ``Mᵀ``), differentiable.

        ``to_local()`` is differentiable: gradients flow back to the local shard of the ``DTensor``.
        """
        w = self.weight.to_local().to(self.dtype)
        w = w if w.dim() == 2 else rearrange(w, "o i ... -> o (i ...)")
        if self.spec.transpose:
            w = w.T
        i0, i1 = self._live
        if self.side == "rows":
            return w[i0:i1, self._cols[0]:self._cols[1]]
        if self.side == "cols":
            return w[self._rows[0]:self._rows[1], i0:i1].T
        return w[self._rows[0]:self._rows[1], self._cols[0]:self._cols[1]]

    def blocks_of(self, buf: nn.Module) -> tuple[str, str]:
        """Names of the (warm replicated, sharded) buffers: ``("V", "U")``, or ``("U", "V")`` for ``"cols"``."""
        return ("U", "V") if self.side == "cols" else ("V", "U")

    def sharded_rows(self, buf: nn.Module) -> torch.Tensor:
        """This rank's live rows of the sharded block (a view of its local tensor): the rows of ``A_r``."""
        t = getattr(buf, self.blocks_of(buf)[1])
        t = t.to_local() if is_sharded(t) else t
        return t[self._live[0]:self._live[1]]

    def shard_buffers(self, buf: nn.Module) -> None:
        """Replace the sharded block of freshly drawn full buffers by its local rows, as a ``DTensor``.

        The full vectors are drawn as for an unsharded layer and sliced, so a
        sharded state starts where the unsharded one does. The sharded block
        is a ``DTensor`` (``Shard(0)`` on the weight's mesh dimension) over
        the weight's sharded axis (zero outside the operator's slice), so
        ``torch.distributed.checkpoint`` saves and reshards it.
        """
        from torch.distributed.tensor import DTensor, Replicate, Shard

        for key, init in (("Rv", 0.0), ("C", 0.0), ("R", math.inf)):
            if not hasattr(buf, key):
                # Caches of the last step (not saved), rebuilt by every step:
                # c_jᵀ A b_j, and the residual intervals.
                buf.register_buffer(key, torch.full_like(buf.S, init), persistent=False)
        _, sharded = self.blocks_of(buf)
        if self.mesh_dim is None or is_sharded(getattr(buf, sharded)):
            return  # replicated: every rank holds the whole block
        full = getattr(buf, sharded)
        length, (s0, s1) = self._axis
        padded = full.new_zeros(length, full.shape[1])
        padded[s0:s1] = full
        lo, hi = self.local_range
        placements = [Replicate()] * self._mesh.ndim
        placements[self.mesh_dim] = Shard(0)
        setattr(buf, sharded, DTensor.from_local(padded[lo:hi].clone(), self._mesh, placements,
                                                 run_check=False, shape=padded.shape, stride=padded.stride()))

    def _tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    def _stamp_now(self, buf: nn.Module) -> tuple:
        return tuple(t._version for t in self._tensors()) + (buf.S._version,)

    def _check_fresh(self, buf: nn.Module) -> None:
        if self._stamp is None or self._stamp != self._stamp_now(buf):
            raise RuntimeError(
                f"Layer {self.name!r} is sharded (DTensor): its σ and ‖W‖_F are reduced across ranks in "
                "SpectralState.step(), and the weights or the state changed since the last step. Call "
                "state.step() before evaluating penalties (wrap() and penalties that own their state do).")

    # ---------------------------------------------------------------- one iteration (driven by ShardedBackend)
    def pre_parts(self, buf: nn.Module) -> list[torch.Tensor] | None:
        """Local terms needed before ``P_r`` can be formed (none for a matrix)."""
        return None

    def local_products(self, buf: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """``(P_r, A_rᵀ P_r, [‖A_r‖_F²], None)``: this rank's terms; the last two are summed over the ranks."""
        b = getattr(buf, self.blocks_of(buf)[0])
        p, z, f2 = local_products(self.iterated_local().detach(), b)
        return p, z, f2.reshape(1), None

    def ritz_also(self) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        return ()

    def finish(self, buf: nn.Module, scalars: torch.Tensor) -> None:
        """Keep the reduced norms of this step and stamp them with the versions they belong to."""
        self._frob2 = scalars[0].clone()
        self._stamp = self._stamp_now(buf)

    # ---------------------------------------------------------------- differentiable values
    def sigmas_expr(self, buf: nn.Module, count: int) -> torch.Tensor:
        """Differentiable ``c_jᵀ A b_j`` for the first ``count`` directions: global value, local gradient."""
        self._check_fresh(buf)
        warm, _ = self.blocks_of(buf)
        b = getattr(buf, warm)[:, :count].detach()
        c = self.sharded_rows(buf)[:, :count].detach()
        partial = (c * (self.iterated_local() @ b)).sum(0)
        return buf.Rv[:count].to(partial.dtype) + (partial - partial.detach())

    def frobenius_expr(self, buf: nn.Module) -> torch.Tensor:
        """Differentiable ``‖M‖_F``: the reduced value, gradient ``M_r / ‖M‖_F`` on the local shard."""
        self._check_fresh(buf)
        partial = self.iterated_local().square().sum()
        return (self._frob2.to(partial.dtype) + (partial - partial.detach())).clamp_min(0).sqrt()

    def _frobenius_upper(self) -> float:
        return math.sqrt(max(float(self._frob2), 0.0))

    def sigma1_bounds(self, buf: nn.Module) -> tuple[float, float]:
        """``(lower, upper)`` bounds of σ₁ of the operator as of the last step, from reduced values only.

        Lower: the step's estimate ``S_1`` (a Ritz value, or ``‖AᵀA b‖/‖A b‖`` for
        k = 1; both ≤ σ₁). Upper: ``√(‖M‖_F² − Σ_{j≥2} θ_j²)`` with ``θ`` the
        Ritz values of the step (interlacing: ``θ_j ≤ σ_j``). Every rank computes
        the same floats; no communication.

        Raises:
            RuntimeError: the weights changed since the last step.
        """
        self._check_fresh(buf)
        lower = float(buf.S[0])
        tail = float(buf.C[1:].double().square().sum())
        f = self._frobenius_upper()
        return lower, max(math.sqrt(max(f * f - tail, 0.0)), lower)

    # ---------------------------------------------------------------- refusals
    def _refuse(self, what: str):
        raise RuntimeError(f"Layer {self.name!r} is sharded (DTensor); {what} would gather its weight. The "
                           "spectral state reads it through SpectralState.sigma/top_sigmas/frobenius instead.")

    def matvec(self, v):
        self._refuse("a global product W v")

    def rmatvec(self, u):
        self._refuse("a global product Wᵀ u")

    def matrix(self):
        self._refuse("the dense matrix")

    def frobenius(self):
        self._refuse("frobenius() without the state's reduced value")

    def blocks(self):
        self._refuse("blocks()")


class ShardedFactorView(ShardedView):
    """``M = W₀ + s·B·A`` (a LoRA layer) or ``M = B·A`` (a low-rank layer) with factors sharded by FSDP2.

    ``fully_shard`` shards ``W₀`` (``m × n``) and ``B`` (``m × r``) on the
    operator's rows and ``A`` (``r × n``) along ``r``; ``V`` (``n × k``) is
    replicated and ``U`` is sharded like ``B``'s rows. Rank ``ρ`` holds rows
    ``W₀_ρ, B_ρ`` and the rows ``A_c`` of ``A``; nothing is gathered::

        round 1 (reduced):  A V (r × k),  H = Bᵀ W₀ V (r × k),  G = BᵀB (r × r)
        local:              P_ρ = W₀_ρ V + s B_ρ (A V),  BᵀP = H + s G (A V)
        round 2 (reduced):  Z = Σ_ρ W₀_ρᵀ P_ρ + s Σ_c A_cᵀ (BᵀP)_c,  ‖W₀‖_F², ‖B‖_F², ‖A‖_F²

    then the Ritz update as for a matrix. The differentiable
    ``σ_j = u_jᵀ M v_j`` needs ``A v_j`` of the *new* ``v_j``, which round 1 of
    the next iteration computes (with the same weights): it is reduced right
    after the update, so a step of ``n`` iterations runs ``2n + 1``
    all-reduces (3 for one iteration) — each batched over every factorised
    layer, the matrix layers riding in round 2. Gradients land on the local
    shards: ``∂σ/∂W₀_ρ = u_ρ vᵀ``, ``∂σ/∂B_ρ = s u_ρ (A v)ᵀ``,
    ``∂σ/∂A_c = s (Bᵀu)_c vᵀ`` with ``Bᵀu = (BᵀP) q / σ`` (replicated).

    ``‖M‖_F`` is not available: its gradient on ``W₀_ρ`` is ``M_ρ/‖M‖_F``,
    whose ``B_ρ A`` needs the whole ``A``. :meth:`frobenius_expr` raises, and
    :meth:`sigma1_bounds` uses ``‖W₀‖_F + |s|·‖B‖_F·‖A‖_F`` as its upper bound.

    Supported placements: ``B`` ``Shard(0)`` and ``W₀`` sharded on the
    operator's rows (the same chunks; either may be replicated instead), ``A``
    ``Shard(0)`` or replicated, all on one mesh dimension. A ``W₀`` stored
    in × out (``fan_in_fan_out``) sharded on dim 0 is sharded on the
    operator's columns, unlike ``B``, and is refused.

    Args:
        name: the layer's name (for messages).
        spec: a ``LoRASpec`` or ``LowRankSpec`` with at least one ``DTensor``.
    """

    def __init__(self, name: str, spec) -> None:
        self.name = name
        self.spec = spec
        if isinstance(spec, LoRASpec):
            base, self.scale = spec.base, float(spec.scale)
        elif isinstance(spec, LowRankSpec):
            if spec.conv is not None or spec.row_scale is not None:
                raise ValueError(f"Layer {name!r}: a sharded low-rank convolution (or one with a folded BatchNorm) "
                                 "is not supported; only low-rank Linear factors")
            base, self.scale = None, 1.0
        else:
            raise TypeError(f"Expected a LoRASpec or LowRankSpec for layer {name!r}, but got {type(spec).__name__}")
        self._base = base
        parts = {"A": spec.a, "B": spec.b} | ({"W0": base} if base is not None else {})
        for part, ms in parts.items():
            t = ms.weight()
            if (ms.rows is not None or ms.cols is not None or ms.groups != 1 or ms.row_scale is not None
                    or t.dim() != 2 or (ms.transpose and part != "W0")):
                raise ValueError(f"Layer {name!r}: its factor {part} is a sliced, transposed, grouped or scaled view "
                                 f"(or not 2-D: shape {tuple(t.shape)}); sharded factorised layers need the plain "
                                 "stored factors")
        shards = {part: (_shard_of(name, ms.weight()) if is_sharded(ms.weight()) else None)
                  for part, ms in parts.items()}
        meshes = {part: ms.weight().device_mesh for part, ms in parts.items() if is_sharded(ms.weight())}
        if any(m != next(iter(meshes.values())) for m in meshes.values()):
            raise ValueError(f"Layer {name!r}: its factors {sorted(meshes)} are DTensors on different device meshes")
        mesh = next(iter(meshes.values()))
        m, r = spec.b.weight().shape
        n = spec.a.weight().shape[1]
        self.shape = (m, n)
        self.rank = r
        row_dim = 1 if base is not None and base.transpose else 0
        rows = []
        for part, dim in (("B", 0), ("W0", row_dim)):
            sh = shards.get(part)
            if sh is None:
                continue
            if sh[1] != dim:
                w = parts[part].weight()
                raise _placement_error(name, w, f"factor {part} is sharded on dim {sh[1]}, not on the operator's "
                                       f"rows (dim {dim} of the stored tensor), as the other factors need")
            rows.append((part, sh))
        if len(rows) == 2 and (rows[0][1][0], rows[0][1][2]) != (rows[1][1][0], rows[1][1][2]):
            raise ValueError(f"Layer {name!r}: W0 and B are sharded into different row chunks (mesh dim, rows "
                             f"{rows[1][1][0::2]} vs {rows[0][1][0::2]}); they must be sharded alike")
        a_shard = shards["A"]
        if a_shard is not None and a_shard[1] != 0:
            raise _placement_error(name, spec.a.weight(), "factor A must be sharded along r (Shard(0))")
        if a_shard is not None and (not rows or a_shard[0] != rows[0][1][0]):
            raise ValueError(f"Layer {name!r}: A is sharded along r but W0/B are not sharded on the same mesh "
                             "dimension's rows; not supported")
        self.side = "rows"
        self.mesh_dim = rows[0][1][0] if rows else None
        self._rows_sharded = {part for part, _ in rows}
        self.local_range = rows[0][1][2] if rows else (0, m)
        self._axis = (m, (0, m))
        self._live = (0, self.local_range[1] - self.local_range[0])
        self._a_sharded = a_shard is not None
        self._a_range = a_shard[2] if a_shard is not None else (0, r)
        self._mesh = mesh
        self.group = None if self.mesh_dim is None else mesh.get_group(self.mesh_dim)
        self._frob2 = None
        self._norms: torch.Tensor | None = None
        self._stamp = None
        # Replicated products of the current V (and weights): A V, Bᵀ W₀ V, BᵀB; BᵀP of the last
        # update and BᵀU = (BᵀP) Q / σ. Not saved: rebuilt by the next step.
        self._pre: tuple | None = None
        self._pre_stamp: tuple | None = None
        self._btp: torch.Tensor | None = None
        self._btu: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The stored tensor ``U``'s rows are sharded like: ``B`` (``m × r``)."""
        return self.spec.b.weight()

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        ref = (self._base or self.spec.b).weight()
        return torch.float64 if ref.dtype == torch.float64 else torch.float32

    def _tensors(self) -> list[torch.Tensor]:
        return [ms.weight() for ms in (self.spec.a, self.spec.b, self._base) if ms is not None]

    def _local(self, part: str) -> torch.Tensor:
        """This rank's rows of ``W₀`` (operator orientation) or ``B``, or its rows ``A_c`` of ``A``; differentiable."""
        ms = {"A": self.spec.a, "B": self.spec.b, "W0": self._base}[part]
        t = ms.weight()
        t = (t.to_local() if is_sharded(t) else t).to(self.dtype)
        if ms.transpose:
            t = t.T
        if part != "A" and part not in self._rows_sharded:
            t = t[self.local_range[0]:self.local_range[1]]
        return t

    def blocks_of(self, buf: nn.Module) -> tuple[str, str]:
        return ("V", "U")

    def pre_parts(self, buf: nn.Module) -> list[torch.Tensor]:
        """This rank's terms of ``A V`` (zero outside its rows of A), ``Bᵀ W₀ V`` and ``BᵀB``."""
        w0 = self._local("W0").detach() if self._base is not None else None
        return factor_terms(w0, self._local("B").detach(), self._local("A").detach(), buf.V, self._a_range, self.rank)

    def take_pre(self, buf: nn.Module, reduced: list[torch.Tensor]) -> None:
        """Keep the reduced ``(A V, Bᵀ W₀ V, BᵀB)`` of the current ``V`` and weights."""
        av, h, g = reduced
        if not self._a_sharded:
            # A is replicated: A V is global on every rank (its summed copy is discarded).
            av = self._local("A").detach() @ buf.V
        self._pre = (av.clone(), h.clone(), g.clone())
        self._pre_stamp = tuple(t._version for t in self._tensors()) + (buf.V._version,)

    def pre_fresh(self, buf: nn.Module) -> bool:
        return self._pre is not None and self._pre_stamp == tuple(t._version for t in self._tensors()) + (
            buf.V._version,)

    def local_products(self, buf: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        w0 = self._local("W0").detach() if self._base is not None else None
        b, a = self._local("B").detach(), self._local("A").detach()
        p, z0, za, self._btp = factor_products(w0, b, a, buf.V, self._a_range, *self._pre, self.scale)
        w2 = w0.square().sum() if w0 is not None else p.new_zeros(())
        a2 = a.square().sum()
        zero = a2.new_zeros(())
        if self._a_sharded or self.group is None:
            return p, z0 + za, torch.stack([w2, b.square().sum(), a2]), None
        # A replicated: its terms are global on every rank; added after the reduction, not summed.
        return p, z0, torch.stack([w2, b.square().sum(), zero]), (za, torch.stack([zero, zero, a2]))

    def ritz_also(self) -> Sequence[tuple[torch.Tensor, torch.Tensor]]:
        k = self._btp.shape[1]
        if self._btu is None or self._btu.shape != self._btp.shape or self._btu.dtype != self._btp.dtype:
            self._btu = torch.zeros(self.rank, k, dtype=self._btp.dtype, device=self._btp.device)
        return ((self._btp, self._btu),)

    def finish(self, buf: nn.Module, scalars: torch.Tensor) -> None:
        self._norms = scalars.clamp_min(0).sqrt()
        self._stamp = self._stamp_now(buf)

    def sigmas_expr(self, buf: nn.Module, count: int) -> torch.Tensor:
        """Differentiable ``u_jᵀ M v_j``: global value; gradients ``u_ρ vᵀ``, ``s u_ρ (Av)ᵀ``, ``s (Bᵀu)_c vᵀ``."""
        self._check_fresh(buf)
        if not self.pre_fresh(buf):
            raise RuntimeError(f"Layer {self.name!r}: the replicated A·V of the last step is missing; call "
                               "state.step() before evaluating penalties")
        v = buf.V[:, :count].detach()
        u = self.sharded_rows(buf)[:, :count].detach()
        av = self._pre[0][:, :count]
        btu = self._btu[self._a_range[0]:self._a_range[1], :count]
        partial = self.scale * (u * (self._local("B") @ av)).sum(0)
        partial = partial + self.scale * (btu * (self._local("A") @ v)).sum(0)
        if self._base is not None:
            partial = partial + (u * (self._local("W0") @ v)).sum(0)
        return buf.Rv[:count].to(partial.dtype) + (partial - partial.detach())

    def frobenius_expr(self, buf: nn.Module) -> torch.Tensor:
        raise RuntimeError(
            f"Layer {self.name!r} is a factorised (LoRA or low-rank) layer with FSDP-sharded factors: the gradient "
            "of ‖W₀ + s·B·A‖_F on this rank's rows needs B_ρ·A, i.e. the whole factor A, which the spectral state "
            "never gathers. Penalties on ‖W‖_F (tail energy, nuclear norm, stable rank) cannot be used on it; "
            "leave the layer out (layers=...) or use σ-based penalties")

    def _frobenius_upper(self) -> float:
        w0, b, a = self._norms.double().tolist()
        return w0 + abs(self.scale) * b * a

    def sigma1_bounds(self, buf: nn.Module) -> tuple[float, float]:
        """``(lower, upper)``: the step's ``S_1`` and ``‖W₀‖_F + |s|‖B‖_F‖A‖_F`` (no ``‖M‖_F``: see the class)."""
        self._check_fresh(buf)
        lower = float(buf.S[0])
        return lower, max(self._frobenius_upper(), lower)


def refuse_bn_folding(model: nn.Module) -> None:
    """Raise if ``model`` has a BatchNorm with running statistics: folding it into sharded weights is not supported.

    The state folds a BatchNorm into the layer before it (``fold_bn=True``);
    on a sharded model it refuses rather than silently iterating the unfolded
    weight. (Looking for the BatchNorm's producer traces the model, which
    would run FSDP's forward hooks.)

    Example:
        >>> refuse_bn_folding(nn.Sequential(nn.Linear(2, 2)))
    """
    bns = [n for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if bns:
        raise ValueError(f"The model has sharded (DTensor) weights and BatchNorm layers {bns}: folding a "
                         "BatchNorm into a sharded weight is not supported yet; pass fold_bn=False")


def _spec_tensors(spec) -> list[torch.Tensor]:
    """The stored tensors a descriptor reads (matrix, low-rank factors, LoRA base and factors)."""
    if hasattr(spec, "weight") and callable(spec.weight):
        return [spec.weight()]
    return [t for part in ("base", "a", "b") if hasattr(spec, part) for t in _spec_tensors(getattr(spec, part))]


def sharded_operator(name: str, spec, view: str = "matrix") -> ShardedView | None:
    """The sharded operator of a layer descriptor reading ``DTensor`` weights; None when none is a ``DTensor``.

    Args:
        name: the layer's name (for messages).
        spec: its registry descriptor (``MatrixSpec``, ``LowRankSpec`` or ``LoRASpec``).
        view: the state's view; the exact operator view of a sharded convolution is refused.

    Returns:
        A :class:`ShardedView` (:class:`ShardedFactorView` for low-rank and
        LoRA layers), or None for unsharded layers.

    Raises:
        ValueError: the operator view of a sharded convolution, and placements that would need a gather.

    Example:
        >>> from robustcompress.layers import layer_views
        >>> (v,) = layer_views(nn.Linear(3, 2))
        >>> sharded_operator("fc", v.spec) is None
        True
    """
    tensors = _spec_tensors(spec)
    if not any(is_sharded(t) for t in tensors):
        return None
    if not (hasattr(spec, "weight") and callable(spec.weight)):
        return ShardedFactorView(name, spec)
    if view == "operator" and spec.conv is not None:
        raise ValueError(f"Layer {name!r}: the operator view of a sharded convolution is not supported; "
                         "use view='matrix'")
    return ShardedView(name, spec)


class ShardedBackend:
    """One subspace iteration for every sharded layer: one all-reduce per process group, or three with factors.

    Unlike the product back-ends (which return ``U₀ = W V, Y = Wᵀ U₀`` for the
    state's update), the sharded back-end also owns the update: its Gram
    matrix and norms must come from reduced values, and column-sharded layers
    iterate ``Wᵀ``. Matrix layers need one all-reduce (``Z`` and ``‖A_r‖_F²``
    of every layer in one flat buffer per process group and dtype).
    Factorised layers (:class:`ShardedFactorView`) add the reduction of their
    ``A V``-type terms before it (every step: every rank must run the same
    collectives) and again after the update (for the new ``V``): one batched
    all-reduce each, for all of them. ``all_reduce`` is ``torch.distributed.all_reduce``
    unless given (a sum over the ranks of ``group``).

    Example:
        >>> ShardedBackend().step({}, {})
        {}
    """

    def __init__(self, all_reduce: Callable[..., object] | None = None) -> None:
        self._all_reduce = all_reduce

    def _reduce(self, parts: dict[str, list[torch.Tensor]], ops: dict[str, ShardedView]) -> dict[str, list[torch.Tensor]]:
        """Sum every layer's tensors over its group: one flat all-reduce per (group, dtype)."""
        out = {n: list(ts) for n, ts in parts.items()}
        packs: dict[tuple, list[str]] = {}
        for name, ts in parts.items():
            if ops[name].group is not None and ts:
                packs.setdefault((id(ops[name].group), ts[0].dtype), []).append(name)
        for members in packs.values():
            flat = torch.cat([t.reshape(-1) for n in members for t in parts[n]])
            (self._all_reduce or dist.all_reduce)(flat, group=ops[members[0]].group)
            offset = 0
            for n in members:
                out[n] = []
                for t in parts[n]:
                    out[n].append(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
        return out

    def _refresh(self, ops: dict[str, ShardedView], bufs: dict[str, nn.Module]) -> None:
        reduced = self._reduce({n: op.pre_parts(bufs[n]) for n, op in ops.items()}, ops)
        for n, op in ops.items():
            op.take_pre(bufs[n], reduced[n])

    def step(self, ops: dict[str, ShardedView], bufs: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """One iteration of every layer in ``ops``; returns ``{name: finite flag}`` (replicated)."""
        factored = {n: op for n, op in ops.items() if isinstance(op, ShardedFactorView)}
        if factored:
            # Every step, fresh or not: skipping it on the ranks whose weights did not change
            # (a local fact) while others run it would leave the collectives unmatched.
            self._refresh(factored, bufs)
        parts = {name: op.local_products(bufs[name]) for name, op in ops.items()}
        reduced = self._reduce({n: [p[1], p[2]] for n, p in parts.items()}, ops)
        flags = {}
        for name, op in ops.items():
            buf = bufs[name]
            p, _, _, post = parts[name]
            z, scalars = reduced[name]
            if post is not None:
                z, scalars = z + post[0], scalars + post[1]
            warm, _ = op.blocks_of(buf)
            ok = ritz_update(p, z, getattr(buf, warm), op.sharded_rows(buf), buf.S, buf.Rv, buf.C, buf.R,
                             also=op.ritz_also())
            ok = ok & torch.isfinite(scalars).all()
            op.finish(buf, scalars)
            flags[name] = ok
        if factored:
            # A V of the new V (same weights): what u_jᵀ M v_j's gradient on B needs, and round 1 of the next iteration.
            self._refresh(factored, bufs)
        return flags
