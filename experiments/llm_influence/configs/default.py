"""Influence functions on a small transformer language model trained on a synthetic fact corpus.

A miniature of the language-model analyses of Grosse et al. (2023), "Studying large language model
generalization with influence functions": how sparse influence is, whether it survives flipping the
order of a fact, how much low-rank query batching and TF-IDF filtering lose, and the linear
datamodeling score (LDS) of gradient dot products, K-FAC and EK-FAC on the language model.

Command (from the repository root)::

    python -m experiments.llm_influence.main \
        --config=experiments/llm_influence/configs/default.py --workdir=workdirs/llm_influence

LDS (retraining ground truth; run after the default in the same work directory, whose corpus,
model, curvature and score stages it reuses)::

    python -m experiments.llm_influence.main \
        --config=experiments/llm_influence/configs/default.py:lds --workdir=workdirs/llm_influence

Tiny run (< 1 minute; used by tests/test_llm_influence_experiment.py)::

    python -m experiments.llm_influence.main \
        --config=experiments/llm_influence/configs/default.py:tiny --workdir=workdirs/llm_tiny

Last default run (fresh work directory): 6 min 14 s wall on the 2-core machine while other jobs
kept the load average at 4-8 (model 54 s, curvature 45 s, scores 50 s, query batching 163 s of
which 82 s compiling, TF-IDF 47 s). Then the :lds run in the same directory: 19 min 31 s wall,
all of it the 100 retrained models (1154 s: 11.5 s per model including compilation, 7-13 s per
model once compiled, depending on the load). Means +- 95% CI over the 384 queries (EK-FAC unless
stated; details and per-order numbers in README.md):

    sparsity     top-1% share 0.188 +- 0.005 (uniform 0.010); tail exponent 0.587 +- 0.011
    order flip   share of positive influence held by the fact's ~10 sequences:
                 same order 0.192 +- 0.012, flipped 0.082 +- 0.005 (same-entity control 0.014 and
                 0.069: flipped, the fact's sequences count only as mentions of the entity);
                 mean rank 83 +- 22 vs 572 +- 43 (no relation: 1081)
    query rank   Pearson with full rank: r=1 0.981, r=4 0.998, r=16 0.9998, r=32 0.99997, r=64 1.0;
                 seconds 16.7 / 33.4 / 7.5 / 13.7 / 7.0 vs 2.2 at full rank (single runs)
    TF-IDF       recall@k of the top-10: k=10 0.448, 25 0.621, 50 0.780, 100 0.797, 200 0.840,
                 500 0.927; speed-up 11.6x, 5.4x, 3.3x, 3.2x, 2.9x, 1.5x
    LDS (:lds)   identity 0.101 +- 0.016, kfac 0.197 +- 0.019, ekfac 0.198 +- 0.019;
                 noise ceiling 0.541 +- 0.030 (same-order queries: ekfac 0.285, ceiling 0.765)
"""

from __future__ import annotations

import ml_collections

# Analyses read the scores of these methods (each must be a key of config.methods).
_ANALYSIS_METHOD = "ekfac"


def _method(strategy: str, fisher: str = "sampled") -> ml_collections.ConfigDict:
    """One attribution method: curvature strategy, Fisher type and damping."""
    return ml_collections.ConfigDict(
        {
            "strategy": strategy,
            "fisher": fisher,
            # None: 0.1 x the mean eigenvalue of each layer (a typed placeholder, so that
            # `--config.methods.ekfac.damping=1e-3` works); must stay None for identity.
            "damping": ml_collections.config_dict.placeholder(float),
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The default experiment; ``arg == "tiny"``: a run under a minute with every analysis and a
    scaled-down LDS; ``"lds"``: the default plus the LDS ground truth (slow, see ``config.lds``)."""
    if arg not in (None, "", "tiny", "lds"):
        raise ValueError(f"unknown config argument {arg!r}; use nothing, 'tiny' or 'lds'")
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Unoptimized XLA backend for the tiny run, which is dominated by compile time (main.py sets
    # the flag before JAX's first computation).
    config.fast_compile = arg == "tiny"

    # tda_jax.data.make_fact_corpus: 48 invented entities x 4 relations = 192 facts, each stated by
    # 10 paraphrases (entity always before value), plus 400 arithmetic and 400 distractor
    # sentences, packed into 2161 sequences of <= 32 tokens; vocabulary 317 words. Queries: 384,
    # one same-order ("the capital of X is" -> V) and one flipped ("V is the capital of" -> X) per
    # fact.
    config.corpus = ml_collections.ConfigDict(
        {
            "seed": 0,
            "num_entities": 48,
            "relations": ("capital", "language", "founder", "river"),
            "statements_per_fact": 10,
            "num_arithmetic": 400,
            "num_distractors": 400,
            "max_len": 64,
        }
    )

    # tda_jax.models.TransformerLM: 2 pre-LN blocks, d_model 64, 4 heads, MLP width 256, untied
    # output head (about 140k parameters in tracked layers).
    config.model = ml_collections.ConfigDict(
        {"num_layers": 2, "d_model": 64, "num_heads": 4, "d_mlp": 256, "tie_embeddings": False}
    )
    # 15 epochs of AdamW learn every same-order fact (top-1 completion accuracy 1.0) and almost
    # none of the flipped ones (0.026), as in the paper's set-up.
    config.train = ml_collections.ConfigDict(
        {
            "num_epochs": 15,
            "batch_size": 64,
            "learning_rate": 5e-3,
            "weight_decay": 0.0,
            "optimizer": "adamw",
            "checkpoint_every_epochs": 5,
        }
    )

    # Attribution methods (score = -grad f_q^T (F + damping)^-1 grad loss_i, positive: training on
    # the sequence raises the query's completion log-probability). Fisher: "sampled", the true
    # Fisher with one next token drawn from the model at every position, as Grosse et al. use.
    # The empirical Fisher (gradients at the training tokens) nearly vanishes on tokens the model
    # has memorised, which the facts are, and the expected Fisher back-propagates T x V = 32 x 317
    # cotangents per sequence (too slow here). `fisher` is ignored by identity.
    config.methods = ml_collections.ConfigDict(
        {"identity": _method("identity"), "kfac": _method("kfac"), "ekfac": _method("ekfac")}
    )
    # Tracked layers (regular expression searched in layer names, e.g. "mlp"), None for all of
    # embed, attention query/key/value/out, MLP fc1/fc2 and head. The positional table and the
    # LayerNorms are never tracked (recorded in results.json settings).
    config.layers = ml_collections.config_dict.placeholder(str)
    config.curvature_batch_size = 128
    config.query_batch_size = 64
    config.train_batch_size = 128

    # 1. Sparsity: per query, |score| sorted in decreasing order. The tail exponent alpha is minus
    # the least-squares slope of log10 |score|_(r) against log10 r over ranks
    # fit_min_rank..fit_max_rank (|score|_(r) ~ r^-alpha); top_fraction: the share of the total
    # |influence| held by the top ceil(top_fraction x N) sequences.
    config.sparsity = ml_collections.ConfigDict(
        {"method": _ANALYSIS_METHOD, "fit_min_rank": 1, "fit_max_rank": 100, "top_fraction": 0.01}
    )
    # 2. Order flip: share of a query's total positive influence held by the training sequences
    # that state its fact, and their mean rank, for same-order and flipped queries.
    config.order_flip = ml_collections.ConfigDict(
        {"methods": ("identity", "kfac", "ekfac"), "main_method": _ANALYSIS_METHOD}
    )
    # 3. Query batching: rank-r SVD of every layer's preconditioned query gradient, compared with
    # full-rank scores on `num_queries` random queries x `num_train` random training sequences.
    # All ranks share one memory budget for preconditioned queries (`max_query_bytes`, 4 MiB: 7
    # full-rank queries of this model), so full-rank queries need several passes over the training
    # data and low-rank ones fewer. `query_batch_size` queries are factorised at a time; their
    # full-rank gradients are held while factorising and count against the budget, so it is kept
    # small to leave room for the low-rank factors.
    config.query_batching = ml_collections.ConfigDict(
        {
            "method": _ANALYSIS_METHOD,
            "ranks": (1, 4, 16, 32, 64),
            "num_queries": 16,
            "num_train": 256,
            "max_query_bytes": 4 * 2**20,
            "query_batch_size": 4,
            "train_batch_size": 64,
        }
    )
    # 4. TF-IDF filtering: recall@k of each query's unfiltered top-`top` sequences among its k
    # TF-IDF candidates (all queries), and the speed-up of scoring `timing_queries` queries against
    # the union of their candidates instead of every sequence (same compiled step, batches of
    # `timing_batch_size`, best of `repeats` timings).
    config.tfidf = ml_collections.ConfigDict(
        {
            "method": _ANALYSIS_METHOD,
            "ks": (10, 25, 50, 100, 200, 500),
            "top": 10,
            "timing_queries": 8,
            "timing_batch_size": 32,
            "repeats": 3,
        }
    )
    # 5. LDS: retraining on random half subsets (vectorized with
    # tda_jax.evaluation.retrain_ground_truth, cached and resumable chunk by chunk); measurement:
    # the completion log-probability of every query.
    # Off by default: it retrains num_subsets x seeds_per_subset models (see the :lds config).
    config.lds = ml_collections.ConfigDict(
        {
            "enabled": False,
            "num_subsets": 50,
            "fraction": 0.5,
            "seeds_per_subset": 2,
            "models_per_chunk": 20,
        }
    )

    if arg == "tiny":
        config.corpus.update(
            {"num_entities": 8, "relations": ("capital", "language"), "statements_per_fact": 4,
             "num_arithmetic": 16, "num_distractors": 16}
        )
        config.model.update({"num_layers": 1, "d_model": 16, "num_heads": 2, "d_mlp": 32})
        config.train.update({"num_epochs": 6, "batch_size": 16, "learning_rate": 1e-2,
                             "checkpoint_every_epochs": 6})
        config.curvature_batch_size = 32
        config.query_batch_size = 32
        config.train_batch_size = 32
        config.sparsity.fit_max_rank = 10
        config.query_batching.update({"ranks": (2,), "num_queries": 6, "num_train": 40,
                                      "max_query_bytes": 2**16, "query_batch_size": 2,
                                      "train_batch_size": 16})
        config.tfidf.update({"ks": (5, 20), "top": 5, "timing_queries": 4,
                             "timing_batch_size": 16, "repeats": 1})
        config.lds.update({"enabled": True, "num_subsets": 4, "seeds_per_subset": 2,
                           "models_per_chunk": 8})
    elif arg == "lds":
        config.lds.enabled = True
    return config
