"""FSD estimators LAFTR is compared with, in the same ``(params0, params1) -> scalar`` form.

* :func:`true_fsd`: ``(1/n) sum_i rho(f(x_i, theta0), f(x_i, theta1))`` on stored inputs: all the
  training data (the target), or a coreset of ``m`` examples (:func:`select_coreset`; ``m d``
  numbers stored).
* :func:`quadratic_fsd`: the second-order expansion around ``theta0``,
  ``FSD ~ 0.5 Delta theta^T G Delta theta`` with ``G = E_x[J^T H_rho J]`` the GGN of the distance
  (``H_rho = I`` for ``"sq"``, ``diag(p) - p p^T`` for ``"kl"``). ``G`` comes from the library's
  curvature code (:func:`fit_quadratic` calls :func:`tda_jax.curvature.fit_curvature` with the
  expected Fisher of the matching loss): ``"diagonal"`` is the EWC penalty, ``"kfac"`` the K-FAC
  quadratic ``0.5 sum_l tr(A_l Delta W_l G_l Delta W_l^T)`` (any layerwise block works).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tda_jax import losses
from tda_jax.curvature import Curvature, fit_curvature
from tda_jax.data import Dataset, num_examples, subset
from tda_jax.fsd.distances import check_distance, discrepancy

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class HeadApply:
    """``(params, x) -> model.apply({"params": params}, x)[:, outputs]`` (hashable, so compiled
    curvature passes are shared between equal heads)."""

    model: nn.Module
    outputs: tuple[int, ...] | None = None

    def __call__(self, params: Any, inputs: Array) -> Array:
        out = self.model.apply({"params": params}, inputs)
        return out if self.outputs is None else out[:, jnp.asarray(self.outputs)]


def _root(params: Any) -> Any:
    if isinstance(params, dict) and "params" in params and len(params) == 1:
        return params["params"]
    return params


def true_fsd(apply_fn, params0: Any, params1: Any, inputs: Array, *, distance: str = "sq",
             batch_size: int | None = None) -> Array:
    """``mean_i rho(f(x_i, theta0), f(x_i, theta1))`` over ``inputs`` ``[n, ...]``.

    Args:
      apply_fn: ``(params, x) -> outputs`` (e.g. :class:`HeadApply`), taking the params dict.
      params0, params1: variables or params at theta0 / theta1.
      inputs: the stored inputs (all the data, or a coreset).
      distance: ``"sq"`` or ``"kl"``.
      batch_size: evaluate in chunks of this many rows (``lax.map``); None for one batch.
    """
    check_distance(distance)
    p0, p1 = _root(params0), _root(params1)
    inputs = jnp.asarray(inputs)

    def chunk(x):
        return jnp.sum(discrepancy(distance, apply_fn(p0, x), apply_fn(p1, x)))

    n = inputs.shape[0]
    if n == 0:
        raise ValueError("inputs is empty")
    if batch_size is None or batch_size >= n:
        return chunk(inputs) / n
    full = (n // batch_size) * batch_size
    total = jnp.sum(jax.lax.map(chunk, inputs[:full].reshape(-1, batch_size, *inputs.shape[1:])))
    if full < n:
        total = total + chunk(inputs[full:])
    return total / n


def select_coreset(key: Array, data: Dataset, size: int) -> Dataset:
    """``size`` examples drawn uniformly without replacement (the coreset FSD's memory)."""
    n = num_examples(data)
    if not 0 < int(size) <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {size}")
    index = np.sort(np.asarray(jax.random.choice(key, n, (int(size),), replace=False)))
    return subset(data, index)


def fit_quadratic(model: nn.Module, params: Any, data: Dataset, *, strategy: str = "kfac",
                  distance: str = "sq", outputs: Sequence[int] | None = None,
                  batch_size: int = 256) -> Curvature:
    """The GGN of ``distance`` at ``params`` (theta0) on ``data`` with a layerwise curvature block.

    ``"sq"`` uses the mean-squared-error loss (output Hessian ``I``), ``"kl"`` the softmax cross
    entropy (``diag(p) - p p^T``); both with ``fisher="expected"``, which does not read the
    targets, so zeros are passed as targets.

    Args:
      model: the flax module; ``params``: its variables or params.
      data: the data the FSD averages over.
      strategy: a layerwise block: ``"diagonal"`` (EWC), ``"kfac"``, ``"ekfac"``.
      distance: ``"sq"`` or ``"kl"``.
      outputs: restrict to these outputs (a multi-head task's head).
      batch_size: examples per curvature step.
    """
    check_distance(distance)
    outputs = None if outputs is None else tuple(int(o) for o in outputs)
    apply_fn = HeadApply(model, outputs)
    root = _root(params)
    n = num_examples(data)
    if distance == "sq":
        c = int(jax.eval_shape(apply_fn, root, jnp.asarray(data.inputs[:1])).shape[-1])
        loss = losses.mean_squared_error()
        targets = np.zeros((n, c), np.float32)
        num_classes = None
    else:
        loss = losses.softmax_cross_entropy()
        c = int(jax.eval_shape(apply_fn, root, jnp.asarray(data.inputs[:1])).shape[-1])
        targets = np.zeros((n,), np.int32)
        num_classes = c
    dataset = Dataset(np.asarray(data.inputs), targets, num_classes)
    return fit_curvature(apply_fn, root, dataset, strategy=strategy, loss=loss,
                         fisher="expected", batch_size=batch_size, allow_untracked=False)


def quadratic_fsd(curvature: Curvature, params0: Any, params1: Any) -> Array:
    """``0.5 Delta theta^T G Delta theta`` with ``G`` the *undamped* layerwise curvature.

    Per layer (matrix view ``[in (+1 bias row), out]``, see
    :class:`tda_jax.capture.layers.LayerSpec`): rotate ``Delta W`` into the block's basis
    (``Q_A^T Delta W Q_G`` for K-FAC/EK-FAC, identity for the diagonal) and sum
    ``eigenvalues * (rotated)^2``.
    """
    block = curvature.block
    if not hasattr(block, "eigenvalues"):
        raise ValueError(f"quadratic_fsd needs a layerwise curvature block, got "
                         f"{curvature.strategy!r}")
    p0, p1 = _root(params0), _root(params1)
    total = jnp.zeros((), jnp.float32)
    for spec in curvature.specs:
        layer0, layer1 = p0, p1
        for part in spec.path:
            layer0, layer1 = layer0[part], layer1[part]
        delta = spec.to_matrix(layer1) - spec.to_matrix(layer0)
        factors = curvature.factors[spec.name]
        q_a, q_g = block.basis(factors)
        if q_a is not None:
            delta = q_a.T @ delta
        if q_g is not None:
            delta = delta @ q_g
        total = total + jnp.sum(block.eigenvalues(factors) * jnp.square(delta))
    return 0.5 * total


def quadratic_num_stored(curvature: Curvature) -> int:
    """Numbers a quadratic penalty stores: the undamped factors (eigenvectors + eigenvalues)."""
    leaves = jax.tree_util.tree_leaves(curvature.factors)
    return int(sum(np.size(leaf) for leaf in leaves if np.ndim(leaf) > 0))
