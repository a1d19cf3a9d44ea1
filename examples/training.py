"""Training pieces for the examples: pure, jittable and vmappable, plus a ``fit`` loop.

``init_state``, ``train_step`` and ``evaluate`` are pure functions of their
arguments (no ``jit`` inside), so a study can ``jax.vmap`` them over seeds or
noise strengths and ``jax.jit`` the result. ``fit`` is the single-run loop the
CLI uses: a Python loop over one jitted step, which on XLA:CPU runs several
times faster than a ``jax.lax.scan`` over the epoch.

Keys: ``root = jax.random.key(seed)``; parameters from :func:`init_key`
(``fold_in(root, 0)``); step ``t`` draws its noise from :func:`noise_key`
(``fold_in(fold_in(root, 1), t)``); the batch order comes from
``data.batch_indices(seed, epoch, ...)``. ``fit`` and compare_dropout.py both
use this schedule, so their runs from the same seed are comparable.

Across processes (``jax.distributed``), ``fit`` takes a mesh over the devices of
every process: each process holds the whole dataset, feeds its own rows of each
global batch (``jax.make_array_from_process_local_data``) and runs the same jit
over the global arrays, so the updates, the BatchNorm statistics and the noise
(a function of the key and the global row) are those of one process with all
the devices.

This is a library module: run as a script it only prints its usage.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from data import batch_indices
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree: vmap/jit/device_put it)."""

  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(
  lr: float, epochs: int, steps_per_epoch: int, weight_decay: float = 1e-4
) -> optax.GradientTransformation:
  """AdamW whose learning rate decays from ``lr`` to 0 over all steps (cosine)."""
  schedule = optax.cosine_decay_schedule(lr, max(1, epochs * steps_per_epoch))
  return optax.adamw(schedule, weight_decay=weight_decay)


def init_state(
  model: nn.Module, tx: optax.GradientTransformation, key: jax.Array, sample_x
) -> TrainState:
  """Initial parameters, statistics and optimizer state.

  ``init`` runs with ``train=False``, so it needs no ``'dropout'`` stream and
  leaves the running statistics at their initial values.
  """
  variables = model.init(key, sample_x, train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
  )


def loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy and accuracy of integer ``labels``."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def train_step(
  model: nn.Module, tx: optax.GradientTransformation, state: TrainState, x, y, key: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the batch ``(x, y)`` with noise drawn from ``key``.

  Returns the new state and the batch's ``{'loss', 'acc'}`` in train mode
  (noise on, batch statistics), measured before the update.
  """

  def loss_fn(params):
    logits, updates = model.apply(
      {"params": params, "batch_stats": state.batch_stats},
      x,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    loss, acc = loss_and_accuracy(logits, y)
    return loss, (acc, updates["batch_stats"])

  (loss, (acc, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    batch_stats=batch_stats,
    opt_state=opt_state,
  )
  return state, {"loss": loss, "acc": acc}


def eval_sums(model: nn.Module, state: TrainState, x, y, valid) -> tuple[jax.Array, jax.Array]:
  """Eval-mode (``train=False``) summed loss and number correct over the rows where ``valid``."""
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(ce * valid), jnp.sum((jnp.argmax(logits, -1) == y) * valid)


def _padded_batches(x, y, batch_size: int):
  """``(x, y, valid)`` padded to whole batches of ``batch_size``, shaped ``(batches, bs, ...)``."""
  n = x.shape[0]
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  xb = jnp.pad(jnp.asarray(x), [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  yb = jnp.pad(jnp.asarray(y), (0, pad))
  valid = jnp.arange(num_batches * batch_size) < n
  return (
    xb.reshape((num_batches, batch_size) + x.shape[1:]),
    yb.reshape(num_batches, batch_size),
    valid.reshape(num_batches, batch_size),
  )


def _host_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
  """Yields ``(x, y, valid)`` NumPy batches of exactly ``batch_size`` rows (last one padded)."""
  for start in range(0, x.shape[0], batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    k = xb.shape[0]
    if k < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - k,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros(batch_size - k, yb.dtype)])
    yield xb, yb, np.arange(batch_size) < k


def evaluate(
  model: nn.Module, state: TrainState, x, y, batch_size: int = 1000
) -> dict[str, jax.Array]:
  """Eval-mode (``train=False``) mean loss and accuracy over all of ``(x, y)``.

  Runs ``ceil(n / batch_size)`` batches in a ``lax.map`` to bound memory; the
  last batch is padded and the padding masked out. Jittable (and vmappable)
  with ``batch_size`` static.
  """
  n = x.shape[0]
  batches = _padded_batches(x, y, min(batch_size, n))
  losses, correct = jax.lax.map(lambda b: eval_sums(model, state, *b), batches)
  return {"loss": losses.sum() / n, "acc": correct.sum() / n}


def init_key(root: jax.Array) -> jax.Array:
  """The key a run's parameters are initialized from."""
  return jax.random.fold_in(root, 0)


def noise_key(root: jax.Array, step) -> jax.Array:
  """The key of the noise drawn at training step ``step`` (may be traced)."""
  return jax.random.fold_in(jax.random.fold_in(root, 1), step)


def _fit_step(model, tx, state, x, y, root):
  """``train_step`` with the step's key ``noise_key(root, state.step)``."""
  return train_step(model, tx, state, x, y, noise_key(root, state.step))


# Module-level jits with the (hashable) model and optimizer static: two fits of
# the same configuration, e.g. with and without a mesh, share compilations.
_init_jit = jax.jit(init_state, static_argnums=(0, 1))
_step_jit = jax.jit(_fit_step, static_argnums=(0, 1), donate_argnums=2)
_eval_sums_jit = jax.jit(eval_sums, static_argnums=0)
# The same optimizer object for the same settings, so it hashes equal.
_cached_optimizer = functools.lru_cache(maxsize=32)(make_optimizer)


def _process_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
  """The rows of a ``(batch_size, ...)`` batch that this process's devices hold, ascending.

  In that order they are the process-local data of
  ``jax.make_array_from_process_local_data``.
  """
  spans = {
    index[0].indices(batch_size)[:2]
    for index in sharding.addressable_devices_indices_map((batch_size,)).values()
    if index is not None
  }
  return np.concatenate([np.arange(lo, hi) for lo, hi in sorted(spans)])


def replicate(tree: Any, sharding: NamedSharding) -> Any:
  """A pytree whose values are the same on every process, as arrays replicated over ``sharding``.

  Leaves already on ``sharding`` are kept; the others go through NumPy, so
  ``jax.device_put`` checks across processes that they are equal. Typed keys
  travel as their key data.
  """

  def put(a):
    if isinstance(a, jax.Array) and a.sharding == sharding:
      return a
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      wrap = functools.partial(jax.random.wrap_key_data, impl=jax.random.key_impl(a))
      return jax.jit(wrap, out_shardings=sharding)(put(jax.random.key_data(a)))
    return jax.device_put(np.asarray(a), sharding)

  return jax.tree.map(put, tree)


def local_copy(tree: Any) -> Any:
  """This process's first replica of a pytree of replicated arrays (single-device arrays)."""
  return jax.tree.map(lambda a: a if a.is_fully_addressable else a.addressable_data(0), tree)


def start_epoch(state: TrainState, epochs: int, steps_per_epoch: int) -> int:
  """The epoch a run of ``epochs`` epochs resumes at from ``state`` (``epochs``: nothing left).

  Raises:
    ValueError: ``state.step`` is short of ``epochs`` but not at an epoch boundary.
  """
  step = int(np.asarray(local_copy(state.step)))
  if step >= epochs * steps_per_epoch:
    return epochs
  if step % steps_per_epoch:
    raise ValueError(
      f"the state is at step {step}, not at an epoch boundary ({steps_per_epoch} steps per epoch)"
    )
  return step // steps_per_epoch


def _check_mesh(mesh: Mesh | None, batch_size: int) -> int:
  """Number of data-parallel devices (1 without a mesh)."""
  if mesh is None:
    return 1
  if "data" not in mesh.axis_names:
    raise ValueError(f"mesh needs a 'data' axis; it has {mesh.axis_names}")
  devices = mesh.shape["data"]
  if batch_size % devices:
    raise ValueError(
      f"batch_size {batch_size} must be a multiple of the {devices} data-parallel devices"
    )
  return devices


def fit(
  model: nn.Module,
  data: dict[str, Any],
  *,
  epochs: int,
  batch_size: int = 128,
  lr: float = 3e-3,
  weight_decay: float = 1e-4,
  seed: int = 0,
  progress: bool = True,
  mesh: Mesh | None = None,
  eval_batch_size: int = 1000,
  state: TrainState | None = None,
) -> dict[str, Any]:
  """Trains ``model`` on ``data`` (from ``data.load_dataset``) and evaluates it.

  Args:
    model: a module called as ``model(x, train=...)``.
    data: ``x_train``, ``y_train``, ``x_test``, ``y_test`` arrays.
    epochs, batch_size, lr, weight_decay: see :func:`make_optimizer`; the
      incomplete last batch of each epoch is dropped.
    seed: initialization, noise and batch order (see the module docstring).
    progress: show a tqdm bar over epochs (on stderr).
    mesh: a ``jax.sharding.Mesh`` with a ``'data'`` axis: each batch is split
      over it and the state replicated. BatchNorm statistics stay those of the
      whole batch, because under ``jit`` XLA inserts the cross-device reduction.
      A mesh over the devices of several processes (after
      ``jax.distributed.initialize``; every process calls ``fit`` with the same
      arguments) trains one model over all of them; each process evaluates
      its replica of the state on one of its devices, so the metrics are the
      same on every process.
    eval_batch_size: rows per evaluation batch (the last one padded).
    state: a state to resume from (e.g. a restored checkpoint) instead of a new
      one: training goes on at epoch ``state.step // steps_per_epoch`` (see
      :func:`start_epoch`) up to ``epochs``, with the batch order and noise keys
      of an uninterrupted run and this call's learning-rate schedule (over
      ``epochs``); from a state at or past ``epochs`` it only evaluates
      (``epochs`` may then be 0).

  Returns:
    ``{'state', 'history', 'final', 'step_loss', 'train_seconds'}``:
    ``history`` has one dict per epoch trained (``train_batch_loss``/``train_batch_acc``:
    mean train-mode batch metrics; ``test_loss``/``test_acc``: eval mode after
    the epoch; ``elapsed_seconds`` since ``fit`` started, initialization and
    compilation included); ``final`` the eval-mode loss and accuracy on the full train and
    test sets; ``step_loss`` the train-mode loss of every step (NumPy).
  """
  x, y = np.asarray(data["x_train"]), np.asarray(data["y_train"])
  x_test, y_test = np.asarray(data["x_test"]), np.asarray(data["y_test"])
  n = x.shape[0]
  if epochs < (1 if state is None else 0):
    raise ValueError(f"epochs must be >= 1; got {epochs}")
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in [1, {n}] (the training set size); got {batch_size}")
  _check_mesh(mesh, batch_size)
  steps_per_epoch = n // batch_size

  start = time.perf_counter()
  root = jax.random.key(seed)
  tx = _cached_optimizer(lr, epochs, steps_per_epoch, weight_decay)
  if state is None:
    state = _init_jit(model, tx, init_key(root), x[:batch_size])
  first_epoch = start_epoch(state, epochs, steps_per_epoch)

  multi_process = mesh is not None and mesh.is_multi_process
  batch_rows = None
  if mesh is None:
    step_fn = functools.partial(_step_jit, model, tx)
  else:
    replicated, batch_split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    if multi_process:
      state, root = replicate((state, root), replicated)
      batch_rows = _process_rows(batch_split, batch_size)
    else:
      state = jax.device_put(state, replicated)
      root = jax.device_put(root, replicated)
    # NumPy batches passed to a jit with in_shardings are split on transfer.
    step_fn = jax.jit(
      functools.partial(_fit_step, model, tx),
      in_shardings=(replicated, batch_split, batch_split, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=0,
    )

  def eval_fn(state, x, y):
    # Every evaluation runs the same fixed-shape batch function, so the train
    # and test sets of any size share one compilation.
    if multi_process:
      state = local_copy(state)
    sums = [_eval_sums_jit(model, state, *b) for b in _host_batches(x, y, eval_batch_size)]
    loss, correct = np.sum(jax.device_get(sums), axis=0)
    return {"loss": loss / x.shape[0], "acc": correct / x.shape[0]}

  history, step_losses = [], []
  bar = None
  epoch_iter = range(first_epoch, epochs)
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    epoch_iter = bar = tqdm(epoch_iter, desc="epochs", unit="epoch", file=sys.stderr)
  for epoch in epoch_iter:
    losses, accs = [], []
    for idx in batch_indices(seed, epoch, n, batch_size):
      if batch_rows is None:
        xb, yb = x[idx], y[idx]
      else:  # the global batch, of which this process holds its own rows
        mine = idx[batch_rows]
        xb = jax.make_array_from_process_local_data(
          batch_split, x[mine], (batch_size,) + x.shape[1:]
        )
        yb = jax.make_array_from_process_local_data(batch_split, y[mine], (batch_size,))
      state, metrics = step_fn(state, xb, yb, root)
      losses.append(metrics["loss"])
      accs.append(metrics["acc"])
    # One device-to-host transfer per epoch, not per step.
    losses, accs = np.asarray(jnp.stack(losses)), np.asarray(jnp.stack(accs))
    step_losses.append(losses)
    test = eval_fn(state, x_test, y_test)
    record = {
      "epoch": epoch + 1,
      "train_batch_loss": float(losses.mean()),
      "train_batch_acc": float(accs.mean()),
      "test_loss": float(test["loss"]),
      "test_acc": float(test["acc"]),
      "elapsed_seconds": time.perf_counter() - start,
    }
    history.append(record)
    if bar is not None:
      bar.set_postfix(
        loss=f"{record['train_batch_loss']:.3f}",
        acc=f"{record['train_batch_acc']:.3f}",
        test_acc=f"{record['test_acc']:.3f}",
      )
  if bar is not None:
    bar.close()
  train = eval_fn(state, x, y)
  test = eval_fn(state, x_test, y_test)
  final = {
    "train_loss": float(train["loss"]),
    "train_acc": float(train["acc"]),
    "test_loss": float(test["loss"]),
    "test_acc": float(test["acc"]),
  }
  return {
    "state": state,
    "history": history,
    "final": final,
    "step_loss": np.concatenate(step_losses) if step_losses else np.zeros(0, np.float32),
    "train_seconds": time.perf_counter() - start,
  }


def save_checkpoint(path: str, state: TrainState, meta: dict[str, Any]) -> None:
  """Writes ``state`` (arrays of any sharding) and the JSON ``meta`` to the new directory ``path``.

  Uses orbax (a dependency of flax). In a multi-process run every process must
  call it, with the same ``path``: orbax writes each array once and
  synchronizes the processes.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(
      os.path.abspath(path),
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )


def checkpoint_meta(path: str) -> dict[str, Any]:
  """The JSON ``meta`` that :func:`save_checkpoint` wrote to ``path``."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    return ckptr.restore(
      os.path.abspath(path), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )["meta"]


def restore_checkpoint(
  path: str, target: TrainState, sharding: jax.sharding.Sharding
) -> TrainState:
  """The state saved in ``path``, with ``target``'s structure, placed on ``sharding``.

  Args:
    path: a directory written by :func:`save_checkpoint`, by a run with any
      number of processes and devices.
    target: the state (or its ``jax.eval_shape``) of the model to restore into.
    sharding: where every array goes, e.g. one device or ``NamedSharding(mesh,
      P())`` (replicated over a mesh, which may span processes: every process
      must then call this).
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target
  )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(
      os.path.abspath(path), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
  return restored["state"]


def build_parser() -> argparse.ArgumentParser:
  """The parser of ``python training.py``, which has nothing to run but ``--help``."""
  return argparse.ArgumentParser(
    prog="training.py",
    description=__doc__.split("\n\n", 1)[0],
    epilog="This is a library module of the examples, not a script. The runnable scripts "
    "are examples/compare_dropout.py (the study) and examples/train.py (one run).",
  )


def main(argv=None) -> None:
  """Prints the usage (there is nothing to run here); ``--help`` exits after it too."""
  parser = build_parser()
  parser.parse_args(argv)
  parser.print_help()


if __name__ == "__main__":
  main()
