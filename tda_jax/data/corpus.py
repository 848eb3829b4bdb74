"""A synthetic fact corpus for language-model influence experiments, a word tokenizer, and
causal-LM datasets.

The corpus is a miniature of the set-up in Grosse et al. (2023), "Studying large language model
generalization with influence functions": invented entities (pseudo-words built from syllables)
carry facts such as "the capital of vorland is kesh .", each stated in training text by several
paraphrases, mixed with a little arithmetic and with distractor sentences that mention entities
without stating a fact. Every paraphrase names the entity before the value, so a *flipped* query
("kesh is the capital of" -> "vorland") asks for an order the model never saw; influence on
same-order and flipped queries can then be compared.

Token ids: :data:`PAD_ID` (``<pad>``) = 0, :data:`BOS_ID` (``<bos>``) = 1, :data:`EOS_ID`
(``<eos>``) = 2; words follow in sorted order.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from tda_jax.data.dataset import Dataset
from tda_jax.losses import IGNORE

PAD = "<pad>"
"""Padding token: fills inputs after a sequence ends (its targets are IGNORE)."""
BOS = "<bos>"
"""Beginning-of-sequence token: the first input of every sequence in :func:`lm_dataset`."""
EOS = "<eos>"
"""End-of-sequence token: the last target of a training sequence in :func:`lm_dataset`."""
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SPECIAL_TOKENS = (PAD, BOS, EOS)

# Punctuation becomes a token of its own ("kesh ." -> ["kesh", "."]); apostrophes stay inside
# words, so "'s" written as a separate word is one token.
_PUNCTUATION = ".,=+-*/?!;:()\""
_TOKEN = re.compile(r"[^\s" + re.escape(_PUNCTUATION) + r"]+|[" + re.escape(_PUNCTUATION) + r"]")
_FORMAT = "tda_jax.data.WordTokenizer"


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
    """A word-level tokenizer with a fixed vocabulary.

    Text is lower-cased and split on whitespace; the punctuation characters ``. , = + - * / ? ! ; :
    ( ) "`` are tokens of their own. Nothing is added implicitly (no ``<bos>``/``<eos>``): that is
    :func:`lm_dataset`'s job.

    Attributes:
      words: the vocabulary, ``words[i]`` is the word of id ``i``; starts with
        ``("<pad>", "<bos>", "<eos>")``.
    """

    words: tuple[str, ...]
    _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        words = tuple(self.words)
        if words[:3] != SPECIAL_TOKENS:
            raise ValueError(f"words must start with the special tokens {SPECIAL_TOKENS}; got "
                             f"{words[:3]}.")
        for i, word in enumerate(words):
            if not isinstance(word, str) or not word or re.search(r"\s", word):
                raise ValueError(f"words[{i}] = {word!r} is not a non-empty string without whitespace.")
        ids = {word: i for i, word in enumerate(words)}
        if len(ids) != len(words):
            dupes = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"words has duplicates: {dupes[:5]}.")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "_ids", ids)

    @staticmethod
    def split(text: str) -> list[str]:
        """The words of ``text``: lower-cased, split on whitespace, punctuation separated."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}.")
        return _TOKEN.findall(text.lower())

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> WordTokenizer:
        """The tokenizer whose vocabulary is the special tokens then every word of ``texts``, sorted.

        Sorting makes the ids independent of the order of ``texts``.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not one string.")
        vocabulary = set()
        for text in texts:
            vocabulary.update(cls.split(text))
        vocabulary -= set(SPECIAL_TOKENS)
        return cls(SPECIAL_TOKENS + tuple(sorted(vocabulary)))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (nothing added).

        Raises:
          ValueError: naming the first word that is not in the vocabulary.
        """
        ids = []
        for word in self.split(text):
            i = self._ids.get(word)
            if i is None:
                raise ValueError(f"word {word!r} in text {text!r} is not in the tokenizer's vocabulary "
                                 f"({self.vocab_size} words); build the tokenizer from texts that "
                                 "contain it.")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The words of ``ids`` joined by single spaces (``<pad>``/``<bos>``/``<eos>`` dropped if
        ``skip_special``)."""
        words = []
        for position, i in enumerate(np.asarray(list(ids)).reshape(-1).tolist()):
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"ids[{position}] = {i!r} is not a token id in [0, {self.vocab_size}).")
            if skip_special and i < len(SPECIAL_TOKENS):
                continue
            words.append(self.words[i])
        return " ".join(words)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable description (for :func:`tda_jax.io.write_json`)."""
        return {"format": _FORMAT, "version": 1, "words": list(self.words)}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str) -> WordTokenizer:
        """The tokenizer described by :meth:`to_json`'s dict (or that dict as a JSON string)."""
        if isinstance(obj, str):
            obj = json.loads(obj)
        if not isinstance(obj, dict) or obj.get("format") != _FORMAT or "words" not in obj:
            raise ValueError(f"obj is not a saved WordTokenizer (expected a dict with format "
                             f"{_FORMAT!r} and 'words'); got {str(obj)[:100]!r}.")
        if obj.get("version") != 1:
            raise ValueError(f"unsupported WordTokenizer version {obj.get('version')!r}; expected 1.")
        return cls(tuple(obj["words"]))


def lm_dataset(token_lists: Sequence[Sequence[int]], max_len: int, vocab_size: int,
               prompt_lengths: Sequence[int] | None = None, add_eos: bool = True) -> Dataset:
    """A causal language-model dataset of shifted, right-padded sequences.

    Row ``n`` is the sequence ``s = [<bos>] + token_lists[n] (+ [<eos>])``; position ``t`` has input
    ``s[t]`` and target ``s[t + 1]``. Positions after the sequence have input ``<pad>``, target
    :data:`tda_jax.losses.IGNORE` and ``input_mask`` 0. With ``prompt_lengths[n] = p``, the first
    ``p`` tokens of the row are a prompt: the targets predicting them (positions ``t < p``) are
    IGNORE too, so only the completion carries loss (what
    :func:`tda_jax.losses.completion_log_prob` measures).

    Args:
      token_lists: ``N`` sequences of token ids (without ``<bos>``/``<eos>``).
      max_len: number of positions ``T``; a row of ``n`` tokens needs ``T >= n + add_eos``.
      vocab_size: vocabulary size ``V`` (ids must lie in ``[0, V)``); the dataset's ``num_classes``.
      prompt_lengths: optional ``[N]`` prompt lengths, each in ``[0, len(row))``.
      add_eos: append ``<eos>`` (as a target) to every row. Queries measured by
        ``completion_log_prob`` usually leave it out.

    Returns:
      ``Dataset(inputs [N, T] int32, targets [N, T] int32, num_classes=V, input_mask [N, T]
      float32)``.

    Raises:
      ValueError: naming the row, for a row that is empty, too long, holds an id outside
        ``[1, V)`` (``<pad>`` is reserved for padding), or has an empty completion.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}.")
    if (isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer)
            or vocab_size <= EOS_ID):
        raise ValueError(f"vocab_size must be an integer > {EOS_ID} (the special tokens <pad>, <bos>, "
                         f"<eos> take ids 0-2), got {vocab_size!r}.")
    if isinstance(token_lists, str | np.ndarray) and np.ndim(token_lists) != 2:
        raise TypeError("token_lists must be a sequence of token-id sequences (one per row).")
    rows = [_check_row(n, row, vocab_size) for n, row in enumerate(token_lists)]
    num = len(rows)
    if prompt_lengths is not None:
        prompt_lengths = np.asarray(prompt_lengths)
        if prompt_lengths.shape != (num,) or not (
                num == 0 or np.issubdtype(prompt_lengths.dtype, np.integer)):
            raise ValueError(f"prompt_lengths must be [{num}] integers (one per row of token_lists); "
                             f"got {prompt_lengths.dtype} of shape {prompt_lengths.shape}.")
    inputs = np.full((num, max_len), PAD_ID, np.int32)
    targets = np.full((num, max_len), IGNORE, np.int32)
    input_mask = np.zeros((num, max_len), np.float32)
    for n, row in enumerate(rows):
        sequence = [BOS_ID, *row] + ([EOS_ID] if add_eos else [])
        length = len(sequence) - 1  # positions used
        if length > max_len:
            raise ValueError(f"token_lists row {n} has {len(row)} tokens; with <bos>"
                             f"{' and <eos>' if add_eos else ''} it needs {length} positions but "
                             f"max_len is {max_len}. Raise max_len or shorten the row.")
        inputs[n, :length] = sequence[:-1]
        targets[n, :length] = sequence[1:]
        input_mask[n, :length] = 1.0
        if prompt_lengths is not None:
            p = int(prompt_lengths[n])
            if not 0 <= p < len(row):
                raise ValueError(f"prompt_lengths[{n}] = {p} but row {n} has {len(row)} tokens: the "
                                 f"prompt must leave a non-empty completion (0 <= p < {len(row)}).")
            targets[n, :p] = IGNORE
    return Dataset(inputs, targets, int(vocab_size), input_mask)


def _check_row(n: int, row, vocab_size: int) -> list[int]:
    if isinstance(row, str):
        raise TypeError(f"token_lists row {n} is a string; encode it first (WordTokenizer.encode).")
    array = np.asarray(row)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"token_lists row {n} must be a 1-D sequence of integer token ids; got "
                        f"{array.dtype} of shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"token_lists row {n} is empty; every row needs at least one token.")
    bad = np.flatnonzero((array <= PAD_ID) | (array >= vocab_size))
    if bad.size:
        shown = ", ".join(f"position {int(t)}: {int(array[t])}" for t in bad[:5])
        raise ValueError(f"token_lists row {n} has id(s) outside [1, {vocab_size}) ({shown}); ids must "
                         f"come from the vocabulary and {PAD_ID} (<pad>) is reserved for padding.")
    return array.tolist()


# --------------------------------------------------------------------------------------------------
# The fact corpus.

class Relation(NamedTuple):
    """A relation between an entity and a value.

    Attributes:
      name: short name (``"capital"``).
      noun: the word used in queries: "the {noun} of {entity} is {value}".
      templates: training paraphrases with ``{e}`` (entity) before ``{v}`` (value); the first is the
        same-order query's statement.
    """

    name: str
    noun: str
    templates: tuple[str, ...]


RELATIONS = {r.name: r for r in (
    Relation("capital", "capital", ("the capital of {e} is {v} .", "{e} 's capital is {v} .",
                                    "the capital city of {e} is called {v} .",
                                    "in {e} , the seat of government is {v} .")),
    Relation("language", "language", ("the language of {e} is {v} .", "people in {e} speak {v} .",
                                      "{e} 's official language is {v} .")),
    Relation("founder", "founder", ("the founder of {e} is {v} .", "{e} was founded by {v} .",
                                    "{e} 's founder was a person named {v} .")),
    Relation("river", "river", ("the river of {e} is {v} .", "{e} 's largest river is the {v} .",
                                "through {e} flows the {v} .")),
    Relation("mountain", "mountain", ("the mountain of {e} is {v} .", "{e} 's highest peak is {v} .",
                                      "above {e} rises mount {v} .")),
    Relation("currency", "currency", ("the currency of {e} is {v} .",
                                      "in {e} , people pay with {v} .",
                                      "{e} 's money is called {v} .")),
)}
"""The available relations by name (training templates always name the entity first)."""

# Distractors mention entities (never values) without stating a fact; {n} is a relation noun.
_DISTRACTORS = (
    "{e} is a quiet place .",
    "many travellers visit {e} in summer .",
    "the weather in {e} is mild .",
    "the people of {e} are proud of their {n} .",
    "{e} has many old roads .",
    "nobody knows much about {e} .",
    "the markets of {e} are busy .",
    "{e} and {e2} are neighbours .",
    "a letter from {e} arrived today .",
)
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "tr", "st", "sh", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "sh", "k", "nd", "m", "s")


class Fact(NamedTuple):
    """One fact and the training rows that state it.

    Attributes:
      fact_id: position in :attr:`FactCorpus.facts`.
      relation: the relation's name.
      entity: the subject (named first in every training statement).
      value: the object; it appears in no training row other than ``rows``.
      rows: sorted training-sequence indices whose text states the fact.
    """

    fact_id: int
    relation: str
    entity: str
    value: str
    rows: tuple[int, ...]


class Query(NamedTuple):
    """A query: a prompt and the completion whose log-probability is measured.

    Attributes:
      prompt: e.g. ``"the capital of vorland is"`` (same order) or ``"kesh is the capital of"``
        (flipped).
      completion: ``"kesh"`` (same order) or ``"vorland"`` (flipped).
      fact_id: the fact queried.
      order: ``"same"`` (entity then value, as in training) or ``"flipped"``.
      rows: the training rows stating the fact (``facts[fact_id].rows``).
    """

    prompt: str
    completion: str
    fact_id: int
    order: str
    rows: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FactCorpus:
    """Training sequences and queries of :func:`make_fact_corpus`.

    Attributes:
      texts: ``N`` training sequences (1-3 sentences each), for TF-IDF and inspection.
      tokens: the ``N`` sequences as token ids (no ``<bos>``/``<eos>``).
      tokenizer: the :class:`WordTokenizer` over training texts and queries.
      facts: the facts, with the rows stating each.
      queries: two per fact, ``queries[2 f]`` same order and ``queries[2 f + 1]`` flipped.
      row_facts: for each training row, the ids of the facts it states (empty for arithmetic and
        distractor-only rows).
      relations: names of the relations used.
      entities: the subject entities.
      max_len: sequence positions ``T`` of :meth:`train_dataset` / :meth:`query_dataset`: every
        training row plus ``<bos>`` and ``<eos>`` fits, rounded up to a multiple of 8.
      seed: the generating seed.
    """

    texts: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]
    tokenizer: WordTokenizer
    facts: tuple[Fact, ...]
    queries: tuple[Query, ...]
    row_facts: tuple[tuple[int, ...], ...]
    relations: tuple[str, ...]
    entities: tuple[str, ...]
    max_len: int
    seed: int

    @property
    def num_train(self) -> int:
        """Number of training sequences ``N``."""
        return len(self.texts)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size ``V``."""
        return self.tokenizer.vocab_size

    def query_indices(self, order: str | None = None) -> np.ndarray:
        """``[Q']`` positions in :attr:`queries` of the queries of ``order`` (all if None)."""
        if order not in (None, "same", "flipped"):
            raise ValueError(f"order must be None, 'same' or 'flipped', got {order!r}.")
        return np.asarray([i for i, q in enumerate(self.queries) if order is None or q.order == order],
                          np.int64)

    def query_texts(self, order: str | None = None) -> list[str]:
        """``prompt + " " + completion`` of each query (of ``order``), e.g. for TF-IDF filtering."""
        return [f"{self.queries[i].prompt} {self.queries[i].completion}"
                for i in self.query_indices(order)]

    def query_fact_ids(self, order: str | None = None) -> np.ndarray:
        """``[Q']`` int fact id of each query (of ``order``)."""
        return np.asarray([self.queries[i].fact_id for i in self.query_indices(order)], np.int64)

    def query_row_mask(self, order: str | None = None) -> np.ndarray:
        """``[Q', N]`` bool: training row ``n`` states the fact of query ``q``."""
        indices = self.query_indices(order)
        mask = np.zeros((len(indices), self.num_train), bool)
        for row, i in enumerate(indices):
            mask[row, list(self.queries[i].rows)] = True
        return mask

    def train_dataset(self, max_len: int | None = None) -> Dataset:
        """The training sequences as a causal-LM :class:`Dataset` (with ``<eos>``)."""
        return lm_dataset(self.tokens, max_len or self.max_len, self.vocab_size)

    def query_dataset(self, order: str | None = None, max_len: int | None = None) -> Dataset:
        """The queries (of ``order``) as a causal-LM :class:`Dataset` whose targets are only the
        completion (prompt targets IGNORE, no ``<eos>``), for ``completion_log_prob``."""
        token_lists, prompt_lengths = [], []
        for i in self.query_indices(order):
            prompt = self.tokenizer.encode(self.queries[i].prompt)
            token_lists.append(prompt + self.tokenizer.encode(self.queries[i].completion))
            prompt_lengths.append(len(prompt))
        return lm_dataset(token_lists, max_len or self.max_len, self.vocab_size,
                          prompt_lengths=np.asarray(prompt_lengths, np.int64), add_eos=False)


def _pseudo_words(rng: np.random.Generator, count: int, syllables: tuple[int, int],
                  taken: set[str]) -> list[str]:
    """``count`` new invented words of ``syllables`` (min, max) syllables, none in ``taken``."""
    words = []
    for _ in range(100 * count + 1000):
        if len(words) == count:
            return words
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _NUCLEI[rng.integers(len(_NUCLEI))]
                       + _CODAS[rng.integers(len(_CODAS))]
                       for _ in range(rng.integers(syllables[0], syllables[1] + 1)))
        if len(word) >= 3 and word not in taken:
            taken.add(word)
            words.append(word)
    raise ValueError(f"could not invent {count} distinct words of {syllables} syllables; ask for fewer "
                     "entities.")


def make_fact_corpus(seed: int = 0, num_entities: int = 48,
                     relations: Sequence[str] = ("capital", "language", "founder", "river"),
                     statements_per_fact: int = 10, num_arithmetic: int = 400,
                     num_distractors: int = 400, max_operand: int = 9,
                     sentences_per_sequence: Sequence[float] = (0.8, 0.15, 0.05),
                     max_len: int = 64) -> FactCorpus:
    """Invents entities and facts and writes them into training sequences; deterministic by seed.

    Each of ``num_entities`` invented entities has one fact per relation, with a value word unique to
    that fact. A fact is stated ``statements_per_fact`` times by the relation's paraphrase templates
    (cycling through them, the first template always included), always entity before value. Values
    appear in no other sentence, so flipped-order text ("kesh is the capital of vorland") never
    occurs in training. Arithmetic sentences ("3 + 4 = 7 .", operands in ``[0, max_operand]``) and
    distractors (entity mentions without a fact) are mixed in; sentences are shuffled and packed
    1, 2 or 3 to a sequence.

    Defaults give 1920 fact statements (192 facts) and 800 other sentences in about 2200 sequences
    of up to about 28 tokens (``max_len`` 32), a vocabulary of 317 words.

    Args:
      seed: seed of ``numpy.random.default_rng``; the same arguments give the same corpus.
      num_entities: number of subject entities.
      relations: names from :data:`RELATIONS` (``capital``, ``language``, ``founder``, ``river``,
        ``mountain``, ``currency``).
      statements_per_fact: training statements of each fact (>= 1).
      num_arithmetic: arithmetic sentences.
      num_distractors: distractor sentences.
      max_operand: largest arithmetic operand.
      sentences_per_sequence: probabilities of packing 1, 2, 3, ... sentences into a sequence.
      max_len: upper bound on a sequence's length with ``<bos>`` and ``<eos>``.

    Returns:
      A :class:`FactCorpus`.
    """
    unknown = [r for r in relations if r not in RELATIONS]
    if isinstance(relations, str) or unknown or not relations or len(set(relations)) != len(relations):
        raise ValueError(f"relations must be distinct names from {sorted(RELATIONS)}; got {relations!r}.")
    for name, value, low in (("num_entities", num_entities, 2), ("statements_per_fact",
                             statements_per_fact, 1), ("num_arithmetic", num_arithmetic, 0),
                             ("num_distractors", num_distractors, 0), ("max_operand", max_operand, 0),
                             ("max_len", max_len, 16)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    packing = np.asarray(sentences_per_sequence, np.float64)
    if packing.ndim != 1 or packing.size == 0 or np.any(packing < 0) or not np.isclose(packing.sum(), 1):
        raise ValueError("sentences_per_sequence must be probabilities of 1, 2, ... sentences summing to "
                         f"1; got {sentences_per_sequence!r}.")
    rng = np.random.default_rng(seed)
    relations = tuple(relations)
    nouns = [RELATIONS[r].noun for r in relations]

    reserved = {w for r in RELATIONS.values() for t in r.templates for w in WordTokenizer.split(t)}
    reserved |= {w for t in _DISTRACTORS for w in WordTokenizer.split(t)}
    reserved |= {"is", "the", "of"} | {str(i) for i in range(2 * max_operand + 1)}
    entities = _pseudo_words(rng, num_entities, (2, 3), reserved)
    values = _pseudo_words(rng, num_entities * len(relations), (1, 2), reserved)

    # Sentences as (text, fact id or -1).
    sentences: list[tuple[str, int]] = []
    facts = []
    for entity in entities:
        for name in relations:
            fact_id = len(facts)
            value = values[fact_id]
            facts.append((name, entity, value))
            templates = RELATIONS[name].templates
            order = [0, *(1 + rng.permutation(len(templates) - 1))]
            for j in range(statements_per_fact):
                sentences.append((templates[order[j % len(order)]].format(e=entity, v=value), fact_id))
    for _ in range(num_arithmetic):
        a, b = rng.integers(0, max_operand + 1, size=2)
        sentences.append((f"{a} + {b} = {a + b} .", -1))
    for _ in range(num_distractors):
        template = _DISTRACTORS[rng.integers(len(_DISTRACTORS))]
        first, second = rng.choice(num_entities, size=2, replace=False)
        text = template.format(e=entities[first], e2=entities[second],
                               n=nouns[rng.integers(len(nouns))])
        sentences.append((text, -1))

    # Shuffle, then pack consecutive sentences into sequences.
    order = rng.permutation(len(sentences))
    texts, row_facts = [], []
    start = 0
    while start < len(order):
        group = 1 + int(rng.choice(len(packing), p=packing))
        chosen = [sentences[i] for i in order[start:start + group]]
        while len(chosen) > 1 and sum(len(WordTokenizer.split(t)) for t, _ in chosen) + 2 > max_len:
            chosen.pop()
        if sum(len(WordTokenizer.split(t)) for t, _ in chosen) + 2 > max_len:
            raise ValueError(f"max_len={max_len} is too short for the sentence {chosen[0][0]!r}.")
        start += len(chosen)
        texts.append(" ".join(t for t, _ in chosen))
        row_facts.append(tuple(sorted({f for _, f in chosen if f >= 0})))

    rows_of: list[list[int]] = [[] for _ in facts]
    for row, ids in enumerate(row_facts):
        for f in ids:
            rows_of[f].append(row)
    fact_list = tuple(Fact(f, name, entity, value, tuple(rows_of[f]))
                      for f, (name, entity, value) in enumerate(facts))
    queries = []
    for fact in fact_list:
        noun = RELATIONS[fact.relation].noun
        queries.append(Query(f"the {noun} of {fact.entity} is", fact.value, fact.fact_id, "same",
                             fact.rows))
        queries.append(Query(f"{fact.value} is the {noun} of", fact.entity, fact.fact_id, "flipped",
                             fact.rows))

    tokenizer = WordTokenizer.from_texts(texts + [f"{q.prompt} {q.completion}" for q in queries])
    tokens = tuple(tuple(tokenizer.encode(t)) for t in texts)
    longest = max(len(t) for t in tokens) + 2
    return FactCorpus(texts=tuple(texts), tokens=tokens, tokenizer=tokenizer, facts=fact_list,
                      queries=tuple(queries), row_facts=tuple(row_facts), relations=relations,
                      entities=tuple(entities), max_len=min(max_len, -(-longest // 8) * 8),
                      seed=int(seed))
