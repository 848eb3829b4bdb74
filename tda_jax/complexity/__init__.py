"""Data complexity from influence functions: IF-COMP's pNML distributions and complexities
(:mod:`tda_jax.complexity.ifcomp`), and the brute-force pNML they approximate
(:mod:`tda_jax.complexity.brute_force`)."""

from tda_jax.complexity.brute_force import brute_force_pnml, proximal_objective
from tda_jax.complexity.ifcomp import (
    PNML,
    boltzmann_loss_gradients,
    build_kernel_step,
    check_classifier,
    check_epsilon,
    check_labels,
    check_temperature,
    ifcomp,
    labelled_complexity,
    linearized_response,
    output_kernels,
    pnml_from_kernels,
)

__all__ = [
    "PNML",
    "boltzmann_loss_gradients",
    "brute_force_pnml",
    "build_kernel_step",
    "check_classifier",
    "check_epsilon",
    "check_labels",
    "check_temperature",
    "ifcomp",
    "labelled_complexity",
    "linearized_response",
    "output_kernels",
    "pnml_from_kernels",
    "proximal_objective",
]
