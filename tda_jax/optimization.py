"""The one optax loop: a pure gradient step and a Python driver that runs it.

Used by model training (:mod:`tda_jax.training`), the MI critics and encoders
(:mod:`tda_jax.mi.fitting`) and the VAE (:func:`tda_jax.mi.train_vae`); it sits in the shared layer
because the inference half must not import the attribution half.

* :func:`gradient_step` builds the pure (unjitted) update
  ``step(params, opt_state, *args) -> (params, opt_state, value, aux)`` from an objective and an
  optax transformation; callers jit it once (or ``vmap``/``scan`` it).
* :func:`run_steps` calls a jitted ``step(state, x) -> (state, value)`` once per input under a
  progress bar. It never synchronizes host and device per step: the step values stay on the device
  and are checked for NaN/inf once per chunk of ``check_every`` steps (and at every step listed in
  ``check_at``, e.g. checkpoints), raising :class:`FloatingPointError` that names the first bad
  step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tda_jax.progress import progress

Params = Any
State = Any


def gradient_step(objective: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                  maximize: bool = False, has_aux: bool = False):
    """The pure optax update of ``params`` on ``objective``.

    Args:
      objective: ``objective(params, *args) -> value`` (a scalar), or ``-> (value, aux)`` with
        ``has_aux``.
      optimizer: the optax transformation.
      maximize: ascend ``objective`` (e.g. a bound) instead of descending it (a loss).
      has_aux: whether ``objective`` returns ``(value, aux)``.

    Returns:
      ``step(params, opt_state, *args) -> (params, opt_state, value, aux)`` where ``value`` is the
      objective *before* the update and ``aux`` is ``None`` without ``has_aux``.
    """

    def step(params: Params, opt_state: Any, *args: Any):
        (value, aux), grads = jax.value_and_grad(
            objective if has_aux else lambda p, *a: (objective(p, *a), None), has_aux=True
        )(params, *args)
        if maximize:
            grads = jax.tree.map(jnp.negative, grads)
        # optax's own arithmetic (e.g. Adam's bias correction, float ** int32 count) relies on
        # standard promotion; scoped here so callers may run under strict promotion.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state, value, aux

    return step


def _raise_non_finite(values: np.ndarray, first_step: int, what: str,
                      describe_step: Callable[[int], str], hint: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        step = first_step + int(bad[0])
        raise FloatingPointError(
            f"{what} became non-finite ({values[bad[0]]}) at step {step}{describe_step(step)}. "
            f"{hint}")


def run_steps(step: Callable[[State, Any], tuple[State, jax.Array]], state: State,
              inputs: Iterable[Any], *, num_steps: int, first_step: int = 0,
              check_every: int = 100, check_at: Iterable[int] = (),
              on_check: Callable[[int, State], None] | None = None, desc: str | None = None,
              what: str = "training loss", describe_step: Callable[[int], str] = lambda s: "",
              hint: str = "Lower the learning rate, or check the data for NaN/inf values.",
              ) -> tuple[State, np.ndarray]:
    """Runs ``state, value = step(state, x)`` for ``num_steps`` inputs ``x`` (a jitted ``step``).

    Steps are numbered ``first_step, first_step + 1, ...`` (a resumed run starts past 0). After
    step ``s`` has run, i.e. when ``s + 1`` updates are done, the values since the last check are
    copied to the host and checked when ``(s + 1) % check_every == 0``, when ``s + 1`` is in
    ``check_at``, or at the end; then ``on_check(s + 1, state)`` is called (e.g. to save a
    checkpoint after ``s + 1`` updates).

    Args:
      step: ``step(state, x) -> (state, value)``, jitted by the caller (compiled once).
      state: the initial state (e.g. ``(params, opt_state)``).
      inputs: at least ``num_steps`` inputs (batches, PRNG keys); extra ones are not consumed.
      num_steps: steps to run.
      first_step: the number of the first step.
      check_every: chunk length between host checks (absolute step numbers).
      check_at: further numbers of completed updates at which to check (and call ``on_check``).
      on_check: called as ``on_check(num_updates_done, state)`` after each check.
      desc: progress bar label.
      what: what the values are, named in the error.
      describe_step: extra words about a step for the error, e.g. ``" (epoch 2, batch 3)"``.
      hint: what to do, appended to the error.

    Returns:
      ``(state, values)`` with ``values`` the ``[num_steps]`` host array of step values.

    Raises:
      FloatingPointError: at the first check that finds a non-finite value, naming its step.
    """
    if int(check_every) < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    check_at = {int(s) for s in check_at}
    last = first_step + int(num_steps)
    chunks: list[np.ndarray] = []
    pending: list[jax.Array] = []
    pending_first = first_step
    done = first_step
    iterator = iter(inputs)
    for _ in progress(range(int(num_steps)), desc=desc, total=int(num_steps)):
        state, value = step(state, next(iterator))
        pending.append(value)
        done += 1
        if done % check_every == 0 or done in check_at or done == last:
            values = np.asarray(jnp.stack(pending))  # the only host sync of the chunk
            _raise_non_finite(values, pending_first, what, describe_step, hint)
            chunks.append(values)
            pending, pending_first = [], done
            if on_check is not None:
                on_check(done, state)
    values = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
    return state, values
