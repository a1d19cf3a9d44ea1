"""Datasets for the examples, as standardized NumPy arrays, and the batch order.

Nothing here downloads anything:

* ``mnist1d`` (Greydanus 2020) is generated offline by ``mnist1d.data.make_dataset``
  (4000 train / 1000 test sequences of length 40, 10 classes).
* ``mnist``, ``fashion_mnist`` and ``cifar10`` are read with ``tfds.data_source``
  (random access over ArrayRecord files; no TensorFlow needed) from a TFDS data
  directory that must already hold them. When it does not, :func:`load_dataset`
  raises :class:`DatasetUnavailableError` saying how to prepare them on a machine
  with internet access.

Every input array is float32, channels-last and standardized per channel with
statistics of the training inputs only.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

# mnist1d's own default data seed (get_dataset_args().seed); the published
# MNIST-1D accuracies are for this dataset.
MNIST1D_DEFAULT_SEED = 42

# name -> (input shape of one example, number of classes)
DATASETS: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist1d": ((40, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
}
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")

# Records read per data-source call: large enough for ArrayRecord's parallel
# reads to pay off, small enough to keep the undecoded bytes in memory small.
_READ_CHUNK = 8192


class DatasetUnavailableError(RuntimeError):
  """A TFDS dataset is not prepared in the data directory (and we never download)."""


def load_dataset(name: str = "mnist1d", *, data_seed: int | None = None,
                 data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
  """Loads a dataset as standardized, channels-last NumPy arrays.

  Args:
    name: one of ``DATASETS``: 'mnist1d', 'mnist', 'fashion_mnist', 'cifar10'.
    data_seed: mnist1d only: ``args.seed`` of ``make_dataset``; None keeps
      mnist1d's default (42), the dataset of the published results.
    data_dir: TFDS datasets only: the TFDS data directory; None uses TFDS's
      default (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).

  Returns:
    ``{'x_train', 'y_train', 'x_test', 'y_test', 'num_classes', 'name'}``;
    inputs float32 of shape ``(N,) + DATASETS[name][0]``, standardized per
    channel with the training inputs' mean and standard deviation; labels int32.

  Raises:
    ValueError: unknown ``name``, or an argument that does not apply to it.
    DatasetUnavailableError: a TFDS dataset is not prepared in ``data_dir``.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {tuple(DATASETS)}")
  if name == "mnist1d":
    if data_dir is not None:
      raise ValueError("data_dir does not apply to mnist1d (it is generated, not read)")
    x_train, y_train, x_test, y_test = _load_mnist1d(data_seed)
  else:
    if data_seed is not None:
      raise ValueError(f"data_seed applies only to mnist1d, not {name!r}")
    x_train, y_train, x_test, y_test = _load_tfds(name, data_dir)
  x_train, x_test = standardize(x_train, x_test)
  return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
          "num_classes": DATASETS[name][1], "name": name}


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Standardizes both arrays per channel (last axis) with ``x_train``'s statistics."""
  axes = tuple(range(x_train.ndim - 1))
  # float64 statistics: a float32 sum over 60000 * 784 values loses digits.
  mean = x_train.mean(axis=axes, dtype=np.float64)
  std = x_train.std(axis=axes, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)  # a constant channel stays finite
  scale = lambda x: ((x - mean) / std).astype(np.float32)
  return scale(x_train), scale(x_test)


def batch_indices(key_or_seed, epoch: int, n: int, batch_size: int) -> np.ndarray:
  """The sample indices of every batch of ``epoch``: ``(n // batch_size, batch_size)``.

  A fresh permutation of ``range(n)`` per epoch; the incomplete last batch is
  dropped (a different remainder each epoch). Deterministic in
  ``(key_or_seed, epoch)``:

  * an ``int`` seed draws with NumPy, ``default_rng([seed, epoch])`` (no device
    work, so it costs nothing in a training loop);
  * a JAX PRNG key draws with ``jax.random.permutation(fold_in(key, epoch), n)``.
  """
  if not 0 < batch_size <= n:
    raise ValueError(f"batch_size must be in [1, n={n}]; got {batch_size}")
  if epoch < 0:
    raise ValueError(f"epoch must be >= 0; got {epoch}")
  if isinstance(key_or_seed, (int, np.integer)):
    if key_or_seed < 0:
      raise ValueError(f"seed must be >= 0; got {key_or_seed}")
    perm = np.random.default_rng([int(key_or_seed), int(epoch)]).permutation(n)
  else:
    import jax  # pylint: disable=import-outside-toplevel
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key_or_seed, epoch), n))
  steps = n // batch_size
  return perm[: steps * batch_size].reshape(steps, batch_size)


# ----------------------------------------------------------------------- MNIST-1D


def _load_mnist1d(data_seed: int | None):
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=import-outside-toplevel

  args = get_dataset_args()
  if data_seed is not None:
    args.seed = int(data_seed)
  # make_dataset reseeds Python's and NumPy's global generators; keep the
  # caller's global state as it was.
  np_state = np.random.get_state()
  try:
    data = make_dataset(args)  # never get_dataset: it downloads a pickle
  finally:
    np.random.set_state(np_state)
  return (np.asarray(data["x"], np.float32)[..., None], np.asarray(data["y"], np.int32),
          np.asarray(data["x_test"], np.float32)[..., None],
          np.asarray(data["y_test"], np.int32))


# --------------------------------------------------------------------------- TFDS


def _unavailable_message(name: str, data_dir, cause: BaseException) -> str:
  where = (f"data_dir {os.fspath(data_dir)!r}" if data_dir is not None
           else "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
  cause_line = " ".join(str(cause).split())[:200]
  return (
      f"dataset {name!r} is not prepared in {where}, and these examples never download. "
      "On a machine with internet access (and `pip install tensorflow tensorflow-datasets`) run "
      f"`tfds build {name} --file_format=array_record --data_dir=DIR` (or in Python "
      f"`tfds.data_source('{name}', data_dir='DIR', "
      "builder_kwargs={'file_format': 'array_record'})`), copy DIR here and pass "
      f"`--data-dir DIR` (data_dir=DIR) or set TFDS_DATA_DIR=DIR. "
      f"[tfds said: {type(cause).__name__}: {cause_line}]")


def _open_tfds(name: str, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  verbosity = absl_logging.get_verbosity()
  # tfds logs a warning for each missing metadata folder; the error below says
  # it better, in one line.
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    # download=False: with data missing, tfds would otherwise try to fetch it.
    return tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
  except (NotImplementedError, FileNotFoundError, AssertionError, ValueError) as e:
    # What tfds raises for a missing dataset depends on what is in data_dir:
    # NotImplementedError (nothing there: it assumes a TFRecord dataset, which
    # has no random access), FileNotFoundError/AssertionError (partial files),
    # ValueError (unknown split).
    raise DatasetUnavailableError(_unavailable_message(name, data_dir, e)) from e
  finally:
    absl_logging.set_verbosity(verbosity)


def _read_all(source) -> list[dict[str, Any]]:
  """Every record of a TFDS data source, decoded, in order."""
  n = len(source)
  records: list[dict[str, Any]] = []
  batched = True
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, n)))
    if batched:
      try:
        # __getitems__ reads a chunk in parallel: 3x faster than one record at a
        # time on MNIST (4.6 s vs 13.9 s for 60000 records on 2 cores).
        records.extend(source.__getitems__(keys))
        continue
      except TypeError:
        # tfds.testing.mock_data (tfds 4.9.10) patches __getitems__ as an
        # unbound function, so it fails with a TypeError; only __getitem__ works.
        if start:
          raise
        batched = False
    records.extend(source[i] for i in keys)
  return records


def _to_arrays(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
  x = np.stack([np.asarray(r["image"]) for r in records]).astype(np.float32)
  y = np.asarray([r["label"] for r in records], np.int32)
  return x, y


def _load_tfds(name: str, data_dir):
  train, test = _open_tfds(name, data_dir)
  if len(train) == 0 or len(test) == 0:
    raise DatasetUnavailableError(_unavailable_message(
        name, data_dir, RuntimeError(f"empty split (train {len(train)}, test {len(test)})")))
  x_train, y_train = _to_arrays(_read_all(train))
  x_test, y_test = _to_arrays(_read_all(test))
  expected = DATASETS[name][0]
  if x_train.shape[1:] != expected or x_test.shape[1:] != expected:
    raise ValueError(f"{name}: expected examples of shape {expected}, got "
                     f"{x_train.shape[1:]} (train) and {x_test.shape[1:]} (test)")
  return x_train, y_train, x_test, y_test
