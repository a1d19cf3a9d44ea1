"""Training groups of runs and measuring each trained network.

Every config of one group (same noise op, block order and architecture) trains
through one compiled step: the noise strengths are traced arguments, and the
placement a config does not use gets strength 0, which regjax applies as the
exact identity. Runs with the same seed share initialization and batch order, so
differences between configs are paired by seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import models
import numpy as np
from data import batch_indices
from training import evaluate, init_key, init_state, make_optimizer, noise_key, train_step

from regjax import diagnostics
from study.configs import Config


@dataclasses.dataclass(frozen=True)
class Settings:
  """How every run of an experiment trains."""

  epochs: int
  batch_size: int = 64
  lr: float = 3e-3
  weight_decay: float = 1e-4
  activation: str = "relu"
  vmap: bool = False


def build_model(data: dict, config: Config, block_value, head_value, activation: str):
  """The network of ``config`` with noise strengths ``block_value``, ``head_value``."""
  arch = dict(config.arch)
  kind = arch.pop("model", "cnn")
  noise = {
    "block_noise": _noise_name(config),
    "block_noise_value": block_value,
    "head_noise": _noise_name(config),
    "head_noise_value": head_value,
    "activation": activation,
    **arch,
  }
  if kind == "mlp":
    return models.default_mlp(data["name"], data["num_classes"], **noise)
  return models.default_cnn(data["name"], data["num_classes"], order=config.order, **noise)


def eval_model(data: dict, config: Config, activation: str):
  """The noise-free network of ``config``: noise layers hold no variables and are
  the identity in eval mode, so it evaluates every config of the group."""
  return build_model(
    data, dataclasses.replace(config, method="none", value=0.0), 0.0, 0.0, activation
  )


def _noise_name(config: Config) -> str:
  return "dropout" if config.method == "none" else config.method


@dataclasses.dataclass
class Trained:
  """The runs of one group and their stacked final states."""

  runs: list[tuple[Config, int]]
  states: Any
  loss_per_epoch: list[list[float]]
  # Run index -> {path: LayerShift}, filled by `measure` for later experiments to reuse.
  shifts: dict[int, dict] = dataclasses.field(default_factory=dict)

  def state(self, r: int):
    return jax.tree.map(lambda a: a[r], self.states)


def train_group(
  configs: Sequence[Config],
  seeds: Sequence[int],
  data: dict,
  settings: Settings,
  on_epoch: Callable[[int], None],
) -> Trained:
  """Trains every (config, seed); ``on_epoch(k)`` is called as k run-epochs finish."""
  runs = [(c, s) for c in configs for s in seeds]
  strengths = jnp.asarray([c.strengths for c, _ in runs], jnp.float32)
  keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for _, s in runs])
  x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  n = x_train.shape[0]
  steps = n // settings.batch_size
  tx = make_optimizer(settings.lr, settings.epochs, steps, settings.weight_decay)
  template = configs[0]

  def model(strength):
    return build_model(data, template, strength[0], strength[1], settings.activation)

  def init(key_data, strength):
    return init_state(
      model(strength), tx, init_key(jax.random.wrap_key_data(key_data)), x_train[:2]
    )

  def step(state, strength, idx, key_data, step_index):
    key = noise_key(jax.random.wrap_key_data(key_data), step_index)
    return train_step(model(strength), tx, state, x_train[idx], y_train[idx], key)

  vinit = jax.jit(jax.vmap(init))
  vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, 0, None)))

  def train(sl, per_epoch):
    states, history = vinit(keys[sl], strengths[sl]), []
    run_seeds = [seed for _, seed in runs[sl]]
    for epoch in range(settings.epochs):
      order = np.stack(
        [batch_indices(seed, epoch, n, settings.batch_size) for seed in run_seeds], 1
      )
      losses = []
      for i in range(steps):
        states, metrics = vstep(states, strengths[sl], order[i], keys[sl], epoch * steps + i)
        losses.append(metrics["loss"])
      history.append(np.asarray(jnp.mean(jnp.stack(losses), 0)))
      on_epoch(per_epoch)
    return states, np.stack(history, 1)

  if settings.vmap:
    states, history = train(slice(None), len(runs))
  else:
    # On a 2-core CPU one vmap over runs is slower than the runs one by one
    # through the same compiled width-1 step.
    done = [train(slice(r, r + 1), 1) for r in range(len(runs))]
    states = jax.tree.map(lambda *a: jnp.concatenate(a), *[d[0] for d in done])
    history = np.concatenate([d[1] for d in done])
  return Trained(runs, states, history.tolist())


@functools.cache
def eval_fns(model):
  """Eval-mode apply and jitted evaluate, once per model, so every run of it reuses
  the diagnostics' and the evaluation's compilations."""

  def apply_fn(v, x):
    return model.apply(v, x, train=False)

  evaluate_jit = jax.jit(lambda state, x, y: evaluate(model, state, x, y, batch_size=500))
  return apply_fn, evaluate_jit


def layer_summary(layer: diagnostics.LayerShift) -> dict[str, float]:
  """One BN layer's train/eval mismatch in the three forms the study reports.

  ``shift``: mean over channels of ``max(real/moving, moving/real)`` (per channel);
  ``paper_shift``: the same max of the ratio of channel-mean variances (Li et al.'s
  figures), less sensitive to sampling noise in single channels;
  ``delta``: ``mean(real_var) / mean(moving_var)`` (< 1 when noise inflated the
  train variance); ``mean_offset``: mean over channels of
  ``|moving_mean - real_mean| / sqrt(real_var)``, the shift of the mean.
  """
  ratio = float(np.mean(layer.real_var) / np.mean(layer.moving_var))
  offset = np.abs(layer.moving_mean - layer.real_mean) / np.sqrt(layer.real_var)
  return {
    "shift": layer.mean_shift,
    "paper_shift": max(ratio, 1 / ratio),
    "delta": ratio,
    "mean_offset": float(np.mean(offset)),
  }


def measure(trained: Trained, data: dict, settings: Settings, shift_batches) -> list[dict]:
  """Per run: eval-mode test/train metrics, per-BN shift summaries, and test metrics
  after exact recalibration (mean and variance, every training sample in
  ``shift_batches``)."""
  model = eval_model(data, trained.runs[0][0], settings.activation)
  apply_fn, evaluate_jit = eval_fns(model)
  rows = []
  for r, (config, seed) in enumerate(trained.runs):
    state = trained.state(r)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    test = evaluate_jit(state, data["x_test"], data["y_test"])
    train = evaluate_jit(state, data["x_train"], data["y_train"])
    shifts = trained.shifts[r] = diagnostics.variance_shift(apply_fn, variables, shift_batches)
    recal = diagnostics.recalibrate_batch_stats(apply_fn, variables, shift_batches)
    recal_test = evaluate_jit(state.replace(batch_stats=recal), data["x_test"], data["y_test"])
    rows.append(
      {
        "config": config.label,
        "method": config.method,
        "placement": config.placement,
        "value": config.value,
        "s2": config.s2,
        "order": config.order,
        "tag": config.tag,
        "extension": config.extension,
        "seed": seed,
        "test_acc": float(test["acc"]),
        "test_loss": float(test["loss"]),
        "train_acc": float(train["acc"]),
        "train_loss": float(train["loss"]),
        "recal_test_acc": float(recal_test["acc"]),
        "recal_test_loss": float(recal_test["loss"]),
        "layers": {path: layer_summary(s) for path, s in shifts.items()},
        "loss_per_epoch": trained.loss_per_epoch[r],
      }
    )
  return rows
