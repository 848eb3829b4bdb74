"""LAFTR: the Linearized Activation Function TRick for function-space distances (Dhawan, Huang,
Bae, Grosse, "Efficient Parametric Approximations of Neural Network Function Space Distance",
ICML 2023).

The function-space distance between a ReLU network at ``theta0`` and at ``theta1`` is

    FSD(theta0, theta1) = E_{x ~ data} rho(f(x, theta0), f(x, theta1))

(``rho`` from :mod:`tda_jax.fsd.distances`). LAFTR estimates it without the data from a small
summary made once at ``theta0`` (:func:`summarize`, one pass over the data):

* per hidden unit ``j`` of layer ``l``, its activation rate ``mu_lj = P_x(s_lj(x, theta0) > 0)``;
* the input mean ``m`` and covariance ``Sigma`` (optionally per class ``k``, with weights
  ``pi_k = n_k / N``; the FSD is then ``sum_k pi_k FSD_k``).

The network is replaced by a *linear network with stochastic gates*: each ReLU becomes
``a_l = z_l * s_l`` with ``z_l ~ Bernoulli(mu_l)`` independent across units, layers and
examples, frozen at theta0, and the perturbation is propagated jointly
(:func:`tda_jax.fsd.network.joint_forward`)::

    Delta s_l = Delta W_l^T a_{l-1} + W'_l^T Delta a_{l-1} + Delta b_l,   Delta a_l = z_l * Delta s_l,

so ``Delta f = Delta s_L`` depends on theta1 only through this pass. Three variants:

* ``"bernoulli"`` (the paper's LAFTR estimator): Monte Carlo over ``x ~ N(m, Sigma)`` and
  ``z_l ~ Bernoulli(mu_l)``; ``rho(f0, f0 + Delta f)`` with ``f0`` the gated network's output.
* ``"deterministic"``: the gates are theta0's own ReLU pattern ``z_l = 1[s_l(x, theta0) > 0]`` on
  ``x ~ N(m, Sigma)`` (or on given ``inputs``); ``f0`` is the true network. Where theta1 does not
  flip any gate on ``x`` this is exactly ``rho(f(x, theta0), f(x, theta1))``.
* ``"moment"`` (moment matching, no sampling): propagates the exact second moment of
  ``u_l = [a_l; Delta a_l; 1]`` through the gated linear network. With
  ``M_l = [[W_l^T, 0, b_l], [Delta W_l^T, W'_l^T, Delta b_l], [0, 0, 1]]`` and
  ``v = M_l u_{l-1} = [s_l; Delta s_l; 1]``,

      E[v v^T] = M_l S_{l-1} M_l^T,     S_l = E[g g^T] * (M_l S_{l-1} M_l^T)   (elementwise)

  where ``g = [z_l; z_l; 1]`` and ``E[z_i z_j] = mu_i mu_j`` (``i != j``), ``E[z_i^2] = mu_i``;
  ``S_0 = [[Sigma + m m^T, 0, m], [0, 0, 0], [m^T, 0, 1]]``. This uses only the first two moments
  of ``x`` and is the exact expectation of the ``"bernoulli"`` estimator for ``"sq"``:
  ``E ||Delta f||^2 / 2 = tr(E[Delta f Delta f^T]) / 2``. For ``"kl"`` it uses the second-order
  expansion ``KL ~ 0.5 tr(H_k E[Delta f Delta f^T])`` with ``H_k`` the group's mean softmax Hessian
  ``E_x[diag(p0) - p0 p0^T]`` stored in the summary. (The authors' code propagates the mean and a
  covariance separately, drops the cross-covariance of ``a`` and ``Delta a`` and uses
  ``mu_i mu_j`` on the diagonal too; the recursion above keeps those terms, so it is exact for the
  stochastic-gate model.)

For a network without hidden layers, or a ReLU network whose units are always active on the data
(``mu = 1``), ``"moment"`` with ``"sq"`` equals the true FSD exactly (the squared error of a linear
map depends on the inputs only through their first two moments); the sampled variants are then
unbiased for it.

The summary stores ``sum_l h_l`` rates plus ``d + d(d + 1) / 2`` moments per group (and ``C^2``
for the KL Hessian): :meth:`LaftrSummary.num_stored`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.data import Dataset, num_examples
from tda_jax.fsd.distances import check_distance, discrepancy, softmax_hessian
from tda_jax.fsd.network import (
    check_relu_mlp,
    flatten_inputs,
    forward,
    joint_forward,
    mlp_layers,
    widths_of,
)

Array = jax.Array
VARIANTS = ("bernoulli", "deterministic", "moment")


@flax.struct.dataclass
class LaftrSummary:
    """What LAFTR keeps of ``theta0`` and its training data (a pytree; vmap/jit friendly).

    Attributes:
      rates: per hidden layer, activation rates ``[K, h_l]`` (``K`` groups: 1, or one per class).
      mean: input means ``[K, d]``.
      cov: input covariances ``[K, d, d]`` (population, i.e. divided by ``n_k``).
      weights: group weights ``pi_k = n_k / N`` ``[K]``.
      output_hessian: mean softmax Hessians ``[K, C', C']`` at theta0 (for ``"kl"`` moments).
      widths: ``(d, h_1, ..., C)`` of the network (static).
      outputs: the output indices the distance is taken on (a task's head), or None (static).
    """

    rates: tuple[Array, ...]
    mean: Array
    cov: Array
    weights: Array
    output_hessian: Array
    widths: tuple[int, ...] = flax.struct.field(pytree_node=False)
    outputs: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

    def num_stored(self, distance: str = "sq") -> int:
        """Numbers the estimator reads: rates, means, covariances (upper triangle), weights, and
        the KL Hessians (upper triangle) for ``distance="kl"``."""
        k = int(np.shape(self.weights)[-1])
        d = self.widths[0]
        c = int(np.shape(self.output_hessian)[-1])
        total = k * (sum(self.widths[1:-1]) + d + d * (d + 1) // 2 + 1)
        if distance == "kl":
            total += k * c * (c + 1) // 2
        return total


def restrict_outputs(layers, outputs: Sequence[int] | None):
    """The layers with the last one restricted to the output columns ``outputs``."""
    if outputs is None:
        return layers
    idx = jnp.asarray(outputs)
    kernel, bias = layers[-1]
    return (*layers[:-1], (kernel[:, idx], bias[idx]))


def _check_outputs(outputs, num_outputs: int) -> tuple[int, ...] | None:
    if outputs is None:
        return None
    outputs = tuple(int(o) for o in outputs)
    if not outputs or min(outputs) < 0 or max(outputs) >= num_outputs:
        raise ValueError(f"outputs must be indices in 0..{num_outputs - 1}, got {outputs}")
    return outputs


@jax.jit
def _summary_sums(layers, x: Array, group_onehot: Array) -> dict:
    """One chunk's sums; ``group_onehot [B, K]`` is zero on padded rows, so they add nothing."""
    logits, pre = forward(layers, x)
    w = group_onehot
    return {
        "count": jnp.sum(w, axis=0),
        "active": tuple(jnp.einsum("bk,bh->kh", w, (s > 0).astype(x.dtype)) for s in pre),
        "x": jnp.einsum("bk,bd->kd", w, x),
        "xx": jnp.einsum("bk,bd,be->kde", w, x, x),
        "hessian": jnp.einsum("bk,bij->kij", w, softmax_hessian(logits)),
    }


def summarize(model: Any, params: Any, data: Dataset, *, per_class: bool = False,
              outputs: Sequence[int] | None = None, batch_size: int = 512) -> LaftrSummary:
    """The LAFTR summary of ``model`` at ``params`` (theta0) on ``data``, in one pass.

    Args:
      model: a :class:`tda_jax.models.MLP` with ReLU activations.
      params: its variables (``{"params": ...}``) or params.
      data: the data the FSD averages over (labels are used only with ``per_class``).
      per_class: one group (rates and moments) per class of ``data.num_classes``, weighted by
        class frequency.
      outputs: restrict the distance to these output indices (a multi-head task's head).
      batch_size: examples per chunk; the pass compiles once (last chunk padded and masked).

    Returns:
      A :class:`LaftrSummary`.
    """
    check_relu_mlp(model)
    inputs = np.asarray(data.inputs)
    n = num_examples(data)
    if n == 0:
        raise ValueError("data is empty: the summary needs at least one example")
    d = int(np.prod(inputs.shape[1:]))
    widths = widths_of(model, d)
    outputs = _check_outputs(outputs, widths[-1])
    layers = restrict_outputs(mlp_layers(params, widths), outputs)
    if per_class:
        if data.num_classes is None:
            raise ValueError("per_class=True needs class labels (data.num_classes is None)")
        groups = int(data.num_classes)
        labels = np.asarray(data.targets).astype(np.int64)
    else:
        groups, labels = 1, np.zeros(n, np.int64)
    batch_size = int(min(batch_size, n))

    total = None
    for start in range(0, n, batch_size):
        x = inputs[start:start + batch_size].reshape(-1, d).astype(np.float32)
        onehot = np.eye(groups, dtype=np.float32)[labels[start:start + batch_size]]
        pad = batch_size - x.shape[0]
        if pad:
            x = np.concatenate([x, np.zeros((pad, d), np.float32)])
            onehot = np.concatenate([onehot, np.zeros((pad, groups), np.float32)])
        part = jax.tree.map(lambda v: np.asarray(v, np.float64), _summary_sums(layers, x, onehot))
        total = part if total is None else jax.tree.map(np.add, total, part)

    count = total["count"]
    safe = np.maximum(count, 1.0)
    mean = total["x"] / safe[:, None]
    cov = total["xx"] / safe[:, None, None] - mean[:, :, None] * mean[:, None, :]
    cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return LaftrSummary(
        rates=tuple(f32(a / safe[:, None]) for a in total["active"]),
        mean=f32(mean), cov=f32(cov), weights=f32(count / n),
        output_hessian=f32(total["hessian"] / safe[:, None, None]),
        widths=widths, outputs=outputs)


def _input_sqrt(cov: Array) -> Array:
    """A square root ``L`` with ``L L^T = cov`` (eigendecomposition; PSD up to rounding)."""
    vals, vecs = jnp.linalg.eigh(cov)
    return vecs * jnp.sqrt(jnp.clip(vals, 0.0))[None, :]


def _sampled(summary: LaftrSummary, layers0, layers1, key: Array, num_samples: int,
             distance: str, variant: str) -> Array:
    """Monte Carlo estimate, ``num_samples`` inputs per group (``"bernoulli"`` /
    ``"deterministic"``)."""
    groups = summary.weights.shape[0]
    d = summary.widths[0]

    def group_value(k, key):
        key_x, key_z = jax.random.split(key)
        eps = jax.random.normal(key_x, (num_samples, d))
        x = summary.mean[k] + eps @ _input_sqrt(summary.cov[k]).T
        gate_keys = jax.random.split(key_z, len(summary.rates))

        def gate(i, s):
            if variant == "deterministic":
                return s > 0
            return jax.random.uniform(gate_keys[i], s.shape) < summary.rates[i][k]

        f0, delta = joint_forward(layers0, layers1, x, gate)
        return jnp.mean(discrepancy(distance, f0, f0 + delta))

    values = jax.vmap(group_value)(jnp.arange(groups), jax.random.split(key, groups))
    return jnp.sum(summary.weights * values)


def _gate_second_moment(mu: Array) -> Array:
    """``E[g g^T]`` for ``g = [z; z; 1]``, ``z_j ~ Bernoulli(mu_j)`` independent."""
    zz = jnp.outer(mu, mu) + jnp.diag(mu - mu * mu)
    top = jnp.concatenate([zz, zz, mu[:, None]], axis=1)
    bottom = jnp.concatenate([mu, mu, jnp.ones((1,), mu.dtype)])[None, :]
    return jnp.concatenate([top, top, bottom], axis=0)


def _layer_map(w0, b0, w1, b1) -> Array:
    """``M = [[W^T, 0, b], [Delta W^T, W'^T, Delta b], [0, 0, 1]]`` ``[2 out + 1, 2 in + 1]``."""
    n_in, n_out = w0.shape
    zeros = jnp.zeros((n_out, n_in), w0.dtype)
    top = jnp.concatenate([w0.T, zeros, b0[:, None]], axis=1)
    mid = jnp.concatenate([(w1 - w0).T, w1.T, (b1 - b0)[:, None]], axis=1)
    last = jnp.zeros((1, 2 * n_in + 1), w0.dtype).at[0, -1].set(1.0)
    return jnp.concatenate([top, mid, last], axis=0)


def delta_output_second_moment(summary: LaftrSummary, layers0, layers1) -> Array:
    """``E[Delta f Delta f^T]`` ``[K, C', C']`` under the stochastic-gate model, per group (the
    ``"moment"`` recursion of the module docstring)."""
    d = summary.widths[0]

    def group(mean, cov, rates):
        second = cov + jnp.outer(mean, mean)
        s = jnp.zeros((2 * d + 1, 2 * d + 1), cov.dtype)
        s = s.at[:d, :d].set(second).at[:d, -1].set(mean).at[-1, :d].set(mean).at[-1, -1].set(1.0)
        for i, ((w0, b0), (w1, b1)) in enumerate(zip(layers0, layers1)):
            m = _layer_map(w0, b0, w1, b1)
            v = m @ s @ m.T
            if i == len(layers0) - 1:
                c = w0.shape[1]
                return v[c:2 * c, c:2 * c]
            s = _gate_second_moment(rates[i]) * v
        raise AssertionError("unreachable")

    return jax.vmap(group)(summary.mean, summary.cov, summary.rates)


def laftr_fsd(summary: LaftrSummary, params0: Any, params1: Any, *, variant: str = "moment",
              distance: str = "sq", key: Array | None = None, num_samples: int = 256,
              inputs: Array | None = None) -> Array:
    """The LAFTR estimate of ``FSD(theta0, theta1)`` (a scalar; differentiable in ``params1``).

    Args:
      summary: :func:`summarize` at ``params0``.
      params0, params1: the MLP's variables or params at theta0 and theta1.
      variant: ``"moment"`` (closed form), ``"bernoulli"`` or ``"deterministic"`` (sampled; see
        the module docstring).
      distance: ``"sq"`` (``0.5 ||Delta f||^2`` on logits) or ``"kl"``
        (``KL(softmax(f0) || softmax(f1))``).
      key: PRNG key of the sampled variants.
      num_samples: inputs drawn per group by the sampled variants.
      inputs: ``"deterministic"`` only: evaluate on these inputs ``[B, ...]`` instead of samples
        (then it is the gate-frozen FSD on a stored set).

    Returns:
      The estimate, a float32 scalar.
    """
    check_distance(distance)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(summary, LaftrSummary):
        raise TypeError(f"summary must be a LaftrSummary (from summarize), got "
                        f"{type(summary).__name__}")
    layers0 = restrict_outputs(mlp_layers(params0, summary.widths, "params0"), summary.outputs)
    layers1 = restrict_outputs(mlp_layers(params1, summary.widths, "params1"), summary.outputs)
    if inputs is not None:
        if variant != "deterministic":
            raise ValueError("inputs= is only used by variant='deterministic'")
        x = flatten_inputs(jnp.asarray(inputs), summary.widths[0])
        f0, delta = joint_forward(layers0, layers1, x, lambda i, s: s > 0)
        return jnp.mean(discrepancy(distance, f0, f0 + delta))
    if variant == "moment":
        second = delta_output_second_moment(summary, layers0, layers1)
        if distance == "sq":
            per_group = 0.5 * jnp.trace(second, axis1=1, axis2=2)
        else:
            per_group = 0.5 * jnp.sum(summary.output_hessian * second, axis=(1, 2))
        return jnp.sum(summary.weights * per_group)
    if key is None:
        raise ValueError(f"variant={variant!r} samples inputs: pass key=jax.random.key(...)")
    return _sampled(summary, layers0, layers1, key, int(num_samples), distance, variant)
