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

Placements the state cannot iterate without gathering — ``Partial``,
``_StridedShard``, a sharded dimension that is not the operator's rows or
columns, two mesh dimensions sharding one weight — are refused with an error
naming the layer and its placement.

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

import sys
from typing import Callable

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from .iteration import cholesky_qr2
from .views import LinearOperator

__all__ = ["is_sharded", "ShardedView", "ShardedBackend", "local_products", "ritz_update", "sharded_operator",
           "refuse_bn_folding"]


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


@torch.no_grad()
def ritz_update(p: torch.Tensor, z: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Update ``(C_r, B, σ)`` in place from this rank's ``P_r`` and the reduced ``Z``.

    k = 1: ``s = √(bᵀz) = ‖A b‖``, ``c_r = p_r / s``, ``b ← z/‖z‖``,
    ``σ = ‖z‖ / s = cᵀ A b_new`` (what the unsharded state computes).
    k > 1: Rayleigh–Ritz with ``G = BᵀZ``: ``σ_j = √λ_j``, ``C_r = P_r Q / σ``,
    ``B ← orth(Z Q)`` (CholeskyQR2). Directions with ``σ ≈ 0`` keep their
    previous vectors, and a non-finite ``Z`` leaves everything unchanged.
    Only reduced quantities decide anything, so every rank takes the same branch.

    Args:
        p: ``P_r = A_r B`` (``m_r × k``).
        z: the all-reduced ``Z = AᵀA B`` (``n × k``).
        b: the warm block ``B`` (``n × k``, orthonormal), updated in place.
        c: this rank's rows of ``C`` (``m_r × k``), updated in place.
        s: ``σ`` (``k``), updated in place.
        r: ``c_jᵀ A b_j`` for the new vectors (``k``), written in place.

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
    ok = torch.isfinite(z).all()
    if k == 1:
        s2 = (b * z).sum()
        sv = s2.clamp_min(0).sqrt()
        zn = torch.linalg.vector_norm(z)
        ok = ok & torch.isfinite(sv)
        live = ok & (sv > tiny) & (zn > tiny)
        c.copy_(torch.where(live, p / sv.clamp_min(tiny), c))
        b.copy_(torch.where(live, z / zn.clamp_min(tiny), b))
        s.copy_(torch.where(live, zn / sv.clamp_min(tiny), torch.where(ok, sv, s[0])).reshape(1))
        r.copy_(torch.where(ok, torch.where(live, s, torch.zeros_like(s)), r))
        return ok
    gram = b.T @ z
    gram = torch.where(ok, (gram + gram.T) / 2, torch.zeros_like(gram))
    lam, q = torch.linalg.eigh(gram)
    lam, q = lam.flip(-1), q.flip(-1)
    sig = lam.clamp_min(0).sqrt()
    floor = torch.finfo(sig.dtype).eps * sig[:1].clamp_min(tiny) * 16
    live = (sig > floor) & ok
    c.copy_(torch.where(live[None, :], (p @ q) / sig.clamp_min(tiny), c))
    zq = z @ q
    z_rot = torch.where(live[None, :], zq, b @ q)
    b_new = cholesky_qr2(torch.where(ok, z_rot, b))
    # c_jᵀ A b_j = q_jᵀ PᵀA b_j / σ_j = (Z q_j)ᵀ b_j / σ_j: no second product, no reduction.
    # A direction that kept an old c has no such identity; its value is taken as 0 (σ_j ≈ 0 there).
    r_new = torch.where(live, (zq * b_new).sum(0) / sig.clamp_min(tiny), torch.zeros_like(sig))
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


class ShardedView(LinearOperator):
    """A layer's matrix view whose stored ``DTensor`` weight is sharded along the operator's rows or columns.

    The operator is the registry's ``M = (W or Wᵀ)[rows, cols]``
    (:class:`~robustcompress.layers.MatrixSpec`; ``W`` seen as
    ``rearrange(w, "o i ... -> o (i ...)")``). ``side`` says what is sharded:
    ``"rows"`` (iterated as ``A = M``), ``"cols"`` (iterated as ``A = Mᵀ``) or
    ``"replicated"`` (every rank holds ``W``). A slice across the unsharded
    axis is taken locally (packed Q/K/V of a ``Conv1D`` stored in × out and
    sharded on its input axis); a slice along the sharded axis would straddle
    ranks unevenly and is refused.

    Args:
        name: the layer's name (for messages).
        spec: the layer's matrix descriptor; ``spec.weight()`` is a ``DTensor``.

    Raises:
        ValueError: a placement or descriptor that cannot be iterated without gathering.
    """

    def __init__(self, name: str, spec) -> None:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

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
        sharded = []
        for mesh_dim, pl in enumerate(weight.placements):
            if type(pl) is Shard:
                sharded.append((mesh_dim, pl.dim))
            elif not isinstance(pl, Replicate):
                raise _placement_error(name, weight, f"{pl} is not a plain Shard or Replicate")
        if len(sharded) > 1:
            raise _placement_error(name, weight, "more than one mesh dimension shards it")
        stored = (weight.shape[0], weight[0].numel())
        full = (stored[1], stored[0]) if spec.transpose else stored  # (W or Wᵀ) before slicing
        self.mesh_dim: int | None = None
        self.side = "replicated"
        if sharded:
            self.mesh_dim, dim = sharded[0]
            if dim not in (0, 1) or (dim == 1 and weight.dim() > 2):
                raise _placement_error(name, weight, f"Shard({dim}) is neither the operator's rows nor its columns")
            self.side = "rows" if (dim == 0) != spec.transpose else "cols"
        self._rows = _span(spec.rows, full[0], name)
        self._cols = _span(spec.cols, full[1], name)
        if (self.side == "rows" and self._rows != (0, full[0])) or (self.side == "cols" and self._cols != (0, full[1])):
            raise ValueError(f"Layer {name!r}: its operator is a slice along the axis the weight is sharded on "
                             f"(placements {tuple(weight.placements)}), which would straddle ranks unevenly; "
                             "not supported (leave the layer out with layers=..., or shard it on the other axis)")
        self.shape = (self._rows[1] - self._rows[0], self._cols[1] - self._cols[0])
        local_shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
        if tuple(local_shape) != tuple(weight.to_local().shape):
            raise _placement_error(name, weight, f"its local shard {tuple(weight.to_local().shape)} is not the "
                                   f"chunk {tuple(local_shape)} DTensor describes")
        if self.side == "replicated":
            self.local_range = (0, self.shape[0])
        else:
            d = sharded[0][1]
            self.local_range = (offset[d], offset[d] + local_shape[d])
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

    def iterated_local(self) -> torch.Tensor:
        """This rank's rows of the iterated operator ``A`` (``M`` or ``Mᵀ``), differentiable.

        ``to_local()`` is differentiable: gradients flow back to the local shard of the ``DTensor``.
        """
        w = self.weight.to_local().to(self.dtype)
        w = w if w.dim() == 2 else rearrange(w, "o i ... -> o (i ...)")
        if self.spec.transpose:
            w = w.T
        if self.side == "rows":
            return w[:, self._cols[0]:self._cols[1]]
        if self.side == "cols":
            return w[self._rows[0]:self._rows[1]].T
        return w[self._rows[0]:self._rows[1], self._cols[0]:self._cols[1]]

    def blocks_of(self, buf: nn.Module) -> tuple[str, str]:
        """Names of the (warm replicated, sharded) buffers: ``("V", "U")``, or ``("U", "V")`` for ``"cols"``."""
        return ("U", "V") if self.side == "cols" else ("V", "U")

    def shard_buffers(self, buf: nn.Module) -> None:
        """Replace the sharded block of freshly drawn full buffers by its local rows, as a ``DTensor``.

        The full vectors are drawn as for an unsharded layer and sliced, so a
        sharded state starts where the unsharded one does. The sharded block
        is a ``DTensor`` (``Shard(0)`` on the weight's mesh dimension), so
        ``torch.distributed.checkpoint`` saves and reshards it.
        """
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not hasattr(buf, "Rv"):
            # c_jᵀ A b_j after the last step: a cache (not saved), rebuilt by every step.
            buf.register_buffer("Rv", torch.zeros_like(buf.S), persistent=False)
        _, sharded = self.blocks_of(buf)
        if self.side == "replicated" or is_sharded(getattr(buf, sharded)):
            return
        full = getattr(buf, sharded)
        lo, hi = self.local_range
        placements = [Replicate()] * self.weight.device_mesh.ndim
        placements[self.mesh_dim] = Shard(0)
        local = full[lo:hi].clone()
        setattr(buf, sharded, DTensor.from_local(local, self.weight.device_mesh, placements, run_check=False,
                                                 shape=full.shape, stride=full.stride()))

    def _stamp_now(self, buf: nn.Module) -> tuple:
        return (self.weight._version, buf.S._version)

    def _check_fresh(self, buf: nn.Module) -> None:
        if self._stamp is None or self._stamp != self._stamp_now(buf):
            raise RuntimeError(
                f"Layer {self.name!r} is sharded (DTensor): its σ and ‖W‖_F are reduced across ranks in "
                "SpectralState.step(), and the weights or the state changed since the last step. Call "
                "state.step() before evaluating penalties (wrap() and penalties that own their state do).")

    def sigmas_expr(self, buf: nn.Module, count: int) -> torch.Tensor:
        """Differentiable ``c_jᵀ A b_j`` for the first ``count`` directions: global value, local gradient."""
        self._check_fresh(buf)
        warm, sharded = self.blocks_of(buf)
        b = getattr(buf, warm)[:, :count].detach()
        c = getattr(buf, sharded)
        c = (c.to_local() if is_sharded(c) else c)[:, :count].detach()
        partial = (c * (self.iterated_local() @ b)).sum(0)
        return buf.Rv[:count].to(partial.dtype) + (partial - partial.detach())

    def frobenius_expr(self, buf: nn.Module) -> torch.Tensor:
        """Differentiable ``‖M‖_F``: the reduced value, gradient ``M_r / ‖M‖_F`` on the local shard."""
        self._check_fresh(buf)
        partial = self.iterated_local().square().sum()
        return (self._frob2.to(partial.dtype) + (partial - partial.detach())).clamp_min(0).sqrt()

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
        A :class:`ShardedView`, or None for unsharded layers.

    Raises:
        ValueError: sharded low-rank or LoRA layers, the operator view of a
            sharded convolution, and placements that would need a gather.

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
        raise ValueError(f"Layer {name!r}: sharded factorised (low-rank or LoRA) layers are not supported yet")
    if view == "operator" and spec.conv is not None:
        raise ValueError(f"Layer {name!r}: the operator view of a sharded convolution is not supported; "
                         "use view='matrix'")
    return ShardedView(name, spec)


class ShardedBackend:
    """One subspace iteration for every sharded layer, with one all-reduce per process group.

    Unlike the product back-ends (which return ``U₀ = W V, Y = Wᵀ U₀`` for the
    state's update), the sharded back-end also owns the update: its Gram
    matrix and norms must come from reduced values, and column-sharded layers
    iterate ``Wᵀ``. ``all_reduce`` is ``torch.distributed.all_reduce`` unless
    given (a sum over the ranks of ``group``).

    Example:
        >>> ShardedBackend().step({}, {})
        {}
    """

    def __init__(self, all_reduce: Callable[..., object] | None = None) -> None:
        self._all_reduce = all_reduce

    def step(self, ops: dict[str, ShardedView], bufs: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """One iteration of every layer in ``ops``; returns ``{name: finite flag}`` (replicated)."""
        parts: dict[str, tuple] = {}
        packs: dict[tuple, list[str]] = {}
        for name, op in ops.items():
            buf = bufs[name]
            warm, sharded = op.blocks_of(buf)
            b = getattr(buf, warm)
            p, z, f2 = local_products(op.iterated_local().detach(), b)
            parts[name] = (p, z, f2)
            if op.group is not None:
                packs.setdefault((id(op.group), z.dtype), []).append(name)
        for members in packs.values():
            # One flat buffer per group and dtype: every Z block, then every ‖A_r‖_F².
            flat = torch.cat([parts[n][1].reshape(-1) for n in members] + [torch.stack([parts[n][2] for n in members])])
            reduce = self._all_reduce or dist.all_reduce
            reduce(flat, group=ops[members[0]].group)
            offset = 0
            for n in members:
                z = parts[n][1]
                parts[n] = (parts[n][0], flat[offset:offset + z.numel()].view_as(z), None)
                offset += z.numel()
            for i, n in enumerate(members):
                parts[n] = parts[n][:2] + (flat[offset + i],)
        flags = {}
        for name, op in ops.items():
            buf = bufs[name]
            p, z, f2 = parts[name]
            warm, sharded = op.blocks_of(buf)
            c = getattr(buf, sharded)
            ok = ritz_update(p, z, getattr(buf, warm), c.to_local() if is_sharded(c) else c, buf.S, buf.Rv)
            ok = ok & torch.isfinite(f2)
            op._frob2 = f2.clone()
            op._stamp = op._stamp_now(buf)
            flags[name] = ok
        return flags
