"""The math of lightning-stability (SPEC §1–§8): pure tensor functions, no Lightning, no hooks."""

from ._compiled import compile_mode, compile_stats, set_compile_mode
from .attention import (
    AttentionDiagnostics,
    attention_diagnostics,
    attention_entropy,
    attention_logit_max,
    kappa_score,
)
from .balanced_mass import (
    BalancedMass,
    balanced_mass_per_head,
    softmax_jacobian_inf1_norm,
    theta_balanced_mass,
)
from .bound import UnifiedBound, combined_predictor, residual_gain, unified_bound
from .collapse import rank_collapse, token_similarity
from .linear import (
    condition_from_singular_values,
    condition_number,
    extreme_singular_values,
    kappa_wkwq,
    singular_value_extremes_many,
    spectral_norm,
    wkwq_norm,
)
from .norm import (
    ln_error_coefficient,
    ln_error_coefficient_from_variance,
    propose_ln_eps,
    propose_ln_eps_from_variance,
    rho_ln,
    rho_ln_from_variance,
    token_variance,
)
from .precision import eps_mach
from .rolling import RollingZScore, rolling_zscore
from .softmax_jacobian import softmax_jacobian_norm
from .softmax_solver import kappa_softmax
from .value_conditioning import kappa_v, kappa_v_many

__all__ = [
    "AttentionDiagnostics",
    "BalancedMass",
    "RollingZScore",
    "UnifiedBound",
    "attention_diagnostics",
    "attention_entropy",
    "attention_logit_max",
    "balanced_mass_per_head",
    "combined_predictor",
    "compile_mode",
    "compile_stats",
    "condition_from_singular_values",
    "condition_number",
    "eps_mach",
    "extreme_singular_values",
    "kappa_score",
    "kappa_softmax",
    "kappa_v",
    "kappa_v_many",
    "kappa_wkwq",
    "ln_error_coefficient",
    "ln_error_coefficient_from_variance",
    "propose_ln_eps",
    "propose_ln_eps_from_variance",
    "rank_collapse",
    "residual_gain",
    "rho_ln",
    "rho_ln_from_variance",
    "rolling_zscore",
    "set_compile_mode",
    "singular_value_extremes_many",
    "softmax_jacobian_inf1_norm",
    "softmax_jacobian_norm",
    "spectral_norm",
    "theta_balanced_mass",
    "token_similarity",
    "token_variance",
    "unified_bound",
    "wkwq_norm",
]
