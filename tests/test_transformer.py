"""Tests of tda_jax.models.TransformerLM and of training it on token data with causal_lm_loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tda_jax.data import Dataset
from tda_jax.losses import IGNORE, causal_lm_loss
from tda_jax.models import TransformerLM, num_outputs_of
from tda_jax.training import (
    TrainConfig,
    check_training_data,
    evaluate,
    load_params,
    saved_steps,
    train,
)
from tda_jax.training.step import jitted_train_step, split_training_key

VOCAB, MAX_LEN = 7, 6


def _model(tie=False, num_layers=2):
    return TransformerLM(vocab_size=VOCAB, max_len=MAX_LEN, d_model=8, num_heads=2,
                         num_layers=num_layers, d_mlp=16, tie_embeddings=tie)


def _tokens(key, shape):
    return jax.random.randint(key, shape, 0, VOCAB, dtype=jnp.int32)


def _param_names(variables):
    return {"/".join(k.key for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}


def _successor_data(n=24, seed=0):
    """Sequences counting up mod (VOCAB - 1) in ids 1..VOCAB-1 from a random start, right-padded
    with id 0; targets are the next token, IGNORE at the last real position and at padding."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, VOCAB - 1, n)
    lengths = rng.integers(3, MAX_LEN + 1, n)
    positions = np.arange(MAX_LEN)
    real = positions[None, :] < lengths[:, None]
    inputs = np.where(real, 1 + (starts[:, None] + positions[None, :]) % (VOCAB - 1), 0)
    has_next = positions[None, :] < lengths[:, None] - 1
    targets = np.where(has_next, np.roll(inputs, -1, axis=1), IGNORE)
    return Dataset(inputs.astype(np.int32), targets.astype(np.int32), VOCAB,
                   real.astype(np.float32))


def _nll_numpy(logits, targets, count_ignored=False):
    """Per-sequence summed next-token NLL in float64; ``count_ignored`` is the planted bug that
    scores IGNORE positions as if their target were token 0."""
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.maximum(targets, 0)[..., None], -1)[..., 0]
    keep = np.ones_like(picked) if count_ignored else (targets != IGNORE)
    return -(picked * keep).sum(-1)


@pytest.fixture(scope="module")
def untied():
    model = _model()
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, MAX_LEN), jnp.int32))


@pytest.mark.parametrize("tie", [False, True])
def test_output_shape_and_layer_names(tie):
    model = _model(tie)
    tokens = _tokens(jax.random.PRNGKey(1), (3, 4))  # shorter than max_len
    variables = model.init(jax.random.PRNGKey(0), tokens)
    logits = model.apply(variables, tokens)
    assert logits.shape == (3, 4, VOCAB) and logits.dtype == jnp.float32
    assert num_outputs_of(model, tokens[:1]) == VOCAB
    names = _param_names(variables)
    for i in range(2):
        for layer in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"):
            assert {f"block_{i}/{layer}/kernel", f"block_{i}/{layer}/bias"} <= names
        assert {f"block_{i}/ln_attn/scale", f"block_{i}/ln_mlp/scale"} <= names
    assert {"embed/embedding", "pos_embedding", "ln_final/scale"} <= names
    assert variables["params"]["pos_embedding"].shape == (MAX_LEN, 8)
    assert ("head/kernel" in names) == (not tie)


def test_causal(untied):
    model, variables = untied
    tokens = _tokens(jax.random.PRNGKey(2), (2, MAX_LEN))
    base = model.apply(variables, tokens)
    for t in range(MAX_LEN):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
        logits = model.apply(variables, changed)
        np.testing.assert_allclose(logits[:, :t], base[:, :t], rtol=1e-6, atol=1e-6)
        # ... while position t itself does see its token (the check above is not vacuous).
        assert np.abs(np.asarray(logits[:, t] - base[:, t])).max() > 1e-4


def test_tied_head_is_the_transposed_embedding():
    tied, untied = _model(tie=True), _model(tie=False)
    tokens = _tokens(jax.random.PRNGKey(3), (2, 5))
    variables = tied.init(jax.random.PRNGKey(0), tokens)
    untied_names = _param_names(untied.init(jax.random.PRNGKey(0), tokens))
    assert untied_names - _param_names(variables) == {"head/kernel", "head/bias"}
    assert not any(name.startswith("head") for name in _param_names(variables))
    logits, state = tied.apply(variables, tokens,
                               capture_intermediates=lambda m, _: m.name == "ln_final")
    final = state["intermediates"]["ln_final"]["__call__"][0]  # [B, T, d_model]
    expected = np.einsum("btd,vd->btv", np.asarray(final, np.float64),
                         np.asarray(variables["params"]["embed"]["embedding"], np.float64))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_context_raises(untied):
    model, variables = untied
    too_long = jnp.zeros((1, MAX_LEN + 1), jnp.int32)
    with pytest.raises(ValueError, match="exceeds the model's context max_len"):
        model.apply(variables, too_long)
    with pytest.raises(ValueError, match="exceeds the model's context max_len"):
        model.init(jax.random.PRNGKey(0), too_long)
    with pytest.raises(TypeError, match="integer token ids"):
        model.apply(variables, jnp.zeros((1, 3), jnp.float32))


def test_batch_loss_is_masked_sequence_nll(untied):
    model, variables = untied
    data = _successor_data()
    config = TrainConfig(loss="causal_lm", batch_size=5)
    # Four real rows (with IGNORE positions) and one padding row (mask 0) repeating row 0.
    rows = np.array([0, 1, 2, 3, 0])
    batch = {"inputs": data.inputs[rows], "targets": data.targets[rows],
             "mask": np.array([1, 1, 1, 1, 0], np.float32)}
    assert (batch["targets"][:4] == IGNORE).any()
    step = jitted_train_step(model, config)  # the step that train() runs
    _, _, loss = step.step(variables, step.train_step.init_opt_state(variables), batch)
    logits = model.apply(variables, batch["inputs"])
    expected = _nll_numpy(logits, batch["targets"])[:4].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # A loss that also scored the IGNORE positions would be far outside that tolerance.
    planted = _nll_numpy(logits, batch["targets"], count_ignored=True)[:4].mean()
    assert abs(planted - expected) > 1e-2 * expected


def test_train_lowers_loss_and_evaluate_is_per_token(tmp_path):
    model = _model(num_layers=1)
    data = _successor_data()
    config = TrainConfig(num_epochs=10, batch_size=8, learning_rate=2e-2, weight_decay=0.0,
                         loss="causal_lm")
    key = jax.random.PRNGKey(4)
    initial = model.init(split_training_key(key)[0], jnp.asarray(data.inputs[:1]))
    trained = train(key, model, None, data, config, checkpoint_steps=(0,),
                    checkpoint_dir=tmp_path / "run")
    assert saved_steps(tmp_path / "run") == [0, 30]
    np.testing.assert_array_equal(load_params(tmp_path / "run", 30)["params"]["pos_embedding"],
                                  trained["params"]["pos_embedding"])
    before, after = evaluate(model, initial, data), evaluate(model, trained, data)
    assert after["loss"] < 0.5 * before["loss"], (before, after)
    assert after["accuracy"] > 0.8, after
    # evaluate: mean NLL and accuracy per token over the positions with a target.
    logits = np.asarray(model.apply(trained, data.inputs))
    has_target = data.targets != IGNORE
    assert after["num_tokens"] == has_target.sum()
    np.testing.assert_allclose(after["loss"],
                               _nll_numpy(logits, data.targets).sum() / has_target.sum(),
                               rtol=1e-5)
    correct = (logits.argmax(-1) == data.targets) & has_target
    np.testing.assert_allclose(after["accuracy"], correct.sum() / has_target.sum(), rtol=1e-6)


def test_bad_token_data_is_rejected_naming_rows():
    model, data, loss = _model(), _successor_data(n=8), causal_lm_loss()
    assert check_training_data(model, data, loss) == 8
    targets = data.targets.copy()
    targets[3, 1] = VOCAB
    with pytest.raises(ValueError, match=r"targets.*row 3 position 1: 7"):
        check_training_data(model, data._replace(targets=targets), loss)
    for bad in (VOCAB, -1):
        inputs = data.inputs.copy()
        inputs[5, 2] = bad
        with pytest.raises(ValueError, match=rf"train_data\.inputs.*row 5 position 2: {bad}"):
            check_training_data(model, data._replace(inputs=inputs), loss)
    row = int(np.flatnonzero(data.input_mask[:, -1] == 0)[0])  # a right-padded sequence
    targets = data.targets.copy()
    targets[row, -1] = 1
    with pytest.raises(ValueError, match=rf"padding position.*row {row} position {MAX_LEN - 1}"):
        check_training_data(model, data._replace(targets=targets), loss)
    with pytest.raises(ValueError, match="vocab_size=9"):
        check_training_data(model, data._replace(num_classes=9), loss)
    with pytest.raises(ValueError, match="token loss"):
        check_training_data(model, data, TrainConfig().loss)  # cross-entropy on [B, T, V]
    with pytest.raises(ValueError, match=r"row 4 position 0: 7"):
        targets = data.targets.copy()
        targets[4, 0] = VOCAB
        train(jax.random.PRNGKey(0), model, None, data._replace(targets=targets),
              TrainConfig(num_epochs=1, batch_size=4, loss="causal_lm"))
