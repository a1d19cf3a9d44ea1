"""Tests of the example infrastructure: examples/{data,models,training,train}.py.

Nothing downloads: MNIST-1D is generated, the TFDS datasets come from
``tfds.testing.mock_data`` or from a tiny ArrayRecord dataset built in a
temporary directory.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("mnist1d")  # the `examples` extra
tfds = pytest.importorskip("tensorflow_datasets")

import jax
import jax.numpy as jnp

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import data
import models
import train
import training

CHANCE_MARGIN = 0.1 + 5 * (0.1 * 0.9 / 512) ** 0.5  # 5 standard errors above chance


@pytest.fixture(scope="module")
def mnist1d():
  # Also checks that generating MNIST-1D leaves NumPy's global RNG alone
  # (mnist1d's make_dataset reseeds it).
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  d = data.load_dataset("mnist1d")
  assert np.array_equal(np.random.get_state()[1], before)
  return d


# --------------------------------------------------------------------------- data


def test_mnist1d_shapes_and_standardization(mnist1d):
  d = mnist1d
  assert d["name"] == "mnist1d" and d["num_classes"] == 10
  assert d["x_train"].shape == (4000, 40, 1) and d["x_test"].shape == (1000, 40, 1)
  assert d["y_train"].shape == (4000,) and d["y_test"].shape == (1000,)
  assert d["x_train"].dtype == np.float32 and d["y_train"].dtype == np.int32
  np.testing.assert_allclose(d["x_train"].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(d["x_train"].std(), 1.0, atol=1e-5)
  # The test set uses the train statistics, so it is only roughly standardized.
  assert abs(d["x_test"].mean()) < 0.1 and abs(d["x_test"].std() - 1) < 0.1
  assert set(np.unique(d["y_train"])) == set(range(10))


def test_batch_indices_deterministic_permutation_per_epoch():
  n, bs = 103, 10
  a = data.batch_indices(5, 0, n, bs)
  assert a.shape == (10, 10) and a.dtype.kind == "i"
  np.testing.assert_array_equal(a, data.batch_indices(5, 0, n, bs))
  assert len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < n  # ragged batch dropped
  assert not np.array_equal(a, data.batch_indices(5, 1, n, bs))
  assert not np.array_equal(a, data.batch_indices(6, 0, n, bs))
  # A JAX key works as well, deterministically.
  k = data.batch_indices(jax.random.key(5), 3, n, bs)
  np.testing.assert_array_equal(k, data.batch_indices(jax.random.key(5), 3, n, bs))
  assert len(np.unique(k)) == 100
  with pytest.raises(ValueError, match="batch_size"):
    data.batch_indices(0, 0, n, n + 1)


@pytest.mark.parametrize(
  "name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))]
)
def test_tfds_datasets_with_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=24):
    d = data.load_dataset(name)
  assert d["name"] == name and d["num_classes"] == 10
  for split in ("train", "test"):
    x, y = d[f"x_{split}"], d[f"y_{split}"]
    assert x.shape == (24,) + shape and x.dtype == np.float32
    assert y.shape == (24,) and y.dtype == np.int32
    assert np.isfinite(x).all() and y.min() >= 0 and y.max() < 10
  # Per-channel standardization with the train statistics.
  np.testing.assert_allclose(d["x_train"].mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(d["x_train"].std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def _build_tiny_mnist(data_dir, n_train=40, n_test=20):
  """A real (not mocked) ArrayRecord 'mnist' in ``data_dir``, from random images."""
  from PIL import Image
  from tensorflow_datasets.image_classification import mnist as mnist_lib

  class TinyMNIST(mnist_lib.MNIST, skip_registration=True):
    name = "mnist"

    def _split_generators(self, dl_manager):
      return {"train": self._examples(n_train, 0), "test": self._examples(n_test, 1)}

    def _examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):  # PIL images: encoding numpy ones would need TensorFlow
        yield (
          i,
          {
            "image": Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
            "label": i % 10,
          },
        )

  builder = TinyMNIST(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  )


def test_tfds_reads_a_prepared_array_record_dataset(tmp_path):
  # mock_data replaces the data source; this reads real files through the
  # batched __getitems__ path and honours data_dir.
  _build_tiny_mnist(tmp_path)
  d = data.load_dataset("mnist", data_dir=tmp_path)
  assert d["x_train"].shape == (40, 28, 28, 1) and d["x_test"].shape == (20, 28, 28, 1)
  assert sorted(d["y_train"].tolist()) == sorted(i % 10 for i in range(40))
  np.testing.assert_allclose(d["x_train"].mean(), 0.0, atol=1e-4)


def test_missing_tfds_dataset_raises_a_helpful_error(tmp_path):
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_dataset("fashion_mnist", data_dir=tmp_path)
  message = str(info.value)
  assert isinstance(info.value, RuntimeError)
  assert "\n" not in message
  assert "tfds build fashion_mnist" in message and "--data-dir" in message
  assert str(tmp_path) in message and "never download" in message
  assert not any(tmp_path.iterdir())  # nothing was written, let alone downloaded


def test_cli_missing_dataset_exits_with_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    train.main(
      [
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path),
        "--no-progress",
        "--out",
        str(tmp_path / "m.json"),
      ]
    )
  assert info.value.code != 0
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith("train.py: error: dataset 'cifar10' is not prepared")
  assert not (tmp_path / "m.json").exists()


def test_cli_usage_errors(capsys):
  with pytest.raises(SystemExit) as info:
    train.main(["--help"])
  assert info.value.code == 0
  out = capsys.readouterr().out
  for flag in (
    "--dataset",
    "--data-dir",
    "--order",
    "--noise-value",
    "--placement",
    "--devices",
    "--quick",
    "--no-progress",
  ):
    assert flag in out
  for argv in (
    ["--order", "bn-act"],
    ["--devices", "3"],
    ["--model", "mlp", "--order", "conv"],
    ["--noise-value", "0.1"],
    ["--noise", "dropout", "--noise-value", "1.0"],
    ["--noise", "uout", "--noise-value", "-0.1"],
    ["--noise", "channel", "--placement", "head"],
  ):
    with pytest.raises(SystemExit) as info:
      train.parse_args(argv)
    assert info.value.code == 2
  capsys.readouterr()
  with pytest.raises(SystemExit) as info:  # more devices than this process has
    train.main(
      [
        "--devices",
        str(len(jax.devices()) + 1),
        "--batch-size",
        str(128 * (len(jax.devices()) + 1)),
        "--no-progress",
      ]
    )
  assert info.value.code == 2
  assert "xla_force_host_platform_device_count" in capsys.readouterr().err


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--num-processes", "0"], "--num-processes must be >= 1; got 0"),
    (["--num-processes", "2"], "--num-processes 2 needs --coordinator HOST:PORT"),
    (["--num-processes", "2", "--coordinator", "h:1"], "--num-processes 2 needs --process-id"),
    (
      ["--num-processes", "2", "--coordinator", "h:1", "--process-id", "2"],
      "--process-id must be in [0, 1] for --num-processes 2; got 2",
    ),
    (["--process-id", "-1"], "--process-id must be in [0, 0] for --num-processes 1; got -1"),
    (["--coordinator", "host"], "--coordinator must be HOST:PORT with a port in [1, 65535]"),
    (["--coordinator", "host:0"], "--coordinator must be HOST:PORT with a port in [1, 65535]"),
    (["--coordinator", ":80"], "--coordinator must be HOST:PORT with a port in [1, 65535]"),
    (["--epochs", "0"], "--epochs must be >= 1 (or 0 with --restore-checkpoint); got 0"),
    (["--restore-checkpoint", "{tmp}/none"], "--restore-checkpoint {tmp}/none is not a directory"),
    (["--save-checkpoint", "{tmp}"], "--save-checkpoint {tmp} already exists"),
  ],
)
def test_cli_distributed_and_checkpoint_usage_errors(argv, message, tmp_path, capsys, monkeypatch):
  for name in (train.COORDINATOR_ENV, train.NUM_PROCESSES_ENV, train.PROCESS_ID_ENV):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(SystemExit) as info:
    train.parse_args([a.format(tmp=tmp_path) for a in argv])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1].startswith(f"train.py: error: {message.format(tmp=tmp_path)}")


def test_cli_distributed_options_from_the_environment(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(train.COORDINATOR_ENV, "h:1234")
  monkeypatch.setenv(train.NUM_PROCESSES_ENV, "3")
  monkeypatch.setenv(train.PROCESS_ID_ENV, "2")
  args = train.parse_args([])
  assert (args.coordinator, args.num_processes, args.process_id) == ("h:1234", 3, 2)
  assert train.is_distributed(args) and args.devices is None  # all devices, once joined
  args = train.parse_args(["--process-id", "1", "--num-processes", "2"])  # flags win
  assert (args.num_processes, args.process_id) == (2, 1)
  monkeypatch.setenv(train.NUM_PROCESSES_ENV, "two")
  with pytest.raises(SystemExit):
    train.parse_args([])
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
    "train.py: error: $JAX_NUM_PROCESSES must be an integer; got 'two'"
  )
  monkeypatch.delenv(train.COORDINATOR_ENV)
  monkeypatch.delenv(train.NUM_PROCESSES_ENV)
  monkeypatch.delenv(train.PROCESS_ID_ENV)
  args = train.parse_args([])
  assert not train.is_distributed(args) and args.devices == 1 and args.process_id == 0


def test_cli_restore_needs_a_checkpoint(tmp_path, capsys):
  # A directory orbax cannot read: a one-line error (exit status 2) before any
  # training. tests/test_train_multiprocess.py restores real checkpoints.
  (tmp_path / "empty").mkdir()
  with pytest.raises(SystemExit) as info:
    train.main(
      ["--restore-checkpoint", str(tmp_path / "empty"), "--quick", "--no-progress"]
      + ["--out", str(tmp_path / "m.json")]
    )
  assert info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  assert err.startswith(f"train.py: error: --restore-checkpoint {tmp_path / 'empty'} holds no ")
  assert not (tmp_path / "m.json").exists()


# ------------------------------------------------------------------------- models

PUBLISHED_ORDERS = (  # as the public order experiment prints them
  "conv - act - dropout - BN - pool",
  "conv - act - dropout - pool - BN",
  "conv - act - BN - pool - dropout",
  "conv - act - BN - dropout - pool",
  "conv - BN - act - dropout - pool",
  "conv - BN - act - pool - dropout",
  "conv - BN - dropout - act - pool",
  "conv - dropout - act - BN - pool",
  "conv - dropout - act - pool - BN",
  "conv - dropout - BN - act - pool",
)


def test_brief_orders_parse():
  parsed = [models.parse_order(o) for o in PUBLISHED_ORDERS]
  assert ["-".join(p) for p in parsed] == list(models.PUBLISHED_ORDER_LOSSES)
  assert models.parse_order("conv-bn-act-drop-pool") == ("conv", "bn", "act", "drop", "pool")
  assert models.parse_order("conv") == ("conv",)


@pytest.mark.parametrize(
  "spec,match",
  [
    ("bn-act-pool", "no 'conv'"),
    ("conv-bn-conv", "once"),
    ("conv-foo", "unknown token"),
    ("", "unknown token"),
    ("conv--bn", "unknown token"),
    ("conv-bn-act-bn", "once"),
  ],
)
def test_bad_orders_raise(spec, match):
  with pytest.raises(ValueError, match=match):
    models.parse_order(spec)
  with pytest.raises(ValueError, match=match):  # and at build time
    models.CNN(features=(2,), order=spec).init(jax.random.key(0), jnp.ones((2, 8, 1)), train=False)


# One tiny architecture and two input shapes for all model tests: eager JAX
# compiles each primitive once per shape, so shared shapes keep this file fast.
TINY = dict(features=(4, 6), hidden=5, num_classes=3)
X1 = np.random.default_rng(0).standard_normal((4, 12, 2)).astype(np.float32)
X2 = np.random.default_rng(1).standard_normal((4, 8, 8, 2)).astype(np.float32)


def _build_and_run(model, x):
  """init (eval mode) + a train-mode apply + an eval apply."""
  variables = model.init(jax.random.key(0), x, train=False)
  y_train, updates = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
  )
  y_eval = model.apply(variables, x, train=False)
  return variables, updates, y_train, y_eval


@pytest.mark.parametrize("order", list(models.PUBLISHED_ORDER_LOSSES))
def test_every_brief_order_builds_in_1d_and_2d(order):
  # Traced, not run: eval_shape builds every layer, checks every shape and
  # costs ~0.1 s, where running each order eagerly costs ~3 s of compilation.
  # The layers' numerics are run by the tests below in the default order.
  for x in (X1, X2):
    model = models.CNN(**TINY, order=order, block_noise="dropout", block_noise_value=0.2)
    variables, updates, y_train, y_eval = jax.eval_shape(
      functools.partial(_build_and_run, model), x
    )
    assert y_train.shape == y_eval.shape == (4, 3)
    assert set(variables["batch_stats"]) == {"bn0", "bn1", "head_bn"}
    assert set(updates["batch_stats"]) == {"bn0", "bn1", "head_bn"}


def _noise_modules(model, x=X1):
  """Names of the noise submodules that ran in a train-mode call (traced, not run)."""

  def capture(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return model.apply(
      variables,
      x,
      train=True,
      rngs={"dropout": jax.random.key(1)},
      capture_intermediates=True,
      mutable=["batch_stats", "intermediates"],
    )[1]

  return {k for k in jax.eval_shape(capture, x)["intermediates"] if "noise" in k}


@pytest.mark.parametrize("cls", [models.CNN, models.MLP])
def test_noise_placement(cls):
  assert _noise_modules(cls(**TINY)) == set()
  assert _noise_modules(cls(**TINY, block_noise="uout", block_noise_value=0.1)) == {
    "noise0",
    "noise1",
  }
  assert _noise_modules(cls(**TINY, head_noise="uout", head_noise_value=0.1)) == {"head_noise"}
  _, _, y_train, y_eval = _build_and_run(
    cls(
      **TINY, block_noise="dropout", block_noise_value=0.5, head_noise="uout", head_noise_value=0.5
    ),
    X1,
  )
  assert bool(jnp.isfinite(y_train).all()) and not np.allclose(y_train, y_eval)
  if cls is models.CNN:  # an order without 'drop' has nowhere to put block noise
    assert (
      _noise_modules(
        cls(**TINY, order="conv-bn-act-pool", block_noise="dropout", block_noise_value=0.5)
      )
      == set()
    )


def test_eval_is_deterministic_and_needs_no_rngs():
  model = models.CNN(
    **TINY,
    block_noise="dropout",
    block_noise_value=0.3,
    head_noise="gaussian",
    head_noise_value=0.3,
  )
  variables = model.init(jax.random.key(0), X1, train=False)
  a, b = model.apply(variables, X1, train=False), model.apply(variables, X1, train=False)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="'dropout'"):
    model.apply(variables, X1, train=True, mutable=["batch_stats"])
  train_out = [
    model.apply(
      variables, X1, train=True, rngs={"dropout": jax.random.key(k)}, mutable=["batch_stats"]
    )[0]
    for k in (1, 2)
  ]
  assert not np.allclose(train_out[0], train_out[1])


@pytest.mark.parametrize("noise", sorted(models.NOISE_OPS))
def test_every_noise_op_in_blocks_and_head(noise):
  cls, field = models.NOISE_OPS[noise]
  assert field in cls.__dataclass_fields__
  value = models.DEFAULT_NOISE_VALUE[noise]
  head = "none" if noise in models.SPATIAL_NOISE else noise
  model = models.CNN(
    **TINY, block_noise=noise, block_noise_value=value, head_noise=head, head_noise_value=value
  )
  _, _, y_train, _ = _build_and_run(model, X1)
  assert bool(jnp.isfinite(y_train).all())
  assert jax.eval_shape(functools.partial(_build_and_run, model), X2)[2].shape == (4, 3)
  if noise in models.SPATIAL_NOISE:
    with pytest.raises(ValueError, match="spatial axes"):
      _build_and_run(models.CNN(**TINY, head_noise=noise, head_noise_value=value), X1)


def test_unknown_noise_raises():
  with pytest.raises(ValueError, match="unknown noise"):
    models.CNN(**TINY, block_noise="nope").init(jax.random.key(0), X1, train=False)


# ----------------------------------------------------------------------- training


def test_evaluate_batches_and_pads_exactly():
  model = models.CNN(**TINY)
  x = np.concatenate([X1, X1, X1[:2]])  # 10 rows: batches of 4 leave a ragged 2
  y = jnp.arange(10) % 3
  tx = training.make_optimizer(1e-3, 1, 1, 0.0)
  state = training.init_state(model, tx, jax.random.key(1), x)
  whole = training.evaluate(model, state, x, y, batch_size=10)
  padded = jax.jit(training.evaluate, static_argnums=(0, 4))(model, state, x, y, 4)
  np.testing.assert_allclose(padded["loss"], whole["loss"], rtol=1e-6)
  np.testing.assert_allclose(padded["acc"], whole["acc"])


def test_train_step_vmaps_over_seeds_and_traced_rates(mnist1d):
  x, y = mnist1d["x_train"][:64], mnist1d["y_train"][:64]
  tx = training.make_optimizer(3e-3, 1, 1, 1e-4)

  def one(seed, rate):
    model = models.default_cnn("mnist1d", 10, block_noise="dropout", block_noise_value=rate)
    state = training.init_state(model, tx, jax.random.key(seed), x)
    state, metrics = training.train_step(model, tx, state, x, y, jax.random.key(seed + 7))
    return state.step, metrics["loss"], training.evaluate(model, state, x, y)["loss"]

  steps, loss, eval_loss = jax.jit(jax.vmap(one))(jnp.arange(3), jnp.array([0.0, 0.2, 0.5]))
  np.testing.assert_array_equal(steps, [1, 1, 1])
  assert bool(jnp.isfinite(loss).all() and jnp.isfinite(eval_loss).all())
  assert len(set(np.asarray(loss).round(5).tolist())) == 3


def test_cli_quick_on_mnist1d(tmp_path):
  out = tmp_path / "metrics.json"
  metrics = train.main(["--quick", "--no-progress", "--noise", "uout", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["final"] == metrics["final"]
  assert saved["config"]["dataset"] == "mnist1d" and saved["config"]["noise_value"] == 0.1
  assert saved["noise_variance"] == pytest.approx(0.1**2 / 3)
  assert len(saved["history"]) == 2 and len(saved["step_loss"]) == 2 * (1024 // 128)
  assert saved["final"]["test_acc"] > CHANCE_MARGIN


def test_cli_quick_on_mock_mnist_2d(tmp_path):
  out = tmp_path / "metrics.json"
  with tfds.testing.mock_data(num_examples=64):
    metrics = train.main(
      [
        "--dataset",
        "mnist",
        "--quick",
        "--batch-size",
        "32",
        "--noise",
        "dropout",
        "--placement",
        "head",
        "--no-progress",
        "--out",
        str(out),
      ]
    )
  assert metrics["model"]["fields"]["head_noise"] == "dropout"
  assert metrics["model"]["fields"]["block_noise"] == "none"
  assert len(metrics["step_loss"]) == 2 * 2 and np.isfinite(metrics["step_loss"]).all()
  assert json.loads(out.read_text())["config"]["dataset"] == "mnist"


_DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    import train
    assert len(jax.devices()) == 4, jax.devices()
    out = {}
    for devices in (1, 4):
      args = train.parse_args(["--devices", str(devices), "--epochs", "2", "--batch-size", "64",
                               "--limit-train", "256", "--limit-test", "128", "--seed", "3",
                               "--noise", "dropout", "--noise-value", "0.2", "--no-progress"])
      metrics, result = train.run(args)
      stats = jax.tree.leaves(jax.device_get(result["state"].batch_stats))
      out[devices] = {"step_loss": metrics["step_loss"],
                      "epoch_loss": [h["train_batch_loss"] for h in metrics["history"]],
                      "test_loss": metrics["final"]["test_loss"],
                      "batch_stats": [np.asarray(s).ravel().tolist() for s in stats],
                      "devices": len(result["state"].params["classifier"]["kernel"].devices())}
    print("RESULT" + json.dumps(out))
""")


DATA_PARALLEL_TEST = "test_data_parallel_matches_single_device"


@pytest.fixture(scope="module", autouse=True)
def data_parallel_run(request):
  """The data-parallel subprocess, started before this file's first test.

  It needs its own process (the device count is fixed at JAX start-up) and
  ~20 s, mostly XLA compilation; started early, it runs on the second core
  while the other tests run. Not started when that test is not selected.
  """
  if not any(item.name == DATA_PARALLEL_TEST for item in request.session.items):
    yield None
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.Popen(
    [sys.executable, "-c", _DATA_PARALLEL_SCRIPT, str(EXAMPLES)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env=env,
  )
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


def test_data_parallel_matches_single_device(data_parallel_run):
  stdout, stderr = data_parallel_run.communicate(timeout=300)
  assert data_parallel_run.returncode == 0, stderr[-3000:]
  line = next(row for row in stdout.splitlines() if row.startswith("RESULT"))
  result = json.loads(line[len("RESULT") :])
  one, four = result["1"], result["4"]
  assert one["devices"] == 1 and four["devices"] == 4  # replicated over the mesh
  assert len(one["step_loss"]) == 2 * (256 // 64)
  np.testing.assert_allclose(four["step_loss"], one["step_loss"], rtol=1e-4)
  np.testing.assert_allclose(four["epoch_loss"], one["epoch_loss"], rtol=1e-4)
  np.testing.assert_allclose(four["test_loss"], one["test_loss"], rtol=1e-4)
  for a, b in zip(four["batch_stats"], one["batch_stats"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
