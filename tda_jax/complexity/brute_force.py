"""Brute-force pNML: for every test point and candidate label, minimise the temperature-scaled
proximal Bregman objective itself (no linearization, no curvature approximation) and read off the
hindsight-optimal probability. The oracle that IF-COMP (:mod:`tda_jax.complexity.ifcomp`) is
checked against; it costs a full optimisation over the training set per (point, label) pair.

For a classifier trained with softmax cross-entropy on ``x_1..x_N`` to ``theta_s``:

    theta_hat(x, y) = argmin_theta (1/N) sum_i KL(softmax(f(theta_s, x_i)) || softmax(f(theta, x_i)))
                                   + eps * (-log softmax(f(theta, x) / T)_y)
                                   + (lambda / 2) ||theta - theta_s||^2
    p_y(x) = softmax(f(theta_hat(x, y), x))_y

(the KL is the Bregman divergence of the log-sum-exp in output space). All ``(point, label)``
problems are independent, so they are stacked along a leading axis and minimised together with
one Adam run of the shared optax loop (:mod:`tda_jax.optimization`): the summed objective has
block-separable gradients and Adam's update is elementwise, so each problem follows exactly its
own Adam trajectory.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tda_jax.complexity.ifcomp import PNML, check_epsilon, check_labels, check_temperature
from tda_jax.optimization import gradient_step, run_steps

Params = Any


def proximal_objective(apply_fn, params_s: Params, train_inputs: jax.Array, *, temperature: float,
                       epsilon: float, damping: float):
    """``objective(theta, x [1, ...], y) ->`` the temperature-scaled proximal Bregman objective of
    one added point (see the module docstring); ``theta`` is a parameter tree like ``params_s``."""
    train_inputs = jnp.asarray(train_inputs)
    log_p_s = jax.nn.log_softmax(apply_fn(params_s, train_inputs), axis=-1)
    p_s = jnp.exp(log_p_s)

    def objective(theta, x, y):
        log_p = jax.nn.log_softmax(apply_fn(theta, train_inputs), axis=-1)
        bregman = jnp.mean(jnp.sum(p_s * (log_p_s - log_p), axis=-1))
        logits = apply_fn(theta, x)[0]
        added = -jax.nn.log_softmax(logits / temperature)[y]
        distance = sum(jnp.sum(jnp.square(a - b)) for a, b in
                       zip(jax.tree.leaves(theta), jax.tree.leaves(params_s)))
        return bregman + epsilon * added + 0.5 * damping * distance

    return objective


def brute_force_pnml(apply_fn, params: Params, train_inputs: Any, test_inputs: Any, *,
                     temperature: float, epsilon: float, damping: float,
                     labels: Any = None, num_steps: int = 400, learning_rate: float = 1e-2,
                     ) -> tuple[PNML, np.ndarray]:
    """Brute-force pNML of every test point: one proximal refit per (point, label).

    Args:
      apply_fn: ``(params, inputs) -> logits [B, C]``.
      params: trained parameters ``theta_s`` (the refits start there).
      train_inputs: ``[N, ...]`` training inputs (the Bregman term; labels are not needed).
      test_inputs: ``[M, ...]``.
      temperature, epsilon, damping: ``T``, ``eps`` and ``lambda`` of the objective.
      labels: candidate labels (default every class).
      num_steps: Adam steps (cosine-decayed from ``learning_rate``).
      learning_rate: initial Adam step size.

    Returns:
      ``(PNML, final_gradient_norms [M, Y])``; the gradient norms of the objective at the returned
      parameters show how well each refit converged.
    """
    temperature = check_temperature(temperature)
    epsilon = check_epsilon(epsilon)
    if not np.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}.")
    test_inputs = jnp.asarray(test_inputs)
    logits = apply_fn(params, test_inputs)
    num_classes = int(logits.shape[-1])
    labels = check_labels(labels, num_classes)
    num_test, num_labels = int(test_inputs.shape[0]), int(labels.size)
    objective = proximal_objective(apply_fn, params, train_inputs, temperature=temperature,
                                   epsilon=epsilon, damping=float(damping))
    # Problem k = (point k // Y, label labels[k % Y]).
    xs = jnp.repeat(test_inputs, num_labels, axis=0)[:, None]
    ys = jnp.tile(jnp.asarray(labels), num_test)
    num_problems = num_test * num_labels
    stacked = jax.tree.map(lambda v: jnp.broadcast_to(v, (num_problems, *v.shape)), params)

    def total(theta):
        return jnp.sum(jax.vmap(objective)(theta, xs, ys))

    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(num_steps), 1)))
    update = gradient_step(total, optimizer)

    @jax.jit
    def step(state, _):
        theta, opt_state = state
        theta, opt_state, value, _ = update(theta, opt_state)
        return (theta, opt_state), value

    (theta, _), _ = run_steps(step, (stacked, optimizer.init(stacked)), iter(range(int(num_steps))),
                              num_steps=int(num_steps), desc="brute-force pNML",
                              what="proximal objective")
    grad_norms = jax.vmap(lambda t, x, y: optax.global_norm(jax.grad(objective)(t, x, y)))(
        theta, xs, ys)
    refit_logits = jax.vmap(lambda t, x: apply_fn(t, x)[0])(theta, xs)  # [M Y, C]
    log_probs = jax.nn.log_softmax(refit_logits, axis=-1)
    log_hindsight = jnp.take_along_axis(log_probs, ys[:, None], axis=-1)[:, 0]
    log_hindsight = jnp.reshape(log_hindsight, (num_test, num_labels))
    complexity = jax.nn.logsumexp(log_hindsight, axis=-1)
    result = PNML(np.asarray(logits), labels, np.asarray(jnp.exp(log_hindsight)),
                  np.asarray(jnp.exp(log_hindsight - complexity[:, None])), np.asarray(complexity))
    return result, np.asarray(grad_norms).reshape(num_test, num_labels)
