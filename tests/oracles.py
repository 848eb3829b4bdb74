"""Dense oracles for curvature blocks on models whose tracked layers see several positions.

Tiny ``flax.linen`` models, each with a hand-written *reference forward* that exposes every
tracked layer's inputs ``a_t`` and takes additive perturbations of its outputs ``y_t`` (so
``g_t = d outputs / d y_t``) without using :mod:`tda_jax.capture`:

* ``conv``: ``nn.Conv`` (kernel 3, SAME padding) over 6 positions -> tanh -> flatten -> ``nn.Dense``.
* ``token``: ``nn.Embed`` over 3 tokens -> ``nn.Dense`` per position -> tanh -> ``nn.DenseGeneral``
  contracting (position, feature).
* ``reused_layer``: one ``nn.Dense`` applied twice (shared weights) -> ``nn.Dense`` head.
* ``sum_dense``: ``sum_t Dense(x_t)`` over 2 positions with squared error, linear, so K-FAC's
  factors can be written on paper (``G = 2 I``, ``A = E[mean_t a_t a_t^T]``).

Parameters are flattened in the library's documented order: layers in ``specs`` order, each layer's
matrix view ``W [in, out]`` (``LayerSpec.to_matrix``: kernel rows, bias last) row-major. Oracles:

* :func:`dense_ggn`: ``(1/N) sum_i J_i^T H_i J_i`` with ``J_i`` from ``jax.jacobian`` of the Flax model
  and ``H_i`` from ``jax.hessian`` of the per-example loss (not the library's ``hessian_sqrt``).
* :func:`per_example_grads`: ``jax.grad`` of a per-example loss or measurement, flat.
* :func:`kronecker_factors`: ``A = E[mean_t a_t a_t^T]``, ``G = E[sum_t J_t^T H J_t]`` from the
  reference forward (``J_t = d outputs / d y_t``), i.e. the K-FAC conventions for positions.
* :func:`influence_oracle`: pairwise and self-influence with an explicit dense solve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.capture.layers import LayerSpec, output_shapes
from tda_jax.data import Dataset
from tda_jax.losses import Loss, mean_squared_error, softmax_cross_entropy

NUM_CLASSES = 3
NUM_TRAIN = 20
NUM_QUERIES = 5


# ----------------------------------------------------------------------------------------------
# Models and their reference forwards (one example, no batch axis)
# ----------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    """``[B, 6, 2] -> [B, 3]``: a 1-D convolution shared over 6 positions, then a dense head."""

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Conv(3, kernel_size=(3,), padding="SAME", name="conv")(x))
        return nn.Dense(NUM_CLASSES, name="head")(jnp.reshape(h, (h.shape[0], -1)))


def _with_one(x):
    return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


def _conv_reference(mats, x, eps):
    # im2col written out by hand: SAME padding of 1, feature index = channel * 3 + offset (the
    # matrix view's row order: input channel major, kernel offset minor).
    length, channels = x.shape
    padded = jnp.pad(x, ((1, 1), (0, 0)))
    patches = jnp.stack([jnp.stack([padded[t + k] for k in range(3)], axis=-1).reshape(-1)
                         for t in range(length)])  # [T, channels * 3], (c, k) order
    assert patches.shape == (length, channels * 3)
    a_conv = _with_one(patches)
    h = jnp.tanh(a_conv @ mats["conv"] + eps["conv"])
    a_head = _with_one(h.reshape(1, -1))
    out = (a_head @ mats["head"] + eps["head"])[0]
    return out, {"conv": a_conv, "head": a_head}


class TokenNet(nn.Module):
    """``[B, 3] int -> [B, 3]``: embeddings, a per-token dense layer, a DenseGeneral head."""

    @nn.compact
    def __call__(self, tokens):
        e = nn.Embed(7, 4, name="embed")(tokens)
        h = nn.tanh(nn.Dense(5, name="mix")(e))
        return nn.DenseGeneral(NUM_CLASSES, axis=(-2, -1), name="head")(h)


def _token_reference(mats, tokens, eps):
    a_embed = jax.nn.one_hot(tokens, 7, dtype=jnp.float32)  # [T, vocab]
    e = a_embed @ mats["embed"] + eps["embed"]
    a_mix = _with_one(e)
    h = jnp.tanh(a_mix @ mats["mix"] + eps["mix"])
    a_head = _with_one(h.reshape(1, -1))  # (position, feature) row-major, as DenseGeneral
    out = (a_head @ mats["head"] + eps["head"])[0]
    return out, {"embed": a_embed, "mix": a_mix, "head": a_head}


class ReusedNet(nn.Module):
    """``[B, 4] -> [B, 3]``: ``x -> tanh(d(x)) -> tanh(d(.))`` with ONE dense layer ``d``, then a head."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(4, name="shared")
        h = nn.tanh(shared(nn.tanh(shared(x))))
        return nn.Dense(NUM_CLASSES, name="head")(h)


def _reused_reference(mats, x, eps):
    a0 = _with_one(x)
    h0 = jnp.tanh(a0 @ mats["shared"] + eps["shared"][0])
    a1 = _with_one(h0)
    h1 = jnp.tanh(a1 @ mats["shared"] + eps["shared"][1])
    a_head = _with_one(h1)[None]
    out = (a_head @ mats["head"] + eps["head"])[0]
    return out, {"shared": jnp.stack([a0, a1]), "head": a_head}


class SumDense(nn.Module):
    """``[B, 2, 3] -> [B, 2]``: ``sum_t Dense(x_t)``, linear, for K-FAC's position conventions."""

    @nn.compact
    def __call__(self, x):
        return jnp.sum(nn.Dense(2, name="dense")(x), axis=1)


def _sum_dense_reference(mats, x, eps):
    a = _with_one(x)
    return jnp.sum(a @ mats["dense"] + eps["dense"], axis=0), {"dense": a}


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Problem:
    """A model, its parameters, data and oracle hooks.

    ``apply_fn`` is created once per problem so the library's compiled steps are reused.
    ``reference(mats, x, eps) -> (outputs [C], {layer: a [T, in]})`` for one example;
    ``positions[layer]`` is the number of positions ``T`` (the shape of ``eps[layer]`` is
    ``[T, out]``).
    """

    name: str
    model: nn.Module
    apply_fn: Callable[[Any, Any], jax.Array]
    params: Any
    train: Dataset
    queries: Dataset
    loss: Loss
    reference: Callable
    positions: dict[str, int]


def _make(name, model, inputs, targets, num_classes, loss, reference, positions, num_train):
    params = model.init(jax.random.key(0), inputs[:1])["params"]
    # Non-zero biases so that bias rows are not degenerate.
    params = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape)
                          / max(v.size, 1) if v.ndim == 1 else v, params)
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    train = Dataset(inputs[:num_train], targets[:num_train], num_classes)
    queries = Dataset(inputs[num_train:], targets[num_train:], num_classes)
    return Problem(name, model, apply_fn, params, train, queries, loss, reference, positions)


def make_problem(name: str) -> Problem:
    """``"conv"``, ``"token"``, ``"reused_layer"`` (softmax cross-entropy, 3 classes) or
    ``"sum_dense"`` (linear, squared error, 2 positions)."""
    n = NUM_TRAIN + NUM_QUERIES
    rng = np.random.default_rng(sum(map(ord, name)))
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    ce = softmax_cross_entropy()
    if name == "conv":
        x = rng.normal(size=(n, 6, 2)).astype(np.float32)
        return _make(name, ConvNet(), x, labels, NUM_CLASSES, ce, _conv_reference,
                     {"conv": 6, "head": 1}, NUM_TRAIN)
    if name == "token":
        x = rng.integers(0, 7, size=(n, 3)).astype(np.int32)
        return _make(name, TokenNet(), x, labels, NUM_CLASSES, ce, _token_reference,
                     {"embed": 3, "mix": 3, "head": 1}, NUM_TRAIN)
    if name == "reused_layer":
        x = rng.normal(size=(n, 4)).astype(np.float32)
        return _make(name, ReusedNet(), x, labels, NUM_CLASSES, ce, _reused_reference,
                     {"shared": 2, "head": 1}, NUM_TRAIN)
    if name == "sum_dense":
        x = rng.normal(size=(n, 2, 3)).astype(np.float32)
        y = rng.normal(size=(n, 2)).astype(np.float32)
        return _make(name, SumDense(), x, y, None, mean_squared_error(), _sum_dense_reference,
                     {"dense": 2}, NUM_TRAIN)
    raise ValueError(f"unknown problem {name!r}")


# ----------------------------------------------------------------------------------------------
# Flat parameter order
# ----------------------------------------------------------------------------------------------


def model_specs(problem: Problem) -> tuple[LayerSpec, ...]:
    """Tracked layers as the capture code sees them, sorted by name (order is the caller's choice)."""
    specs, _, _ = output_shapes(problem.apply_fn, problem.params,
                                jnp.asarray(problem.train.inputs[:1]))
    return tuple(specs[n] for n in sorted(specs))


def layer_offsets(specs) -> dict[str, slice]:
    """``{layer: slice}`` of each layer's block in the flat vector."""
    out, start = {}, 0
    for s in specs:
        out[s.name] = slice(start, start + s.num_params)
        start += s.num_params
    return out


def _get(params, path):
    for key in path:
        params = params[key]
    return params


def flatten(params, specs) -> jax.Array:
    """Parameter tree -> flat vector in the documented order."""
    return jnp.concatenate([jnp.ravel(s.to_matrix({n: _get(params, s.path)[n]
                                                    for n in s.param_names})) for s in specs])


def unflatten(theta, params, specs):
    """Flat vector -> parameter tree like ``params`` (every leaf must belong to a layer in specs)."""
    tree = jax.tree.map(lambda v: v, params)  # fresh containers
    tree = _to_dict(tree)
    offsets = layer_offsets(specs)
    for s in specs:
        mat = jnp.reshape(theta[offsets[s.name]], (s.in_dim, s.out_dim))
        node = _get(tree, s.path)
        node.update(s.from_matrix(mat))
    return tree


def _to_dict(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def matrices(theta, specs) -> dict[str, jax.Array]:
    """Flat vector -> ``{layer: W [in, out]}``."""
    offsets = layer_offsets(specs)
    return {s.name: jnp.reshape(theta[offsets[s.name]], (s.in_dim, s.out_dim)) for s in specs}


# ----------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------


def _loss_hessian(loss: Loss, outputs, target):
    return jax.hessian(lambda o: loss.per_example(o[None], target[None])[0])(outputs)


def dense_ggn(problem: Problem, specs, data: Dataset | None = None) -> np.ndarray:
    """``(1/N) sum_i J_i^T H_i J_i`` ``[P, P]`` (float64) in the flat order of ``specs``."""
    data = problem.train if data is None else data
    theta = flatten(problem.params, specs)

    def outputs(vec, x):
        return problem.apply_fn(unflatten(vec, problem.params, specs), x[None])[0]

    @jax.jit
    def terms(theta, x, y):
        jac = jax.vmap(jax.jacobian(outputs), in_axes=(None, 0))(theta, x)  # [N, C, P]
        out = jax.vmap(outputs, in_axes=(None, 0))(theta, x)
        return jac, jax.vmap(lambda o, t: _loss_hessian(problem.loss, o, t))(out, y)  # [N, C, C]

    jac, hess = terms(theta, jnp.asarray(data.inputs), jnp.asarray(data.targets))
    jac, hess = np.asarray(jac, np.float64), np.asarray(hess, np.float64)
    jac = jac.reshape(len(jac), -1, jac.shape[-1])  # sequence outputs [T, V] flattened
    hess = hess.reshape(len(hess), jac.shape[1], jac.shape[1])
    return np.einsum("nci,ncd,ndj->ij", jac, hess, jac) / len(jac)


def per_example_grads(problem: Problem, specs, fn: Callable, data: Dataset) -> np.ndarray:
    """``[N, P]`` float64 gradients of ``fn(outputs [1, C], targets [1]) -> [1]`` per example."""
    theta = flatten(problem.params, specs)

    def one(x, y):
        return jax.grad(lambda v: fn(problem.apply_fn(unflatten(v, problem.params, specs),
                                                      x[None]), y[None])[0])(theta)

    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(data.inputs), jnp.asarray(data.targets)),
                      np.float64)


def _zero_eps(problem: Problem, specs):
    return {s.name: jnp.zeros((problem.positions[s.name], s.out_dim)) for s in specs}


def reference_outputs(problem: Problem, specs, data: Dataset) -> np.ndarray:
    """Outputs of the hand-written reference forward ``[N, C]``."""
    mats = matrices(flatten(problem.params, specs), specs)
    eps = _zero_eps(problem, specs)
    return np.asarray(jax.vmap(lambda x: problem.reference(mats, x, eps)[0])(
        jnp.asarray(data.inputs)))


def reference_layer_grads(problem: Problem, specs, fn: Callable, data: Dataset) -> np.ndarray:
    """``[N, P]`` gradients assembled as ``sum_t a_t g_t^T`` from the reference forward."""
    mats = matrices(flatten(problem.params, specs), specs)
    eps0 = _zero_eps(problem, specs)

    def one(x, y):
        def scalar(eps):
            out, a = problem.reference(mats, x, eps)
            return fn(out[None], y[None])[0], a

        g, a = jax.grad(scalar, has_aux=True)(eps0)
        return jnp.concatenate([jnp.ravel(a[s.name].T @ g[s.name]) for s in specs])

    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(data.inputs), jnp.asarray(data.targets)),
                      np.float64)


def kronecker_factors(problem: Problem, specs, data: Dataset | None = None
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (A, G)}`` with ``A = E[mean_t a_t a_t^T]`` and ``G = E[sum_t J_t^T H J_t]``.

    ``J_t = d outputs / d y_t`` and ``H`` the loss Hessian: ``sum_k g_{k,t} g_{k,t}^T`` for any
    square root ``H = sum_k v_k v_k^T``, i.e. the expected-Fisher cotangents summed over ``k``.
    """
    data = problem.train if data is None else data
    mats = matrices(flatten(problem.params, specs), specs)
    eps0 = _zero_eps(problem, specs)

    def one(x, y):
        out, a = problem.reference(mats, x, eps0)
        jac = jax.jacobian(lambda e: problem.reference(mats, x, e)[0])(eps0)  # {l: [C, T, out]}
        hess = _loss_hessian(problem.loss, out, y)
        big_a = {n: jnp.mean(jnp.einsum("ti,tj->tij", v, v), axis=0) for n, v in a.items()}
        big_g = {n: jnp.einsum("cto,cd,dtp->op", j, hess, j) for n, j in jac.items()}
        return big_a, big_g

    big_a, big_g = jax.jit(jax.vmap(one))(jnp.asarray(data.inputs), jnp.asarray(data.targets))
    return {s.name: (np.asarray(big_a[s.name], np.float64).mean(0),
                     np.asarray(big_g[s.name], np.float64).mean(0)) for s in specs}


def block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    size = sum(b.shape[0] for b in blocks)
    out = np.zeros((size, size))
    start = 0
    for b in blocks:
        out[start:start + b.shape[0], start:start + b.shape[0]] = b
        start += b.shape[0]
    return out


def influence_oracle(preconditioner: np.ndarray, query_grads: np.ndarray,
                     train_grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(-gq M^{-1} gt^T [Q, N], diag(gt M^{-1} gt^T) [N])`` with a dense solve (float64)."""
    solved = np.linalg.solve(preconditioner, train_grads.T)  # [P, N]
    return -query_grads @ solved, np.einsum("np,pn->n", train_grads, solved)
