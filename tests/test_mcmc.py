"""Tests for the HMC / MALA kernels, step-size tuning and annealing schedules.

Statistical checks start many chains at EXACT samples of a Gaussian target: an invariant kernel
keeps them exactly distributed, so after a few steps the sample mean and variance must match the
truth to within a z-score bound computed from the sample size (a wrong Metropolis ratio or momentum
scale moves them by many standard errors).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax import mcmc

NUM_CHAINS = 4000
Z_BOUND = 4.5  # |z| bound for each of the few dozen checks (false alarm rate ~1e-5 each)

MEAN = jnp.array([1.0, -2.0, 0.5])
# Correlated covariance so that mixing matters and a diagonal-only bug would show.
COV = jnp.array([[1.0, 0.6, 0.0], [0.6, 2.0, 0.3], [0.0, 0.3, 0.25]])
PRECISION = jnp.linalg.inv(COV)


def gaussian_log_density(z):
    d = z - MEAN
    return -0.5 * d @ PRECISION @ d


def exact_samples(key, n):
    return MEAN + jax.random.normal(key, (n, 3)) @ jnp.linalg.cholesky(COV).T


SECH_SCALE = jnp.linspace(0.5, 2.0, 10)


def sech_log_density(z):
    """Product of hyperbolic-secant densities ``∝ 1 / cosh(z / s)``: smooth, non-Gaussian.

    Used for tuning tests because on exactly Gaussian targets the HMC acceptance rate at fixed L is
    not monotone in the step size (leapfrog resonances), which no step-size tuner can fix.
    """
    return -jnp.sum(jnp.logaddexp(z / SECH_SCALE, -z / SECH_SCALE))


def sech_samples(key, n):
    # Inverse CDF of the density 1 / (pi cosh(x)): x = log(tan(pi u / 2)).
    u = jax.random.uniform(key, (n, SECH_SCALE.shape[0]), minval=1e-6, maxval=1 - 1e-6)
    return SECH_SCALE * jnp.log(jnp.tan(jnp.pi * u / 2))


TARGETS = {
    "gaussian": (gaussian_log_density, exact_samples),
    "sech": (sech_log_density, sech_samples),
}


def assert_gaussian_moments(samples):
    """Mean and variance of every coordinate match N(MEAN, COV) within Z_BOUND standard errors."""
    samples = np.asarray(samples, np.float64)
    n = samples.shape[0]
    var = np.diag(np.asarray(COV))
    z_mean = (samples.mean(0) - np.asarray(MEAN)) / np.sqrt(var / n)
    z_var = (samples.var(0, ddof=1) - var) / (var * np.sqrt(2.0 / (n - 1)))
    assert np.all(np.abs(z_mean) < Z_BOUND), z_mean
    assert np.all(np.abs(z_var) < Z_BOUND), z_var


@functools.partial(jax.jit, static_argnames=("kernel", "num_steps", "log_density_fn"))
def _run_chains(keys, z0, step_size, inverse_mass_diag, kernel, num_steps, log_density_fn):
    # One compile per (kernel, num_steps, target): step size and mass are traced.
    def one_chain(chain_key, z):
        if kernel == "hmc":
            state = mcmc.hmc_init(z, log_density_fn)
        else:
            state = mcmc.mala_init(z, log_density_fn)

        def body(s, k):
            if kernel == "hmc":
                s, info = mcmc.hmc_step(k, s, log_density_fn, step_size, 5, inverse_mass_diag)
            else:
                s, info = mcmc.mala_step(k, s, log_density_fn, step_size)
            return s, info.acceptance_probability

        state, acc = jax.lax.scan(body, state, jax.random.split(chain_key, num_steps))
        return state.position, acc.mean()

    return jax.vmap(one_chain)(keys, z0)


def run_chains(kernel, key, step_size, num_steps=8, inverse_mass_diag=None, target="gaussian"):
    """Runs NUM_CHAINS chains started at exact samples; returns (positions, mean acceptance)."""
    key_init, key_run = jax.random.split(key)
    log_density_fn, sampler = TARGETS[target]
    z0 = sampler(key_init, NUM_CHAINS)
    keys = jax.random.split(key_run, NUM_CHAINS)
    if inverse_mass_diag is None:
        inverse_mass_diag = jnp.ones(z0.shape[1])
    return _run_chains(
        keys,
        z0,
        step_size,
        inverse_mass_diag,
        kernel=kernel,
        num_steps=num_steps,
        log_density_fn=log_density_fn,
    )


@pytest.mark.parametrize(
    "kernel,step_size,inverse_mass_diag",
    [("hmc", 0.8, None), ("hmc", 0.8, jnp.array([1.0, 2.0, 0.25])), ("mala", 0.3, None)],
)
def test_kernel_leaves_gaussian_invariant(kernel, step_size, inverse_mass_diag):
    positions, acceptance = run_chains(kernel, jax.random.key(0), step_size, 8, inverse_mass_diag)
    # Large steps: the Metropolis correction must be doing real work for the test to bite.
    assert 0.2 < float(acceptance.mean()) < 0.95
    assert_gaussian_moments(positions)


@pytest.mark.parametrize("kernel", ["hmc", "mala"])
def test_tiny_steps_accept_almost_always(kernel):
    _, acceptance = run_chains(kernel, jax.random.key(1), 1e-4)
    assert float(acceptance.mean()) > 0.999


def test_leapfrog_is_reversible_and_conserves_energy():
    vg = jax.value_and_grad(gaussian_log_density)
    z0 = jnp.array([0.3, -1.0, 0.7])
    p0 = jnp.array([1.0, 0.5, -0.2])
    ld0, g0 = vg(z0)
    z1, p1, ld1, g1 = mcmc.leapfrog(vg, z0, p0, ld0, g0, 0.05, 20, jnp.ones(()))
    # Running back with negated momentum returns to the start (time reversibility).
    z2, p2, _, _ = mcmc.leapfrog(vg, z1, -p1, ld1, g1, 0.05, 20, jnp.ones(()))
    np.testing.assert_allclose(z2, z0, atol=1e-5)
    np.testing.assert_allclose(-p2, p0, atol=1e-5)
    energy = lambda ld, p: -ld + 0.5 * jnp.sum(p**2)
    assert abs(float(energy(ld1, p1) - energy(ld0, p0))) < 1e-2
    assert float(jnp.linalg.norm(z1 - z0)) > 0.1  # it did move


@pytest.mark.parametrize("kernel", ["hmc", "mala"])
def test_tune_step_size_reaches_target(kernel):
    target = 0.65 if kernel == "hmc" else 0.574
    init = sech_samples(jax.random.key(2), 64)
    step_size = mcmc.tune_step_size(
        jax.random.key(3), init, sech_log_density, kernel=kernel, num_integration_steps=5
    )
    assert isinstance(step_size, float) and step_size > 0
    _, acceptance = run_chains(kernel, jax.random.key(4), step_size, target="sech")
    assert abs(float(acceptance.mean()) - target) < 0.07, float(acceptance.mean())


def test_step_size_is_traced_without_recompiling():
    step = jax.jit(lambda k, s, eps: mcmc.hmc_step(k, s, gaussian_log_density, eps, 3))
    state = mcmc.hmc_init(MEAN, gaussian_log_density)
    for eps in (0.1, 0.2, 0.3):
        state, _ = step(jax.random.key(0), state, eps)
    assert step._cache_size() == 1


# ------------------------------------------------------------- pytree positions
# A correlated 7-d Gaussian seen two ways: as a flat vector [7] and as the pytree
# {"a": [3], "b": [2, 2]} whose ravel (leaves in key order, each raveled C-order) is that vector.
TREE_PRECISION = jnp.linalg.inv(
    0.5 * jnp.eye(7) + 0.5 * jnp.exp(-jnp.abs(jnp.arange(7.0)[:, None] - jnp.arange(7.0)))
)
TREE_MEAN = jnp.linspace(-1.0, 1.0, 7)


def flat_log_density(z):
    d = z - TREE_MEAN
    return -0.5 * d @ TREE_PRECISION @ d


def ravel_tree(tree):
    return jnp.concatenate([tree["a"], tree["b"].reshape(-1)])


def unravel_flat(z):
    return {"a": z[:3], "b": z[3:].reshape(2, 2)}


def tree_log_density(tree):
    return flat_log_density(ravel_tree(tree))


@pytest.mark.parametrize("kernel", ["hmc", "mala"])
def test_pytree_position_gives_the_flat_vector_chain(kernel):
    """Same keys, same chain: the kernels act leaf-wise exactly as on the raveled vector."""
    inv_mass_flat = jnp.linspace(0.5, 2.0, 7)
    num_steps = 6

    def chain(key, z0, log_density_fn, inverse_mass):
        init = mcmc.hmc_init if kernel == "hmc" else mcmc.mala_init
        state = init(z0, log_density_fn)

        def body(s, k):
            if kernel == "hmc":
                s, info = mcmc.hmc_step(k, s, log_density_fn, 0.7, 4, inverse_mass)
            else:
                s, info = mcmc.mala_step(k, s, log_density_fn, 0.4)
            return s, (s.position, info.acceptance_probability)

        return jax.lax.scan(body, state, jax.random.split(key, num_steps))

    keys = jax.random.split(jax.random.key(21), 32)
    z0 = jax.random.normal(jax.random.key(22), (32, 7))

    @jax.jit
    def run_both(keys, z0):
        flat = jax.vmap(lambda k, z: chain(k, z, flat_log_density, inv_mass_flat))(keys, z0)
        tree = jax.vmap(
            lambda k, z: chain(k, unravel_flat(z), tree_log_density, unravel_flat(inv_mass_flat))
        )(keys, z0)
        return flat, tree

    (flat_state, (flat_path, flat_acc)), (tree_state, (tree_path, tree_acc)) = run_both(keys, z0)
    assert isinstance(tree_state, mcmc.MCMCState) and mcmc.HMCState is mcmc.MALAState
    assert tree_state.position["b"].shape == (32, 2, 2)
    assert tree_state.grad_log_density["b"].shape == (32, 2, 2)
    np.testing.assert_allclose(jax.vmap(jax.vmap(ravel_tree))(tree_path), flat_path, atol=1e-5)
    np.testing.assert_allclose(tree_acc, flat_acc, atol=1e-5)
    np.testing.assert_allclose(tree_state.log_density, flat_state.log_density, atol=1e-4)
    np.testing.assert_allclose(
        jax.vmap(ravel_tree)(tree_state.grad_log_density), flat_state.grad_log_density, atol=1e-4
    )
    # Large steps: both accepted and rejected proposals occur, so the comparison covers both.
    acc = np.asarray(flat_acc)
    assert 0.2 < acc.mean() < 0.9 and (acc < 0.5).any() and (acc > 0.99).any(), acc.mean()


def test_pytree_hmc_with_scalar_mass_matches_flat_leapfrog_and_energy():
    tree0 = unravel_flat(jnp.linspace(-0.5, 0.5, 7))
    p0 = unravel_flat(jnp.linspace(1.0, -1.0, 7))
    vg = jax.value_and_grad(tree_log_density)
    ld0, g0 = vg(tree0)
    z1, p1, ld1, g1 = mcmc.leapfrog(vg, tree0, p0, ld0, g0, 0.05, 20, 2.0)
    flat_vg = jax.value_and_grad(flat_log_density)
    fz0 = ravel_tree(tree0)
    fz1, fp1, fld1, _ = mcmc.leapfrog(
        flat_vg, fz0, ravel_tree(p0), ld0, ravel_tree(g0), 0.05, 20, 2.0 * jnp.ones(7)
    )
    np.testing.assert_allclose(ravel_tree(z1), fz1, atol=1e-5)
    np.testing.assert_allclose(ravel_tree(p1), fp1, atol=1e-5)
    np.testing.assert_allclose(ld1, fld1, atol=1e-5)
    energy0 = -ld0 + mcmc.kinetic_energy(p0, {"a": 2.0, "b": 2.0})
    energy1 = -ld1 + mcmc.kinetic_energy(p1, {"a": 2.0, "b": 2.0})
    assert abs(float(energy1 - energy0)) < 1e-2


def nan_outside_half_space(z):
    # Log density undefined (NaN) for z[0] > 0.5.
    return jnp.where(z[0] > 0.5, jnp.nan, -0.5 * jnp.sum(z**2))


@pytest.mark.parametrize("kernel", ["hmc", "mala"])
def test_nan_proposals_are_rejected(kernel):
    init, step = (mcmc.hmc_init, mcmc.hmc_step) if kernel == "hmc" else (mcmc.mala_init, None)

    def one_chain(key):
        state = init(jnp.array([0.0, 0.0]), nan_outside_half_space)

        def body(s, k):
            if kernel == "hmc":
                s, info = mcmc.hmc_step(k, s, nan_outside_half_space, 0.5, 5)
            else:
                s, info = mcmc.mala_step(k, s, nan_outside_half_space, 0.5)
            return s, (s.position, s.log_density, info.acceptance_probability)

        return jax.lax.scan(body, state, jax.random.split(key, 50))[1]

    positions, log_densities, acceptance = jax.vmap(one_chain)(jax.random.split(jax.random.key(5), 20))
    assert np.all(np.asarray(positions[..., 0]) <= 0.5)
    assert np.all(np.isfinite(np.asarray(log_densities)))
    assert np.any(np.asarray(acceptance) == 0.0)  # some proposals crossed and were rejected
    assert np.any(np.asarray(acceptance) > 0.5)  # and the chains still move


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="non-finite|finite"):
        mcmc.hmc_init(jnp.array([1.0, 0.0]), nan_outside_half_space)
    with pytest.raises(ValueError, match="at least one array leaf"):
        mcmc.hmc_init({}, gaussian_log_density)
    # A batch of chains passed to a single-chain kernel: the density is not a scalar.
    with pytest.raises(ValueError, match="scalar"):
        mcmc.mala_init(jnp.zeros((2, 3)), lambda z: -0.5 * jnp.sum(z**2, axis=-1))
    with pytest.raises(ValueError, match="scalar"):
        mcmc.hmc_init(jnp.zeros(3), lambda z: z**2)
    with pytest.raises(TypeError, match="floating"):
        mcmc.hmc_init(jnp.zeros(3, jnp.int32), gaussian_log_density)
    with pytest.raises(TypeError, match=r"\['b'\].*floating"):
        mcmc.hmc_init({"a": jnp.zeros(2), "b": jnp.zeros(2, jnp.int32)}, tree_log_density)
    state = mcmc.hmc_init(jnp.zeros(3), gaussian_log_density)
    with pytest.raises(ValueError, match="inverse_mass_diag"):
        mcmc.hmc_step(jax.random.key(0), state, gaussian_log_density, 0.1, 2, jnp.ones(4))
    tree_state = mcmc.hmc_init(unravel_flat(jnp.zeros(7)), tree_log_density)
    with pytest.raises(ValueError, match="inverse_mass_diag"):
        mcmc.hmc_step(jax.random.key(0), tree_state, tree_log_density, 0.1, 2, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="inverse_mass_diag"):
        bad_mass = {"a": jnp.ones(3), "b": jnp.ones(4)}
        mcmc.hmc_step(jax.random.key(0), tree_state, tree_log_density, 0.1, 2, bad_mass)
    init = exact_samples(jax.random.key(2), 4)
    with pytest.raises(ValueError, match="kernel"):
        mcmc.tune_step_size(jax.random.key(0), init, gaussian_log_density, kernel="nuts")
    with pytest.raises(ValueError, match="target_acceptance"):
        mcmc.tune_step_size(jax.random.key(0), init, gaussian_log_density, target_acceptance=1.5)
    with pytest.raises(ValueError, match="init_positions"):
        mcmc.tune_step_size(jax.random.key(0), init[0], gaussian_log_density)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "schedule",
    [
        mcmc.linear_schedule,
        mcmc.geometric_schedule,
        lambda t: mcmc.geometric_schedule(t, start=1e-3),
        mcmc.sigmoid_schedule,
        lambda t: mcmc.sigmoid_schedule(t, scale=10.0),
    ],
)
@pytest.mark.parametrize("num_steps", [1, 2, 7, 1000])
def test_schedules_endpoints_and_monotone(schedule, num_steps):
    betas = schedule(num_steps)
    assert betas.shape == (num_steps + 1,)
    assert betas.dtype == jnp.float32
    b = np.asarray(betas)
    assert b[0] == 0.0 and b[-1] == 1.0
    assert np.all(np.diff(b) >= 0)
    mcmc.check_schedule(betas)


def test_schedule_shapes():
    np.testing.assert_allclose(mcmc.linear_schedule(4), [0, 0.25, 0.5, 0.75, 1.0])
    g = np.asarray(mcmc.geometric_schedule(4, start=1e-3), np.float64)
    np.testing.assert_allclose(g[1:], [1e-3, 1e-2, 1e-1, 1.0], rtol=1e-6)
    s = np.asarray(mcmc.sigmoid_schedule(100))
    # Symmetric about the midpoint and denser at both ends than in the middle.
    np.testing.assert_allclose(s + s[::-1], 1.0, atol=1e-6)
    assert np.diff(s)[0] < np.diff(s)[50]


@pytest.mark.parametrize(
    "betas,message",
    [
        ([0.0, 0.6, 0.4, 1.0], "nondecreasing"),
        ([0.0, 0.5, 0.9], "end at 1"),
        ([0.1, 0.5, 1.0], "start at 0"),
        ([0.0, float("nan"), 1.0], "non-finite"),
        ([1.0, 0.5, 0.0], "start at 0"),
        ([0.0], "T >= 1"),
        ([[0.0, 1.0]], "1-D"),
    ],
)
def test_check_schedule_rejects_bad_schedules(betas, message):
    with pytest.raises(ValueError, match=message):
        mcmc.check_schedule(jnp.asarray(betas))


def test_schedule_arguments_validated():
    with pytest.raises(ValueError, match="num_steps"):
        mcmc.linear_schedule(0)
    with pytest.raises(ValueError, match="start"):
        mcmc.geometric_schedule(10, start=0.0)
    with pytest.raises(ValueError, match="scale"):
        mcmc.sigmoid_schedule(10, scale=-1.0)
