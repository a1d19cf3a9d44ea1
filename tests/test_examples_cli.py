"""Tests of examples/data.py's digits dataset, ``train_size``, missing TFDS data
and the command lines of the library modules examples/{data,training}.py.

Nothing downloads: digits is bundled with scikit-learn, and the TFDS checks run
against empty temporary data directories.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import data

SUBPROCESS_TIMEOUT = 300  # seconds; importing tfds or jax on a busy machine is slow


@pytest.fixture(scope="module")
def digits():
  pytest.importorskip("sklearn")
  return data.load_dataset("digits")


def _run(args, env=None):
  """Runs ``python *args`` in the examples directory; returns the CompletedProcess."""
  return subprocess.run(
    [sys.executable, *args],
    cwd=EXAMPLES,
    env=env,
    capture_output=True,
    text=True,
    timeout=SUBPROCESS_TIMEOUT,
    check=False,
  )


def _empty_tfds_env(tmp_path):
  """The environment with TFDS's default data dir and HOME both empty temporary dirs."""
  (tmp_path / "tfds").mkdir()
  (tmp_path / "home").mkdir()
  return dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), HOME=str(tmp_path / "home"))


# ------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_labels(digits):
  assert data.DATASETS["digits"] == ((8, 8, 1), 10)
  assert digits["name"] == "digits" and digits["num_classes"] == 10
  assert digits["x_train"].shape == (1297, 8, 8, 1) and digits["x_test"].shape == (500, 8, 8, 1)
  assert digits["y_train"].shape == (1297,) and digits["y_test"].shape == (500,)
  assert digits["x_train"].dtype == np.float32 and digits["x_test"].dtype == np.float32
  assert digits["y_train"].dtype == np.int32 and digits["y_test"].dtype == np.int32
  for y in (digits["y_train"], digits["y_test"]):
    assert set(np.unique(y).tolist()) == set(range(10))


def test_digits_split_is_stratified(digits):
  # Every class has about 1797 / 10 images, so stratification puts ~50 of each
  # in the 500 test images; an unstratified split would stray by several.
  test_counts = np.bincount(digits["y_test"], minlength=10)
  train_counts = np.bincount(digits["y_train"], minlength=10)
  assert test_counts.min() >= 48 and test_counts.max() <= 52, test_counts
  fractions = test_counts / (test_counts + train_counts)
  np.testing.assert_allclose(fractions, 500 / 1797, atol=0.01)


def test_digits_standardized_with_train_statistics(digits):
  np.testing.assert_allclose(digits["x_train"].mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(digits["x_train"].std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  assert np.isfinite(digits["x_test"]).all()
  assert abs(digits["x_test"].mean()) < 0.1 and abs(digits["x_test"].std() - 1) < 0.1


def test_digits_is_deterministic(digits):
  again = data.load_dataset("digits")
  for key in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(again[key], digits[key])


def test_digits_rejects_arguments_that_do_not_apply(tmp_path):
  pytest.importorskip("sklearn")
  with pytest.raises(ValueError, match="data_dir"):
    data.load_dataset("digits", data_dir=tmp_path)
  with pytest.raises(ValueError, match="data_seed"):
    data.load_dataset("digits", data_seed=1)


# --------------------------------------------------------------------- train_size


def test_train_size_keeps_the_first_examples_and_their_statistics(digits):
  n = 100
  small = data.load_dataset("digits", train_size=n)
  assert small["x_train"].shape == (n, 8, 8, 1) and small["y_train"].shape == (n,)
  np.testing.assert_array_equal(small["y_train"], digits["y_train"][:n])
  # Standardized with the statistics of the n examples kept, not of all 1297.
  np.testing.assert_allclose(small["x_train"].mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(small["x_train"].std(axis=(0, 1, 2)), 1.0, atol=1e-5)
  x_train, _, x_test, _ = data._load_digits()
  expected_train, expected_test = data.standardize(x_train[:n], x_test)
  np.testing.assert_allclose(small["x_train"], expected_train, atol=1e-6)
  # The test set keeps all its examples (standardized with the subset's statistics).
  np.testing.assert_array_equal(small["y_test"], digits["y_test"])
  np.testing.assert_allclose(small["x_test"], expected_test, atol=1e-6)
  full = data.load_dataset("digits", train_size=1297)
  np.testing.assert_array_equal(full["x_train"], digits["x_train"])


@pytest.mark.parametrize("train_size", [0, -1, 1298, 2.0, True, "10"])
def test_train_size_out_of_range_raises(digits, train_size):
  with pytest.raises(ValueError, match=r"train_size .*\[1, 1297\]"):
    data.load_dataset("digits", train_size=train_size)


def test_train_size_with_mock_tfds_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    d = data.load_dataset("mnist", train_size=10)
    assert d["x_train"].shape == (10, 28, 28, 1) and d["x_test"].shape == (24, 28, 28, 1)
    with pytest.raises(ValueError, match=r"train_size .*\[1, 24\]"):
      data.load_dataset("mnist", train_size=25)


# ------------------------------------------------------------------ missing TFDS

_MISSING_TFDS_SCRIPT = textwrap.dedent("""
    import json, sys
    import data
    results = []
    for data_dir in (None, sys.argv[1]):
      try:
        data.load_dataset("mnist", data_dir=data_dir)
        results.append({"error": None})
      except data.DatasetUnavailableError as e:
        results.append({"error": type(e).__name__, "cause": type(e.__cause__).__name__,
                        "message": str(e)})
    print(json.dumps(results))
    """)


def test_missing_tfds_dataset_with_and_without_data_dir(tmp_path):
  # A subprocess, so that tfds resolves its default data dir from this
  # environment (it reads $TFDS_DATA_DIR once, when imported).
  pytest.importorskip("tensorflow_datasets")
  env = _empty_tfds_env(tmp_path)
  explicit = tmp_path / "explicit"
  explicit.mkdir()
  proc = _run(["-c", _MISSING_TFDS_SCRIPT, str(explicit)], env=env)
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  default, given = json.loads(proc.stdout.strip().splitlines()[-1])
  for result in (default, given):
    assert result["error"] == "DatasetUnavailableError", result
    assert "\n" not in result["message"] and "Traceback" not in result["message"]
    assert "tfds build mnist" in result["message"] and "never download" in result["message"]
  # data_dir=None makes tfds ask for ArrayRecord and fail on the empty split dict.
  assert default["cause"] == "KeyError" and "default TFDS data_dir" in default["message"]
  assert str(explicit) in given["message"]
  for folder in ("tfds", "home", "explicit"):  # nothing was written, let alone downloaded
    assert not any((tmp_path / folder).iterdir()), folder


# --------------------------------------------------------------------------- CLIs


@pytest.mark.parametrize("script", ["data.py", "training.py"])
def test_help_prints_description_and_the_runnable_scripts(script):
  proc = _run([script, "--help"])
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout.startswith(f"usage: {script}")
  module = importlib.import_module(script.removesuffix(".py"))
  description = " ".join(module.__doc__.split("\n\n")[0].split())
  assert description in " ".join(proc.stdout.split())
  for runnable in ("examples/compare_dropout.py", "examples/train.py", "library module"):
    assert runnable in " ".join(proc.stdout.split())


@pytest.mark.parametrize("script", ["data.py", "training.py"])
def test_unknown_option_is_an_argparse_error(script):
  proc = _run([script, "--no-such-option"])
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    f"{script}: error: unrecognized arguments: --no-such-option"
  )


def test_training_without_arguments_prints_its_usage():
  proc = _run(["training.py"])
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout.startswith("usage: training.py")
  assert "examples/train.py" in proc.stdout


def test_data_without_arguments_summarizes_the_datasets(tmp_path):
  env = _empty_tfds_env(tmp_path)
  # A fake prepared mnist: the summary only looks at the files.
  version_dir = tmp_path / "tfds" / "mnist" / "3.0.1"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  (version_dir / "mnist-train.array_record-00000-of-00001").write_bytes(b"")
  proc = _run(["data.py"], env=env)
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  lines = dict(line.split(maxsplit=1) for line in proc.stdout.strip().splitlines())
  assert list(lines) == list(data.DATASETS)
  assert "(8, 8, 1)" in lines["digits"] and "built in" in lines["digits"]
  assert "(40, 1)" in lines["mnist1d"] and "built in" in lines["mnist1d"]
  assert "10 classes" in lines["cifar10"] and "(32, 32, 3)" in lines["cifar10"]
  tfds_dir = str(tmp_path / "tfds")
  assert f"TFDS, prepared in {tfds_dir}" in lines["mnist"]
  for name in ("fashion_mnist", "cifar10"):
    assert f"TFDS, not prepared in {tfds_dir}" in lines[name]


def test_tfds_prepared_needs_info_and_array_record_files(tmp_path):
  assert not data.tfds_prepared("mnist", tmp_path)
  version_dir = tmp_path / "mnist" / "3.0.1"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  assert not data.tfds_prepared("mnist", tmp_path)  # TFRecord or nothing: no random access
  (version_dir / "mnist-test.array_record-00000-of-00001").write_bytes(b"")
  assert data.tfds_prepared("mnist", tmp_path)
  assert not data.tfds_prepared("cifar10", tmp_path)
