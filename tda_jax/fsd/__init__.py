"""Function-space distances: LAFTR (a parametric summary of a ReLU network and its data) and the
baselines it is compared with (true FSD on all data or a coreset, diagonal-Fisher / K-FAC
quadratics), all as ``(params0, params1) -> scalar`` estimators; see :mod:`tda_jax.fsd.laftr`."""

from tda_jax.fsd.baselines import (
    HeadApply,
    fit_quadratic,
    quadratic_fsd,
    quadratic_num_stored,
    select_coreset,
    true_fsd,
)
from tda_jax.fsd.distances import DISTANCES, discrepancy, softmax_hessian
from tda_jax.fsd.influence import (
    damped_inverse_apply,
    laftr_hessian,
    pbrf_scores,
    pbrf_self_influence,
)
from tda_jax.fsd.laftr import (
    VARIANTS,
    LaftrSummary,
    delta_output_second_moment,
    laftr_fsd,
    restrict_outputs,
    summarize,
)
from tda_jax.fsd.network import SUPPORTED_ACTIVATIONS, check_relu_mlp, joint_forward, mlp_layers

__all__ = [
    "DISTANCES",
    "SUPPORTED_ACTIVATIONS",
    "VARIANTS",
    "HeadApply",
    "LaftrSummary",
    "check_relu_mlp",
    "damped_inverse_apply",
    "delta_output_second_moment",
    "discrepancy",
    "fit_quadratic",
    "joint_forward",
    "laftr_hessian",
    "laftr_fsd",
    "mlp_layers",
    "pbrf_scores",
    "pbrf_self_influence",
    "quadratic_fsd",
    "quadratic_num_stored",
    "restrict_outputs",
    "select_coreset",
    "softmax_hessian",
    "summarize",
    "true_fsd",
]
