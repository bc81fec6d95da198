"""Integrations with training frameworks: a Lightning callback and a Hugging Face Trainer callback.

Each lives in its own submodule and imports its framework only when that
submodule is imported, so ``import robustcompress`` (and this package) never
imports ``lightning`` or ``transformers``:

* :mod:`robustcompress.integrations.lightning` — ``PenaltyCallback`` for ``lightning.Trainer``;
* :mod:`robustcompress.integrations.hf` — ``PenaltyCallback`` for ``transformers.Trainer``.

Both add the penalty gradients once per optimizer step *after* gradient
clipping (penalty gradients are never clipped), the same rule as
:func:`robustcompress.optim.wrap`, and save / restore the penalties, the
spectral state and the tracker with the framework's checkpoints.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["lightning", "hf"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
