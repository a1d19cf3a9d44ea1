"""Measurements beyond the standard ones, on trained runs: recalibration variants,
train-mode accuracy, and the activations a width check needs.

Recalibration variants (each keeps the trained parameters):

* ``mean+var``: :func:`regjax.diagnostics.recalibrate_batch_stats`, the exact
  (cumulative) mean and variance of every sample passed, noise off;
* ``var only``: the trained running mean, the exact variance (Hendrycks &
  Gimpel 2016 re-estimate the variance);
* ``ema``: train-mode passes with the noise off, updating the running
  statistics with the model's momentum, as continued training would;
* ``mean+var, k samples``: the exact statistics from the first ``k`` samples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from regjax import diagnostics
from study.runner import eval_fns


def _set_path(tree: dict, path: str, leaf_name: str, value) -> dict:
  """A copy of ``tree`` with ``tree[p0][p1]...[leaf_name] = value`` for ``path = 'p0/p1'``."""
  head, _, rest = path.partition("/")
  node = dict(tree[head])
  if rest:
    node = _set_path(node, rest, leaf_name, value)
  else:
    node[leaf_name] = jnp.asarray(value, tree[head][leaf_name].dtype)
  return {**tree, head: node}


def variance_only(batch_stats: dict, shifts: dict[str, diagnostics.LayerShift]) -> dict:
  """``batch_stats`` with each layer's variance set to its exact eval-mode value."""
  for path, layer in shifts.items():
    batch_stats = _set_path(batch_stats, path, "var", layer.real_var)
  return batch_stats


@functools.cache
def _ema_step(model):
  def step(variables, x):
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]

  return jax.jit(step)


def ema(model, params, batch_stats, x_train: np.ndarray, batch_size: int, passes: int = 1):
  """Running statistics after ``passes`` epochs of noise-free train-mode updates."""
  step = _ema_step(model)
  steps = x_train.shape[0] // batch_size
  for _ in range(passes):
    for i in range(steps):
      batch_stats = step(
        {"params": params, "batch_stats": batch_stats},
        x_train[i * batch_size : (i + 1) * batch_size],
      )
  return batch_stats


@functools.cache
def _train_mode_probs(model, batch_size: int):
  def probs(variables, x, key):
    def one(xb, k):
      logits, _ = model.apply(
        variables, xb, train=True, rngs={"dropout": k}, mutable=["batch_stats"]
      )
      return jax.nn.softmax(logits)

    xb = x.reshape((-1, batch_size) + x.shape[1:])
    keys = jax.random.split(key, xb.shape[0])
    return jax.lax.map(lambda a: one(*a), (xb, keys)).reshape(x.shape[0], -1)

  return jax.jit(probs)


def train_mode_accuracy(model, variables, x, y, key, passes: int, batch_size: int = 500):
  """Test accuracy in train mode (noise on, BN on each batch's statistics): of one
  noisy pass, and of the softmax averaged over ``passes`` noisy passes."""
  n = (x.shape[0] // batch_size) * batch_size
  x, y = jnp.asarray(x[:n]), np.asarray(y[:n])
  probs_fn = _train_mode_probs(model, batch_size)
  probs = [np.asarray(probs_fn(variables, x, k)) for k in jax.random.split(key, passes)]
  single = float(np.mean(np.argmax(probs[0], -1) == y))
  averaged = float(np.mean(np.argmax(np.mean(probs, 0), -1) == y))
  return single, averaged


def accuracy(model, state, batch_stats, data) -> float:
  """Eval-mode test accuracy with ``batch_stats`` in place of the trained ones."""
  evaluate_jit = eval_fns(model)[1]
  return float(
    evaluate_jit(state.replace(batch_stats=batch_stats), data["x_test"], data["y_test"])["acc"]
  )


def captured_input(model, variables, x, layer: str, activation) -> np.ndarray:
  """``activation(output of layer)`` in eval mode, float64 (the units a noise sees)."""
  _, state = model.apply(
    variables,
    x,
    train=False,
    capture_intermediates=(lambda module, name: module.name == layer and name == "__call__"),
    mutable=["intermediates"],
  )
  out = state["intermediates"][layer]["__call__"][0]
  return np.asarray(activation(out), np.float64)
