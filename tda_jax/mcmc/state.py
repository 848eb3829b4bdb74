"""The state shared by the HMC and MALA kernels, and leaf-wise helpers for pytree positions.

A position is any pytree of floating arrays (a flat vector ``[D]``, a dict of parameter arrays,
...); a log density maps one position to a scalar. Gradients, momenta and proposal noise have the
position's structure. Random draws over a position are made as ONE flat standard normal vector of
the total size, split into the leaves in ``jax.tree_util.tree_leaves`` order: a kernel run on a
pytree position therefore draws exactly the numbers it would draw on the flat vector
``jax.flatten_util.ravel_pytree(position)[0]``, and (up to float rounding of the sums) gives the same
chain for the same keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
LogDensityFn = Callable[[PyTree], Array]
# value_and_grad_fn(position) -> (log_density scalar, grad with the position's structure)
ValueAndGradFn = Callable[[PyTree], tuple[Array, PyTree]]


class MCMCState(NamedTuple):
    """State of one HMC or MALA chain.

    Attributes:
      position: current point, a pytree of floating arrays (e.g. ``[D]``).
      log_density: log target density (up to a constant) at ``position``, scalar ``[]``.
      grad_log_density: its gradient at ``position``, same structure and shapes as ``position``.
    """

    position: PyTree
    log_density: Array
    grad_log_density: PyTree


def check_position(position: PyTree, name: str = "position") -> None:
    """Raises unless ``position`` is a non-empty pytree of floating-point arrays.

    Raises:
      ValueError: on a pytree without leaves.
      TypeError: on a leaf that is not floating point (named by its path).
    """
    leaves = jax.tree_util.tree_leaves_with_path(position)
    if not leaves:
        raise ValueError(
            f"`{name}` must be a pytree with at least one array leaf, got {position!r}."
        )
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path) or "(the array itself)"
            raise TypeError(
                f"`{name}` leaf {where} of shape {jnp.shape(leaf)} must have a floating dtype, "
                f"got {dtype}; cast it with .astype(jnp.float32)."
            )


def position_dtype(position: PyTree) -> jnp.dtype:
    """The common floating dtype of the leaves (used for step sizes and accept uniforms)."""
    return jnp.result_type(*jax.tree_util.tree_leaves(position))


def _checked_scalar(log_density_fn: LogDensityFn) -> LogDensityFn:
    def fn(position: PyTree) -> Array:
        value = log_density_fn(position)
        if jnp.shape(value) != ():
            shapes = jax.tree_util.tree_map(jnp.shape, position)
            raise ValueError(
                "`log_density_fn` must map one position to a scalar, got output shape "
                f"{jnp.shape(value)} for a position of shape(s) {shapes}. Sum over data inside "
                "the function and vmap over chains outside it."
            )
        return value

    return fn


def value_and_grad_of(log_density_fn: LogDensityFn) -> ValueAndGradFn:
    """Wraps ``log_density_fn: position -> scalar`` into ``position -> (log_density, grad)``.

    Raises ``ValueError`` (at trace time) when the function does not return a scalar.
    """
    return jax.value_and_grad(_checked_scalar(log_density_fn))


def raise_if_not_finite(log_density: Array, fn_name: str) -> None:
    """Eagerly (concrete input only) raises ``ValueError`` for a non-finite initial log density."""
    if isinstance(log_density, jax.core.Tracer):
        return
    if not bool(jnp.isfinite(log_density)):
        raise ValueError(
            f"`{fn_name}` is {float(log_density)} at the initial position; start the chain at a "
            "point of finite log density."
        )


def mcmc_init(position: PyTree, log_density_fn: LogDensityFn) -> MCMCState:
    """Builds the state of an HMC or MALA chain at ``position``.

    Args:
      position: initial point, a pytree of floating arrays (e.g. ``[D]``).
      log_density_fn: log target density up to a constant, ``position -> scalar``.

    Returns:
      :class:`MCMCState` holding the position, its log density and gradient.

    Raises:
      ValueError: on a position without leaves, a non-scalar log density, or (when called
        eagerly) a non-finite log density at ``position``.
      TypeError: on a non-floating leaf.
    """
    check_position(position)
    log_density, grad = value_and_grad_of(log_density_fn)(position)
    raise_if_not_finite(log_density, "log_density_fn")
    return MCMCState(position, log_density, grad)


# ------------------------------------------------------------------------------ leaf-wise helpers


def tree_normal(key: Array, like: PyTree) -> PyTree:
    """Standard normal draws with the structure, shapes and dtypes of ``like``.

    One flat vector of the total size is drawn and split into the leaves in ``tree_leaves`` order,
    so a single-array position draws exactly ``jax.random.normal(key, shape, dtype)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.size(leaf)) for leaf in leaves]
    flat = jax.random.normal(key, (sum(sizes),), position_dtype(like))
    pieces = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
    out = [
        piece.reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf))
        for piece, leaf in zip(pieces, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def tree_sum(tree: PyTree) -> Array:
    """Sum of all entries of all leaves, a scalar."""
    return sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def tree_all_finite(tree: PyTree) -> Array:
    """Whether every entry of every leaf is finite, a bool scalar."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def tree_where(condition: Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf-wise ``jnp.where`` with a scalar condition."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(condition, a, b), on_true, on_false)


def broadcast_inverse_mass(inverse_mass_diag: Any, position: PyTree) -> PyTree:
    """The diagonal inverse mass as a pytree of the position's structure.

    Args:
      inverse_mass_diag: None (identity), a scalar for every coordinate, or a pytree with the
        position's structure whose leaves are scalars or have the leaf's shape.
      position: the position pytree.

    Returns:
      A pytree of the position's structure with leaves of shape ``[]`` or the leaf's shape.

    Raises:
      ValueError: on a structure or leaf shape that does not match the position.
    """
    if inverse_mass_diag is None:
        return jax.tree_util.tree_map(lambda z: jnp.ones((), jnp.result_type(z)), position)
    treedef = jax.tree_util.tree_structure(position)
    if jax.tree_util.tree_structure(inverse_mass_diag) != treedef:
        if jnp.ndim(inverse_mass_diag) == 0 and not isinstance(inverse_mass_diag, (dict, list, tuple)):
            return jax.tree_util.tree_map(
                lambda z: jnp.asarray(inverse_mass_diag, jnp.result_type(z)), position
            )
        shapes = jax.tree_util.tree_map(jnp.shape, position)
        raise ValueError(
            f"`inverse_mass_diag` must be a scalar or a pytree with the position's structure and "
            f"shapes {shapes}, got structure {jax.tree_util.tree_structure(inverse_mass_diag)}."
        )

    def check(m, z):
        m = jnp.asarray(m, jnp.result_type(z))
        if m.shape not in ((), jnp.shape(z)):
            raise ValueError(
                f"`inverse_mass_diag` leaf must have shape {jnp.shape(z)} (or be a scalar), got "
                f"{m.shape}."
            )
        return m

    return jax.tree_util.tree_map(check, inverse_mass_diag, position)
