"""Compiled steps that the caller holds, shared by content rather than by function identity.

Drivers (curvature passes, score loops, training) build their jitted steps with explicit builders
and hold them for the duration of a call; users who call a driver many times can build the steps
once themselves (e.g. :func:`tda_jax.curvature.build_fit_steps`). A :class:`CompiledStep` compiles
once per input signature; its executables are additionally shared through a small content-keyed
table (the hash of the lowered StableHLO program), so that two steps built from *different* Python
callables that compute the same program, e.g. two fresh ``lambda p, x: model.apply({"params": p}, x)``,
compile only once. Nothing is keyed on a callable's identity, so no cache keeps a user's closure
alive: the table holds compiled executables only, and at most :data:`MAX_EXECUTABLES` of them.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from typing import Any

import jax

MAX_EXECUTABLES = 64

_EXECUTABLES: collections.OrderedDict[str, Any] = collections.OrderedDict()
_LOCK = threading.Lock()


def _leaf_signature(leaf: Any) -> tuple:
    if isinstance(leaf, jax.Array):
        return (leaf.shape, leaf.dtype, getattr(leaf, "weak_type", False), leaf.sharding)
    shape = getattr(leaf, "shape", ())
    dtype = getattr(leaf, "dtype", type(leaf))
    return (tuple(shape), dtype, isinstance(leaf, (int, float, complex)))


def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return (treedef, tuple(_leaf_signature(leaf) for leaf in leaves))


def _content_compile(lowered: jax.stages.Lowered, signature: tuple) -> Any:
    # The input signature is part of the key: unused inputs are pruned from the program, so two
    # programs with equal text can still expect different argument trees.
    digest = hashlib.sha256(lowered.as_text().encode())
    digest.update(repr(signature).encode())
    key = digest.hexdigest()
    with _LOCK:
        executable = _EXECUTABLES.get(key)
        if executable is not None:
            _EXECUTABLES.move_to_end(key)
            return executable
    executable = lowered.compile()
    with _LOCK:
        _EXECUTABLES[key] = executable
        while len(_EXECUTABLES) > MAX_EXECUTABLES:
            _EXECUTABLES.popitem(last=False)
    return executable


class CompiledStep:
    """A function jitted once per input signature, with executables shared by program content.

    Args:
      fn: the step; its arguments are pytrees of arrays (no static arguments).
      name: shown in ``repr`` and error messages.
      **jit_kwargs: passed to :func:`jax.jit` (e.g. ``donate_argnums``).

    Calling the step traces and lowers it the first time a new signature (tree structure, shapes,
    dtypes, shardings) is seen, then runs the compiled executable; later calls with the same
    signature go straight to the executable.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, **jit_kwargs: Any):
        self._jitted = jax.jit(fn, **jit_kwargs)
        self.name = name or getattr(fn, "__name__", "step")
        self._by_signature: dict[tuple, Any] = {}

    def __call__(self, *args: Any) -> Any:
        signature = _signature(args)
        executable = self._by_signature.get(signature)
        if executable is None:
            executable = _content_compile(self._jitted.lower(*args), signature)
            self._by_signature[signature] = executable
        return executable(*args)

    def __repr__(self) -> str:
        return f"CompiledStep({self.name}, {len(self._by_signature)} signature(s))"


def clear_executables() -> None:
    """Drops every shared executable (e.g. between benchmarks that count compilations)."""
    with _LOCK:
        _EXECUTABLES.clear()
