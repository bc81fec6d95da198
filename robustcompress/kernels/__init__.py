"""Fused GPU kernels (Triton) for the spectral core, imported lazily.

``import robustcompress.kernels`` never imports Triton: the kernels load on
the first :func:`fused_power_step` or :func:`triton_available` call.

* :func:`fused_power_step` / :class:`FusedPowerStep` — ``U_l = A_l V_l`` and
  ``Y_l = A_lᵀ U_l`` for many layers at once, each weight read once; weights
  may be strided views of stored tensors (transposed, row/column slices),
  read in place, and an optional ``U`` addend carries a low-rank term (LoRA).
* :func:`power_step_reference` — the same with plain matmuls (fallback, tests).
* :func:`triton_available` — whether the fused kernel can run on a device.
"""

from .fused import FusedPowerStep, fused_power_step, triton_available
from .reference import MAX_K, power_step_reference

__all__ = ["MAX_K", "FusedPowerStep", "fused_power_step", "power_step_reference", "triton_available"]
