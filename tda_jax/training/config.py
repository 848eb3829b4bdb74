"""Training settings and the optimizer they select."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from tda_jax.losses import Loss
from tda_jax.training.losses import resolve_loss

OPTIMIZERS = ("adamw", "sgd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (saved beside checkpoints and checked on resume).

    Attributes:
      num_epochs: passes over the training set.
      batch_size: examples per step; the last batch of an epoch is padded and masked.
      learning_rate: constant step size.
      weight_decay: decoupled weight decay (AdamW-style, applied to every parameter, biases too).
      optimizer: ``"adamw"`` (``optax.adamw``) or ``"sgd"`` (``optax.sgd`` with ``momentum``,
        after ``optax.add_decayed_weights``).
      loss: a :class:`tda_jax.losses.Loss` (``softmax_cross_entropy()`` for classification,
        ``mean_squared_error()`` for regression, ``0.5 * ||f - y||^2``, ``causal_lm_loss()`` for
        a language model: the summed next-token NLL of each sequence). A config name
        (``"cross_entropy"``, ``"mse"``, ``"causal_lm"``) is resolved once with
        :func:`tda_jax.losses.get_loss`, so ``config.loss`` is always a ``Loss``; ``to_dict``
        records its ``name``.
      momentum: SGD momentum (ignored by AdamW); 0 for plain SGD.
    """

    num_epochs: int = 60
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    optimizer: str = "adamw"
    loss: Loss | str = "cross_entropy"
    momentum: float = 0.0

    def __post_init__(self):
        if int(self.num_epochs) < 0:
            raise ValueError(f"TrainConfig.num_epochs must be >= 0, got {self.num_epochs}")
        if int(self.batch_size) < 1:
            raise ValueError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, "
                             f"got {self.optimizer!r}")
        # Resolved once: everything downstream sees a Loss object.
        object.__setattr__(self, "loss", resolve_loss(self.loss, "TrainConfig.loss"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (the loss by its name), as saved beside checkpoints."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "loss": self.loss.name}

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """The optax transformation that ``config`` describes."""
    if config.optimizer == "adamw":
        return optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    sgd = optax.sgd(config.learning_rate, momentum=config.momentum or None)
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd
