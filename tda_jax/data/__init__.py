"""Datasets (in memory, memory-mapped, or read from a record source) and fixed-shape (padded,
masked) batching."""

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
    iter_row_blocks,
    num_batches,
    num_examples,
    row_chunks,
    shuffled_order,
    subset,
    take_rows,
)
from tda_jax.data.digits import load_digits
from tda_jax.data.mnist1d import load_mnist1d
from tda_jax.data.source import (
    SourceColumn,
    as_dataset,
    from_source,
    load_memmap_dataset,
    save_memmap_dataset,
)
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
    "SourceColumn",
    "WordTokenizer",
    "as_dataset",
    "batch_iterator",
    "batches_in_order",
    "from_source",
    "iter_row_blocks",
    "lm_dataset",
    "load_digits",
    "load_memmap_dataset",
    "load_mnist1d",
    "make_fact_corpus",
    "make_synthetic_regression",
    "num_batches",
    "num_examples",
    "row_chunks",
    "save_memmap_dataset",
    "shuffled_order",
    "subset",
    "take_rows",
]
