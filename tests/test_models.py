"""Tests of tda_jax.models: output shapes, input layouts, standard layers only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.models import CNN1D, CNN2D, MLP


def _layer_names(params):
    return set(params["params"])


def test_mlp_shapes_and_flattening():
    model = MLP(hidden_sizes=(16, 8), num_outputs=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 2))
    params = model.init(jax.random.PRNGKey(1), x)
    assert model.apply(params, x).shape == (5, 3)
    assert _layer_names(params) == {"Dense_0", "Dense_1", "Dense_2"}
    assert params["params"]["Dense_0"]["kernel"].shape == (8, 16)
    np.testing.assert_allclose(model.apply(params, x), model.apply(params, x.reshape(5, 8)))
    linear = MLP(hidden_sizes=(), num_outputs=2, activation=nn.tanh)
    p = linear.init(jax.random.PRNGKey(0), x)
    assert _layer_names(p) == {"Dense_0"}


def test_cnn1d_shapes_and_channel_axis():
    model = CNN1D(channels=(4, 8), kernel_size=5, hidden_size=16, num_outputs=10)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 40))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    out = jax.jit(model.apply)(params, x)
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out, jax.jit(model.apply)(params, x[..., None]), rtol=1e-6)
    assert _layer_names(params) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
    with pytest.raises(ValueError, match="CNN1D"):
        model.apply(params, jnp.zeros((3, 40, 1, 1)))


def test_cnn2d_shapes_and_flat_inputs():
    model = CNN2D(channels=(4, 8), kernel_size=3, hidden_size=16, num_outputs=10)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    out = jax.jit(model.apply)(params, x)
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out, jax.jit(model.apply)(params, x.reshape(3, 64)), rtol=1e-6)
    with pytest.raises(ValueError, match="square"):
        model.apply(params, jnp.zeros((3, 63)))


@pytest.mark.parametrize("model, shape", [
    (MLP((8,), 4), (6, 5)),
    (CNN1D((4,), 3, 8, 4), (6, 12)),
    (CNN2D((4,), 3, 8, 4), (6, 4, 4, 1)),
])
def test_examples_are_independent(model, shape):
    # Per-example attribution relies on row i of the output depending only on row i of the input.
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    apply = jax.jit(model.apply)
    full = apply(params, x)
    rows = jnp.concatenate([apply(params, x[i:i + 1]) for i in range(shape[0])])
    np.testing.assert_allclose(full, rows, rtol=1e-5, atol=1e-6)


def test_apply_fn_of_bridges_module_and_attribution_convention():
    from tda_jax.models import apply_fn_of, num_outputs_of

    model = MLP(hidden_sizes=(4,), num_outputs=3)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 6))
    variables = model.init(jax.random.PRNGKey(1), x)
    apply_fn = apply_fn_of(model)
    np.testing.assert_array_equal(apply_fn(variables["params"], x), model.apply(variables, x))
    # Named and hashable: equal modules give equal callables, so cached compilations are reused.
    assert apply_fn == apply_fn_of(MLP(hidden_sizes=(4,), num_outputs=3))
    assert hash(apply_fn) == hash(apply_fn_of(MLP(hidden_sizes=(4,), num_outputs=3)))
    assert apply_fn != apply_fn_of(MLP(hidden_sizes=(4,), num_outputs=2))
    assert num_outputs_of(model, x[:1]) == 3
    with pytest.raises(TypeError, match="flax.linen or flax.nnx Module"):
        apply_fn_of(lambda p, x: x)
