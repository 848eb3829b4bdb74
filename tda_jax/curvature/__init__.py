"""Curvature estimators for influence functions, as registered curvature blocks.

Public API:
  * :func:`fit_curvature` -> :class:`Curvature` (a pytree; sharded passes over the data, saved
    stages), :func:`build_fit_steps` (compiled pass steps a caller can hold and reuse).
  * Blocks: :func:`get_block`, :func:`register_block`, :class:`CurvatureBlock`,
    :class:`LayerwiseBlock`; :func:`registered_blocks` lists the accepted ``strategy`` names.
  * :data:`FISHER_TYPES` and :func:`fisher_cotangents`: expected / sampled / empirical Fisher.
"""

from tda_jax.curvature.blocks import (
    CurvatureBlock,
    LayerwiseBlock,
    get_block,
    register_block,
    registered_blocks,
)
from tda_jax.curvature.estimate import Curvature
from tda_jax.curvature.fisher import FISHER_TYPES, fisher_cotangents
from tda_jax.curvature.fit import (
    build_fit_steps,
    check_compatible,
    discover_layers,
    fit_curvature,
    inspect_model,
    round_batch_size,
    run_pass,
)

STRATEGIES = registered_blocks()

__all__ = [
    "FISHER_TYPES",
    "STRATEGIES",
    "Curvature",
    "CurvatureBlock",
    "LayerwiseBlock",
    "build_fit_steps",
    "check_compatible",
    "discover_layers",
    "fisher_cotangents",
    "fit_curvature",
    "get_block",
    "inspect_model",
    "register_block",
    "registered_blocks",
    "round_batch_size",
    "run_pass",
]
