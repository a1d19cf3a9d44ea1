"""Tests of regjax.diagnostics on Flax NNX models.

Input N(c, v) -> multiplicative noise (mean 1, variance s2) -> BatchNorm:
Var_train = v + s2 * (c**2 + v), Var_eval = v, so delta = v / (v + s2 * (c**2 + v)).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import LinenNet
from flax import nnx

import regjax.nnx as rx
from regjax import diagnostics

C, V = 1.0, 2.0  # input mean and variance


BATCH, FEATURES = 1024, 128


STEPS, MOMENTUM = 200, 0.9


NOISES = {  # name -> (module factory, s2)
  "dropout": (lambda rngs: rx.Dropout(0.5, rngs=rngs), 1.0),
  "gaussian_dropout": (lambda rngs: rx.GaussianDropout(0.5, rngs=rngs), 1.0),
  "uout": (lambda rngs: rx.Uout(1.0, rngs=rngs), 1.0 / 3.0),
}


class NoiseIntoBN(nnx.Module):
  def __init__(self, noise: str, rngs: nnx.Rngs):
    self.noise = NOISES[noise][0](rngs)
    self.bn = rx.BatchNorm(FEATURES, momentum=MOMENTUM, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.noise(x))


def _data(key, n=BATCH):
  return C + math.sqrt(V) * jax.random.normal(key, (n, FEATURES))


def _train(model):
  """Runs STEPS train-mode forward passes in one jit-compiled scan (only the BN
  statistics and the dropout stream change; there is nothing to learn)."""
  graphdef, state = nnx.split(model)

  def body(state, key):
    module = nnx.merge(graphdef, state)
    module(_data(key))
    return nnx.state(module), None

  keys = jax.random.split(jax.random.key(1), STEPS)
  state, _ = jax.jit(lambda s, k: jax.lax.scan(body, s, k))(state, keys)
  nnx.update(model, state)
  return model


def _plain(value):
  is_key = jnp.issubdtype(value.dtype, jax.dtypes.prng_key)
  return jax.random.key_data(value) if is_key else value


def _snapshot(model):
  """Every variable's value and every mode attribute, to check the model is untouched."""
  values = {
    path: np.array(_plain(v.get_value())) for path, v in nnx.to_flat_state(nnx.state(model))
  }
  modes = {
    "/".join(map(str, path)): (
      getattr(m, "deterministic", None),
      getattr(m, "use_running_average", None),
    )
    for path, m in nnx.iter_modules(model)
  }
  return values, modes


def _assert_same(snapshot, model):
  values, modes = _snapshot(model)
  assert modes == snapshot[1]
  assert values.keys() == snapshot[0].keys()
  for path in values:
    np.testing.assert_array_equal(values[path], snapshot[0][path], err_msg=str(path))


@pytest.fixture(scope="module", params=sorted(NOISES))
def trained(request):
  model = _train(NoiseIntoBN(request.param, nnx.Rngs(0, dropout=2)))
  batches = [_data(jax.random.key(100 + i)) for i in range(8)]
  return request.param, model, batches


def test_measured_shift_matches_analytic(trained):
  noise, model, batches = trained
  s2 = NOISES[noise][1]
  expected = V / (V + s2 * (C**2 + V))
  before = _snapshot(model)
  shifts = diagnostics.variance_shift(model, batches)
  _assert_same(before, model)  # train mode, stats and dropout stream all kept
  assert not model.noise.deterministic and not model.bn.use_running_average
  assert list(shifts) == ["bn"]
  layer = shifts["bn"]
  assert layer.count == 8 * BATCH
  # Statistical error ~0.3 % (EMA over 1024-sample batches, 128 features).
  assert abs(layer.delta.mean() / expected - 1) < 0.02
  np.testing.assert_allclose(layer.real_var.mean(), V, rtol=0.02)
  np.testing.assert_allclose(layer.moving_var.mean(), V + s2 * (C**2 + V), rtol=0.02)
  np.testing.assert_array_equal(layer.moving_var, np.asarray(model.bn.var[...], np.float64))
  assert layer.max_shift >= layer.mean_shift >= 1.0


def test_recalibration_brings_running_var_to_eval_var(trained):
  noise, model, batches = trained
  before = _snapshot(model)
  new_stats = diagnostics.recalibrate_batch_stats(model, batches)
  _assert_same(before, model)
  assert isinstance(new_stats, nnx.State)
  old_stats = nnx.state(model, nnx.BatchStat)
  assert jax.tree.structure(new_stats) == jax.tree.structure(old_stats)
  assert jax.tree.map(lambda a: a.dtype, new_stats) == jax.tree.map(lambda a: a.dtype, old_stats)
  # Biased batch variance: E = V * (n-1)/n.
  np.testing.assert_allclose(
    np.mean(new_stats["bn"]["var"][...]), V * (BATCH - 1) / BATCH, rtol=0.01
  )
  np.testing.assert_allclose(np.mean(new_stats["bn"]["mean"][...]), C, atol=0.01)
  # The result is the user's to apply; new Variables, so applying it to a copy
  # leaves the model as it was.
  recalibrated = nnx.clone(model)
  nnx.update(recalibrated, new_stats)
  _assert_same(before, model)
  after = diagnostics.variance_shift(recalibrated, batches)["bn"]
  assert abs(after.delta.mean() - 1) < 0.01
  # Eval outputs now have unit variance again, as in training.
  out = nnx.view(recalibrated, deterministic=True, use_running_average=True)(
    _data(jax.random.key(7), 4096)
  )
  np.testing.assert_allclose(float(jnp.var(out, axis=0).mean()), 1.0, rtol=0.02)


class Block(nnx.Module):
  def __init__(self, din, rngs):
    self.dense = nnx.Linear(din, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)  # flax's own BN
    self.drop = rx.Dropout(0.3, rngs=rngs)

  def __call__(self, x):
    return self.drop(nnx.relu(self.bn(self.dense(x))))


class Deep(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([Block(5, rngs), Block(16, rngs)])
    self.head = nnx.Linear(16, 8, rngs=rngs)
    self.bn = rx.BatchNorm(8, unbiased_running_var=True, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.bn(self.head(x))


def _affine(x, linear):
  return x @ np.asarray(linear.kernel[...], np.float64) + np.asarray(linear.bias[...], np.float64)


def test_nested_paths_flax_bn_and_exact_real_statistics():
  model = Deep(nnx.Rngs(1, dropout=2))
  x = jax.random.normal(jax.random.key(0), (256, 5)) * 3 + 1
  model(x)  # one train step, so the running statistics differ from their init
  before = _snapshot(model)
  batches = [(x[:100], None), (x[100:], None)]  # unequal batches, (x, y) tuples
  shifts = diagnostics.variance_shift(model, batches)
  _assert_same(before, model)
  assert list(shifts) == ["blocks/0/bn", "blocks/1/bn", "bn"]  # call order
  # The first BN's input is the Dense output: check against float64 NumPy.
  h = _affine(np.asarray(x, np.float64), model.blocks[0].dense)
  first = shifts["blocks/0/bn"]
  np.testing.assert_allclose(first.real_mean, h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(first.real_var, h.var(0), rtol=1e-5)
  np.testing.assert_array_equal(first.moving_var, np.asarray(model.blocks[0].bn.var[...]))
  assert first.count == 256

  # Recalibration follows each layer's convention: the last BN stores unbiased
  # variances; every BN normalizes with its batch statistics, dropout is off.
  new = diagnostics.recalibrate_batch_stats(model, [x])
  _assert_same(before, model)
  stats = []
  for block in model.blocks:
    stats.append((h.mean(0), h.var(0)))
    bn = block.bn
    hidden = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(
      bn.bias[...]
    )
    h = _affine(
      np.maximum(hidden, 0), model.blocks[1].dense if block is model.blocks[0] else model.head
    )
  for i, (mean, var) in enumerate(stats):
    np.testing.assert_allclose(np.asarray(new["blocks"][i]["bn"]["var"][...]), var, rtol=1e-4)
    np.testing.assert_allclose(
      np.asarray(new["blocks"][i]["bn"]["mean"][...]), mean, rtol=1e-4, atol=1e-5
    )
  np.testing.assert_allclose(np.asarray(new["bn"]["var"][...]), h.var(0, ddof=1), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(new["bn"]["mean"][...]), h.mean(0), rtol=1e-4, atol=1e-5)


def test_recalibration_pools_every_sample_of_every_batch_and_call():
  # One BN called twice per forward pass: the statistics are those of all its inputs.
  class Twice(nnx.Module):
    def __init__(self, rngs):
      self.bn = rx.BatchNorm(FEATURES, rngs=rngs)

    def __call__(self, x):
      self.bn(2.0 * x)
      return self.bn(x)

  model = Twice(nnx.Rngs(0))
  batches = [_data(jax.random.key(i), 64) * (i + 1) for i in range(3)]
  new = diagnostics.recalibrate_batch_stats(model, batches)
  inputs = [np.asarray(b, np.float64) * k for b in batches for k in (2.0, 1.0)]
  pooled = np.concatenate(inputs)
  np.testing.assert_allclose(
    np.asarray(new["bn"]["mean"][...]), pooled.mean(0), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(new["bn"]["var"][...]), pooled.var(0), rtol=1e-5)
  shift = diagnostics.variance_shift(model, batches)["bn"]
  assert shift.count == 2 * 3 * 64
  np.testing.assert_allclose(shift.real_var, np.concatenate(inputs).var(0), rtol=1e-5)


def test_a_bare_batch_norm_call_and_bn_types():
  bn = nnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))  # no mode set
  x = jax.random.normal(jax.random.key(0), (50, 4, 3)) + 5.0
  new = diagnostics.recalibrate_batch_stats(
    bn, [{"x": x}], call=lambda m, v: m(v), bn_types=nnx.BatchNorm
  )
  np.testing.assert_allclose(
    np.asarray(new["var"][...]), np.asarray(x, np.float64).reshape(-1, 3).var(0), rtol=1e-5
  )
  assert list(diagnostics.variance_shift(bn, [x], bn_types=[nnx.BatchNorm])) == ["<root>"]
  assert bn.use_running_average is None


def test_the_capture_compiles_once_per_architecture_and_shape():
  traces = []

  def call(model, x):
    traces.append(x.shape)  # runs only while jit traces
    return model(x)

  batches = [_data(jax.random.key(i), 32) for i in range(3)]
  for seed in range(3):  # a fresh model of the same architecture per run
    model = NoiseIntoBN("dropout", nnx.Rngs(seed, dropout=seed))
    diagnostics.variance_shift(model, batches, call=call)
  assert traces == [(32, FEATURES)]
  diagnostics.variance_shift(model, [_data(jax.random.key(0), 16)], call=call)
  assert traces == [(32, FEATURES), (16, FEATURES)]


def test_errors_are_clear():
  model = NoiseIntoBN("dropout", nnx.Rngs(0))
  x = jnp.ones((4, FEATURES))
  with pytest.raises(ValueError, match="no BatchNorm call was seen"):
    diagnostics.variance_shift(model, [])
  with pytest.raises(ValueError, match="no BatchNorm call was seen"):
    diagnostics.recalibrate_batch_stats(model, [x], call=lambda m, v: m.noise(v))
  with pytest.raises(ValueError, match="no BatchNorm module"):
    diagnostics.variance_shift(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), [jnp.ones((2, 3))])
  with pytest.raises(ValueError, match="no BatchNorm module"):
    diagnostics.variance_shift(model, [x], bn_types=(nnx.BatchNorm,))
  with pytest.raises(ValueError, match="under 'x'"):
    diagnostics.variance_shift(model, [{"image": x}])
  with pytest.raises(TypeError, match="no `variables`"):
    diagnostics.variance_shift(model, nnx.state(model), [x])
  with pytest.raises(TypeError, match="`batches` is missing"):
    diagnostics.recalibrate_batch_stats(model)
  with pytest.raises(TypeError, match="`call` must be a function"):
    diagnostics.variance_shift(model, [x], call="model")
  with pytest.raises(TypeError, match="`bn_types` must be a class"):
    diagnostics.variance_shift(model, [x], bn_types=["BatchNorm"])
  with pytest.raises(TypeError, match="`call` is for nnx.Module"):
    diagnostics.variance_shift(lambda v, x: x, {}, [x], call=lambda m, v: v)
  with pytest.raises(TypeError, match="not its apply function"):
    diagnostics.variance_shift(LinenNet(), {}, [x])
  with pytest.raises(TypeError, match="apply function or an nnx.Module"):
    diagnostics.recalibrate_batch_stats(nnx.state(model), [x])
  with pytest.raises(TypeError, match="missing `batches`"):
    diagnostics.variance_shift(lambda v, x: x, {})
