"""Identity block: ``F = 0`` and no damping, so the preconditioner is ``I`` (gradient dot products)."""

from __future__ import annotations

import jax.numpy as jnp

from tda_jax.curvature.blocks.base import LayerwiseBlock, register_block


class IdentityBlock(LayerwiseBlock):
    """Gradient dot product: ``score = -grad f^T grad loss``. Needs no pass over the data.

    ``damping`` is refused: with no curvature it would only rescale every score by ``1 / damping``.
    """

    name = "identity"
    passes = ()
    accepts_damping = False

    def initial_factors(self, specs):
        return {s.name: {"damping": jnp.zeros((), jnp.float32)} for s in specs}

    def eigenvalues(self, factors):
        return None

    def to_dense(self, specs, factors, damped=False):
        size = sum(s.num_params for s in specs)
        # The preconditioner is I: report F + damping = I when damped, F = 0 otherwise.
        return jnp.eye(size) if damped else jnp.zeros((size, size))


IDENTITY = register_block(IdentityBlock())
