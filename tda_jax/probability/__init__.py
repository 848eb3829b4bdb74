"""The functional probability core: importance weights, resampling and sequential Monte Carlo.

Everything here is a pure, unjitted function over pytrees (callers ``jit``, ``vmap``, ``scan`` and
shard them); PRNG keys come first.

* :mod:`.weights`: normalized log-weights, effective sample size, log-mean-exp, all safe for
  ``-inf`` (zero-weight) entries.
* :mod:`.resampling`: multinomial, stratified, systematic and residual resampling
  (``fn(key, weights, num_samples) -> int32 ancestors``) and traceable ESS-adaptive resampling.
* :mod:`.smc`: generic SMC (``init`` / ``build_kernel`` -> ``kernel(key, state) -> (state, info)``,
  ``run_smc`` over ``lax.scan``) with an unbiased log normalizer estimate (a stochastic lower bound
  on ``log Z``) and optional sharding of particles over a ``"data"`` mesh axis.
* :mod:`.csmc`: conditional SMC with a pinned reference trajectory (a stochastic upper bound on
  ``log Z`` when the reference is an exact target draw).
"""

from tda_jax.probability.csmc import (
    build_conditional_kernel,
    conditional_smc_step,
    pin_reference,
    run_conditional_smc,
)
from tda_jax.probability.resampling import (
    AdaptiveResamplingResult,
    ResamplingFn,
    adaptive_resample,
    multinomial,
    residual,
    stratified,
    systematic,
)
from tda_jax.probability.smc import (
    LogPotentialFn,
    ProposalFn,
    SMCInfo,
    SMCKernel,
    SMCResult,
    SMCState,
    build_kernel,
    init,
    num_particles_of,
    run_smc,
    smc_step,
)
from tda_jax.probability.weights import (
    effective_sample_size,
    log_mean_exp,
    log_sum_exp,
    normalize_log_weights,
)

__all__ = [
    "AdaptiveResamplingResult",
    "LogPotentialFn",
    "ProposalFn",
    "ResamplingFn",
    "SMCInfo",
    "SMCKernel",
    "SMCResult",
    "SMCState",
    "adaptive_resample",
    "build_conditional_kernel",
    "build_kernel",
    "conditional_smc_step",
    "effective_sample_size",
    "init",
    "log_mean_exp",
    "log_sum_exp",
    "multinomial",
    "normalize_log_weights",
    "num_particles_of",
    "pin_reference",
    "residual",
    "run_conditional_smc",
    "run_smc",
    "smc_step",
    "stratified",
    "systematic",
]
