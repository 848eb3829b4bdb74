"""MCMC kernels (HMC, MALA), step-size tuning, annealing schedules and annealed importance sampling.

Single-chain kernels share one state type, :class:`MCMCState`, and work on a position that is any
pytree of floating arrays (a flat ``[D]`` vector or, e.g., a dict of parameters) with
``log_density_fn: position -> scalar``; vmap over chains. AIS chains use flat positions ``[D]``.
AIS sign convention and bounds: see :mod:`tda_jax.mcmc.ais`.
"""

from tda_jax.mcmc.ais import (
    AISResult,
    BDMCResult,
    ais,
    ais_log_normalizer_lower,
    ais_log_normalizer_upper,
    annealed_chain,
    bdmc,
    broadcast_step_sizes,
    log_mean_exp,
    reverse_step_sizes,
)
from tda_jax.mcmc.hmc import HMCInfo, HMCState, hmc_init, hmc_step, kinetic_energy, leapfrog
from tda_jax.mcmc.mala import MALAInfo, MALAState, mala_init, mala_step
from tda_jax.mcmc.schedules import (
    check_schedule,
    geometric_schedule,
    linear_schedule,
    sigmoid_schedule,
)
from tda_jax.mcmc.state import MCMCState, mcmc_init
from tda_jax.mcmc.tuning import (
    DualAveragingState,
    dual_averaging_init,
    dual_averaging_update,
    tune_ais_step_sizes,
    tune_step_size,
)

__all__ = [
    "AISResult",
    "BDMCResult",
    "DualAveragingState",
    "HMCInfo",
    "HMCState",
    "MALAInfo",
    "MALAState",
    "MCMCState",
    "ais",
    "ais_log_normalizer_lower",
    "ais_log_normalizer_upper",
    "annealed_chain",
    "bdmc",
    "check_schedule",
    "dual_averaging_init",
    "dual_averaging_update",
    "geometric_schedule",
    "hmc_init",
    "hmc_step",
    "kinetic_energy",
    "leapfrog",
    "linear_schedule",
    "log_mean_exp",
    "mala_init",
    "mala_step",
    "mcmc_init",
    "broadcast_step_sizes",
    "reverse_step_sizes",
    "sigmoid_schedule",
    "tune_ais_step_sizes",
    "tune_step_size",
]
