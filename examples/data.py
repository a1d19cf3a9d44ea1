"""Datasets for the examples, as standardized NumPy arrays, and the batch order.

Nothing here downloads anything:

* ``mnist1d`` (Greydanus 2020) is generated offline by ``mnist1d.data.make_dataset``
  (4000 train / 1000 test sequences of length 40, 10 classes).
* ``digits`` is scikit-learn's bundled ``load_digits`` (1797 8x8 grayscale
  handwritten digits, 10 classes), split once into 1297 train / 500 test images
  (stratified, ``random_state=0``).
* ``mnist``, ``fashion_mnist`` and ``cifar10`` are read with ``tfds.data_source``
  (random access over ArrayRecord files; no TensorFlow needed) from a TFDS data
  directory that must already hold them. When it does not, :func:`load_dataset`
  raises :class:`DatasetUnavailableError` saying how to prepare them on a machine
  with internet access.

Every input array is float32, channels-last and standardized per channel with
statistics of the training inputs only.

Run as a script (``python examples/data.py``) it lists the datasets and whether
the TFDS ones are prepared in the default data directory.
"""

from __future__ import annotations

import argparse
import glob
import os
from typing import Any

import numpy as np

# mnist1d's own default data seed (get_dataset_args().seed); the published
# MNIST-1D accuracies are for this dataset.
MNIST1D_DEFAULT_SEED = 42

# The fixed digits split: 500 test images, stratified by class.
DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0

# name -> (input shape of one example, number of classes)
DATASETS: dict[str, tuple[tuple[int, ...], int]] = {
  "mnist1d": ((40, 1), 10),
  "digits": ((8, 8, 1), 10),
  "mnist": ((28, 28, 1), 10),
  "fashion_mnist": ((28, 28, 1), 10),
  "cifar10": ((32, 32, 3), 10),
}
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
BUILT_IN_DATASETS = ("mnist1d", "digits")

# Records read per data-source call: large enough for ArrayRecord's parallel
# reads to pay off, small enough to keep the undecoded bytes in memory small.
_READ_CHUNK = 8192


class DatasetUnavailableError(RuntimeError):
  """A TFDS dataset is not prepared in the data directory (and we never download)."""


def load_dataset(
  name: str = "mnist1d",
  *,
  data_seed: int | None = None,
  data_dir: str | os.PathLike | None = None,
  train_size: int | None = None,
) -> dict[str, Any]:
  """Loads a dataset as standardized, channels-last NumPy arrays.

  Args:
    name: one of ``DATASETS``: 'mnist1d', 'digits', 'mnist', 'fashion_mnist',
      'cifar10'.
    data_seed: mnist1d only: ``args.seed`` of ``make_dataset``; None keeps
      mnist1d's default (42), the dataset of the published results.
    data_dir: TFDS datasets only: the TFDS data directory; None uses TFDS's
      default (``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).
    train_size: keep only the first ``train_size`` training examples (in
      ``[1, available]``); the standardization statistics are theirs. None keeps
      all. The test set is always complete.

  Returns:
    ``{'x_train', 'y_train', 'x_test', 'y_test', 'num_classes', 'name'}``;
    inputs float32 of shape ``(N,) + DATASETS[name][0]``, standardized per
    channel with the training inputs' mean and standard deviation; labels int32.

  Raises:
    ValueError: unknown ``name``, an argument that does not apply to it, or a
      ``train_size`` out of range.
    DatasetUnavailableError: a TFDS dataset is not prepared in ``data_dir``.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of {tuple(DATASETS)}")
  x_train, y_train, x_test, y_test = _load_raw(name, data_seed, data_dir)
  x_train, y_train = _first_examples(x_train, y_train, train_size, name)
  x_train, x_test = standardize(x_train, x_test)
  return {
    "x_train": x_train,
    "y_train": y_train,
    "x_test": x_test,
    "y_test": y_test,
    "num_classes": DATASETS[name][1],
    "name": name,
  }


def _load_raw(name: str, data_seed: int | None, data_dir):
  """The unstandardized ``(x_train, y_train, x_test, y_test)`` of ``name``."""
  if name != "mnist1d" and data_seed is not None:
    raise ValueError(f"data_seed applies only to mnist1d, not {name!r}")
  if name in BUILT_IN_DATASETS and data_dir is not None:
    raise ValueError(
      f"data_dir does not apply to {name} (it is built in, not read from a TFDS data directory)"
    )
  if name == "mnist1d":
    return _load_mnist1d(data_seed)
  if name == "digits":
    return _load_digits()
  return _load_tfds(name, data_dir)


def _first_examples(x: np.ndarray, y: np.ndarray, train_size: int | None, name: str):
  """The first ``train_size`` rows of ``(x, y)`` (all of them for None)."""
  if train_size is None:
    return x, y
  available = x.shape[0]
  # bool is an int subclass, but train_size=True is surely a mistake.
  is_int = isinstance(train_size, (int, np.integer)) and not isinstance(train_size, bool)
  if not is_int or not 1 <= train_size <= available:
    raise ValueError(
      f"train_size must be an integer in [1, {available}] ({name!r} has "
      f"{available} training examples); got {train_size!r}"
    )
  return x[:train_size], y[:train_size]


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Standardizes both arrays per channel (last axis) with ``x_train``'s statistics."""
  axes = tuple(range(x_train.ndim - 1))
  # float64 statistics: a float32 sum over 60000 * 784 values loses digits.
  mean = x_train.mean(axis=axes, dtype=np.float64)
  std = x_train.std(axis=axes, dtype=np.float64)
  std = np.where(std > 0, std, 1.0)  # a constant channel stays finite

  def scale(x):
    return ((x - mean) / std).astype(np.float32)

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
  return (
    np.asarray(data["x"], np.float32)[..., None],
    np.asarray(data["y"], np.int32),
    np.asarray(data["x_test"], np.float32)[..., None],
    np.asarray(data["y_test"], np.int32),
  )


# ------------------------------------------------------------------------- digits


def _load_digits():
  """scikit-learn's digits with the fixed stratified split, as float32/int32 arrays."""
  # Lazy: scikit-learn is needed for this dataset only.
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import train_test_split  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  x = np.asarray(digits.images, np.float32)[..., None]
  y = np.asarray(digits.target, np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, y, test_size=DIGITS_TEST_SIZE, stratify=y, random_state=DIGITS_SPLIT_SEED
  )
  return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------- TFDS


def _unavailable_message(name: str, data_dir, cause: BaseException) -> str:
  where = (
    f"data_dir {os.fspath(data_dir)!r}"
    if data_dir is not None
    else "the default TFDS data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  )
  cause_line = " ".join(str(cause).split())[:200]
  return (
    f"dataset {name!r} is not prepared in {where}, and these examples never download. "
    "On a machine with internet access (and `pip install tensorflow tensorflow-datasets`) run "
    f"`tfds build {name} --file_format=array_record --data_dir=DIR` (or in Python "
    f"`tfds.data_source('{name}', data_dir='DIR', "
    "builder_kwargs={'file_format': 'array_record'})`), copy DIR here and pass "
    f"`--data-dir DIR` (data_dir=DIR) or set TFDS_DATA_DIR=DIR. "
    f"[tfds said: {type(cause).__name__}: {cause_line}]"
  )


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
  except (NotImplementedError, OSError, AssertionError, ValueError, KeyError) as e:
    # What tfds raises for a missing dataset depends on data_dir and its files:
    # NotImplementedError (an explicit, empty data_dir: it assumes a TFRecord
    # dataset, which has no random access), KeyError (data_dir=None: tfds then
    # asks for ArrayRecord, and SplitDict.__getitem__ finds no splits),
    # FileNotFoundError/AssertionError (partial files), OSError (unreadable
    # files), ValueError (unknown split).
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
    raise DatasetUnavailableError(
      _unavailable_message(
        name, data_dir, RuntimeError(f"empty split (train {len(train)}, test {len(test)})")
      )
    )
  x_train, y_train = _to_arrays(_read_all(train))
  x_test, y_test = _to_arrays(_read_all(test))
  expected = DATASETS[name][0]
  if x_train.shape[1:] != expected or x_test.shape[1:] != expected:
    raise ValueError(
      f"{name}: expected examples of shape {expected}, got "
      f"{x_train.shape[1:]} (train) and {x_test.shape[1:]} (test)"
    )
  return x_train, y_train, x_test, y_test


# ---------------------------------------------------------------------------- CLI


def default_tfds_dir() -> str:
  """TFDS's default data directory, resolved as tfds does (without importing it)."""
  return os.environ.get(
    "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  )


def tfds_prepared(name: str, data_dir: str | os.PathLike | None = None) -> bool:
  """Whether ``data_dir`` (None: the default) seems to hold ``name`` as ArrayRecord files.

  A look at the files only (``dataset_info.json`` and ``*.array_record*`` under
  ``DIR/name``): it neither imports tfds nor downloads, and does not check that
  the files are complete.
  """
  root = os.path.join(os.fspath(data_dir) if data_dir is not None else default_tfds_dir(), name)
  for info in glob.glob(os.path.join(glob.escape(root), "**", "dataset_info.json"), recursive=True):
    version_dir = glob.escape(os.path.dirname(info))
    if glob.glob(os.path.join(version_dir, "*.array_record*")):
      return True
  return False


def summary_lines() -> list[str]:
  """One line per dataset: name, example shape, classes and where it comes from."""
  lines = []
  for name, (shape, classes) in DATASETS.items():
    if name in BUILT_IN_DATASETS:
      where = "built in"
    else:
      state = "prepared" if tfds_prepared(name) else "not prepared"
      where = f"TFDS, {state} in {default_tfds_dir()}"
    lines.append(f"{name:<14} shape {shape!s:<12} {classes} classes  {where}")
  return lines


def build_parser() -> argparse.ArgumentParser:
  """The parser of ``python data.py`` (which takes no arguments but ``--help``)."""
  return argparse.ArgumentParser(
    prog="data.py",
    description=__doc__.split("\n\n", 1)[0],
    epilog="This is a library module of the examples; run it to list the datasets. "
    "The runnable scripts are examples/compare_dropout.py (the study) and "
    "examples/train.py (one run).",
  )


def main(argv=None) -> None:
  """Prints the dataset summary (or the ``--help`` text)."""
  build_parser().parse_args(argv)
  print("\n".join(summary_lines()))


if __name__ == "__main__":
  main()
