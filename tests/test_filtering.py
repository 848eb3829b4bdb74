"""Tests of tda_jax.attribution.filtering: TF-IDF candidates against a dense numpy TF-IDF oracle
and a hand-made example, recall@k by hand (a ranking bug must change it), candidate gathering."""

import re

import numpy as np
import pytest

from tda_jax.attribution import (
    candidate_union,
    filtering,
    gather_candidates,
    recall_at_k,
    tfidf_candidates,
)
from tda_jax.data import make_fact_corpus

TRAIN = [
    "the cat sat on the mat",           # 0
    "dogs chase a cat",                 # 1
    "the capital of vorland is kesh",   # 2
    "kesh is a busy city",              # 3
    "dogs chase a cat",                 # 4 (same as row 1: a tie)
    "nothing related here at all",      # 5
]


def _oracle_similarity(queries, train, pattern=r"\b\w+\b"):
    """Dense TF-IDF cosine with scikit-learn's default weighting: tf * (ln((1 + n) / (1 + df)) + 1),
    rows l2-normalised; terms seen only in queries are dropped."""
    split = lambda t: re.findall(pattern, t.lower())  # noqa: E731
    vocab = sorted({w for t in train for w in split(t)})
    counts = lambda texts: np.array([[split(t).count(w) for w in vocab] for t in texts], float)  # noqa: E731
    tf_train, tf_query = counts(train), counts(queries)
    idf = np.log((1 + len(train)) / (1 + (tf_train > 0).sum(0))) + 1
    unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-300)  # noqa: E731
    return unit(tf_query * idf) @ unit(tf_train * idf).T


def test_tfidf_candidates_hand_made_example():
    queries = ["the capital of vorland is", "a cat", "kesh", "zzz unknown"]
    got = tfidf_candidates(queries, TRAIN, k=3)
    assert got.shape == (4, 3) and got.dtype == np.int64
    assert got[0, 0] == 2                       # the statement of the fact
    assert list(got[1, :2]) == [1, 4]           # the two identical rows, tie broken by index
    assert list(got[2, :2]) == [3, 2]           # "kesh" alone: the shorter row is more similar
    assert list(got[3]) == [0, 1, 2]            # no shared term: all zeros, rows in index order
    # Against the dense oracle: candidates are the oracle's stable ranking.
    similarity = _oracle_similarity(queries, TRAIN)
    expected = np.argsort(-np.round(similarity, 12), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(tfidf_candidates(queries, TRAIN, k=len(TRAIN))[:, :3], got)


def test_tfidf_candidates_on_token_ids_keeps_every_id():
    # Single-digit ids would be dropped by scikit-learn's default pattern (two characters or more).
    train = [[3, 7, 9], [4, 5], [3, 7], [11, 12, 13]]
    got = tfidf_candidates([[7, 3], [12], [5]], train, k=2)
    assert list(got[0]) == [2, 0] and got[1, 0] == 3 and got[2, 0] == 1
    words = {3: "cat", 7: "dog", 9: "mat", 4: "sun", 5: "sky", 11: "x1", 12: "x2", 13: "x3"}
    as_text = lambda rows: [" ".join(words[i] for i in r) for r in rows]  # noqa: E731
    np.testing.assert_array_equal(tfidf_candidates(as_text([[7, 3], [12], [5]]), as_text(train), k=2),
                                  got)
    np.testing.assert_array_equal(
        tfidf_candidates([np.array([7, 3]), (12,), [5]], [np.asarray(r) for r in train], k=2,
                         block_size=1), got)


def test_tfidf_candidates_argument_errors():
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 6\]"):
        tfidf_candidates(["cat"], TRAIN, k=7)
    with pytest.raises(ValueError, match="k must"):
        tfidf_candidates(["cat"], TRAIN, k=0)
    with pytest.raises(TypeError, match="mixes strings"):
        tfidf_candidates(["cat", [1, 2]], TRAIN, k=1)
    with pytest.raises(TypeError, match="both be strings"):
        tfidf_candidates([[1, 2]], TRAIN, k=1)
    with pytest.raises(TypeError, match="not one string"):
        tfidf_candidates("cat", TRAIN, k=1)
    with pytest.raises(ValueError, match="train_texts is empty"):
        tfidf_candidates(["cat"], [], k=1)
    with pytest.raises(ValueError, match="no term"):
        tfidf_candidates(["cat"], [". ,"], k=1)


def test_tfidf_finds_the_fact_statements_of_same_order_queries():
    corpus = make_fact_corpus(num_entities=12, statements_per_fact=4, num_arithmetic=40,
                              num_distractors=60)
    k = 10
    candidates = tfidf_candidates(corpus.query_texts("same"), corpus.texts, k)
    rows = corpus.query_row_mask("same")
    # The value word only occurs in its fact's rows, so those rows rank first.
    found = [rows[q, candidates[q]].sum() / min(k, rows[q].sum()) for q in range(len(candidates))]
    assert np.mean(found) > 0.95


# --------------------------------------------------------------------------------- recall@k

SCORES = np.array([[0.9, 0.1, 0.5, 0.7],
                   [-1.0, 2.0, 3.0, 0.0]])
# Top-2 by score: query 0 -> {0, 3}, query 1 -> {2, 1}; bottom-2: {1, 2} and {0, 3}.


def test_recall_at_k_by_hand():
    assert recall_at_k(SCORES, [[0, 3], [1, 2]], top=2) == 1.0
    assert recall_at_k(SCORES, [[1, 2], [0, 3]], top=2) == 0.0
    assert recall_at_k(SCORES, [[0, 2], [1, 0]], top=2) == 0.5           # (1/2 + 1/2) / 2
    assert recall_at_k(SCORES, [[3], [0]], top=2) == 0.25                # (1/2 + 0) / 2
    assert recall_at_k(SCORES, [[1, 2, 3], [3, 2, 0]], top=1) == 0.5      # tops {0}, {2}: (0 + 1) / 2
    assert recall_at_k(SCORES, [[2, 1, 3], [1, 0, 3]], top=3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    # Ties by lower index: the top 2 of [1, 1, 1, 0] are rows 0 and 1.
    assert recall_at_k(np.array([[1.0, 1.0, 1.0, 0.0]]), [[0, 1]], top=2) == 1.0
    assert recall_at_k(np.array([[1.0, 1.0, 1.0, 0.0]]), [[2, 3]], top=2) == 0.0


def test_recall_at_k_catches_a_ranking_by_lowest_scores(monkeypatch):
    """A planted bug (ranking ascending) must change the hand-computed values."""
    assert recall_at_k(SCORES, [[0, 3], [1, 2]], top=2) == 1.0
    monkeypatch.setattr(filtering, "top_rows",
                        lambda scores, top: np.argsort(scores, axis=1, kind="stable")[:, :top])
    assert recall_at_k(SCORES, [[0, 3], [1, 2]], top=2) != 1.0


def test_recall_at_k_argument_errors():
    with pytest.raises(ValueError, match=r"top must be an integer in \[1, 4\]"):
        recall_at_k(SCORES, [[0, 3], [1, 2]], top=5)
    with pytest.raises(ValueError, match="candidates has 1 rows"):
        recall_at_k(SCORES, [[0, 3]], top=2)
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(SCORES, [[0, 4], [1, 2]], top=2)
    with pytest.raises(ValueError, match="NaN in query rows"):
        recall_at_k(np.array([[0.0, np.nan]]), [[0]], top=1)
    with pytest.raises(ValueError, match="scores must be"):
        recall_at_k(np.zeros(4), [[0]], top=1)


def test_gather_candidates_from_full_and_union_scores():
    candidates = np.array([[3, 0], [2, 3]])
    np.testing.assert_array_equal(gather_candidates(SCORES, candidates), [[0.7, 0.9], [3.0, 0.0]])
    union = candidate_union(candidates)
    np.testing.assert_array_equal(union, [0, 2, 3])
    np.testing.assert_array_equal(gather_candidates(SCORES[:, union], candidates, union),
                                  [[0.7, 0.9], [3.0, 0.0]])
    # Columns in any order.
    shuffled = np.array([3, 0, 2])
    np.testing.assert_array_equal(gather_candidates(SCORES[:, shuffled], candidates, shuffled),
                                  [[0.7, 0.9], [3.0, 0.0]])
    with pytest.raises(ValueError, match=r"candidates\[1, 0\] = 2 is not among"):
        gather_candidates(SCORES[:, [0, 3]], candidates, np.array([0, 3]))
    with pytest.raises(ValueError, match="repeated"):
        gather_candidates(SCORES[:, [0, 0, 3]], candidates, np.array([0, 0, 3]))
