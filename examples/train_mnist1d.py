"""Train a small 1-D CNN (or MLP) with regjax BatchNorm and noise layers on MNIST-1D.

MNIST-1D (Greydanus 2020) is generated offline by the ``mnist1d`` package:
4000 train and 1000 test sequences of length 40, 10 classes. Nothing is
downloaded.

Every hidden block is ``conv/dense -> regjax.linen.BatchNorm -> relu -> noise``,
where the noise layer is chosen by ``--noise``:

  none      no noise layer
  dropout   regjax.linen.Dropout(rate)          noise variance rate / (1 - rate)
  gaussian  regjax.linen.GaussianDropout(rate)  noise variance rate / (1 - rate)
  uout      regjax.linen.Uout(beta)             noise variance beta**2 / 3

Training is a Python loop over one ``jax.jit``-compiled step (on XLA:CPU this
is several times faster than a ``jax.lax.scan`` over the epoch); evaluation
runs in deterministic mode (``train=False``: running BatchNorm statistics, no
noise).

Usage (from the repository root):

  python examples/train_mnist1d.py                      # default CNN, no noise
  python examples/train_mnist1d.py --noise dropout --rate 0.1
  python examples/train_mnist1d.py --noise uout --beta 0.1
  python examples/train_mnist1d.py --model mlp
  python examples/train_mnist1d.py --quick --out /tmp/m.json   # smoke test

The progress bar shows the epoch's mean train-mode batch loss and accuracy
(noise on) and the eval-mode test accuracy. Metrics (config, per-epoch
history, final eval-mode train/test loss and accuracy, wall time) go to a JSON
file, by default
``runs/train_mnist1d/<timestamp>/metrics.json``.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import regjax
import regjax.linen as rnn

NOISE_CHOICES = ("none", "dropout", "gaussian", "uout")
MODEL_CHOICES = ("cnn", "mlp")
NUM_CLASSES = 10
# mnist1d's own default data seed (get_dataset_args().seed); the published
# MNIST-1D accuracies are for this dataset.
MNIST1D_DEFAULT_SEED = 42


# ----------------------------------------------------------------------------- data


def load_mnist1d(data_seed: int | None = None) -> dict[str, np.ndarray]:
  """Generates MNIST-1D offline and standardizes it with train statistics.

  Args:
    data_seed: ``args.seed`` for ``mnist1d.data.make_dataset``; None keeps
      mnist1d's default (42), the dataset of the published results.

  Returns:
    ``{'x': (4000, 40, 1) float32, 'y': (4000,) int32, 'x_test': (1000, 40, 1),
    'y_test': (1000,)}``; inputs are channels-last, standardized with one mean
    and one standard deviation computed on the training inputs.
  """
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=import-outside-toplevel

  args = get_dataset_args()
  if data_seed is not None:
    args.seed = int(data_seed)
  # make_dataset reseeds Python's and NumPy's global generators (set_seed);
  # keep the caller's global state as it was.
  np_state = np.random.get_state()
  try:
    data = make_dataset(args)
  finally:
    np.random.set_state(np_state)

  x = np.asarray(data["x"], np.float32)
  x_test = np.asarray(data["x_test"], np.float32)
  mean, std = x.mean(), x.std()
  return {
      "x": ((x - mean) / std)[..., None],
      "y": np.asarray(data["y"], np.int32),
      "x_test": ((x_test - mean) / std)[..., None],
      "y_test": np.asarray(data["y_test"], np.int32),
  }


# ---------------------------------------------------------------------------- model


def make_noise(noise: str, rate: float, beta: float) -> nn.Module | None:
  """The noise layer for ``--noise`` (None for 'none'); all draw from the 'dropout' stream."""
  if noise == "none":
    return None
  if noise == "dropout":
    return rnn.Dropout(rate)
  if noise == "gaussian":
    return rnn.GaussianDropout(rate)
  if noise == "uout":
    return rnn.Uout(beta)
  raise ValueError(f"unknown noise {noise!r}; choose one of {NOISE_CHOICES}")


class Block(nn.Module):
  """``conv or dense (no bias) -> BatchNorm -> relu -> noise``."""

  features: int
  noise: str = "none"
  rate: float = 0.0
  beta: float = 0.0
  kernel_size: int | None = None  # None: Dense, else a 1-D Conv
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kernel_size is None:
      x = nn.Dense(self.features, use_bias=False)(x)
    else:
      x = nn.Conv(self.features, (self.kernel_size,), strides=(self.strides,),
                  padding="SAME", use_bias=False)(x)
    x = rnn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    layer = make_noise(self.noise, self.rate, self.beta)
    if layer is not None:
      x = layer(x, deterministic=not train)
    return x


class CNN1D(nn.Module):
  """Three 1-D conv blocks over the length-40 sequence, then a dense block."""

  noise: str = "none"
  rate: float = 0.0
  beta: float = 0.0
  channels: tuple[int, ...] = (32, 32, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    # x: (batch, 40, 1), channels last.
    kw = dict(noise=self.noise, rate=self.rate, beta=self.beta)
    x = Block(self.channels[0], kernel_size=5, strides=1, **kw)(x, train)  # length 40
    for c in self.channels[1:]:
      x = Block(c, kernel_size=3, strides=2, **kw)(x, train)  # 20, 10
    x = x.reshape(x.shape[0], -1)
    x = Block(self.hidden, **kw)(x, train)
    return nn.Dense(NUM_CLASSES)(x)


class MLP(nn.Module):
  """Dense blocks on the flattened sequence."""

  noise: str = "none"
  rate: float = 0.0
  beta: float = 0.0
  hidden: tuple[int, ...] = (256, 256)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for h in self.hidden:
      x = Block(h, noise=self.noise, rate=self.rate, beta=self.beta)(x, train)
    return nn.Dense(NUM_CLASSES)(x)


def make_model(model: str = "cnn", noise: str = "none", rate: float = 0.1,
               beta: float = 0.1) -> nn.Module:
  """The classifier: ``model`` in {'cnn', 'mlp'}, noise layer per ``noise``."""
  if noise not in NOISE_CHOICES:
    raise ValueError(f"unknown noise {noise!r}; choose one of {NOISE_CHOICES}")
  if model == "cnn":
    return CNN1D(noise=noise, rate=rate, beta=beta)
  if model == "mlp":
    return MLP(noise=noise, rate=rate, beta=beta)
  raise ValueError(f"unknown model {model!r}; choose one of {MODEL_CHOICES}")


# ------------------------------------------------------------------------- training


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def _loss_and_accuracy(logits, labels):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, accuracy


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """A jitted ``(state, x, y, idx, dropout_key) -> (state, loss, accuracy)``.

  One optimizer step on the batch ``x[idx], y[idx]`` (the gather happens inside
  ``jit``, so the full arrays stay on the device). Step ``t`` draws its noise
  from ``fold_in(dropout_key, t)``. The loss and accuracy are those of the batch
  in train mode (noise on, batch statistics).
  """

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: TrainState, x, y, idx, dropout_key):
    xb, yb = x[idx], y[idx]
    step_key = jax.random.fold_in(dropout_key, state.step)

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, xb, train=True,
          rngs={"dropout": step_key}, mutable=["batch_stats"])
      loss, accuracy = _loss_and_accuracy(logits, yb)
      return loss, (accuracy, updates["batch_stats"])

    (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state)
    return state, loss, accuracy

  return train_step


@functools.partial(jax.jit, static_argnums=(2, 3))
def epoch_batches(shuffle_key, epoch, n: int, batch_size: int):
  """``(n // batch_size, batch_size)`` sample indices for ``epoch``.

  A permutation drawn with ``fold_in(shuffle_key, epoch)``; the incomplete last
  batch is dropped (a different remainder each epoch).
  """
  steps = n // batch_size
  perm = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n)
  return perm[: steps * batch_size].reshape(steps, batch_size)


def make_evaluate(model: nn.Module):
  """A jitted ``(state, x, y) -> (loss, accuracy)`` in eval mode (train=False)."""

  @jax.jit
  def evaluate(state, x, y):
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                         train=False)
    return _loss_and_accuracy(logits, y)

  return evaluate


def train(model: nn.Module, data: dict[str, np.ndarray], *, epochs: int = 30,
          batch_size: int = 128, lr: float = 3e-3, weight_decay: float = 1e-4,
          seed: int = 0, progress: bool = True) -> dict[str, Any]:
  """Trains ``model`` on ``data`` (from :func:`load_mnist1d`).

  Adam(W) with a cosine learning-rate decay to 0 over all steps. Keys:
  ``root = jax.random.key(seed)``; parameters from ``fold_in(root, 0)``, noise
  from ``fold_in(root, 1)``, batch order from ``fold_in(root, 2)``.

  Returns:
    ``{'state': TrainState, 'history': [per-epoch dicts], 'final': {...},
    'train_seconds': float}``. Each history entry holds the epoch's mean
    ``train_batch_loss``/``train_batch_acc`` (train mode: noise on, batch
    statistics) and the eval-mode ``test_loss``/``test_acc`` after the epoch;
    ``final`` holds eval-mode loss and accuracy on the full train and test
    sets.
  """
  n = data["x"].shape[0]
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}]; got {batch_size}")
  if epochs < 1:
    raise ValueError(f"epochs must be >= 1; got {epochs}")
  steps_per_epoch = n // batch_size

  root = jax.random.key(seed)
  keys = {"dropout": jax.random.fold_in(root, 1), "shuffle": jax.random.fold_in(root, 2)}
  x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
  x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])

  # init runs in eval mode: no noise stream needed, running statistics untouched.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.fold_in(root, 0), x[:batch_size])
  schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=tx.init(variables["params"]))

  train_step = make_train_step(model, tx)
  evaluate = make_evaluate(model)

  history = []
  start = time.perf_counter()
  epoch_iter = range(epochs)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(epoch_iter, desc="epochs", unit="epoch", file=sys.stderr)
    epoch_iter = bar
  for epoch in epoch_iter:
    # A Python loop over a jitted step: on XLA:CPU this runs several times
    # faster than the same epoch as a lax.scan inside one jit.
    losses, accuracies = [], []
    for idx in np.asarray(epoch_batches(keys["shuffle"], epoch, n, batch_size)):
      state, loss, accuracy = train_step(state, x, y, idx, keys["dropout"])
      losses.append(loss)
      accuracies.append(accuracy)
    train_loss, train_acc = jnp.mean(jnp.stack(losses)), jnp.mean(jnp.stack(accuracies))
    test_loss, test_acc = evaluate(state, x_test, y_test)
    record = {"epoch": epoch + 1, "train_batch_loss": float(train_loss),
              "train_batch_acc": float(train_acc), "test_loss": float(test_loss),
              "test_acc": float(test_acc)}
    history.append(record)
    if bar is not None:
      bar.set_postfix(loss=f"{record['train_batch_loss']:.3f}",
                      acc=f"{record['train_batch_acc']:.3f}",
                      test_acc=f"{record['test_acc']:.3f}")
  if bar is not None:
    bar.close()
  train_loss, train_acc = evaluate(state, x, y)
  test_loss, test_acc = evaluate(state, x_test, y_test)
  final = {"train_loss": float(train_loss), "train_acc": float(train_acc),
           "test_loss": float(test_loss), "test_acc": float(test_acc)}
  return {"state": state, "history": history, "final": final,
          "train_seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description="Train a small CNN/MLP with regjax BatchNorm and a noise layer on MNIST-1D "
      "(generated offline; nothing is downloaded).")
  p.add_argument("--model", choices=MODEL_CHOICES, default="cnn",
                 help="network (default: %(default)s)")
  p.add_argument("--noise", choices=NOISE_CHOICES, default="none",
                 help="noise layer after every BatchNorm + relu (default: %(default)s)")
  p.add_argument("--rate", type=float, default=0.1,
                 help="drop rate of --noise dropout / gaussian; noise variance rate/(1-rate) "
                 "(default: %(default)s)")
  p.add_argument("--beta", type=float, default=0.1,
                 help="half-width of --noise uout; noise variance beta**2/3 "
                 "(default: %(default)s)")
  p.add_argument("--epochs", type=int, default=30,
                 help="passes over the training set (default: %(default)s)")
  p.add_argument("--batch-size", type=int, default=128,
                 help="the incomplete last batch of an epoch is dropped (default: %(default)s)")
  p.add_argument("--lr", type=float, default=3e-3,
                 help="peak learning rate, cosine decay to 0 (default: %(default)s)")
  p.add_argument("--weight-decay", type=float, default=1e-4,
                 help="AdamW weight decay (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0,
                 help="training seed: initialization, noise and batch order "
                 "(default: %(default)s)")
  p.add_argument("--data-seed", type=int, default=MNIST1D_DEFAULT_SEED,
                 help="mnist1d dataset seed (args.seed of make_dataset); the default is "
                 "mnist1d's own, the dataset of the published results (default: %(default)s)")
  p.add_argument("--out", default=None,
                 help="metrics JSON path (default: runs/train_mnist1d/<timestamp>/metrics.json)")
  p.add_argument("--quick", action="store_true",
                 help="smoke test: 2 epochs (overrides --epochs)")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  args = p.parse_args(argv)
  if args.quick:
    args.epochs = 2
  if args.epochs < 1:
    p.error(f"--epochs must be >= 1; got {args.epochs}")
  if args.batch_size < 1:
    p.error(f"--batch-size must be >= 1; got {args.batch_size}")
  if args.noise in ("dropout", "gaussian") and not 0.0 <= args.rate < 1.0:
    p.error(f"--rate must be in [0, 1) for --noise {args.noise}; got {args.rate}")
  if args.noise == "uout" and args.beta < 0:
    p.error(f"--beta must be >= 0; got {args.beta}")
  return args


def default_out_path() -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  base = os.path.join("runs", "train_mnist1d", stamp)
  path, i = base, 1
  while os.path.exists(path):
    path, i = f"{base}-{i}", i + 1
  return os.path.join(path, "metrics.json")


def main(argv=None) -> dict[str, Any]:
  """Runs the CLI; returns the metrics dict that is written to the JSON file."""
  args = parse_args(argv)
  t0 = time.perf_counter()
  data = load_mnist1d(args.data_seed)
  data_seconds = time.perf_counter() - t0

  model = make_model(args.model, args.noise, args.rate, args.beta)
  noise_desc = {"none": "none", "dropout": f"dropout(rate={args.rate})",
                "gaussian": f"gaussian_dropout(rate={args.rate})",
                "uout": f"uout(beta={args.beta})"}[args.noise]
  noise_var = {"none": 0.0, "dropout": regjax.dropout_noise_variance(args.rate),
               "gaussian": regjax.dropout_noise_variance(args.rate),
               "uout": regjax.uout_noise_variance(args.beta)}[args.noise]
  print(f"MNIST-1D: train {data['x'].shape}, test {data['x_test'].shape}; "
        f"model {args.model}, noise {noise_desc} (noise variance {noise_var:.4g}); "
        f"{args.epochs} epochs on {jax.devices()[0].platform}")

  result = train(model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 weight_decay=args.weight_decay, seed=args.seed,
                 progress=not args.no_progress)
  final = result["final"]
  total_seconds = time.perf_counter() - t0

  metrics = {
      "config": {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")},
      "noise_variance": noise_var,
      "final": final,
      "history": result["history"],
      "timing": {"data_seconds": data_seconds, "train_seconds": result["train_seconds"],
                 "total_seconds": total_seconds},
      "environment": {"regjax": regjax.__version__, "jax": jax.__version__,
                      "flax": flax.__version__, "optax": optax.__version__,
                      "device": str(jax.devices()[0]), "python": platform.python_version()},
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }
  out = args.out or default_out_path()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(metrics, f, indent=2)

  print(f"final (eval mode): train loss {final['train_loss']:.4f} acc {final['train_acc']:.4f} | "
        f"test loss {final['test_loss']:.4f} acc {final['test_acc']:.4f}")
  print(f"time: {total_seconds:.1f} s (data {data_seconds:.1f} s, "
        f"training incl. compilation {result['train_seconds']:.1f} s)")
  print(f"metrics written to {out}")
  return metrics


if __name__ == "__main__":
  main()
