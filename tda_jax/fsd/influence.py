"""Influence through the proximal Bregman response function with LAFTR's function-space term.

The proximal Bregman response function (PBRF; Bae et al., 2022) of removing training example
``z_m`` (weight ``eps``) from a model trained to ``theta_s`` is

    theta^eps = argmin_theta  (1/N) sum_i D_L(f(x_i, theta), f(x_i, theta_s))
                              - eps L(z_m, theta) + (lambda / 2) ||theta - theta_s||^2,

where for the softmax cross entropy the Bregman divergence ``D_L`` in logit space is
``KL(softmax(f(x_i, theta_s)) || softmax(f(x_i, theta)))``, so the first term is the KL
function-space distance ``FSD_KL(theta_s, theta)``. Replacing it by the LAFTR estimate
(:func:`tda_jax.fsd.laftr_fsd`, ``variant="moment"``, ``distance="kl"``) needs no pass over the
training data for the curvature. To first order in ``eps`` the response is

    theta^eps - theta_s = eps (H + lambda I)^{-1} grad L(z_m, theta_s),
    H = d^2/d theta^2 FSD_LAFTR(theta_s, theta) at theta = theta_s,

a Gauss-Newton matrix of the stochastic-gate linear network over the summary's inputs
(:func:`laftr_hessian`, dense ``[P, P]`` from ``P`` Hessian-vector products). Scores follow the
library's sign (:mod:`tda_jax.attribution.influence`):
``score[q, m] = - grad m(z_q)^T (H + lambda I)^{-1} grad L(z_m)`` and self-influence
``grad L(z_m)^T (H + lambda I)^{-1} grad L(z_m)`` (:func:`pbrf_scores`, :func:`pbrf_self_influence`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from tda_jax.data import Dataset
from tda_jax.fsd.laftr import LaftrSummary, laftr_fsd
from tda_jax.losses import Loss

Array = jax.Array


def _root(params: Any) -> Any:
    if isinstance(params, dict) and "params" in params and len(params) == 1:
        return params["params"]
    return params


def laftr_hessian(summary: LaftrSummary, params: Any, *, distance: str = "kl",
                  chunk: int = 256) -> Array:
    """Dense Hessian ``[P, P]`` of ``FSD_LAFTR(params, theta)`` in ``theta`` at ``params``.

    Parameter order: ``jax.flatten_util.ravel_pytree`` of the params dict. Built from ``P``
    forward-over-reverse Hessian-vector products of the ``"moment"`` estimator, ``chunk`` at a
    time (``lax.map`` over chunks of a vmapped HVP).
    """
    root = _root(params)
    flat, unravel = ravel_pytree(root)
    p = flat.shape[0]

    def fsd_of(vec):
        return laftr_fsd(summary, root, unravel(vec), variant="moment", distance=distance)

    def hvp(v):
        return jax.jvp(jax.grad(fsd_of), (flat,), (v,))[1]

    chunk = int(min(chunk, p))
    padded = -(-p // chunk) * chunk
    eye = jnp.eye(padded, p, dtype=flat.dtype).reshape(-1, chunk, p)
    rows = jax.jit(lambda e: jax.lax.map(jax.vmap(hvp), e))(eye).reshape(padded, p)[:p]
    return 0.5 * (rows + rows.T)


def _per_example_grads(fn, root, data: Dataset, batch_size: int) -> np.ndarray:
    """``[n, P]`` gradients of ``fn(params, x [1, ...], y [1]) -> scalar`` per example."""
    flat, unravel = ravel_pytree(root)

    @jax.jit
    def grads(x, y):
        return jax.vmap(lambda xi, yi: jax.grad(
            lambda f: fn(unravel(f), xi[None], yi[None]))(flat))(x, y)

    inputs, targets = np.asarray(data.inputs), np.asarray(data.targets)
    out = []
    for start in range(0, inputs.shape[0], batch_size):
        out.append(np.asarray(grads(inputs[start:start + batch_size],
                                    targets[start:start + batch_size])))
    return np.concatenate(out)


def damped_inverse_apply(hessian: Array, vectors: np.ndarray, damping: float | None) -> tuple:
    """``(H + lambda I)^{-1} vectors^T`` (``[P, k]``) by Cholesky, and the ``lambda`` used
    (None: ``0.1 x`` the mean eigenvalue ``tr(H) / P``, the library's default rule)."""
    h = np.asarray(hessian, np.float64)
    used = 0.1 * float(np.trace(h)) / h.shape[0] if damping is None else float(damping)
    if not used > 0:
        raise ValueError(f"damping must be > 0 (got {used}); the LAFTR Hessian is singular")
    chol = np.linalg.cholesky(h + used * np.eye(h.shape[0]))
    solved = np.linalg.solve(chol.T, np.linalg.solve(chol, np.asarray(vectors, np.float64).T))
    return solved, used


def pbrf_scores(apply_fn, params: Any, hessian: Array, queries: Dataset, train: Dataset, *,
                loss: Loss, measurement, damping: float | None = None,
                batch_size: int = 256) -> np.ndarray:
    """``score[q, m] = - grad m(z_q)^T (H + lambda I)^{-1} grad L(z_m)`` ``[Q, N]``.

    Args:
      apply_fn: ``(params, x) -> logits``; ``params``: the trained parameters (theta_s).
      hessian: :func:`laftr_hessian` at ``params``.
      queries, train: datasets; ``loss``: the training loss; ``measurement``:
        ``(logits, targets) -> [B]`` on the queries (e.g. ``classification_margin``).
      damping: ``lambda``; None for ``0.1 x`` the mean eigenvalue of ``H``.
    """
    root = _root(params)
    q_grads = _per_example_grads(lambda p, x, y: jnp.sum(measurement(apply_fn(p, x), y)), root,
                                 queries, batch_size)
    t_grads = _per_example_grads(lambda p, x, y: jnp.sum(loss.per_example(apply_fn(p, x), y)),
                                 root, train, batch_size)
    solved, _ = damped_inverse_apply(hessian, q_grads, damping)  # [P, Q]
    return (-(t_grads.astype(np.float64) @ solved).T).astype(np.float32)


def pbrf_self_influence(apply_fn, params: Any, hessian: Array, train: Dataset, *, loss: Loss,
                        damping: float | None = None, batch_size: int = 256) -> np.ndarray:
    """``grad L(z_m)^T (H + lambda I)^{-1} grad L(z_m)`` per training example ``[N]``."""
    root = _root(params)
    grads = _per_example_grads(lambda p, x, y: jnp.sum(loss.per_example(apply_fn(p, x), y)),
                               root, train, batch_size).astype(np.float64)
    solved, _ = damped_inverse_apply(hessian, grads, damping)  # [P, N]
    return np.sum(grads.T * solved, axis=0).astype(np.float32)
