"""Training: a jitted single-model loop with trajectory checkpoints, and vectorized retraining."""

from tda_jax.training.checkpoints import load_data_order, load_params, saved_steps
from tda_jax.training.config import TrainConfig, make_optimizer
from tda_jax.training.evaluate import evaluate
from tda_jax.training.losses import (
    correct_per_example,
    cross_entropy_per_example,
    masked_mean,
    per_example_loss,
    squared_error_per_example,
)
from tda_jax.training.step import TrainStep, make_train_step
from tda_jax.training.train import train
from tda_jax.training.train_many import make_train_one, subset_indices, train_many

__all__ = [
    "TrainConfig",
    "TrainStep",
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
    "saved_steps",
    "squared_error_per_example",
    "subset_indices",
    "train",
    "train_many",
]
