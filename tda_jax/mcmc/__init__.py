"""MCMC kernels (HMC, MALA), step-size tuning, annealing schedules and annealed importance sampling.

Single-chain kernels work on a flat position ``[D]`` with ``log_density_fn: [D] -> scalar``; vmap
over chains. AIS sign convention and bounds: see :mod:`tda_jax.mcmc.ais`.
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
from tda_jax.mcmc.hmc import HMCInfo, HMCState, hmc_init, hmc_step, leapfrog
from tda_jax.mcmc.mala import MALAInfo, MALAState, mala_init, mala_step
from tda_jax.mcmc.schedules import (
    check_schedule,
    geometric_schedule,
    linear_schedule,
    sigmoid_schedule,
)
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
    "leapfrog",
    "linear_schedule",
    "log_mean_exp",
    "mala_init",
    "mala_step",
    "broadcast_step_sizes",
    "reverse_step_sizes",
    "sigmoid_schedule",
    "tune_ais_step_sizes",
    "tune_step_size",
]
