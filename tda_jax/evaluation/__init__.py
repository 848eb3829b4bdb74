"""Evaluation of attribution methods: the linear datamodeling score (LDS) and its noise ceiling."""

from tda_jax.evaluation.lds import (
    NoiseCeiling,
    Summary,
    lds,
    noise_ceiling,
    predicted_subset_sums,
    retrain_ground_truth,
    sample_subsets,
    spearman,
    summarize,
)

__all__ = [
    "NoiseCeiling",
    "Summary",
    "lds",
    "noise_ceiling",
    "predicted_subset_sums",
    "retrain_ground_truth",
    "sample_subsets",
    "spearman",
    "summarize",
]
