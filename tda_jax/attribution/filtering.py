"""TF-IDF candidate filtering of training sequences, and how much of the influence it keeps.

Grosse et al. (2023) score each query against only the training sequences most similar to it by
TF-IDF, because scoring a whole corpus is too expensive. :func:`tfidf_candidates` picks those
candidates; :func:`recall_at_k` measures, on a problem small enough to score in full, what fraction
of each query's most influential training sequences the filter keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Kept by default for text: every run of word characters, including one-letter words and digits
# (scikit-learn's default drops them, which in short synthetic sentences loses "3" and "a").
WORD_PATTERN = r"(?u)\b\w+\b"
# For token ids joined by spaces: every id is a term.
ID_PATTERN = r"\S+"


def _as_documents(texts, argument: str) -> tuple[list[str], bool]:
    """Strings as given, or token-id sequences as space-joined ids; and whether they were ids."""
    if isinstance(texts, str | bytes):
        raise TypeError(f"{argument} must be a sequence of documents, not one string.")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{argument} is empty; give at least one document.")
    are_strings = [isinstance(t, str) for t in texts]
    if all(are_strings):
        return texts, False
    if any(are_strings):
        first = are_strings.index(not are_strings[0])
        raise TypeError(f"{argument} mixes strings and token-id sequences ({argument}[0] is "
                        f"{type(texts[0]).__name__}, {argument}[{first}] is "
                        f"{type(texts[first]).__name__}); give all strings or all id sequences.")
    documents = []
    for i, ids in enumerate(texts):
        array = np.asarray(ids)
        if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
            raise TypeError(f"{argument}[{i}] must be a string or a 1-D sequence of integer token ids; "
                            f"got {array.dtype} of shape {array.shape}.")
        documents.append(" ".join(str(int(i)) for i in array))
    return documents, True


def tfidf_candidates(query_texts: Sequence[str] | Sequence[Sequence[int]],
                     train_texts: Sequence[str] | Sequence[Sequence[int]], k: int,
                     token_pattern: str | None = None, block_size: int = 256) -> np.ndarray:
    """The ``k`` training sequences most similar to each query by TF-IDF cosine similarity.

    A scikit-learn ``TfidfVectorizer`` (default weighting: smoothed idf, sublinear tf off, l2
    normalisation) is fitted on ``train_texts``; queries are mapped with the same vocabulary and idf
    (terms absent from training are dropped), and similarity is the dot product of the l2-normalised
    vectors, i.e. their cosine. Rows are ranked by similarity, highest first, ties by lower index
    (so a query sharing no term with training gets rows ``0..k-1``).

    Args:
      query_texts: ``Q`` queries, as strings or as token-id sequences (e.g. prompt + completion).
      train_texts: ``N`` training sequences, strings or token-id sequences (same kind as queries).
      k: candidates per query, ``1 <= k <= N``.
      token_pattern: the vectorizer's term regex. Default: :data:`WORD_PATTERN` (lower-cased runs of
        word characters, one-character words kept, punctuation dropped) for strings,
        :data:`ID_PATTERN` (every id) for token ids.
      block_size: queries whose ``[block, N]`` similarities are held at once.

    Returns:
      ``[Q, k]`` int64 training-row indices, most similar first.

    Raises:
      ValueError: on bad ``k`` or empty inputs; TypeError on mixed or malformed documents.
    """
    queries, query_ids = _as_documents(query_texts, "query_texts")
    train, train_ids = _as_documents(train_texts, "train_texts")
    if query_ids != train_ids:
        raise TypeError("query_texts and train_texts must both be strings or both be token-id sequences; "
                        f"got {'ids' if query_ids else 'strings'} and {'ids' if train_ids else 'strings'}.")
    num_train = len(train)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= num_train:
        raise ValueError(f"k must be an integer in [1, {num_train}] (the number of training texts); "
                         f"got {k!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    # Imported here so that importing tda_jax.attribution does not load scikit-learn.
    from sklearn.feature_extraction.text import TfidfVectorizer

    pattern = token_pattern or (ID_PATTERN if train_ids else WORD_PATTERN)
    vectorizer = TfidfVectorizer(token_pattern=pattern, lowercase=not train_ids)
    try:
        train_vectors = vectorizer.fit_transform(train)
    except ValueError as error:  # scikit-learn's "empty vocabulary"
        raise ValueError(f"train_texts hold no term matching token_pattern {pattern!r}: {error}") from error
    query_vectors = vectorizer.transform(queries)
    candidates = np.empty((len(queries), int(k)), np.int64)
    for start in range(0, len(queries), block_size):
        similarity = (query_vectors[start:start + block_size] @ train_vectors.T).toarray()
        # A stable sort of -similarity keeps equal similarities in index order.
        candidates[start:start + block_size] = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return candidates


def _check_candidates(candidates, num_queries: int | None, num_train: int | None,
                      argument: str = "candidates") -> np.ndarray:
    candidates = np.asarray(candidates)
    if candidates.ndim != 2 or not np.issubdtype(candidates.dtype, np.integer):
        raise ValueError(f"{argument} must be [num_queries, k] integer row indices; got "
                         f"{candidates.dtype} of shape {candidates.shape}.")
    if num_queries is not None and candidates.shape[0] != num_queries:
        raise ValueError(f"{argument} has {candidates.shape[0]} rows (shape {candidates.shape}) but there "
                         f"are {num_queries} queries.")
    if num_train is not None and candidates.size and (candidates.min() < 0
                                                       or candidates.max() >= num_train):
        raise ValueError(f"{argument} holds indices outside [0, {num_train}) (min {candidates.min()}, "
                         f"max {candidates.max()}).")
    return candidates


def top_rows(scores: np.ndarray, top: int) -> np.ndarray:
    """``[Q, top]`` indices of each query's highest scores, highest first, ties by lower index."""
    scores = np.asarray(scores)
    return np.argsort(-scores, axis=1, kind="stable")[:, :top]


def recall_at_k(scores: np.ndarray, candidates: np.ndarray, top: int = 10) -> float:
    """Mean over queries of the fraction of the query's ``top`` most influential training rows that
    are among its candidates.

    "Most influential" means the highest ``scores`` of the full, unfiltered matrix (ties by lower
    index), so this says how much of the influence a candidate filter such as
    :func:`tfidf_candidates` would keep.

    Args:
      scores: ``[Q, N]`` influence scores of every training row (higher = more influential).
      candidates: ``[Q, k]`` candidate training rows of each query.
      top: how many of the highest-scoring rows count, ``1 <= top <= N``.

    Returns:
      The recall in ``[0, 1]``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] == 0 or not np.issubdtype(scores.dtype, np.number):
        raise ValueError(f"scores must be a non-empty [num_queries, num_train] array; got {scores.dtype} "
                         f"of shape {scores.shape}.")
    num_queries, num_train = scores.shape
    if np.isnan(scores).any():
        rows = np.flatnonzero(np.isnan(scores).any(axis=1))
        raise ValueError(f"scores has NaN in query rows {rows[:5].tolist()}; the ranking is undefined.")
    candidates = _check_candidates(candidates, num_queries, num_train)
    if isinstance(top, bool) or not isinstance(top, int | np.integer) or not 1 <= top <= num_train:
        raise ValueError(f"top must be an integer in [1, {num_train}] (scores has {num_train} training "
                         f"rows); got {top!r}.")
    best = top_rows(scores, int(top))
    kept = np.array([np.isin(best[q], candidates[q]).mean() for q in range(num_queries)])
    return float(kept.mean())


def candidate_union(candidates: np.ndarray) -> np.ndarray:
    """``[U]`` sorted distinct training rows among all queries' candidates ``[Q, k]``.

    Scoring only these rows (``tda_jax.data.subset(train, union)``) covers every query's candidates;
    :func:`gather_candidates` then picks each query's own.
    """
    candidates = _check_candidates(candidates, None, None)
    if candidates.size and candidates.min() < 0:
        raise ValueError(f"candidates holds negative indices (min {candidates.min()}).")
    return np.unique(candidates)


def gather_candidates(scores: np.ndarray, candidates: np.ndarray,
                      columns: np.ndarray | None = None) -> np.ndarray:
    """Each query's scores of its own candidates.

    Args:
      scores: ``[Q, M]`` scores whose column ``j`` is training row ``columns[j]``.
      candidates: ``[Q, k]`` training rows.
      columns: ``[M]`` distinct training rows of the score columns (e.g. :func:`candidate_union`);
        default ``arange(M)`` (the full matrix).

    Returns:
      ``[Q, k]`` with ``out[q, i] = scores[q, j]`` where ``columns[j] == candidates[q, i]``.

    Raises:
      ValueError: if a candidate has no column.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [num_queries, num_columns]; got shape {scores.shape}.")
    num_queries, num_columns = scores.shape
    candidates = _check_candidates(candidates, num_queries, None)
    if columns is None:
        columns = np.arange(num_columns)
    columns = np.asarray(columns)
    if columns.shape != (num_columns,) or not np.issubdtype(columns.dtype, np.integer):
        raise ValueError(f"columns must be [{num_columns}] integer training rows (one per score column); "
                         f"got {columns.dtype} of shape {columns.shape}.")
    order = np.argsort(columns, kind="stable")
    sorted_columns = columns[order]
    if np.any(sorted_columns[1:] == sorted_columns[:-1]):
        raise ValueError("columns has repeated training rows; each row may have one score column.")
    position = np.clip(np.searchsorted(sorted_columns, candidates), 0, max(num_columns - 1, 0))
    found = sorted_columns[position] == candidates if num_columns else np.zeros(candidates.shape, bool)
    if not found.all():
        q, i = np.argwhere(~found)[0]
        raise ValueError(f"candidates[{q}, {i}] = {candidates[q, i]} is not among the score columns; score "
                         "the union of all candidates (candidate_union).")
    return np.take_along_axis(scores, order[position], axis=1)
