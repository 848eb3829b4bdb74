"""Twisted SMC for language models (Zhao, Brekelmans, Makhzani and Grosse, ICML 2024).

Inference half: imports only :mod:`tda_jax.probability` (the SMC core) and
:mod:`tda_jax.models` (the TransformerLM's parameter layout).

* :mod:`.models`: the step interface (``init_carry`` / ``step`` / ``readout``) and :class:`TinyLM`,
  a small recurrent LM whose ``V^T`` sequences can be enumerated.
* :mod:`.kv_cache`: the TransformerLM under the step interface with a fixed-size key/value cache
  (:class:`CachedTransformer`) or prefix recomputation (:class:`RecomputedTransformer`).
* :mod:`.potentials`: Boolean, soft and product potentials ``phi`` over complete sequences.
* :mod:`.twists`: all-vocabulary twist heads, a separate twist network, conditional twists, exact
  table twists.
* :mod:`.smc`: twisted SMC and conditional SMC on the core (bounds on ``log Z``).
* :mod:`.enumeration`: exact ``Z``, ``sigma``, optimal twists ``psi*`` and both KLs.
* :mod:`.learning`: CTL, RL (soft-Q), SIXO, FUDGE and DPG behind :func:`train_twist`.
* :mod:`.tasks`: rare-event, soft class-conditional and infilling tasks.
"""

from tda_jax.twisted.enumeration import (
    ExactTarget,
    all_sequences,
    exact_target,
    kl_divergence,
    optimal_log_twists,
    sample_target,
    sequence_log_probs,
)
from tda_jax.twisted.kv_cache import CachedTransformer, RecomputedTransformer
from tda_jax.twisted.learning import (
    METHODS,
    TwistTrainConfig,
    link_for,
    sample_proposal,
    train_twist,
    twist_loss,
    twist_tables,
)
from tda_jax.twisted.models import StepModel, TinyLM, sample_sequences, teacher_force
from tda_jax.twisted.potentials import Potential, boolean, product, soft
from tda_jax.twisted.smc import (
    TwistedParticles,
    TwistedProblem,
    log_z_estimates,
    twisted_csmc,
    twisted_smc,
)
from tda_jax.twisted.tasks import Task, infilling_task, rare_event_task, soft_task
from tda_jax.twisted.twists import HeadTwist, SeparateTwist, TableTwist, UniformTwist

__all__ = [
    "METHODS", "CachedTransformer", "ExactTarget", "HeadTwist", "Potential",
    "RecomputedTransformer", "SeparateTwist", "StepModel", "TableTwist", "Task", "TinyLM",
    "TwistTrainConfig", "TwistedParticles", "TwistedProblem", "UniformTwist", "all_sequences",
    "boolean", "exact_target", "infilling_task", "kl_divergence", "link_for", "log_z_estimates",
    "optimal_log_twists", "product", "rare_event_task", "sample_proposal", "sample_sequences",
    "sample_target", "sequence_log_probs", "soft", "soft_task", "teacher_force", "train_twist",
    "twist_loss", "twist_tables", "twisted_csmc", "twisted_smc",
]
