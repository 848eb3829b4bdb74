"""Datasets held on the host and fixed-shape (padded, masked) batching."""

from tda_jax.data.dataset import (
    Dataset,
    batch_iterator,
    batches_in_order,
    num_batches,
    num_examples,
    shuffled_order,
    subset,
)
from tda_jax.data.digits import load_digits
from tda_jax.data.mnist1d import load_mnist1d
from tda_jax.data.synthetic import make_synthetic_regression

__all__ = [
    "Dataset",
    "batch_iterator",
    "batches_in_order",
    "load_digits",
    "load_mnist1d",
    "make_synthetic_regression",
    "num_batches",
    "num_examples",
    "shuffled_order",
    "subset",
]
