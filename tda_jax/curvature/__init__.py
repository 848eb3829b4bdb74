"""Curvature estimators for influence functions: identity, diagonal, K-FAC, EK-FAC, exact.

Public API:
  * :func:`fit_curvature` -> :class:`Curvature` (sharded passes over the data, saved stages).
  * :data:`STRATEGIES`, :data:`FISHER_TYPES`: the accepted ``strategy`` and ``fisher`` values.
  * :func:`fisher_cotangents`: output-space vectors for expected / sampled / empirical Fisher.
"""

from tda_jax.curvature.fisher import FISHER_TYPES, fisher_cotangents
from tda_jax.curvature.fit import Curvature, discover_layers, fingerprint, fit_curvature, run_pass
from tda_jax.curvature.strategies import REQUIRED_PASSES, STRATEGIES, precondition_layer

__all__ = [
    "FISHER_TYPES",
    "REQUIRED_PASSES",
    "STRATEGIES",
    "Curvature",
    "discover_layers",
    "fingerprint",
    "fisher_cotangents",
    "fit_curvature",
    "precondition_layer",
    "run_pass",
]
