"""Training: a jitted single-model loop with trajectory checkpoints, and vectorized retraining.

Model convention: training and evaluation take the Flax ``nn.Module`` and return / take its full
variables (``model.init``'s dict, ``{"params": ...}``). Attribution takes a pure
``apply_fn(params, inputs)``; use ``tda_jax.models.apply_fn_of(model)`` with
``variables["params"]`` (a named, hashable callable, so cached compilations are reused).

Losses are :class:`tda_jax.losses.Loss` objects (``TrainConfig(loss=...)`` also accepts the config
names ``"cross_entropy"`` / ``"mse"`` / ``"causal_lm"``, resolved once with
``tda_jax.losses.get_loss``). The optax loop is the shared one of :mod:`tda_jax.optimization`;
:func:`train_in_chunks` is the one driver that retrains many models (``train_many`` and LDS ground
truth).

Language models (e.g. :class:`tda_jax.models.TransformerLM`) train on sequence data: inputs
``[N, T]`` int32 token ids, targets ``[N, T]`` next-token ids with ``-1`` where no loss is taken,
``loss="causal_lm"``. The objective is then the mean over sequences of each sequence's summed token
NLL (the per-example loss that curvature and scores use); :func:`evaluate` reports per-token NLL and
next-token accuracy.
"""

from tda_jax.training.checkpoints import load_data_order, load_params, saved_steps
from tda_jax.training.checks import check_training_data
from tda_jax.training.config import TrainConfig, make_optimizer
from tda_jax.training.evaluate import evaluate
from tda_jax.training.losses import (
    correct_per_example,
    cross_entropy_per_example,
    masked_mean,
    per_example_loss,
    resolve_loss,
    squared_error_per_example,
)
from tda_jax.training.step import TrainStep, make_train_step
from tda_jax.training.train import train
from tda_jax.training.train_many import (
    make_train_one,
    subset_indices,
    train_in_chunks,
    train_many,
)

__all__ = [
    "TrainConfig",
    "TrainStep",
    "check_training_data",
    "correct_per_example",
    "cross_entropy_per_example",
    "evaluate",
    "load_data_order",
    "load_params",
    "make_optimizer",
    "make_train_one",
    "make_train_step",
    "masked_mean",
    "per_example_loss",
    "resolve_loss",
    "saved_steps",
    "squared_error_per_example",
    "subset_indices",
    "train",
    "train_in_chunks",
    "train_many",
]
