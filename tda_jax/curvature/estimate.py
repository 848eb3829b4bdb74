"""The fitted curvature estimate: a pytree of factors plus the static facts that produced it."""

from __future__ import annotations

import json
from typing import Any

import jax

from tda_jax.capture.layers import LayerSpec
from tda_jax.curvature.blocks import CurvatureBlock, get_block


@jax.tree_util.register_pytree_node_class
class Curvature:
    """A fitted curvature estimate that can be passed through ``jit``, ``vmap`` and ``device_put``.

    Attributes:
      strategy: the block's registered name (``"identity"``, ``"diagonal"``, ``"kfac"``, ``"ekfac"``,
        ``"exact"``, or a user block).
      specs: the tracked layers, in a fixed order (static).
      factors: the block's factor pytree (device arrays), e.g. for EK-FAC
        ``{layer: {"eigvecs_A", "eigvals_A", "eigvecs_G", "eigvals_G", "lambda", "damping"}}``.
      settings: the arguments that produced the estimate (static; saved with staged fits).
    """

    def __init__(self, strategy: str, specs: tuple[LayerSpec, ...], factors: Any,
                 settings: dict[str, Any] | str):
        self.strategy = strategy
        self.specs = tuple(specs)
        self.factors = factors
        self._settings = settings if isinstance(settings, str) else json.dumps(settings, sort_keys=True)

    def tree_flatten(self):
        return (self.factors,), (self.strategy, self.specs, self._settings)

    @classmethod
    def tree_unflatten(cls, aux, children):
        strategy, specs, settings = aux
        return cls(strategy, specs, children[0], settings)

    @property
    def block(self) -> CurvatureBlock:
        return get_block(self.strategy)

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self._settings)

    @property
    def damping(self) -> dict[str, float]:
        """Damping actually used, by layer (``{"exact": value}`` for the exact block)."""
        return self.block.damping(self.specs, self.factors)

    @property
    def num_params(self) -> int:
        return sum(s.num_params for s in self.specs)

    def precondition(self, grads: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """``(F + damping)^-1 v`` for ``v[layer] [Q, in, out]`` (matrix view of each layer)."""
        return self.block.precondition(self.specs, self.factors, grads)

    def to_dense(self, damped: bool = False) -> jax.Array:
        """The explicit ``[P, P]`` matrix (parameter order: see :mod:`tda_jax.curvature.blocks.base`)."""
        return self.block.to_dense(self.specs, self.factors, damped)

    def __repr__(self) -> str:
        return (f"Curvature(strategy={self.strategy!r}, layers={[s.name for s in self.specs]}, "
                f"num_params={self.num_params})")
