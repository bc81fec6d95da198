"""robustcompress: keep PyTorch models compressible yet adversarially robust.

Structured compressibility — a few neurons or a few singular directions
carrying most of a layer's energy — creates a few highly sensitive input
directions that attackers exploit. robustcompress tracks that concentration
while a model trains (warm-started subspace iteration, shared by every term)
and penalises the sensitive-direction part of the robustness bound

    log K₂ = Σ_l log ‖W_l‖_F + ½ Σ_l log c_spec(W_l) + Σ_l log L_φ,
    c_spec = σ₁² / Σ_j σ_j²,

so models stay prunable / low-rank without handing attackers a few directions.

Example:
    >>> import torch, robustcompress as rc
    >>> model = rc.MLP(64, (32, 32), 10)
    >>> state = rc.SpectralState(model, k=4)
    >>> state.step()
"""

from .attacks import (
    adversarial_batch,
    fgsm,
    fooling_rate,
    multi_targeted_pgd,
    pgd,
    random_search,
    sensitive_direction_attack,
    sensitive_directions,
    universal_perturbation,
)
from .bound import LipschitzBound, certified_radius, gram_iteration_bound, layer_bound, lipschitz_bound
from .compress import (
    SensitivityImportance,
    amounts_for_energy,
    compression_curve,
    count_macs,
    count_parameters,
    export,
    finetune,
    load_exported,
    measure,
    prune,
    ranks_for_budget,
    remove_masks,
    truncate,
)
from .data import cifar10, digits, gaussian_mixture, linearly_separable, loader, write_fake_cifar10
from .evaluate import accuracy, autoattack_accuracy, eps_sweep, gradient_masking_check, minimal_eps, robust_accuracy
from .hooks import Tracker, track
from .layers import (
    LayerKind,
    LayerView,
    LowRankConv2d,
    LowRankLinear,
    MatrixSpec,
    LowRankSpec,
    LoRASpec,
    ViewOptions,
    batchnorm_scale,
    best_rank_factors,
    find_layers,
    head_name,
    layer_kind,
    register_layer_kind,
    to_dense,
    to_low_rank,
    unregister_layer_kind,
)
from .metrics import layer_metrics
from .models import MLP, SmallCNN, resnet18, vgg11, vgg16
from .optim import PenalizedOptimizer, RowL1Cap, SpectralNormClip, wrap
from .penalties import (
    GroupLassoPenalty,
    HeadSpreadPenalty,
    L1Penalty,
    NuclearNormPenalty,
    Penalty,
    RowL1Penalty,
    SpectralNormPenalty,
    TailEnergyPenalty,
    default_penalties,
)
from .reporting import format_report, report
from .spectral import (
    LinearOperator,
    SpectralState,
    cholesky_qr2,
    conv_operator,
    matrix_view,
    operator_for,
    record_input_shapes,
)

__version__ = "0.1.0"

__all__ = [
    "GroupLassoPenalty",
    "HeadSpreadPenalty",
    "L1Penalty",
    "LayerKind",
    "LayerView",
    "LinearOperator",
    "LipschitzBound",
    "LoRASpec",
    "LowRankConv2d",
    "LowRankLinear",
    "LowRankSpec",
    "MLP",
    "MatrixSpec",
    "NuclearNormPenalty",
    "PenalizedOptimizer",
    "Penalty",
    "RowL1Cap",
    "RowL1Penalty",
    "SensitivityImportance",
    "SmallCNN",
    "SpectralNormClip",
    "SpectralNormPenalty",
    "SpectralState",
    "TailEnergyPenalty",
    "Tracker",
    "ViewOptions",
    "accuracy",
    "adversarial_batch",
    "amounts_for_energy",
    "autoattack_accuracy",
    "batchnorm_scale",
    "best_rank_factors",
    "certified_radius",
    "cholesky_qr2",
    "cifar10",
    "compression_curve",
    "conv_operator",
    "count_macs",
    "count_parameters",
    "default_penalties",
    "digits",
    "eps_sweep",
    "export",
    "fgsm",
    "find_layers",
    "finetune",
    "fooling_rate",
    "format_report",
    "gaussian_mixture",
    "gradient_masking_check",
    "gram_iteration_bound",
    "head_name",
    "layer_bound",
    "layer_kind",
    "layer_metrics",
    "linearly_separable",
    "lipschitz_bound",
    "load_exported",
    "loader",
    "matrix_view",
    "measure",
    "minimal_eps",
    "multi_targeted_pgd",
    "operator_for",
    "pgd",
    "prune",
    "random_search",
    "ranks_for_budget",
    "record_input_shapes",
    "register_layer_kind",
    "remove_masks",
    "report",
    "resnet18",
    "robust_accuracy",
    "sensitive_direction_attack",
    "sensitive_directions",
    "to_dense",
    "to_low_rank",
    "track",
    "truncate",
    "universal_perturbation",
    "unregister_layer_kind",
    "vgg11",
    "vgg16",
    "wrap",
    "write_fake_cifar10",
]
