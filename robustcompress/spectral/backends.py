"""Product back-ends of the spectral state: ``U₀ = W V`` and ``Y = Wᵀ U₀`` for many layers at once.

A back-end is an object with one method, :meth:`ProductBackend.products`: given
the layers' operators and warm right vectors it returns the products of the
layers it computes and leaves the others to the next back-end. The state asks
its back-ends in order; :class:`TorchBackend` computes every operator, so it
always comes last.

* :class:`TorchBackend` — batched torch products (layers of one shape stacked
  into one ``bmm`` where that pays, the rest multiplied in place);
* :class:`FusedBackend` — the fused Triton kernel of
  :mod:`robustcompress.kernels` (one read of each weight per iteration) for
  matrix views (plain, transposed, sliced, grouped: strided views of the one
  stored weight, read in place) and LoRA views.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from robustcompress.spectral.views import matrix_view
    >>> ops = {"a": matrix_view(nn.Linear(4, 3))}
    >>> u0, y = TorchBackend().products(ops, {"a": torch.ones(4, 1)})["a"]
    >>> u0.shape, y.shape
    (torch.Size([3, 1]), torch.Size([4, 1]))
"""

from __future__ import annotations

import torch

from .. import kernels
from .views import LinearOperator, LoRAView, MatrixView

__all__ = ["ProductBackend", "TorchBackend", "FusedBackend", "BATCH_MAX_NUMEL", "ONE_READ_MIN_BYTES"]

# Default of SpectralState(stack_max_numel=...) on CUDA: without the fused
# kernel, layers up to this many weights are stacked into one bmm per shape group: there launch overhead dominates small
# layers. Larger ones are multiplied in place, since stacking copies every
# weight once more per step. On CPU stacking never paid (measured on ResNet-18
# and a 30-layer MLP of 64×64 layers: equal or slower), so CPU layers are
# multiplied in place.
BATCH_MAX_NUMEL = 1 << 18

# CPU matrices from this many bytes on are multiplied in one pass over row
# blocks. Below it the weight fits a server CPU's last-level cache (32 MiB
# measured here), so its second read comes from cache and the per-block calls
# cost more than they save (bench_spectral: a 2000 × 2000 fp32 layer, 16 MiB,
# ran ~1.4× slower blocked at k = 1; a 4096 × 4096 one, 64 MiB, ~1.6× faster).
ONE_READ_MIN_BYTES = 32 << 20

Products = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ProductBackend:
    """One way of computing ``U₀ = W V`` and ``Y = Wᵀ U₀`` for a set of layers."""

    def products(self, ops: dict[str, LinearOperator], vs: dict[str, torch.Tensor]) -> Products:
        """The products of the layers this back-end computes.

        Args:
            ops: ``{name: operator}`` of the layers to multiply.
            vs: ``{name: V}``, each ``n × k`` in the operator's compute dtype.

        Returns:
            ``{name: (U₀, Y)}`` for the layers it computed (a subset of ``ops``);
            the caller hands the rest to the next back-end.
        """
        raise NotImplementedError


class TorchBackend(ProductBackend):
    """Batched torch products for every operator.

    Args:
        stack_max_numel: layers of one shape with at most this many weights are
            stacked into one batched product (None: 2¹⁸ on CUDA, where launches
            dominate small layers; 0 on CPU, where stacking measured slower).
        block_rows: CPU matrices of at least ``ONE_READ_MIN_BYTES`` (32 MiB) are
            walked in blocks of at most this many rows (fewer for wide rows, so a
            block stays within ~1 MiB of cache): ``U_b = W_b V`` then
            ``Y += W_bᵀ U_b`` while the block is still in cache — one read of each
            weight per iteration. 0 turns it off (two full products).
        one_read_min_bytes: the size (in bytes of the stored weight) from which
            the one-read walk is used (default ``ONE_READ_MIN_BYTES``, 32 MiB).
    """

    def __init__(self, stack_max_numel: int | None = None, block_rows: int = 64,
                 one_read_min_bytes: int = ONE_READ_MIN_BYTES) -> None:
        self.stack_max_numel = stack_max_numel
        self.block_rows = block_rows
        self.one_read_min_bytes = one_read_min_bytes

    def products(self, ops: dict[str, LinearOperator], vs: dict[str, torch.Tensor]) -> Products:
        out: Products = {}
        groups: dict[tuple, list[str]] = {}
        singles = []
        for name, op in ops.items():
            key = op.batch_key
            limit = self.stack_max_numel
            if limit is None:
                limit = 0 if op.device.type == "cpu" else BATCH_MAX_NUMEL
            if key is not None and op.shape[0] * op.shape[1] <= limit:
                groups.setdefault(key + (vs[name].shape[1],), []).append(name)
            else:
                singles.append(name)
        for members in groups.values():
            if len(members) == 1:
                singles.extend(members)
                continue
            w = torch.stack([ops[n].matrix2d() for n in members])
            v = torch.stack([vs[n] for n in members])
            u0 = torch.bmm(w, v)
            y = torch.bmm(w.transpose(1, 2), u0)
            for i, n in enumerate(members):
                out[n] = (u0[i], y[i])
        for name in singles:
            op = ops[name]
            if self._one_read(op):
                out[name] = _blocked_products(op, vs[name])
                continue
            out[name] = op.products(vs[name])
        return out

    def _one_read(self, op: LinearOperator) -> bool:
        """Large, ungrouped, row-major CPU matrices: walk row blocks, reading each weight once."""
        if not (self.block_rows and isinstance(op, MatrixView) and op.groups == 1 and op.device.type == "cpu"):
            return False
        m, n = op.shape
        if m * n * op.spec.weight().element_size() < self.one_read_min_bytes or m <= self.block_rows:
            return False
        return op.spec.matrix().stride(-1) == 1


def _blocked_products(op: MatrixView, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U₀ = S W V`` and ``Y = Wᵀ S U₀`` in one pass over row blocks of ``W``: the CPU twin of the fused kernel.

    ``Wᵀ S² W V = Σ_b W_bᵀ S_b² (W_b V)``: each block ``W_b`` is multiplied twice
    while it is still in cache, so each weight is read from memory once per
    iteration instead of twice. The blocks are kept transposed (``k × rows``:
    ``U_bᵀ = Vᵀ W_bᵀ``, ``Yᵀ += U_bᵀ W_b``), the layout CPU BLAS multiplies
    fast for thin blocks (see :func:`~robustcompress.spectral.views.thin_product`).
    """
    w = op.spec.matrix()
    m, n = w.shape
    rows = max(8, min(64, (1 << 20) // max(1, n * w.element_size())))
    s = op.scale()
    vt = v.mT
    u0t = torch.empty(v.shape[1], m, dtype=op.dtype, device=v.device)
    yt = torch.zeros(v.shape[1], n, dtype=op.dtype, device=v.device)
    for i in range(0, m, rows):
        wb = w[i:i + rows].to(op.dtype)
        ub = vt @ wb.mT
        if s is not None:
            ub = ub * s[None, i:i + rows]
            u0t[:, i:i + rows] = ub
            yt.addmm_(ub * s[None, i:i + rows], wb)
        else:
            u0t[:, i:i + rows] = ub
            yt.addmm_(ub, wb)
    return u0t.mT, yt.mT


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# A grouped view is one kernel layer per group; beyond this many groups
# (depthwise convolutions) the per-layer host work outweighs the launch saved,
# and the torch back-end's one batched product over the groups is left to run it.
_MAX_KERNEL_GROUPS = 16


class FusedBackend(ProductBackend):
    """The fused Triton kernel for matrix views and LoRA views with float32/bfloat16/float16 weights.

    Every :class:`MatrixView` is a strided view of its one stored weight
    (plain, transposed like transformers' ``Conv1D``, row- or column-sliced
    like packed Q/K/V and attention heads), which the kernel reads in place
    through its pointer table; a grouped view is one kernel layer per group
    (block ``j`` of ``M`` against rows ``j`` of ``V``; views with more than
    16 groups, e.g. depthwise convolutions, are left to the torch back-end). A :class:`LoRAView`
    ``op(W₀) + s·B·A`` runs ``op(W₀)`` through the kernel with the addend
    ``X = s·B(A V)`` (so ``U`` is the whole operator's product while ``W₀`` is
    read once), then adds ``s·Aᵀ(Bᵀ U)`` to ``Y`` in torch (``r ≪ m, n``).
    Other operators (low-rank products, convolution operators, float64
    weights) are left to the next back-end.

    Args:
        strict: raise when the kernel cannot run (``backend="triton"``) instead
            of leaving every layer to the next back-end; strict also runs on
            CPU tensors (Triton's interpreter).
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        # Caches the kernel's pointer table, rebuilt only when a weight's
        # address, shape, strides or dtype changes; created on first use.
        self._kernel = None
        # Persistent fp32 buffers (row scales, LoRA addends), refreshed in place
        # so the table's addresses stay the same from step to step.
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def _eligible(self, op: LinearOperator) -> bool:
        if isinstance(op, MatrixView):
            if op.groups > _MAX_KERNEL_GROUPS:
                return False
            weight = op.spec.weight()
        elif isinstance(op, LoRAView):
            weight = op.spec.base.weight()
            if op.spec.base.groups != 1 or op.spec.base.row_scale is not None:
                return False
        else:
            return False
        return weight.dtype in _KERNEL_DTYPES and (op.device.type == "cuda" or self.strict)

    def _buffer(self, key: tuple[str, str], fresh: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != fresh.shape or buf.device != fresh.device:
            buf = self._buffers[key] = fresh.detach().to(torch.float32).contiguous().clone()
        else:
            buf.copy_(fresh)
        return buf

    def products(self, ops: dict[str, LinearOperator], vs: dict[str, torch.Tensor]) -> Products:
        eligible = [n for n, op in ops.items() if self._eligible(op)]
        if not eligible:
            if self.strict:
                raise RuntimeError("backend='triton' but no layer is one the kernel runs: a matrix view or LoRA view "
                                   "with float32, bfloat16 or float16 weights")
            return {}
        if not kernels.triton_available(ops[eligible[0]].device):
            if self.strict:
                raise RuntimeError("backend='triton' requested but Triton is not available for these tensors "
                                   "(pip install 'robustcompress[kernels]'; on CPU, the interpreter needs "
                                   "TRITON_INTERPRET=1 set before triton is first imported)")
            return {}
        if self._kernel is None:
            self._kernel = kernels.FusedPowerStep()
        weights, v_in, scales, addends = [], [], [], []
        parts: dict[str, list[int]] = {}  # name -> indices of its kernel layers
        lora_factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for name in eligible:
            op, v = ops[name], vs[name]
            v32 = v if v.dtype == torch.float32 else self._buffer((name, "v"), v)
            if isinstance(op, LoRAView):
                sp = op.spec
                a, b = sp.a.matrix().detach().float(), sp.b.matrix().detach().float()
                lora_factors[name] = (a, b, sp.scale)
                parts[name] = [len(weights)]
                weights.append(sp.base.matrix().detach())
                v_in.append(v32)
                scales.append(None)
                addends.append(self._buffer((name, "x"), sp.scale * (b @ (a @ v32))))
                continue
            spec = op.spec
            s = None if op.row_scale is None else self._buffer((name, "s"), op.row_scale())
            if op.groups == 1:
                parts[name] = [len(weights)]
                weights.append(spec.matrix().detach())
                v_in.append(v32)
                scales.append(s)
                addends.append(None)
                continue
            # Block diagonal: group j's rows of M times V's rows of group j.
            blocks = spec.blocks().detach()
            g, mg, ng = blocks.shape
            parts[name] = list(range(len(weights), len(weights) + g))
            for j in range(g):
                weights.append(blocks[j])
                v_in.append(v32[j * ng:(j + 1) * ng])
                scales.append(None if s is None else s[j * mg:(j + 1) * mg])
                addends.append(None)
        us, ys = self._kernel(weights, v_in, scales, addends)
        out: Products = {}
        for name in eligible:
            idx = parts[name]
            if len(idx) == 1:
                u0, y = us[idx[0]], ys[idx[0]]
            else:
                u0, y = torch.cat([us[i] for i in idx]), torch.cat([ys[i] for i in idx])
            if name in lora_factors:
                a, b, scale = lora_factors[name]
                y = y + scale * (a.T @ (b.T @ u0))
            dtype = vs[name].dtype
            out[name] = (u0.to(dtype), y.to(dtype))
        return out
