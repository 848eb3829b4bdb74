"""Continual learning with function-space (or parameter-space) penalties, vmapped over seeds.

Task ``t`` is trained on ``L_t(theta) + lambda * sum_{s < t} D_s(theta)`` where ``D_s`` estimates
the distance between the current network and the one that finished task ``s``, on task ``s``'s
head and data: ``finetune`` (no penalty), ``ewc`` (diagonal-Fisher quadratic), ``kfac`` (K-FAC
quadratic), ``coreset`` (the true KL FSD on ``m`` stored inputs of task ``s``) and ``laftr``
(the LAFTR KL FSD from task ``s``'s summary). The step is the library's one optax update
(:func:`tda_jax.optimization.gradient_step`); training runs under ``lax.scan`` and ``vmap`` over
seeds, and the previous tasks' states sit in fixed slots (masked until filled), so each method
compiles one program per benchmark.

Benchmarks (MNIST-1D): ``split`` (5 tasks of 2 classes, multi-head: task ``t`` reads logits
``2t, 2t + 1``) and ``permuted`` (task ``t`` permutes the 40 input positions with a fixed
permutation, task 0 the identity; one 10-way head).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tda_jax import fsd, models, training
from tda_jax.curvature import Curvature
from tda_jax.data import Dataset, subset
from tda_jax.losses import softmax_cross_entropy
from tda_jax.optimization import gradient_step

METHODS = ("finetune", "ewc", "kfac", "coreset", "laftr")


class Task(NamedTuple):
    train: Dataset
    test: Dataset
    head: tuple[int, ...]


def make_tasks(kind: str, train: Dataset, test: Dataset, num_tasks: int, seed: int) -> list[Task]:
    """The task sequence of benchmark ``kind`` (``"split"`` or ``"permuted"``)."""
    tasks = []
    if kind == "split":
        for t in range(num_tasks):
            classes = (2 * t, 2 * t + 1)
            parts = []
            for data in (train, test):
                idx = np.flatnonzero(np.isin(data.targets, classes))
                picked = subset(data, idx)
                parts.append(Dataset(picked.inputs, (picked.targets - 2 * t).astype(np.int32), 2))
            tasks.append(Task(parts[0], parts[1], classes))
        return tasks
    rng = np.random.default_rng(seed)
    d = train.inputs.shape[1]
    for t in range(num_tasks):
        perm = np.arange(d) if t == 0 else rng.permutation(d)
        tasks.append(Task(Dataset(train.inputs[:, perm], train.targets, 10),
                          Dataset(test.inputs[:, perm], test.targets, 10), tuple(range(10))))
    return tasks


def head_params(params: dict, head: jax.Array, last: str) -> dict:
    """The params with the output layer ``last`` restricted to the columns ``head`` (traced)."""
    out = dict(params)
    out[last] = {"kernel": jnp.take(params[last]["kernel"], head, axis=1),
                 "bias": jnp.take(params[last]["bias"], head)}
    return out


class Penalty(NamedTuple):
    """A method's per-task state (stacked over seeds, then over task slots) and its distance."""

    state: Any
    distance: Any  # (state_slot, head_params, key) -> scalar


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class ContinualRunner:
    """Trains ``S`` seeds through a task sequence with one method; see the module docstring."""

    def __init__(self, method: str, hidden: tuple[int, ...], tasks: list[Task], config: Any):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method, self.tasks, self.config = method, tasks, config
        self.model = models.MLP(hidden_sizes=tuple(hidden), num_outputs=10)
        self.head_size = len(tasks[0].head)
        self.head_model = models.MLP(hidden_sizes=tuple(hidden), num_outputs=self.head_size)
        self.last = f"Dense_{len(hidden)}"
        self.optimizer = training.make_optimizer(training.TrainConfig(
            learning_rate=config.learning_rate, weight_decay=0.0))
        self.ce = softmax_cross_entropy()
        self._train_fn = None
        self._curv_template: Curvature | None = None

    # --- per-task states -------------------------------------------------------------------
    def task_state(self, params: dict, task: Task, key: jax.Array) -> Any:
        """What the method keeps of task ``task`` after training it (one seed)."""
        p0 = head_params(params, jnp.asarray(task.head), self.last)
        if self.method == "laftr":
            return {"p0": p0, "summary": fsd.summarize(
                self.head_model, p0, task.train, per_class=self.config.laftr_per_class)}
        if self.method == "coreset":
            core = fsd.select_coreset(key, task.train, self.config.coreset_size)
            return {"p0": p0, "inputs": jnp.asarray(core.inputs)}
        if self.method in ("ewc", "kfac"):
            strategy = "diagonal" if self.method == "ewc" else "kfac"
            curv = fsd.fit_quadratic(self.head_model, p0, task.train, strategy=strategy,
                                     distance="kl")
            self._curv_template = curv
            return {"p0": p0, "factors": curv.factors}
        return {"p0": p0}

    def distance(self, state: Any, p1: dict, key: jax.Array) -> jax.Array:
        c = self.config
        if self.method == "laftr":
            return fsd.laftr_fsd(state["summary"], state["p0"], p1, variant=c.laftr_variant,
                                 distance="kl", key=key, num_samples=c.laftr_samples)
        if self.method == "coreset":
            return fsd.true_fsd(fsd.HeadApply(self.head_model), state["p0"], p1,
                                state["inputs"], distance="kl")
        if self.method in ("ewc", "kfac"):
            t = self._curv_template
            curv = Curvature(t.strategy, t.specs, state["factors"], t.settings)
            return fsd.quadratic_fsd(curv, state["p0"], p1)
        return jnp.zeros(())

    # --- training ----------------------------------------------------------------------------
    def _build_train(self, num_steps: int, batch_size: int):
        lam = float(self.config.penalty[self.method])

        def objective(params, x, y, head, slots, mask, heads, key):
            logits = self.model.apply({"params": params}, x)
            loss = jnp.mean(self.ce.per_example(jnp.take(logits, head, axis=1), y))
            if self.method == "finetune":
                return loss
            keys = jax.random.split(key, mask.shape[0])
            dist = jax.vmap(lambda s, h, k: self.distance(
                s, head_params(params, h, self.last), k))(slots, heads, keys)
            return loss + lam * jnp.sum(mask * dist)

        update = gradient_step(objective, self.optimizer)

        def train_one(params, key, x_all, y_all, head, slots, mask, heads):
            opt_state = self.optimizer.init(params)
            n = x_all.shape[0]
            per_epoch = n // batch_size
            epochs = -(-num_steps // per_epoch)
            perm_keys = jax.random.split(key, epochs + 1)
            order = jnp.concatenate([jax.random.permutation(k, n)[:per_epoch * batch_size]
                                     for k in perm_keys[:epochs]])
            batches = order[:num_steps * batch_size].reshape(num_steps, batch_size)
            step_keys = jax.random.split(perm_keys[-1], num_steps)

            def body(carry, inp):
                params, opt_state = carry
                idx, k = inp
                params, opt_state, value, _ = update(params, opt_state, x_all[idx], y_all[idx],
                                                     head, slots, mask, heads, k)
                return (params, opt_state), value

            (params, _), values = jax.lax.scan(body, (params, opt_state), (batches, step_keys))
            return params, values

        return jax.jit(jax.vmap(train_one, in_axes=(0, 0, None, None, None, 0, None, None)))

    def run(self, key: jax.Array, num_seeds: int) -> np.ndarray:
        """Trains every seed through the tasks; returns accuracies ``[S, T_trained, T]`` (row
        ``t``: test accuracy on each task after training task ``t``)."""
        c = self.config
        tasks = self.tasks
        num_tasks = len(tasks)
        init_key, run_key = jax.random.split(key)
        x0 = jnp.asarray(tasks[0].train.inputs[:1])
        params = jax.vmap(lambda k: self.model.init(k, x0)["params"])(
            jax.random.split(init_key, num_seeds))
        heads = jnp.asarray([t.head for t in tasks], jnp.int32)
        slots, mask = None, jnp.zeros((num_tasks,), jnp.float32)
        accuracy = np.zeros((num_seeds, num_tasks, num_tasks))
        for t, task in enumerate(tasks):
            n = task.train.inputs.shape[0]
            batch = int(min(c.batch_size, n))
            steps = int(c.epochs * (n // batch))
            if slots is None:  # a placeholder state fixes the slot shapes (masked out)
                one = self.task_state(jax.tree.map(lambda v: v[0], params), task,
                                      jax.random.key(0))
                slots = jax.tree.map(
                    lambda v: jnp.zeros((num_seeds, num_tasks, *jnp.shape(v)), jnp.asarray(v).dtype),
                    one)
            if self._train_fn is None or self._train_fn[0] != (steps, batch):
                self._train_fn = ((steps, batch), self._build_train(steps, batch))
            keys = jax.random.split(jax.random.fold_in(run_key, t), num_seeds)
            params, _ = self._train_fn[1](params, keys, jnp.asarray(task.train.inputs),
                                          jnp.asarray(task.train.targets), heads[t], slots, mask,
                                          heads)
            for s in range(num_seeds):
                for u in range(num_tasks):
                    accuracy[s, t, u] = self.accuracy(jax.tree.map(lambda v: v[s], params),
                                                      tasks[u])
            if t + 1 < num_tasks and self.method != "finetune":
                states = [self.task_state(jax.tree.map(lambda v: v[s], params), task,
                                          jax.random.fold_in(keys[s], 1))
                          for s in range(num_seeds)]
                new = _stack(states)
                slots = jax.tree.map(lambda buf, v: buf.at[:, t].set(v), slots, new)
                mask = mask.at[t].set(1.0)
        return accuracy

    def accuracy(self, params: dict, task: Task) -> float:
        logits = self.model.apply({"params": params}, jnp.asarray(task.test.inputs))
        pred = jnp.argmax(jnp.take(logits, jnp.asarray(task.head), axis=1), axis=1)
        return float(jnp.mean(pred == jnp.asarray(task.test.targets)))
