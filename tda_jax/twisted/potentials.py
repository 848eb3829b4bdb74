"""Target potentials over generated sequences: Boolean constraints, soft log-potentials, products.

The target of twisted SMC is ``sigma(s_1:T) = p0(s_1:T) phi(s_1:T) / Z`` with
``Z = sum_s p0(s) phi(s)``. A :class:`Potential` returns ``log phi`` for a batch of complete
sequences ``tokens [B, T]`` (and an optional conditioning input ``cond [B, C]``, e.g. the
observed suffix of an infilling task). It enters only the *last* SMC weight
(:mod:`tda_jax.twisted.smc`); intermediate steps see it only through the twists.

* :func:`boolean`: ``log phi = 0`` where a predicate holds, ``-inf`` elsewhere (a constraint).
* :func:`soft`: any finite log-potential, e.g. a classifier's ``log p(c | s)``.
* :func:`product`: ``phi = prod_i phi_i``, i.e. the sum of log-potentials.

Calling a potential checks its output: shape ``[B]``, floating, no NaN (eager inputs raise a
``ValueError``; under ``jit`` a NaN flows into the SMC log normalizer, which is the flag there),
and for Boolean potentials only the values ``0`` and ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

__all__ = ["Potential", "boolean", "product", "soft"]

LogPotentialFn = Callable[[Array, Array | None], Array]


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


@dataclass(frozen=True)
class Potential:
    """``log phi(tokens [B, T], cond) -> [B]`` with a kind: ``"boolean"``, ``"soft"``, ``"product"``.

    Build with :func:`boolean`, :func:`soft` or :func:`product`.
    """

    log_fn: LogPotentialFn
    kind: str
    name: str = "potential"

    def __call__(self, tokens: Array, cond: Array | None = None) -> Array:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"potential {self.name!r} takes tokens [B, T], got shape "
                             f"{tokens.shape}")
        out = jnp.asarray(self.log_fn(tokens, cond))
        if out.shape != (tokens.shape[0],):
            raise ValueError(f"potential {self.name!r} returned shape {out.shape}, expected "
                             f"({tokens.shape[0]},): one log phi per sequence")
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(f"potential {self.name!r} returned dtype {out.dtype}; return floats")
        if _concrete(out):
            values = np.asarray(out)
            if np.isnan(values).any():
                row = int(np.flatnonzero(np.isnan(values))[0])
                raise ValueError(f"potential {self.name!r} returned NaN for sequence {row} "
                                 f"(tokens {np.asarray(tokens[row]).tolist()})")
            if np.isposinf(values).any():
                raise ValueError(f"potential {self.name!r} returned +inf; log phi must be finite "
                                 "or -inf")
            if self.kind == "boolean" and not np.all((values == 0) | np.isneginf(values)):
                raise ValueError(f"Boolean potential {self.name!r} returned values other than "
                                 "0 and -inf")
        return out


def boolean(predicate: Callable[[Array, Array | None], Array], name: str = "constraint"
            ) -> Potential:
    """``log phi = 0`` where ``predicate(tokens, cond) -> bool [B]`` holds, ``-inf`` elsewhere."""

    def log_fn(tokens, cond):
        ok = jnp.asarray(predicate(tokens, cond))
        if ok.dtype != jnp.bool_:
            raise TypeError(f"the predicate of {name!r} must return booleans, got {ok.dtype}")
        return jnp.where(ok, 0.0, -jnp.inf).astype(jnp.float32)

    return Potential(log_fn, "boolean", name)


def soft(log_fn: LogPotentialFn, name: str = "soft") -> Potential:
    """A soft log-potential ``log phi(tokens, cond) -> [B]`` (finite or ``-inf``)."""
    return Potential(log_fn, "soft", name)


def product(*potentials: Potential, name: str | None = None) -> Potential:
    """``phi = prod_i phi_i`` (log-potentials added); Boolean only if every factor is."""
    if not potentials:
        raise ValueError("product() needs at least one potential")
    for i, p in enumerate(potentials):
        if not isinstance(p, Potential):
            raise TypeError(f"argument {i} of product() is {type(p).__name__}, not a Potential")
    kind = "boolean" if all(p.kind == "boolean" for p in potentials) else "product"

    def log_fn(tokens, cond):
        return sum(p(tokens, cond) for p in potentials)

    return Potential(log_fn, kind, name or " * ".join(p.name for p in potentials))
