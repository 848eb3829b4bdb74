"""Attribution methods. Influence functions: pairwise and self-influence scores.

Sign convention for every method: a positive score means training on the example pushes the
query's measurement up; scores are not divided by the number of training examples.
"""

from tda_jax.attribution.filtering import (
    candidate_union,
    gather_candidates,
    recall_at_k,
    tfidf_candidates,
    top_rows,
)
from tda_jax.attribution.influence import (
    ScoreSteps,
    build_score_steps,
    pairwise_scores,
    query_gradients,
    score_arguments,
    self_scores,
)
from tda_jax.curvature import Curvature, fit_curvature

__all__ = [
    "Curvature",
    "ScoreSteps",
    "build_score_steps",
    "candidate_union",
    "fit_curvature",
    "gather_candidates",
    "pairwise_scores",
    "query_gradients",
    "recall_at_k",
    "score_arguments",
    "self_scores",
    "tfidf_candidates",
    "top_rows",
]
