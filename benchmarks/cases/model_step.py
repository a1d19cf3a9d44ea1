"""One jitted training step of a small CNN, with regjax.linen layers against flax.linen's.

The model is the benchmark's own: three conv-bn-act-drop-pool blocks of 32
channels and a dense-bn-act-classifier head on (128, 40, 1) batches, dropout 0.5
in the blocks, built once with regjax's Dropout / BatchNorm and once with flax's
(identical parameter trees). Its shape is that of the example study's
``default_cnn('mnist1d')`` (tests/test_benchmarks.py checks the parameter tree),
so the step costs what a training step of the study costs. The step is forward,
softmax cross-entropy, gradient, optax AdamW and the batch_stats update; every
call gets the same state (no donation) and a fresh dropout key.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import regjax.linen as rnn
from benchmarks.timing import Case, calls_needed, run_cases

BATCH, LENGTH, NUM_CLASSES = 128, 40, 10
MODEL = (
  "the benchmark's CNN (the shape of examples' default_cnn('mnist1d')), "
  "conv-bn-act-drop-pool x3, dropout 0.5 in the blocks"
)


class BenchCNN(nn.Module):
  """Conv-bn-relu-dropout-maxpool blocks, then dense-BN-relu-classifier.

  Attributes:
    layers: 'regjax' (regjax.linen Dropout / BatchNorm) or 'flax' (flax.linen's).
    features: output channels of each block.
    hidden: width of the head's dense layer.
    num_classes: classifier outputs.
    kernel_size: conv window length per spatial axis.
    bn_momentum: running-statistics momentum of every BatchNorm.
    rate: dropout rate in every block.
  """

  layers: str
  features: tuple[int, ...] = (32, 32, 32)
  hidden: int = 64
  num_classes: int = NUM_CLASSES
  kernel_size: int = 3
  bn_momentum: float = 0.9
  rate: float = 0.5

  def norm(self, x: jax.Array, train: bool, name: str) -> jax.Array:
    if self.layers == "regjax":
      return rnn.BatchNorm(momentum=self.bn_momentum, deterministic=not train, name=name)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, name=name)(x)

  def drop(self, x: jax.Array, train: bool, name: str) -> jax.Array:
    layer = rnn.Dropout if self.layers == "regjax" else nn.Dropout
    return layer(rate=self.rate, name=name)(x, deterministic=not train)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    spatial = x.ndim - 2
    window = (2,) * spatial
    for i, features in enumerate(self.features):
      # No conv bias: the BatchNorm after it subtracts the mean.
      x = nn.Conv(
        features, (self.kernel_size,) * spatial, padding="SAME", use_bias=False, name=f"conv{i}"
      )(x)
      x = nn.relu(self.norm(x, train, f"bn{i}"))
      x = self.drop(x, train, f"noise{i}")
      x = nn.max_pool(x, window, strides=window, padding="SAME")
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.hidden, use_bias=False, name="dense")(x)
    x = nn.relu(self.norm(x, train, "head_bn"))
    return nn.Dense(self.num_classes, name="classifier")(x)


def make_optimizer() -> optax.GradientTransformation:
  """AdamW, learning rate 3e-3 decaying to 0 over 1000 steps (cosine), weight decay 1e-4."""
  return optax.adamw(optax.cosine_decay_schedule(3e-3, 1000), weight_decay=1e-4)


def init_state(model: nn.Module, tx: optax.GradientTransformation, x: jax.Array) -> dict[str, Any]:
  """``{'step', 'params', 'batch_stats', 'opt_state'}`` of a freshly initialized model."""
  variables = model.init(jax.random.key(0), x, train=False)
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": variables["params"],
    "batch_stats": variables["batch_stats"],
    "opt_state": tx.init(variables["params"]),
  }


def train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  state: dict[str, Any],
  x: jax.Array,
  y: jax.Array,
  key: jax.Array,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One AdamW step on ``(x, y)`` with dropout drawn from ``key``; the new state and the
  batch's train-mode loss and accuracy."""

  def loss_fn(params):
    logits, updates = model.apply(
      {"params": params, "batch_stats": state["batch_stats"]},
      x,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, (acc, updates["batch_stats"])

  (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {
    "step": state["step"] + 1,
    "params": optax.apply_updates(state["params"], updates),
    "batch_stats": batch_stats,
    "opt_state": opt_state,
  }
  return new_state, {"loss": loss, "acc": acc}


def train_step_rows(opts: argparse.Namespace) -> dict[str, Any]:
  """Times the step with regjax layers against flax layers; ``rows`` and the setup."""
  tx = make_optimizer()
  x = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, 1), jnp.float32)
  y = jax.random.randint(jax.random.key(4), (BATCH,), 0, NUM_CLASSES)
  keys = list(jax.random.split(jax.random.key(5), calls_needed(opts)))
  out: dict[str, Any] = {"batch_shape": [BATCH, LENGTH, 1], "model": MODEL, "rows": []}
  shapes, cases = {}, []
  for layers in ("regjax", "flax"):
    model = BenchCNN(layers)
    state = init_state(model, tx, x)
    shapes[layers] = jax.tree.map(lambda a: tuple(a.shape), state["params"])

    def step(state, x, y, key, model=model):
      return train_step(model, tx, state, x, y, key)

    def args(i: int, state=state) -> tuple:
      return state, x, y, keys[i]

    cases.append(
      Case(
        "trainstep",
        f"CNN train step, {layers} layers",
        "train step",
        step,
        args,
        None if layers == "flax" else "CNN train step, flax layers",
      )
    )
  out["rows"] = run_cases(cases, opts)
  out["same_param_shapes"] = shapes["regjax"] == shapes["flax"]
  if not out["same_param_shapes"]:
    print("  WARNING: the regjax and flax models' parameter shapes differ", file=sys.stderr)
  return out
