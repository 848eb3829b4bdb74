"""Tests of tda_jax.data.corpus: the word tokenizer, the fact corpus (determinism, facts stated
where recorded, no flipped-order text in training) and causal-LM datasets (shift, padding, masks,
errors naming the row)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    RELATIONS,
    WordTokenizer,
    lm_dataset,
    make_fact_corpus,
)
from tda_jax.io import write_json
from tda_jax.losses import IGNORE, check_targets, completion_log_prob

SMALL = dict(num_entities=10, statements_per_fact=4, num_arithmetic=30, num_distractors=40)


@pytest.fixture(scope="module")
def default_corpus():
    return make_fact_corpus()


def _contains(row, pattern) -> bool:
    n = len(pattern)
    return any(tuple(row[i:i + n]) == tuple(pattern) for i in range(len(row) - n + 1))


# --------------------------------------------------------------------------------- tokenizer


def test_tokenizer_split_encode_decode_round_trip():
    assert WordTokenizer.split("The capital, of Vorland's  3+4=7.") == [
        "the", "capital", ",", "of", "vorland's", "3", "+", "4", "=", "7", "."]
    tok = WordTokenizer.from_texts(["the capital of vorland is kesh .", "3 + 4 = 7 ."])
    assert tok.words[:3] == ("<pad>", "<bos>", "<eos>")
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert list(tok.words[3:]) == sorted(tok.words[3:])
    assert tok.vocab_size == 3 + len({"the", "capital", "of", "vorland", "is", "kesh", ".", "3", "+",
                                      "4", "=", "7"})
    ids = tok.encode("The capital of Vorland is kesh.")
    assert len(ids) == 7 and min(ids) > EOS_ID  # nothing added implicitly
    assert tok.decode(ids) == "the capital of vorland is kesh ."
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == "<bos> the capital of vorland is kesh . <eos> <pad>"
    assert tok.decode([BOS_ID, *ids, EOS_ID], skip_special=True) == tok.decode(ids)
    # Vocabulary order does not depend on the order of the texts.
    assert WordTokenizer.from_texts(["3 + 4 = 7 .", "the capital of vorland is kesh ."]) == tok


def test_tokenizer_errors():
    tok = WordTokenizer.from_texts(["a b c"])
    with pytest.raises(ValueError, match="'zork'"):
        tok.encode("a zork b")
    with pytest.raises(ValueError, match=r"ids\[1\]"):
        tok.decode([3, 99])
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer(("a", "b"))
    with pytest.raises(ValueError, match="duplicates"):
        WordTokenizer(("<pad>", "<bos>", "<eos>", "a", "a"))
    with pytest.raises(TypeError, match="one string"):
        WordTokenizer.from_texts("a b c")


def test_tokenizer_json_round_trip(tmp_path):
    tok = make_fact_corpus(**SMALL).tokenizer
    path = tmp_path / "tokenizer.json"
    write_json(path, tok.to_json())
    again = WordTokenizer.from_json(json.loads(path.read_text()))
    assert again == tok and again.words == tok.words
    assert WordTokenizer.from_json(json.dumps(tok.to_json())) == tok
    text = "the capital of " + make_fact_corpus(**SMALL).entities[0] + " is"
    assert again.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="saved WordTokenizer"):
        WordTokenizer.from_json({"words": ["<pad>"]})


# --------------------------------------------------------------------------------- corpus


def test_fact_corpus_is_deterministic_by_seed():
    a, b = make_fact_corpus(seed=3, **SMALL), make_fact_corpus(seed=3, **SMALL)
    assert a == b
    c = make_fact_corpus(seed=4, **SMALL)
    assert c.texts != a.texts and c.entities != a.entities


def test_default_corpus_statistics(default_corpus):
    c = default_corpus
    assert 1500 <= c.num_train <= 5000
    assert len(c.relations) >= 4 and len(c.facts) == len(c.entities) * len(c.relations)
    assert len(c.texts) == len(c.tokens) == len(c.row_facts)
    assert max(len(t) for t in c.tokens) + 2 <= c.max_len <= 64
    assert c.vocab_size < 1000
    values = [f.value for f in c.facts]
    assert len(set(values)) == len(values) and not set(values) & set(c.entities)
    assert all(len(f.rows) >= 2 for f in c.facts)
    # Arithmetic is correct, and there are sequences of 2-3 sentences.
    arithmetic = [s for t in c.texts for s in t.split(" .") if "+" in s]
    assert len(arithmetic) > 100
    for sentence in arithmetic:
        a, plus, b, equals, total = sentence.split()
        assert (plus, equals) == ("+", "=") and int(a) + int(b) == int(total)
    assert any(t.count(" .") >= 2 for t in c.texts)


def test_fact_rows_state_the_fact_and_nothing_else_mentions_the_value(default_corpus):
    c = default_corpus
    tok = c.tokenizer
    rows_with = {}
    for row, ids in enumerate(c.tokens):
        for i in set(ids):
            rows_with.setdefault(i, set()).add(row)
    for fact in c.facts:
        entity, value = tok.encode(fact.entity)[0], tok.encode(fact.value)[0]
        assert fact.rows == tuple(sorted(fact.rows))
        # The recorded rows are exactly the rows holding the value, and each names the entity.
        assert set(fact.rows) == rows_with[value]
        assert all(entity in c.tokens[r] for r in fact.rows)
        assert all(fact.fact_id in c.row_facts[r] for r in fact.rows)
        # The same-order statement appears verbatim in at least one row.
        statement = tok.encode(f"the {RELATIONS[fact.relation].noun} of {fact.entity} is {fact.value}")
        assert any(_contains(c.tokens[r], statement) for r in fact.rows)
    for row, fact_ids in enumerate(c.row_facts):
        assert all(row in c.facts[f].rows for f in fact_ids)


def test_no_training_sequence_states_a_fact_in_flipped_order(default_corpus):
    c = default_corpus
    tok = c.tokenizer
    for fact in c.facts:
        entity, value = tok.encode(fact.entity)[0], tok.encode(fact.value)[0]
        flipped = tok.encode(f"{fact.value} is the {RELATIONS[fact.relation].noun} of")
        for r in fact.rows:
            row = c.tokens[r]
            assert not _contains(row, flipped), c.texts[r]
            # Stronger: within a row the value never comes before the entity's first mention.
            assert row.index(entity) < row.index(value), c.texts[r]
            assert not _contains(row, [value, tok.encode("is")[0]]), c.texts[r]


def test_queries_name_their_fact_order_and_rows():
    c = make_fact_corpus(**SMALL)
    assert len(c.queries) == 2 * len(c.facts)
    for f, fact in enumerate(c.facts):
        same, flipped = c.queries[2 * f], c.queries[2 * f + 1]
        noun = RELATIONS[fact.relation].noun
        assert same == (f"the {noun} of {fact.entity} is", fact.value, f, "same", fact.rows)
        assert flipped == (f"{fact.value} is the {noun} of", fact.entity, f, "flipped", fact.rows)
    np.testing.assert_array_equal(c.query_indices("flipped"), np.arange(1, 2 * len(c.facts), 2))
    np.testing.assert_array_equal(c.query_fact_ids("same"), np.arange(len(c.facts)))
    assert c.query_texts("same")[0] == f"{c.queries[0].prompt} {c.queries[0].completion}"
    mask = c.query_row_mask("flipped")
    assert mask.shape == (len(c.facts), c.num_train)
    assert [tuple(np.flatnonzero(m)) for m in mask] == [f.rows for f in c.facts]
    with pytest.raises(ValueError, match="order"):
        c.query_indices("reversed")

    queries = c.query_dataset()
    check_targets(queries.targets, c.vocab_size, "token")
    # Exactly one target per query: the completion word, at the prompt's last position.
    for q, query in enumerate(c.queries):
        prompt = c.tokenizer.encode(query.prompt)
        (position,) = np.flatnonzero(queries.targets[q] != IGNORE)
        assert position == len(prompt)
        assert queries.targets[q, position] == c.tokenizer.encode(query.completion)[0]
        assert queries.input_mask[q].sum() == len(prompt) + 1
    train = c.train_dataset()
    assert train.inputs.shape == (c.num_train, c.max_len) and train.num_classes == c.vocab_size
    check_targets(train.targets, c.vocab_size, "token", positions=c.max_len)


def test_fact_corpus_argument_errors():
    with pytest.raises(ValueError, match="relations"):
        make_fact_corpus(relations=("capital", "weather"))
    with pytest.raises(ValueError, match="num_entities"):
        make_fact_corpus(num_entities=1)
    with pytest.raises(ValueError, match="sentences_per_sequence"):
        make_fact_corpus(sentences_per_sequence=(0.5, 0.2))


# --------------------------------------------------------------------------------- lm_dataset


def test_lm_dataset_shifts_pads_and_masks_by_hand():
    data = lm_dataset([[5, 6, 7], [8]], max_len=5, vocab_size=10)
    np.testing.assert_array_equal(data.inputs, [[1, 5, 6, 7, 0], [1, 8, 0, 0, 0]])
    np.testing.assert_array_equal(data.targets, [[5, 6, 7, 2, -1], [8, 2, -1, -1, -1]])
    np.testing.assert_array_equal(data.input_mask, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert data.inputs.dtype == np.int32 and data.targets.dtype == np.int32
    assert data.input_mask.dtype == np.float32 and data.num_classes == 10

    # A prompt of 2 tokens: only the completion (and <eos> if added) carries loss.
    data = lm_dataset([[5, 6, 7, 9], [8, 4]], max_len=5, vocab_size=10, prompt_lengths=[2, 0],
                      add_eos=False)
    np.testing.assert_array_equal(data.inputs, [[1, 5, 6, 7, 0], [1, 8, 0, 0, 0]])
    np.testing.assert_array_equal(data.targets, [[-1, -1, 7, 9, -1], [8, 4, -1, -1, -1]])
    np.testing.assert_array_equal(data.input_mask, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    with_eos = lm_dataset([[5, 6, 7]], max_len=4, vocab_size=10, prompt_lengths=[2])
    np.testing.assert_array_equal(with_eos.targets, [[-1, -1, 7, 2]])

    # completion_log_prob on these targets sums exactly the completion tokens' log-probabilities.
    logits = np.random.default_rng(0).normal(size=(2, 5, 10))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [log_p[0, 2, 7] + log_p[0, 3, 9], log_p[1, 0, 8] + log_p[1, 1, 4]]
    got = completion_log_prob(jnp.asarray(logits, jnp.float32), jnp.asarray(data.targets))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_lm_dataset_errors_name_the_row():
    with pytest.raises(ValueError, match="row 1 has 4 tokens.*max_len is 4"):
        lm_dataset([[3], [3, 4, 5, 6]], max_len=4, vocab_size=10)
    lm_dataset([[3], [3, 4, 5, 6]], max_len=4, vocab_size=10, add_eos=False)  # fits without <eos>
    with pytest.raises(ValueError, match=r"row 1 has id.*position 2: 10"):
        lm_dataset([[3], [3, 4, 10]], max_len=8, vocab_size=10)
    with pytest.raises(ValueError, match="row 0 has id.*position 1: -1"):
        lm_dataset([[3, -1]], max_len=8, vocab_size=10)
    with pytest.raises(ValueError, match="row 0 has id.*<pad>"):
        lm_dataset([[3, PAD_ID]], max_len=8, vocab_size=10)
    with pytest.raises(ValueError, match="row 1 is empty"):
        lm_dataset([[3], []], max_len=8, vocab_size=10)
    with pytest.raises(ValueError, match=r"prompt_lengths\[1\] = 2 but row 1 has 2 tokens"):
        lm_dataset([[3, 4], [5, 6]], max_len=8, vocab_size=10, prompt_lengths=[1, 2])
    with pytest.raises(ValueError, match=r"prompt_lengths must be \[2\]"):
        lm_dataset([[3, 4], [5, 6]], max_len=8, vocab_size=10, prompt_lengths=[1])
    with pytest.raises(TypeError, match="row 0.*integer"):
        lm_dataset([[3.0, 4.0]], max_len=8, vocab_size=10)
    with pytest.raises(TypeError, match="row 0 is a string"):
        lm_dataset(["the cat"], max_len=8, vocab_size=10)
    with pytest.raises(ValueError, match="max_len"):
        lm_dataset([[3]], max_len=0, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size"):
        lm_dataset([[3]], max_len=4, vocab_size=2)
