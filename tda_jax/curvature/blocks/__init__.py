"""Curvature blocks: identity, diagonal, K-FAC, EK-FAC and exact, registered by name.

See :mod:`tda_jax.curvature.blocks.base` for the interface; each block lives in its own module and
registers itself on import.
"""

from tda_jax.curvature.blocks.base import (
    CurvatureBlock,
    LayerwiseBlock,
    check_damping,
    get_block,
    layer_quadratic,
    register_block,
    registered_blocks,
    squared_gradient_sums,
)
from tda_jax.curvature.blocks.diagonal import DIAGONAL, DiagonalBlock
from tda_jax.curvature.blocks.ekfac import EKFAC, EKFACBlock
from tda_jax.curvature.blocks.exact import EXACT, ExactBlock, blocked_cholesky
from tda_jax.curvature.blocks.identity import IDENTITY, IdentityBlock
from tda_jax.curvature.blocks.kfac import KFAC, KFACBlock, covariance_sums

__all__ = [
    "DIAGONAL",
    "EKFAC",
    "EXACT",
    "IDENTITY",
    "KFAC",
    "CurvatureBlock",
    "DiagonalBlock",
    "EKFACBlock",
    "ExactBlock",
    "IdentityBlock",
    "KFACBlock",
    "LayerwiseBlock",
    "blocked_cholesky",
    "check_damping",
    "covariance_sums",
    "get_block",
    "layer_quadratic",
    "register_block",
    "registered_blocks",
    "squared_gradient_sums",
]
