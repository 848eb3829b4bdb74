"""Twist learning behind one interface: CTL, RL (soft-Q), SIXO, FUDGE and DPG, selected by name.

Notation: ``g_t = log psi_t(s_1:t)`` (the twist at the sampled token), ``l_t = log p0(s_t|s_<t)``,
``z_t = log sum_v p0(v|s_<t) psi_t(s_<t, v)`` (the twist-induced proposal's normalizer) and
``q(s) = prod_t p0(s_t|s_<t) psi_t(s_1:t) / Z_t(s_<t)`` the twist-induced proposal. Samples come in
groups that share a conditioning input (``G`` groups, infilling) or one group (unconditional
tasks); self-normalized weights are normalized within a group. Gradients flow into the twist
only; weights and samples are constants.

* ``"ctl"`` (contrastive twist learning, exact positives): for every ``t`` the gradient of
  ``KL(sigma(s_1:t) || pi_t)``, ``pi_t ∝ p0(s_1:t) psi_t(s_1:t)``, is
  ``-E_sigma[grad g_t] + E_pi_t[grad g_t]``. Positives are exact target draws; the negative phase
  uses samples of ``q`` reweighted to ``pi_t`` by ``w_t = prod_{u<=t} Z_u / prod_{u<t} psi_u``
  (no ``phi`` in these weights).
* ``"ctl_sn"`` (self-normalized CTL): as ``"ctl"`` but the positive phase also uses the samples of
  ``q``, weighted to ``sigma`` by ``w = p0 phi / q`` (``phi`` enters only here).
* ``"rl"`` (soft Q-learning, on policy): regress ``g_t`` on the soft Bellman target
  ``sg(z_{t+1})`` (``t < T``) and ``max(log phi, floor)`` at ``t = T`` along samples of ``q``; the
  floor keeps the target finite for Boolean potentials.
* ``"sixo"``: logistic regression between exact target prefixes (label 1) and base-model prefixes
  (label 0) with logit ``g_t``, so that ``psi_t ∝ sigma(s_1:t) / p0(s_1:t)`` at the optimum.
* ``"fudge"``: a classifier ``psi_t = sigmoid(r_t)`` (``link="log_sigmoid"``) of the final
  outcome from prefixes of base-model samples; labels ``phi(s)`` in ``[0, 1]`` (soft labels).
* ``"dpg"`` (distributional policy gradient): maximize the self-normalized estimate of
  ``E_sigma[log q(s)]`` with samples of ``q`` and weights ``p0 phi / q``, i.e. descend
  ``KL(sigma || q)``.
* ``"bootstrap"``: no learning (``psi = 1``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tda_jax.optimization import gradient_step
from tda_jax.twisted.smc import TwistedProblem

__all__ = ["METHODS", "TwistTrainConfig", "link_for", "sample_proposal", "train_twist",
           "twist_loss", "twist_tables"]

METHODS = ("ctl", "ctl_sn", "rl", "sixo", "fudge", "dpg", "bootstrap")
_NEEDS_POSITIVES = ("ctl", "sixo")
_Q_NEGATIVES = ("ctl", "ctl_sn", "rl", "dpg")
_P0_NEGATIVES = ("sixo", "fudge")

PyTree = Any


def link_for(method: str) -> str:
    """The twist link a method trains (``"log_sigmoid"`` for FUDGE, else ``"identity"``)."""
    _check_method(method)
    return "log_sigmoid" if method == "fudge" else "identity"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown twist-learning method {method!r}; choose one of {METHODS}")


class TwistTrainConfig(NamedTuple):
    """Settings of :func:`train_twist`.

    Attributes:
      num_steps: optimizer steps.
      num_groups: ``G`` conditioning groups per step (1 for unconditional tasks).
      positives_per_group: exact target draws per group (1 for infilling).
      negatives_per_group: samples of ``q`` or ``p0`` per group.
      learning_rate: Adam step size.
      rl_log_phi_floor: floor on ``log phi`` in the RL target.
    """

    num_steps: int = 1000
    num_groups: int = 1
    positives_per_group: int = 64
    negatives_per_group: int = 64
    learning_rate: float = 3e-3
    rl_log_phi_floor: float = -10.0


def twist_tables(problem: TwistedProblem, tokens: jax.Array, cond: jax.Array | None = None):
    """Teacher-forced tables for sequences ``tokens [B, T]`` (``cond [B, C]`` or None); jitted.

    Returns:
      ``(lp, lpsi)``, both ``[B, T, V]``: ``log p0(. | s_<t)`` and ``log psi_t(s_<t, .)``.
    """
    return _twist_tables_jit(problem, jnp.asarray(tokens, jnp.int32), cond)


def _twist_tables_impl(problem, tokens, cond):
    """Teacher-forced tables for sequences ``tokens [B, T]`` (``cond [B, C]`` or None).

    Returns:
      ``(lp, lpsi)``, both ``[B, T, V]``: ``log p0(. | s_<t)`` and ``log psi_t(s_<t, .)``.
    """
    b = tokens.shape[0]
    p = dataclasses.replace(problem, cond=cond) if cond is not None else problem
    state = p.initial_particles(b)

    def body(st, inp):
        tok, t = inp
        out = (st.log_p_next, st.log_psi_next)
        return p.advance(st, tok, t), out

    ts = jnp.arange(1, problem.horizon + 1, dtype=jnp.int32)
    _, (lp, lpsi) = jax.lax.scan(body, state, (tokens.T.astype(jnp.int32), ts))
    return jnp.swapaxes(lp, 0, 1), jnp.swapaxes(lpsi, 0, 1)


def sample_proposal(key: jax.Array, problem: TwistedProblem, num_samples: int,
                    cond: jax.Array | None = None) -> jax.Array:
    """``num_samples`` draws ``[num_samples, T]`` of the twist-induced proposal ``q`` (jitted)."""
    return _sample_proposal_jit(key, problem, num_samples, cond)


def _sample_proposal_impl(key, problem, num_samples, cond):
    p = dataclasses.replace(problem, cond=cond) if cond is not None else problem
    state = p.initial_particles(num_samples)

    def body(st, inp):
        k, t = inp
        return p.proposal_fn(k, st, t), None

    ts = jnp.arange(1, problem.horizon + 1, dtype=jnp.int32)
    final, _ = jax.lax.scan(body, state, (jax.random.split(key, problem.horizon), ts))
    return final.tokens


def _pieces(lp, lpsi, tokens):
    """``l_t, g_t, z_t`` ``[B, T]`` (module docstring)."""
    idx = tokens[..., None].astype(jnp.int32)
    l = jnp.take_along_axis(lp, idx, axis=2)[..., 0]  # noqa: E741
    g = jnp.take_along_axis(lpsi, idx, axis=2)[..., 0]
    z = jax.scipy.special.logsumexp(lp + lpsi, axis=2)
    return l, g, z


def _self_normalize(log_w, axis):
    """Normalized weights along ``axis``; all ``-inf`` (no finite weight) gives zeros, not NaN."""
    m = jnp.max(log_w, axis=axis, keepdims=True)
    ok = jnp.isfinite(m)
    w = jnp.exp(log_w - jnp.where(ok, m, 0.0))
    w = jnp.where(ok, w, 0.0)
    s = jnp.sum(w, axis=axis, keepdims=True)
    return jax.lax.stop_gradient(w / jnp.where(s > 0, s, 1.0))


def _flat_cond(cond, per_group):
    return None if cond is None else jnp.repeat(cond, per_group, axis=0)


def twist_loss(method: str, twist_params: PyTree, problem: TwistedProblem, batch: dict,
               rl_log_phi_floor: float = -10.0) -> jax.Array:
    """The loss of ``method`` (module docstring) on one batch.

    Args:
      method: one of :data:`METHODS` except ``"bootstrap"``.
      twist_params: parameters being trained.
      problem: the problem (its ``twist_params`` are replaced by ``twist_params``).
      batch: ``{"positives": [G, P, T] or None, "negatives": [G, M, T], "cond": [G, C] or None,
        "neg_log_phi": [G, M]}``.
      rl_log_phi_floor: RL's floor on ``log phi``.
    """
    _check_method(method)
    if method == "bootstrap":
        raise ValueError("the bootstrap proposal has no twist to learn")
    p = dataclasses.replace(problem, twist_params=twist_params)
    neg, cond = batch["negatives"], batch["cond"]
    g_, m_, t_ = neg.shape
    lp, lpsi = _twist_tables_impl(p, neg.reshape(g_ * m_, t_), _flat_cond(cond, m_))
    l, g, z = (x.reshape(g_, m_, t_) for x in _pieces(lp, lpsi, neg.reshape(g_ * m_, t_)))
    log_phi = batch["neg_log_phi"]

    def positive_g():
        pos = batch["positives"]
        gp, pp, _ = pos.shape
        lp_p, lpsi_p = _twist_tables_impl(p, pos.reshape(gp * pp, t_), _flat_cond(cond, pp))
        return _pieces(lp_p, lpsi_p, pos.reshape(gp * pp, t_))[1].reshape(gp, pp, t_)

    if method in ("ctl", "ctl_sn"):
        zs = jax.lax.stop_gradient(z)
        gs = jax.lax.stop_gradient(g)
        g_prev = jnp.concatenate([jnp.zeros_like(gs[..., :1]), gs[..., :-1]], axis=-1)
        log_w_t = jnp.cumsum(zs - g_prev, axis=-1)  # log pi_t / q(s_1:t), no phi
        negative = jnp.sum(_self_normalize(log_w_t, axis=1) * g, axis=(1, 2))
        if method == "ctl":
            positive = jnp.mean(jnp.sum(positive_g(), axis=2), axis=1)
        else:
            log_w = log_w_t[..., -1] - gs[..., -1] + log_phi  # sigma~ / q
            positive = jnp.sum(_self_normalize(log_w, axis=1) * jnp.sum(g, axis=2), axis=1)
        return jnp.mean(negative - positive)
    if method == "rl":
        target_next = jax.lax.stop_gradient(z[..., 1:])
        target_last = jnp.maximum(log_phi, rl_log_phi_floor)[..., None]
        target = jnp.concatenate([target_next, target_last], axis=-1)
        return jnp.mean(jnp.sum((g - target) ** 2, axis=-1))
    if method == "sixo":
        pos = jnp.sum(jax.nn.log_sigmoid(positive_g()), axis=2)
        neg_term = jnp.sum(jax.nn.log_sigmoid(-g), axis=2)
        return -jnp.mean(pos) - jnp.mean(neg_term)
    if method == "fudge":
        y = jnp.exp(log_phi)[..., None]  # soft labels in [0, 1]
        log_not = jnp.log(-jnp.expm1(jnp.minimum(g, -1e-7)))
        return -jnp.mean(jnp.sum(y * g + (1.0 - y) * log_not, axis=-1))
    # dpg
    log_q = jnp.sum(l + g - z, axis=-1)
    log_w = jax.lax.stop_gradient(jnp.sum(l, axis=-1) + log_phi - log_q)
    return -jnp.mean(jnp.sum(_self_normalize(log_w, axis=1) * log_q, axis=1))


def _draw_batch(key, method, problem, task, config: TwistTrainConfig):
    kp, kn = jax.random.split(key)
    g_, m_ = config.num_groups, config.negatives_per_group
    positives, cond = task.positives(kp, g_, config.positives_per_group)
    if method in _P0_NEGATIVES:
        base = dataclasses.replace(problem, twist=_uniform(problem), twist_params={})
    else:
        base = dataclasses.replace(problem,
                                   twist_params=jax.lax.stop_gradient(problem.twist_params))
    neg = _sample_proposal_impl(kn, base, g_ * m_, _flat_cond(cond, m_))
    neg_log_phi = task.potential(neg, _flat_cond(cond, m_)).reshape(g_, m_)
    return {"positives": positives if method in _NEEDS_POSITIVES else None,
            "negatives": neg.reshape(g_, m_, -1), "cond": cond, "neg_log_phi": neg_log_phi}


def _uniform(problem):
    from tda_jax.twisted.twists import UniformTwist
    return UniformTwist(problem.lm.vocab_size)


def train_twist(key: jax.Array, method: str, problem: TwistedProblem, task,
                config: TwistTrainConfig) -> tuple[PyTree, np.ndarray]:
    """Trains ``problem.twist`` from ``problem.twist_params`` with ``method``.

    The twist's ``link`` must match :func:`link_for` (``"log_sigmoid"`` for FUDGE). All steps run
    in one jitted ``lax.scan``.

    Args:
      key: PRNG key.
      method: one of :data:`METHODS` (``"bootstrap"`` returns the parameters unchanged).
      problem: the :class:`~tda_jax.twisted.smc.TwistedProblem` (LM, twist, potential, prompt).
      task: a :class:`~tda_jax.twisted.tasks.Task` (potential and exact-draw sampler).
      config: :class:`TwistTrainConfig`.

    Returns:
      ``(twist_params, losses [num_steps])``.

    Raises:
      ValueError: on an unknown method, a twist with the wrong link, or bad sizes.
      FloatingPointError: when a loss becomes non-finite (naming the step).
    """
    _check_method(method)
    for field in ("num_steps", "num_groups", "positives_per_group", "negatives_per_group"):
        value = getattr(config, field)
        if not isinstance(value, int) or value < (0 if field == "num_steps" else 1):
            raise ValueError(f"TwistTrainConfig.{field} must be a positive int, got {value!r}")
    if method == "bootstrap" or config.num_steps == 0:
        return problem.twist_params, np.zeros((0,), np.float32)
    link = getattr(problem.twist, "link", "identity")
    if link != link_for(method):
        raise ValueError(f"method {method!r} trains a twist with link={link_for(method)!r}, but "
                         f"problem.twist has link={link!r}; use "
                         f"dataclasses.replace(twist, link=link_for({method!r}))")
    params, values = _train_scan(problem.twist_params, key, problem, method, config,
                                 _ByIdentity(task))
    values = np.asarray(values)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise FloatingPointError(f"the {method} twist loss became non-finite ({values[bad[0]]}) "
                                 f"at step {int(bad[0])}; lower the learning rate")
    return params, values


class _ByIdentity:
    """Hashes by identity: lets a task (functions and arrays) be a static argument of ``jit``."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.value is self.value


@partial(jax.jit, static_argnums=(3, 4, 5))
def _train_scan(params, key, problem, method, config, task_ref):
    task = task_ref.value
    optimizer = optax.adam(config.learning_rate)

    def objective(p, batch):
        return twist_loss(method, p, problem, batch, config.rl_log_phi_floor)

    update = gradient_step(objective, optimizer)

    def body(carry, k):
        params, opt_state = carry
        batch = _draw_batch(k, method, dataclasses.replace(problem, twist_params=params), task,
                            config)
        params, opt_state, value, _ = update(params, opt_state, batch)
        return (params, opt_state), value

    (params, _), values = jax.lax.scan(body, (params, optimizer.init(params)),
                                       jax.random.split(key, config.num_steps))
    return params, values


_sample_proposal_jit = jax.jit(lambda key, problem, n, cond: _sample_proposal_impl(
    key, problem, n, cond), static_argnums=(2,))
_twist_tables_jit = jax.jit(lambda problem, tokens, cond: _twist_tables_impl(problem, tokens, cond))
