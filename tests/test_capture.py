"""Capture: per-example layer gradients from a, g equal a Python loop of jax.grad."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.capture import (
    check_coverage,
    layer_gradients,
    layer_params,
    layer_statistics,
    loss_cotangents,
    output_shapes,
    per_example_gradients,
    tag_linear,
)
from tda_jax.losses import mean_squared_error, softmax_cross_entropy


class ConvNet1D(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (3,), strides=(2,), padding="SAME")(x[..., None]))
        h = nn.relu(nn.Conv(2, (2,), padding="VALID", kernel_dilation=(2,))(h))
        return nn.Dense(4)(h.reshape(h.shape[0], -1))


class ConvNet2D(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (3, 3), padding=1, use_bias=False)(x))
        return nn.Dense(4)(h.reshape(h.shape[0], -1))


class SharedAndGeneral(nn.Module):
    """A Dense applied at every position, a layer reused twice, a DenseGeneral, a custom layer."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(6, name="shared")
        h = nn.tanh(shared(x))  # x: [B, T, F] -> positions share weights
        h = nn.tanh(nn.DenseGeneral((2, 3), axis=-1, name="general")(h)).reshape(*h.shape[:2], 6)
        h = nn.tanh(shared(h[..., :x.shape[-1]]))  # second call of the same module
        return Custom(name="custom")(h.mean(axis=1))


class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 3))
        b = self.param("b", nn.initializers.normal(0.1), (3,))
        return tag_linear(self, x, x @ w + b, kernel="w", bias="b")


class EmbedModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(7, 5)(tokens)
        return nn.Dense(3)(jnp.tanh(h).mean(axis=1))


CASES = [
    (ConvNet1D(), (6, 9), "ce"),
    (ConvNet2D(), (5, 4, 4, 2), "ce"),
    (SharedAndGeneral(), (5, 4, 6), "mse"),
    (EmbedModel(), (6, 4), "ce"),
]


@pytest.mark.parametrize("model,shape,loss_name", CASES,
                         ids=["conv1d", "conv2d", "shared_general_tagged", "embed"])
def test_layer_gradients_match_python_loop(model, shape, loss_name):
    key = jax.random.key(0)
    if isinstance(model, EmbedModel):
        x = jax.random.randint(key, shape, 0, 7)
    else:
        x = jax.random.normal(key, shape)
    params = model.init(jax.random.key(1), x)["params"]
    outputs = model.apply({"params": params}, x)
    loss = softmax_cross_entropy() if loss_name == "ce" else mean_squared_error()
    if loss_name == "ce":
        targets = jnp.arange(x.shape[0]) % outputs.shape[-1]
    else:
        targets = jax.random.normal(jax.random.key(2), outputs.shape)
    apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)

    _, a, g, _, specs, _ = layer_statistics(apply_fn, params, x, loss_cotangents(loss.per_example, targets))
    check_coverage(params, specs, allow_untracked=False)
    for i in range(x.shape[0]):  # the oracle: one jax.grad per example
        grad_i = jax.grad(lambda p: loss.per_example(apply_fn(p, x[i:i + 1]), targets[i:i + 1])[0])(
            params)
        for name, spec in specs.items():
            expected = spec.to_matrix(layer_params(grad_i, spec))
            got = layer_gradients(a[name], g[name])[0, i]
            assert float(jnp.linalg.norm(expected)) > 0
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_shared_layer_positions_are_concatenated():
    model = SharedAndGeneral()
    x = jnp.ones((2, 4, 6))
    params = model.init(jax.random.key(0), x)["params"]
    specs, shapes, _ = output_shapes(lambda p, v: model.apply({"params": p}, v), params, x)
    assert set(specs) == {"shared", "general", "custom"}
    assert shapes["shared#0"] == (2, 4, 6) and shapes["shared#1"] == (2, 4, 6)
    assert specs["general"].in_dim == 7 and specs["general"].out_dim == 6


def test_matrix_view_roundtrip():
    model = ConvNet2D()
    x = jnp.ones((1, 4, 4, 2))
    params = model.init(jax.random.key(0), x)["params"]
    specs, _, _ = output_shapes(lambda p, v: model.apply({"params": p}, v), params, x)
    for spec in specs.values():
        original = layer_params(params, spec)
        back = spec.from_matrix(spec.to_matrix(original))
        for k in original:
            np.testing.assert_array_equal(back[k], original[k])


def test_untracked_parameters_raise_with_their_names():
    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.LayerNorm()(x))

    model = WithNorm()
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    specs, _, _ = output_shapes(lambda p, v: model.apply({"params": p}, v), params, x)
    with pytest.raises(ValueError, match="LayerNorm_0/scale"):
        check_coverage(params, specs, allow_untracked=False)
    check_coverage(params, specs, allow_untracked=True)


def test_per_example_gradients_vmap_matches_loop():
    model = nn.Dense(3)
    x = jax.random.normal(jax.random.key(0), (4, 5))
    y = jnp.array([0, 1, 2, 0])
    params = model.init(jax.random.key(1), x)
    loss = softmax_cross_entropy()

    def loss_fn(p, example):
        xi, yi = example
        return loss.per_example(model.apply(p, xi[None]), yi[None])[0]

    grads = per_example_gradients(loss_fn, params, (x, y))
    for i in range(4):
        ref = jax.grad(loss_fn)(params, (x[i], y[i]))
        jax.tree.map(lambda u, v, i=i: np.testing.assert_allclose(u[i], v, rtol=1e-5, atol=1e-6),
                     grads, ref)


def test_shape_mismatch_names_the_inputs():
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))
    with pytest.raises((TypeError, ValueError), match="inputs of shape"):
        output_shapes(lambda p, v: model.apply(p, v), params, jnp.ones((2, 4)))
