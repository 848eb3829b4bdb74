"""The ReLU MLP that LAFTR linearises: its layers, checks, and the gated joint forward pass.

LAFTR applies to networks ``s_l = W_l^T a_{l-1} + b_l``, ``a_l = relu(s_l)`` (``l < L``) and
``f = s_L``: :class:`tda_jax.models.MLP` with ``activation=nn.relu``. Other activations are refused
(:data:`SUPPORTED_ACTIVATIONS`): the trick writes the activation as ``a = z * s`` with a gate
``z in {0, 1}``, which is exact only for a piecewise-linear unit with slopes 0 and 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tda_jax.models import MLP

Array = jax.Array
Layers = tuple[tuple[Array, Array], ...]

SUPPORTED_ACTIVATIONS = ("relu",)


def check_relu_mlp(model: nn.Module) -> None:
    """Raises unless ``model`` is a :class:`tda_jax.models.MLP` with ReLU activations."""
    if not isinstance(model, MLP):
        raise TypeError(
            f"LAFTR supports tda_jax.models.MLP (Dense -> relu -> ... -> Dense); got "
            f"{type(model).__name__}.")
    activation = model.activation
    if activation is not nn.relu and activation is not jax.nn.relu:
        name = getattr(activation, "__name__", repr(activation))
        raise ValueError(
            f"LAFTR needs ReLU units (supported activations: {', '.join(SUPPORTED_ACTIVATIONS)}); "
            f"model.activation is {name!r}. The linearized activation a = z * s with a 0/1 gate "
            "is exact only for ReLU.")


def widths_of(model: MLP, input_dim: int) -> tuple[int, ...]:
    """``(d, h_1, ..., h_{L-1}, C)``: the input width, hidden widths and output width."""
    return (int(input_dim), *(int(h) for h in model.hidden_sizes), int(model.num_outputs))


def _params_root(params: Any) -> Any:
    if isinstance(params, dict) and "params" in params and "Dense_0" not in params:
        return params["params"]
    return params


def mlp_layers(params: Any, widths: Sequence[int], role: str = "params") -> Layers:
    """``((W_1, b_1), ..., (W_L, b_L))`` of an MLP's parameters, checked against ``widths``.

    Args:
      params: ``variables`` (``{"params": ...}``) or the params dict (``Dense_0``, ``Dense_1``...).
      widths: ``(d, h_1, ..., C)`` the parameters must have (from a :class:`LaftrSummary`).
      role: the argument's name, used in errors.

    Raises:
      ValueError: a missing or extra layer, or a kernel whose shape differs from ``widths`` (e.g.
        a summary from another architecture, or inputs of another dimension).
    """
    root = _params_root(params)
    if not isinstance(root, dict):
        raise TypeError(f"{role} must be an MLP's params dict, got {type(root).__name__}")
    num_layers = len(widths) - 1
    names = [f"Dense_{i}" for i in range(num_layers)]
    extra = sorted(set(root) - set(names))
    missing = [n for n in names if n not in root]
    if missing or extra:
        raise ValueError(
            f"{role} has layers {sorted(root)}, but the summary's architecture (widths "
            f"{tuple(widths)}) needs {names}: was the summary made for another architecture?")
    layers = []
    for i, name in enumerate(names):
        kernel, bias = root[name]["kernel"], root[name]["bias"]
        expected = (widths[i], widths[i + 1])
        if tuple(kernel.shape[-2:]) != expected:
            what = "input dimension" if i == 0 and kernel.shape[-1] == widths[1] else "architecture"
            raise ValueError(
                f"{role}[{name!r}]['kernel'] has shape {tuple(kernel.shape)}, the summary expects "
                f"{expected} (widths {tuple(widths)}): mismatched {what}.")
        layers.append((kernel, bias))
    return tuple(layers)


def flatten_inputs(inputs: Array, input_dim: int, role: str = "inputs") -> Array:
    """``[B, ...] -> [B, d]`` as :class:`MLP` flattens them, checking ``d``."""
    flat = jnp.reshape(inputs, (inputs.shape[0], -1))
    if flat.shape[1] != input_dim:
        raise ValueError(
            f"{role} have {flat.shape[1]} features per example (shape {tuple(inputs.shape)}), the "
            f"summary / model expects {input_dim}.")
    return flat


def forward(layers: Layers, x: Array) -> tuple[Array, list[Array]]:
    """The ReLU network: ``(outputs [B, C], [pre-activations s_l [B, h_l] of hidden layers])``."""
    pre = []
    a = x
    for kernel, bias in layers[:-1]:
        s = a @ kernel + bias
        pre.append(s)
        a = jax.nn.relu(s)
    kernel, bias = layers[-1]
    return a @ kernel + bias, pre


def joint_forward(layers0: Layers, layers1: Layers, x: Array,
                  gate: Callable[[int, Array], Array]) -> tuple[Array, Array]:
    """The joint pass of LAFTR with gates frozen at ``theta0``.

    For ``l < L``::

        s_l = W_l^T a_{l-1} + b_l                       (theta0)
        Delta s_l = Delta W_l^T a_{l-1} + W'_l^T Delta a_{l-1} + Delta b_l
        z_l = gate(l, s_l);  a_l = z_l * s_l;  Delta a_l = z_l * Delta s_l

    with ``W' = W + Delta W`` (theta1), ``a_0 = x``, ``Delta a_0 = 0``; the outputs are
    ``f0 = s_L`` and ``Delta f = Delta s_L``, so ``f1 = f0 + Delta f`` is exactly the theta1 network
    when its gates equal theta0's.

    Args:
      layers0, layers1: ``(W, b)`` per layer at theta0 and theta1.
      x: inputs ``[B, d]``.
      gate: ``gate(l, s_l) -> z_l`` (same shape): ``s > 0`` for the deterministic variant, Bernoulli
        samples of the activation rates for the stochastic one.

    Returns:
      ``(f0 [B, C], Delta f [B, C])``.
    """
    a, delta_a = x, jnp.zeros_like(x)
    num = len(layers0)
    for i, ((w0, b0), (w1, b1)) in enumerate(zip(layers0, layers1)):
        s = a @ w0 + b0
        delta_s = a @ (w1 - w0) + delta_a @ w1 + (b1 - b0)
        if i == num - 1:
            return s, delta_s
        z = gate(i, s).astype(s.dtype)
        a, delta_a = z * s, z * delta_s
    raise AssertionError("unreachable")
