"""Datasets held on the host and fixed-shape (padded, masked) batching."""

from tda_jax.data.corpus import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    RELATIONS,
    Fact,
    FactCorpus,
    Query,
    Relation,
    WordTokenizer,
    lm_dataset,
    make_fact_corpus,
)
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
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "RELATIONS",
    "Dataset",
    "Fact",
    "FactCorpus",
    "Query",
    "Relation",
    "WordTokenizer",
    "batch_iterator",
    "batches_in_order",
    "lm_dataset",
    "load_digits",
    "load_mnist1d",
    "make_fact_corpus",
    "make_synthetic_regression",
    "num_batches",
    "num_examples",
    "shuffled_order",
    "subset",
]
