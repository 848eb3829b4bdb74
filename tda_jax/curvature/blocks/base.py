"""The curvature-block interface and the registry that drivers look blocks up in.

A *curvature block* is one approximation of the per-example-normalised curvature ``F`` (GGN or
Fisher) over the tracked layers, written as a bundle of pure functions in the manner of kfac-jax's
curvature blocks and optax's transforms. The drivers (:func:`tda_jax.curvature.fit_curvature`,
:func:`tda_jax.attribution.pairwise_scores`, :func:`tda_jax.attribution.self_scores`) know a block
only through this interface:

==================  ====================================================================  ========
method              what it does                                                          where
==================  ====================================================================  ========
``passes``          names of the statistics passes over the training data, in order       static
``pass_inputs``     device arrays a pass needs from earlier passes (e.g. eigenbases)       host
``statistics``      per-batch partial sums of one pass from layer inputs ``a``, output      traced
                    gradients ``g`` and position masks (padding rows have ``g = 0``)
``finalize``        turns one pass's totals into factors (a pytree), damping included      host
``query_transform`` ``(F + damping)^-1 v`` expressed in the block's *score coordinates*    traced
``query_from_factors`` the same from the query's captured ``a``, ``g`` (no full gradient      traced
                    rotation where the rank-1 factors are cheaper to rotate)
``train_transform`` the training side's ``a``, ``g`` mapped into the same coordinates       traced
``precondition``    ``(F + damping)^-1 v`` in the layers' own coordinates                 traced
``self_quadratic``  ``<DW_b, (F + damping)^-1 DW_b>`` per example                         traced
``to_dense``        the explicit ``[P, P]`` matrix (tests and small models)               traced
==================  ====================================================================  ========

Score coordinates let the drivers score without a back-rotation: for Kronecker eigenbases the
query is rotated once into the eigenbasis and scaled, and the training side's rank-1 factors
``a_t``, ``g_t`` are rotated instead (``B T (in^2 + out^2)`` flops per batch rather than
``2 Q (in^2 out + in out^2)`` per query block). ``score = sum_t (a'_t)^T V'_q g'_t`` in any block.

Parameter order for ``to_dense``: layers in ``specs`` order, each layer's matrix view
``W [in, out]`` (kernel rows, then the bias row) flattened row-major.

A new block is one file: subclass :class:`CurvatureBlock` (or :class:`LayerwiseBlock` for
block-diagonal approximations) and call :func:`register_block` on an instance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tda_jax.capture.layers import LayerSpec

Array = jax.Array
Factors = Any

_REGISTRY: dict[str, CurvatureBlock] = {}


def register_block(block: CurvatureBlock) -> CurvatureBlock:
    """Registers ``block`` under ``block.name`` (the ``strategy`` argument of the drivers)."""
    if not block.name:
        raise ValueError("a curvature block needs a non-empty name.")
    if block.name in _REGISTRY and type(_REGISTRY[block.name]) is not type(block):
        raise ValueError(f"a different curvature block is already registered as {block.name!r}.")
    _REGISTRY[block.name] = block
    return block


def get_block(name: str) -> CurvatureBlock:
    """The registered block called ``name``; raises naming the registered ones otherwise."""
    if isinstance(name, CurvatureBlock):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"strategy={name!r} is not one of the registered curvature blocks "
                         f"{tuple(_REGISTRY)}.")
    return _REGISTRY[name]


def registered_blocks() -> tuple[str, ...]:
    """Names of the registered blocks, in registration order."""
    return tuple(_REGISTRY)


def check_damping(damping: float | None, block_name: str) -> float | None:
    """``None`` or a finite float ``>= 0``; raises naming the argument otherwise."""
    if damping is None:
        return None
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a float >= 0 or None, got {damping!r}.") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"damping must be a finite float >= 0 or None (0.1 x mean eigenvalue), got "
                         f"{damping!r} for strategy={block_name!r}.")
    return value


def default_damping(mean_eigenvalue: float, damping: float | None) -> float:
    """``damping`` if given, else ``0.1 x`` the mean eigenvalue."""
    return float(damping) if damping is not None else 0.1 * float(mean_eigenvalue)


#: Matrices up to this size are factorised with one BLAS / LAPACK thread (see :func:`lapack_threads`).
SMALL_LAPACK = 1024


def lapack_threads(size: int):
    """A context limiting host BLAS / LAPACK (OpenBLAS) to one thread for matrices of ``size`` up
    to :data:`SMALL_LAPACK`, a no-op otherwise.

    Small eigendecompositions gain nothing from threads, and OpenBLAS's spinning threads make them
    many times slower (20x measured for 100 eigh of 129 x 129 with 2 threads on 2 busy cores) when
    the cores are shared. Uses ``threadpoolctl`` (a scikit-learn dependency) when installed.
    """
    import contextlib

    if size > SMALL_LAPACK:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def check_nonsingular(where: str, eigenvalues: np.ndarray, damping: float) -> None:
    """Raises if ``eigenvalues + damping`` is (numerically) singular in float32."""
    eigenvalues = np.asarray(eigenvalues, np.float64)
    largest = float(np.max(eigenvalues)) if eigenvalues.size else 0.0
    smallest = float(np.min(eigenvalues)) + damping if eigenvalues.size else damping
    if not smallest > 1e-7 * max(largest + damping, 1e-30):
        raise ValueError(
            f"{where}: the preconditioner F + damping is singular (smallest eigenvalue "
            f"{float(np.min(eigenvalues)) if eigenvalues.size else 0.0:.3g} + damping {damping:.3g} "
            f"vs largest {largest:.3g}); e.g. constant input features give zero eigenvalues. "
            "Use damping > 0 or damping=None (0.1 x mean eigenvalue).")


class CurvatureBlock:
    """Interface of a curvature approximation over all tracked layers (see the module docstring).

    Subclasses set ``name`` and ``passes`` and implement the methods. Factors are a pytree of
    arrays; what they hold is the block's own business.
    """

    name: str = ""
    passes: tuple[str, ...] = ()
    accepts_damping: bool = True

    def initial_factors(self, specs: tuple[LayerSpec, ...]) -> Factors:
        """Factors before the first pass (what a block without passes uses as is)."""
        return {}

    def pass_inputs(self, pass_name: str, specs: tuple[LayerSpec, ...], factors: Factors) -> Any:
        """Device arrays that ``statistics`` of ``pass_name`` needs from earlier passes."""
        return {}

    def statistics(self, pass_name: str, specs: tuple[LayerSpec, ...], a: Mapping[str, Array],
                   g: Mapping[str, Array], mask: Mapping[str, Array], inputs: Any) -> dict[str, Any]:
        """Per-batch sums of pass ``pass_name``.

        ``a[layer] [B, T, in]``, ``g[layer] [K, B, T, out]`` and ``mask[layer] [B, T]`` (1 for real
        positions of real examples). Padded examples have ``g = 0``; padded tokens of a causal
        model with masked targets do too, but their ``a`` is not zero: covariances of inputs (and
        of a transposed call's ``g`` side) must apply the mask.
        """
        raise NotImplementedError

    def finalize(self, pass_name: str, specs: tuple[LayerSpec, ...], stats: dict[str, Any],
                 count: float, factors: Factors, damping: float | None, eigh_dtype: str) -> Factors:
        """Factors after pass ``pass_name`` from its totals (host numpy, divided by ``count`` here)."""
        raise NotImplementedError

    def query_transform(self, specs, factors: Factors, grads: Mapping[str, Array]) -> dict[str, Array]:
        """``(F + damping)^-1 v`` for ``v[layer] [Q, in, out]``, in score coordinates."""
        raise NotImplementedError

    def query_from_factors(self, specs, factors: Factors, a: Mapping[str, Array],
                           g: Mapping[str, Array]) -> dict[str, Array]:
        """:meth:`query_transform` of the gradients ``sum_t a_t g_t^T`` (``a [Q, T, in]``,
        ``g [Q, T, out]``); blocks may avoid forming and rotating the full gradients."""
        grads = {s.name: jnp.einsum("qti,qto->qio", a[s.name], g[s.name]) for s in specs}
        return self.query_transform(specs, factors, grads)

    def train_transform(self, specs, factors: Factors, a: Mapping[str, Array],
                        g: Mapping[str, Array]) -> tuple[dict[str, Array], dict[str, Array]]:
        """Training-side ``a [B, T, in]`` and ``g [K, B, T, out]`` in score coordinates."""
        return dict(a), dict(g)

    def score_basis(self, specs, factors: Factors) -> dict[str, tuple[Array | None, Array | None]]:
        """Per layer ``(Q_A, Q_G)`` with score coordinates ``V' = Q_A^T V Q_G`` (None: identity)."""
        return {s.name: (None, None) for s in specs}

    def precondition(self, specs, factors: Factors, grads: Mapping[str, Array]) -> dict[str, Array]:
        """``(F + damping)^-1 v`` in the layers' matrix coordinates ``[Q, in, out]``."""
        raise NotImplementedError

    def self_quadratic(self, specs, factors: Factors, a: Mapping[str, Array],
                       g: Mapping[str, Array]) -> Array:
        """``<DW_b, (F + damping)^-1 DW_b>`` -> ``[B]`` for training gradients (``g [1, B, T, out]``)."""
        raise NotImplementedError

    def to_dense(self, specs, factors: Factors, damped: bool = False) -> Array:
        """The explicit ``[P, P]`` matrix ``F`` (``F + damping`` with ``damped=True``)."""
        raise NotImplementedError

    def damping(self, specs, factors: Factors) -> dict[str, float]:
        """Damping actually used, by layer (or one entry for whole-model blocks)."""
        return {s.name: float(factors[s.name]["damping"]) for s in specs}


class LayerwiseBlock(CurvatureBlock):
    """A block-diagonal approximation: each layer ``F_l = Q diag(e) Q^T`` with ``Q = Q_A (x) Q_G``.

    Subclasses give per-layer statistics and finalisation, the eigenbasis ``(Q_A, Q_G)`` (``None``
    for the identity basis) and the eigenvalues ``e [in, out]`` in that basis (``None`` when the
    block is the identity preconditioner). Factors are ``{layer: {..., "damping": scalar}}``.
    """

    def initial_factors(self, specs):
        return {s.name: {} for s in specs}

    def layer_statistics(self, pass_name: str, a: Array, g: Array, mask: Array,
                         inputs: Any) -> Any:
        raise NotImplementedError

    def layer_finalize(self, pass_name: str, spec: LayerSpec, stats: Any, count: float,
                       factors: dict[str, Any], damping: float | None,
                       eigh_dtype: str) -> dict[str, Any]:
        raise NotImplementedError

    def layer_pass_inputs(self, pass_name: str, factors: dict[str, Any]) -> Any:
        return None

    def layer_finalize_cost(self, pass_name: str, spec: LayerSpec) -> float:
        """Relative cost of :meth:`layer_finalize` (``in x out``: elementwise work by default);
        multi-process fits share the layers out by it (:func:`tda_jax.sharding.assign_by_cost`)."""
        return float(spec.in_dim * spec.out_dim)

    def basis(self, factors: dict[str, Any]) -> tuple[Array | None, Array | None]:
        return None, None

    def eigenvalues(self, factors: dict[str, Any]) -> Array | None:
        raise NotImplementedError

    # --- the block interface, layer by layer ---------------------------------------------------

    def pass_inputs(self, pass_name, specs, factors):
        return {s.name: self.layer_pass_inputs(pass_name, factors[s.name]) for s in specs}

    def statistics(self, pass_name, specs, a, g, mask, inputs):
        return {s.name: self.layer_statistics(pass_name, a[s.name], g[s.name], mask[s.name],
                                              inputs[s.name]) for s in specs}

    def finalize_layer(self, pass_name: str, spec: LayerSpec, stats: Any, count: float,
                       factors: dict[str, Any], damping: float | None,
                       eigh_dtype: str) -> dict[str, Any]:
        """:meth:`layer_finalize` of one layer, checked for a singular preconditioner after the
        last pass (the unit of work that multi-process fits assign to processes)."""
        factors = self.layer_finalize(pass_name, spec, stats, count, factors, damping, eigh_dtype)
        eig = self.eigenvalues(factors) if pass_name == self.passes[-1] else None
        if eig is not None:  # once the layer's final eigenvalues are known
            check_nonsingular(f"layer {spec.name!r} ({self.name})", np.asarray(eig),
                              float(factors["damping"]))
        return factors

    def finalize(self, pass_name, specs, stats, count, factors, damping, eigh_dtype):
        factors = dict(factors) if factors else {}
        for s in specs:
            factors[s.name] = self.finalize_layer(pass_name, s, stats[s.name], count,
                                                  dict(factors.get(s.name, {})), damping, eigh_dtype)
        return factors

    def _weights(self, factors: dict[str, Any]) -> Array | None:
        eig = self.eigenvalues(factors)
        return None if eig is None else 1.0 / (eig + factors["damping"])

    def query_transform(self, specs, factors, grads):
        out = {}
        for s in specs:
            f = factors[s.name]
            qa, qg = self.basis(f)
            v = grads[s.name]
            if qa is not None:
                v = jnp.swapaxes(qa, 0, 1) @ v @ qg
            weights = self._weights(f)
            out[s.name] = v if weights is None else v * weights
        return out

    def query_from_factors(self, specs, factors, a, g):
        # Rotating the rank-1 factors costs T (in^2 + out^2) per query, rotating the gradient
        # in out (in + out): per layer, take the cheaper order.
        out = {}
        for s in specs:
            f = factors[s.name]
            qa, qg = self.basis(f)
            x, y = a[s.name], g[s.name]
            positions = x.shape[1]
            if qa is not None and positions * (s.in_dim ** 2 + s.out_dim ** 2) < \
                    s.in_dim * s.out_dim * (s.in_dim + s.out_dim):
                v = jnp.einsum("qti,qto->qio", x @ qa, y @ qg)
            else:
                v = jnp.einsum("qti,qto->qio", x, y)
                if qa is not None:
                    v = jnp.swapaxes(qa, 0, 1) @ v @ qg
            weights = self._weights(f)
            out[s.name] = v if weights is None else v * weights
        return out

    def score_basis(self, specs, factors):
        return {s.name: self.basis(factors[s.name]) for s in specs}

    def train_transform(self, specs, factors, a, g):
        a_out, g_out = {}, {}
        for s in specs:
            qa, qg = self.basis(factors[s.name])
            a_out[s.name] = a[s.name] if qa is None else a[s.name] @ qa
            g_out[s.name] = g[s.name] if qg is None else g[s.name] @ qg
        return a_out, g_out

    def precondition(self, specs, factors, grads):
        rotated = self.query_transform(specs, factors, grads)
        out = {}
        for s in specs:
            qa, qg = self.basis(factors[s.name])
            v = rotated[s.name]
            out[s.name] = v if qa is None else qa @ v @ jnp.swapaxes(qg, 0, 1)
        return out

    def self_quadratic(self, specs, factors, a, g):
        a, g = self.train_transform(specs, factors, a, g)
        total = 0.0
        for s in specs:
            total = total + layer_quadratic(a[s.name], g[s.name][0], self._weights(factors[s.name]))
        return total

    def to_dense(self, specs, factors, damped=False):
        blocks = []
        for s in specs:
            f = factors[s.name]
            eig = self.eigenvalues(f)
            eig = jnp.zeros((s.in_dim, s.out_dim)) if eig is None else eig
            if damped:
                eig = eig + f["damping"]
            qa, qg = self.basis(f)
            q = jnp.kron(jnp.eye(s.in_dim) if qa is None else qa,
                         jnp.eye(s.out_dim) if qg is None else qg)
            blocks.append((q * eig.reshape(-1)) @ q.T)
        return jax.scipy.linalg.block_diag(*blocks)


def layer_quadratic(a: Array, g: Array, weights: Array | None) -> Array:
    """``sum_{i,o} w_io (sum_t a_ti g_to)^2`` per example -> ``[B]`` (``w = 1`` when None).

    ``a [B, T, in]``, ``g [B, T, out]``. For ``T = 1`` the square factorises and no ``[B, in, out]``
    array is formed.
    """
    if a.shape[1] == 1:
        a2, g2 = jnp.square(a[:, 0]), jnp.square(g[:, 0])
        if weights is None:
            return jnp.sum(a2, axis=-1) * jnp.sum(g2, axis=-1)
        return jnp.einsum("bi,io,bo->b", a2, weights, g2)
    grads = jnp.einsum("bti,bto->bio", a, g)
    if weights is None:
        return jnp.sum(jnp.square(grads), axis=(1, 2))
    return jnp.einsum("bio,io->b", jnp.square(grads), weights)


def squared_gradient_sums(a: Array, g: Array, basis_a: Array | None = None,
                          basis_g: Array | None = None) -> Array:
    """``sum_{k,b} (Q_A^T DW_{k,b} Q_G)^2`` -> ``[in, out]``; identity bases give ``diag`` sums.

    ``DW_{k,b} = sum_t a_{b,t} g_{k,b,t}^T``: positions are summed *before* squaring. For ``T = 1``
    the square factorises, so no ``[B, in, out]`` array is formed.
    """
    if basis_a is not None:
        a = a @ basis_a
    if basis_g is not None:
        g = g @ basis_g
    if a.shape[1] == 1:
        return jnp.einsum("bi,kbo->io", jnp.square(a[:, 0]), jnp.square(g[:, :, 0]))
    grads = jnp.einsum("bti,kbto->kbio", a, g)
    return jnp.sum(jnp.square(grads), axis=(0, 1))
