"""Compress for real: structured pruning, rank truncation, fine-tuning, re-measuring, export.

Two ways to make a trained network smaller, each returning the compressed model:

* :func:`prune` (:mod:`.pruning`) removes whole neurons / filters, ranked by
  an importance score; Torch-Pruning removes every coupled slice with them.
* :func:`truncate` (:mod:`.truncation`) replaces layers by their best
  rank-``r`` factorisation ``W ≈ B·A``, only where that holds fewer weights.

Then :func:`finetune`, :func:`measure` and :func:`compression_curve`
(:mod:`.measurement`), and :func:`export` / :func:`load_exported`
(:mod:`.exporting`: a checksummed file that rebuilds the smaller model from a
fresh base model). The layer facts these rely on (which layers prune / truncate
handle, the BatchNorm scale, Conv1D's orientation, the head) live in ``_kinds``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> prune(model, 0.5, example_inputs=torch.zeros(1, 8))[0].out_features
    8
    >>> type(truncate(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)), rank=4)[0]).__name__
    'LowRankLinear'
"""

from .exporting import export, load_exported
from .measurement import compression_curve, count_macs, count_parameters, finetune, measure
from .pruning import SensitivityImportance, amounts_for_energy, prune, remove_masks
from .truncation import ranks_for_budget, truncate

__all__ = [
    "SensitivityImportance",
    "prune",
    "remove_masks",
    "amounts_for_energy",
    "truncate",
    "ranks_for_budget",
    "count_parameters",
    "count_macs",
    "finetune",
    "measure",
    "compression_curve",
    "export",
    "load_exported",
]
